// What the page keeps, per tab, in sessionStorage: the token (moved there from the URL
// fragment), the websocket URL, the focused job, and each room's cursor. A job room's cursor is
// saved together with the timeline it numbers, in one entry, so a reload never pairs a cursor
// with events it does not cover (no duplicate, no gap).

const PREFIX = "jobspine.";

function read(key) {
  try {
    const raw = sessionStorage.getItem(PREFIX + key);
    return raw === null ? null : JSON.parse(raw);
  } catch {
    return null;
  }
}

function write(key, value) {
  try {
    if (value === null) sessionStorage.removeItem(PREFIX + key);
    else sessionStorage.setItem(PREFIX + key, JSON.stringify(value));
    return true;
  } catch {
    return false; // storage full or disabled: the page works, a reload starts afresh
  }
}

// The token handed over in the URL fragment (#token=...): moved to sessionStorage and removed
// from the address bar (even when empty), so it stays out of history, bookmarks and any later
// request. A token other than the tab's own starts the tab afresh: nothing of the user signed
// in before (focused job, saved timeline, cursors) is shown to the next one.
// Returns whether the tab's token changed.
export function takeFragmentToken() {
  const fragment = new URLSearchParams(location.hash.slice(1));
  if (!fragment.has("token")) return false;
  const token = fragment.get("token").trim();
  history.replaceState(null, "", location.pathname + location.search);
  if (!token || token === read("token")) return false;
  session.signOut();
  write("token", token);
  return true;
}

export const session = {
  token: () => read("token"),
  setToken: (token) => write("token", token),
  url: () => read("url"),
  setUrl: (url) => write("url", url),
  focus: () => read("focus"),
  setFocus: (jobId) => write("focus", jobId),
  view: () => read("view"),
  setView: (view) => write("view", view),
  dismissed: () => read("dismissed") || [],
  setDismissed: (keys) => write("dismissed", keys.slice(-200)),
  signOut: () => {
    for (const key of Object.keys(sessionStorage)) {
      if (key.startsWith(PREFIX)) sessionStorage.removeItem(key);
    }
  },
  userCursor: (room) => read(`cursor.${room}`),
  setUserCursor: (room, cursor) => write(`cursor.${room}`, cursor),
  // {jobId, cursor, events, resets} of the focused job's timeline, or null.
  timeline: (jobId) => {
    const saved = read("timeline");
    return saved && saved.jobId === jobId ? saved : null;
  },
  setTimeline: (timeline) => {
    if (!write("timeline", timeline)) write("timeline", null);
  },
};
