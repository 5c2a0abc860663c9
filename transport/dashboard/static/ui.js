// DOM and formatting helpers. Text is always set as text (never as HTML): job data is the
// user's, and nothing of it is ever parsed as markup.

export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (key === "class") el.className = value;
    else if (key in el && !key.includes("-")) el[key] = value;
    else el.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

export function replace(el, ...children) {
  el.replaceChildren(...children.flat(Infinity).filter((c) => c !== null && c !== undefined && c !== false));
}

export const FINAL = new Set(["completed", "failed", "cancelled"]);

export function isOmitted(value) {
  return value !== null && typeof value === "object" && !Array.isArray(value) && "$omitted" in value;
}

// Right-to-left letters and the characters that reorder text (overrides, embeddings, isolates,
// marks).
const BIDI = /[\u0590-\u08FF\uFB1D-\uFDFF\uFE70-\uFEFE\u200F\u202A-\u202E\u2066-\u2069\u061C\u{10800}-\u{10FFF}\u{1E800}-\u{1EFFF}]/u;

// A user's text to be shown among the page's own words: when it holds anything that reorders
// text, it is set in an isolate (FSI ... PDI), so that an override in a step label, an error
// or a user id reorders only itself and never the words around it.
export function iso(value) {
  const text = String(value ?? "");
  return BIDI.test(text) ? `\u2068${text}\u2069` : text;
}

// One line of JSON, at most `limit` characters, isolated (iso); an omitted payload says its
// size; no value (null: a job with no step yet) is an empty string, not "null". A cut never
// splits a character in two (an emoji's surrogate pair).
export function brief(value, limit = 160) {
  if (value === undefined || value === null) return "";
  if (isOmitted(value)) return `[left out: ${value.size} bytes]`;
  let text = typeof value === "string" ? value : JSON.stringify(value);
  if (text === undefined) text = String(value);
  if (text.length > limit) {
    let end = limit - 1;
    if (/[\uD800-\uDBFF]/.test(text[end - 1])) end -= 1;
    text = `${text.slice(0, end)}…`;
  }
  return iso(text);
}

export function shortId(id) {
  return id ? iso(id.slice(-8)) : "";
}

export function age(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "–";
  const s = Math.max(0, seconds);
  if (s < 60) return `${s.toFixed(s < 10 ? 1 : 0)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min`;
  if (s < 86400) return `${(s / 3600).toFixed(1)} h`;
  return `${(s / 86400).toFixed(1)} d`;
}

export function clock(unix) {
  if (!unix) return "–";
  const d = new Date(unix * 1000);
  const pad = (n, w = 2) => String(n).padStart(w, "0");
  return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}.${pad(d.getMilliseconds(), 3)}`;
}

export function bytes(n) {
  if (n === null || n === undefined) return "–";
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KiB`;
  return `${(n / 1024 / 1024).toFixed(1)} MiB`;
}

export function now() {
  return Date.now() / 1000;
}
