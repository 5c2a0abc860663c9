// The jobspine dashboard: a client of the websocket protocol (transport/PROTOCOL.md) and
// nothing else. Views: sign-in, StatusBar, the job list (filters, submit), the focused job
// (actions, restart editor, ErrorBanner, TaskTimeline, DebugPanel), RecoveryToast, admin.

import { Connection } from "./conn.js";
import { session, takeFragmentToken } from "./store.js";
import { FINAL, age, brief, bytes, clock, h, isOmitted, iso, now, replace, shortId } from "./ui.js";

const STATES = ["created", "running", "paused", "completed", "failed", "cancelled"];
// Old finished jobs leave the live list past this many, oldest first (bounded memory).
const MAX_FINISHED = 50;
const LIST_LIMIT = 100;
// The admin view asks for this many jobs, newest first (the protocol's `list` has no paging).
const ADMIN_LIMIT = 200;
const TOAST_REASONS = new Set(["recovery", "shutdown", "store_unavailable"]);
const CHECKPOINT_LIMIT = 1024 * 1024;
// The focused job's timeline keeps this many newest events (bounded memory and storage).
const MAX_TIMELINE = 1000;
const TEMPLATES = {
  research: { query: "structured concurrency", depth: 30 },
  trade: { symbol: "ACME", side: "buy", quantity: 100, slices: 10 },
  analysis: { content: "jobspine runs long user jobs under supervision.", chunk_size: 8 },
};

const S = {
  conn: null,
  me: null,
  status: { state: "signed-out" },
  jobs: new Map(),
  filters: { state: "", kind: "", text: "" },
  focus: session.focus(),
  timeline: null, // {jobId, cursor, events, resets}
  details: null, // {jobId, recovery, checkpoint, error}
  notice: null, // {kind: "error" | "info", text}
  view: session.view() || "jobs",
  admin: { user: "", state: "", jobs: [], stats: null, error: null, at: null },
  editing: false,
};

const $ = (id) => document.getElementById(id);

// -- sign-in -------------------------------------------------------------------------------

async function defaultUrl() {
  try {
    const reply = await fetch("/dashboard.json", { cache: "no-store" });
    const config = await reply.json();
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    return `${scheme}://${location.hostname}:${config.websocket_port}/`;
  } catch {
    return "ws://127.0.0.1:8765/";
  }
}

async function showSignIn(message) {
  $("app").hidden = true;
  $("signin").hidden = false;
  $("signin-message").textContent = message || "";
  $("signin-message").hidden = !message;
  $("signin-url").value = session.url() || (await defaultUrl());
  $("signin-token").focus();
}

function signIn(event) {
  event.preventDefault();
  const token = $("signin-token").value.trim();
  if (!token) return;
  session.setToken(token);
  session.setUrl($("signin-url").value.trim());
  $("signin-token").value = "";
  start();
}

// Forgets everything of the signed-in user, in memory and in the tab's storage, so the next
// user of this tab sees nothing of theirs.
function signOut(message) {
  if (S.conn) S.conn.stop();
  clearTimeout(adminTimer);
  Object.assign(S, {
    conn: null, me: null, status: { state: "signed-out" }, focus: null, timeline: null,
    details: null, notice: null, view: "jobs", editing: false,
    admin: { user: "", state: "", jobs: [], stats: null, error: null, at: null },
  });
  S.jobs.clear();
  rows.clear();
  adminRows.clear();
  for (const id of ["jobs-body", "timeline-body", "admin-body", "admin-stats", "toasts"]) replace($(id));
  session.signOut();
  showSignIn(message);
}

// -- connection ----------------------------------------------------------------------------

async function start() {
  const token = session.token();
  if (!token) {
    showSignIn();
    return;
  }
  const url = session.url() || (await defaultUrl());
  session.setUrl(url);
  $("signin").hidden = true;
  $("app").hidden = false;
  restoreTimeline();
  S.conn = new Connection(url, token, {
    status: (info) => {
      S.status = info;
      render();
    },
    hello: onHello,
    event: onEvent,
    skipped: onSkipped,
    reset: onReset,
    roomError: (room, err) => {
      if (S.timeline && room === `job:${S.timeline.jobId}`) {
        if (err.code === "unknown_job") forgetFocused(err);
        else S.notice = { kind: "error", text: `${iso(room)}: ${iso(err.message)}` };
        render();
      }
    },
    signedOut: (code, reason) => {
      const why = code === 4004 ? "Your token has expired" : `The server refused the token (${reason})`;
      signOut(`${why}. Paste a new one (jobspine token --user NAME).`);
    },
    cursor: (room) => {
      if (room.startsWith("user:")) return session.userCursor(room);
      const saved = S.timeline && room === `job:${S.timeline.jobId}` ? S.timeline.cursor : null;
      if (saved) {
        // Kept from before a reload: the room continues after it, with no event read twice.
        S.timeline.continuedFrom = saved.seq;
        renderTimeline();
      }
      return saved || { epoch: S.conn.epoch, seq: 0 };
    },
    saveCursor: (room, cursor) => {
      if (room.startsWith("user:")) session.setUserCursor(room, cursor);
      else if (S.timeline && room === `job:${S.timeline.jobId}`) {
        S.timeline.cursor = cursor;
        saveTimelineSoon();
      }
    },
  });
  S.conn.start();
  render();
}

async function onHello(me) {
  S.me = me;
  S.conn.join(`user:${me.user_id}`);
  if (S.focus) S.conn.join(`job:${S.focus}`);
  render();
  try {
    mergeJobs(await S.conn.request("list", { limit: LIST_LIMIT }));
  } catch (err) {
    S.notice = { kind: "error", text: `could not list jobs: ${iso(err.message)}` };
  }
  if (S.focus && !S.jobs.has(S.focus)) await fetchJob(S.focus);
  refreshDetails();
  if (S.view === "admin") refreshAdmin();
  render();
}

// Shows a notice; one said within the last few seconds stays in front of it (a reconnection
// may have several things to say at once, such as a reset list and a closed job).
function tell(kind, text) {
  const recent = S.notice && now() - S.notice.at < 3;
  S.notice = recent
    ? { kind: S.notice.kind === "error" ? "error" : kind, text: `${S.notice.text}. ${text}`, at: S.notice.at }
    : { kind, text, at: now() };
}

// -- jobs ----------------------------------------------------------------------------------

// A job from a reply or a snapshot replaces the one held unless that one is newer (its `seq`:
// events may have overtaken the reply).
function mergeJobs(jobs) {
  for (const job of jobs) {
    const held = S.jobs.get(job.id);
    if (!held || job.seq >= held.seq) S.jobs.set(job.id, job);
  }
  dropOldFinished();
  render();
}

function dropOldFinished() {
  const finished = [...S.jobs.values()].filter((j) => FINAL.has(j.state) && j.id !== S.focus);
  if (finished.length <= MAX_FINISHED) return;
  finished.sort((a, b) => (a.updated_at || 0) - (b.updated_at || 0));
  for (const job of finished.slice(0, finished.length - MAX_FINISHED)) S.jobs.delete(job.id);
}

// Applies an event to the job it is about; event types and fields this page does not know
// still move the job's state and show in the timeline.
function applyEvent(e) {
  if (e.type === "deleted") {
    S.jobs.delete(e.job_id);
    return;
  }
  let job = S.jobs.get(e.job_id);
  if (!job) {
    if (e.type !== "created") {
      fetchJob(e.job_id);
      return;
    }
    job = { id: e.job_id, user_id: e.user_id, kind: e.data.kind, input: e.data.input, created_at: e.at, progress: 0, step: null, seq: 0, attempt: 0 };
    S.jobs.set(e.job_id, job);
  }
  if (e.seq <= job.seq) return;
  job.seq = e.seq;
  job.updated_at = e.at;
  if (e.state) job.state = e.state;
  const d = e.data || {};
  switch (e.type) {
    case "created":
      for (const [key, value] of Object.entries(d)) if (!(key in job)) job[key] = value;
      break;
    case "progress":
      job.progress = d.progress;
      job.step = d.step;
      break;
    case "started":
    case "resumed":
      job.attempt = d.attempt ?? job.attempt;
      job.pause_reason = null;
      if (d.owner !== undefined) job.owner = d.owner;
      break;
    case "checkpoint":
      job.checkpoint_version = d.version;
      job.checkpoint_at = e.at;
      break;
    case "completed":
      job.result = d.result;
      break;
    case "failed":
      job.error = d.error;
      if (d.failed_attempts !== undefined) job.failed_attempts = d.failed_attempts;
      break;
    case "paused":
      job.pause_reason = d.reason;
      break;
    case "recovery":
      job.pause_reason = "recovery";
      job.recovery_attempts = d.recovery_attempts;
      break;
    case "restarted":
      Object.assign(job, { input: d.input, progress: 0, step: null, result: null, error: null, checkpoint_version: 0, pause_reason: null });
      break;
    case "retrying":
      Object.assign(job, { error: d.error, failed_attempts: d.failed_attempts, run_at: d.next_attempt_at });
      break;
    default:
      break;
  }
}

const fetching = new Set();
async function fetchJob(jobId) {
  if (fetching.has(jobId)) return;
  fetching.add(jobId);
  try {
    mergeJobs([await S.conn.request("get", { job_id: jobId })]);
  } catch (err) {
    // Gone or not ours: nothing to show, and the focused job is closed saying why.
    if (jobId === S.focus && (err.code === "unknown_job" || err.code === "forbidden")) forgetFocused(err);
  } finally {
    fetching.delete(jobId);
  }
}

// The focused job is not on this server (removed by retention, or the server now runs on
// another database): its panel and timeline close, since nothing of them can be continued.
function forgetFocused(err) {
  const jobId = S.focus;
  if (!jobId) return;
  S.jobs.delete(jobId);
  focusJob(null);
  tell("error", `job ${jobId} is no longer on this server (${iso(err.message)}): its timeline was closed`);
  render();
}

function onEvent(e, rooms) {
  applyEvent(e);
  if (S.timeline && rooms.includes(`job:${S.timeline.jobId}`)) {
    appendTimelineRow(e);
    if (e.type !== "progress") refreshDetailsSoon();
  }
  dropOldFinished();
  render();
}

function onSkipped(marker, rooms) {
  if (S.timeline && rooms.includes(`job:${S.timeline.jobId}`)) {
    const entry = { skipped: true, seq: marker.seq, count: marker.count, job_id: marker.job_id };
    appendTimelineRow(entry);
  }
}

function onReset(room, result) {
  const reason = result.reset_reason;
  if (room.startsWith("user:")) {
    // The jobs held are of another database, or some were removed: none of them can be
    // trusted, the list is the snapshot's (the focused job is fetched again if not in it).
    S.jobs.clear();
    mergeJobs(result.snapshot ? result.snapshot.jobs : []);
    if (S.focus && !S.jobs.has(S.focus)) fetchJob(S.focus);
    tell("info", `job list reset: ${reason}`);
  } else if (S.timeline && room === `job:${S.timeline.jobId}`) {
    // The timeline held events of another database or numbers beyond the head: it starts
    // again from the durable log, saying why.
    if (result.snapshot) mergeJobs([result.snapshot.job]);
    S.timeline.resets.push({ at: now(), reason });
    S.timeline.events = [];
    S.timeline.dropped = 0;
    S.timeline.cursor = null;
    saveTimelineSoon();
    renderTimeline(true);
    S.conn.resubscribe(room, { epoch: result.epoch, seq: 0 });
  }
  render();
}

// -- the focused job and its timeline --------------------------------------------------------

function restoreTimeline() {
  S.timeline = S.focus ? session.timeline(S.focus) || newTimeline(S.focus) : null;
  renderTimeline(true);
}

function newTimeline(jobId) {
  return { jobId, cursor: null, events: [], resets: [] };
}

let saveTimer = null;
function saveTimelineSoon() {
  if (saveTimer === null) saveTimer = setTimeout(saveTimeline, 250);
}

function saveTimeline() {
  clearTimeout(saveTimer);
  saveTimer = null;
  if (S.timeline && S.timeline.cursor) {
    const { jobId, cursor, events, resets, dropped } = S.timeline;
    session.setTimeline({ jobId, cursor, events, resets, dropped });
  }
}

function focusJob(jobId) {
  if (jobId === S.focus) return;
  if (S.focus && S.conn) S.conn.leave(`job:${S.focus}`);
  S.focus = jobId;
  session.setFocus(jobId);
  S.timeline = jobId ? newTimeline(jobId) : null;
  session.setTimeline(null);
  S.details = null;
  S.editing = false;
  renderTimeline(true);
  if (jobId && S.conn) {
    S.conn.join(`job:${jobId}`);
    if (!S.jobs.has(jobId)) fetchJob(jobId);
    refreshDetails();
  }
  render();
  if (jobId) $("detail").focus();
}

// At most one refresh per 300 ms however fast checkpoints come (a throttle, not a debounce:
// a job checkpointing every 200 ms would otherwise never be refreshed).
let detailsTimer = null;
function refreshDetailsSoon() {
  if (detailsTimer !== null) return;
  detailsTimer = setTimeout(() => {
    detailsTimer = null;
    refreshDetails();
  }, 300);
}

async function refreshDetails() {
  const jobId = S.focus;
  if (!jobId || !S.conn || S.conn.state !== "live") return;
  const details = { jobId, recovery: null, checkpoint: null, error: null };
  try {
    [details.recovery, details.checkpoint] = await Promise.all([
      S.conn.request("recovery_options", { job_id: jobId }),
      S.conn.request("checkpoint_details", { job_id: jobId }),
    ]);
  } catch (err) {
    details.error = iso(err.message);
  }
  if (S.focus === jobId) {
    S.details = details;
    render();
  }
}

// -- actions -------------------------------------------------------------------------------

async function act(op, fields, what) {
  try {
    const job = await S.conn.request(op, fields);
    if (job && job.id) mergeJobs([job]);
    S.notice = { kind: "info", text: what(job) };
    refreshDetails();
    return job;
  } catch (err) {
    S.notice = { kind: "error", text: `${op} refused: ${iso(err.message)}` };
    return null;
  } finally {
    render();
  }
}

async function submitJob(event) {
  event.preventDefault();
  const kind = $("submit-kind").value.trim();
  let input;
  try {
    input = JSON.parse($("submit-input").value);
  } catch (err) {
    S.notice = { kind: "error", text: `the input is not JSON: ${err.message}` };
    render();
    return;
  }
  const job = await act("create", { kind, input }, (j) => `created ${iso(j.kind)} job ${j.id}`);
  if (job) focusJob(job.id);
}

async function restartJob(event) {
  event.preventDefault();
  let modifications;
  try {
    modifications = JSON.parse($("restart-mods").value || "{}");
  } catch (err) {
    S.notice = { kind: "error", text: `modifications are not JSON: ${err.message}` };
    render();
    return;
  }
  if (modifications === null || typeof modifications !== "object" || Array.isArray(modifications)) {
    S.notice = { kind: "error", text: "modifications must be a JSON object (merged into the input)" };
    render();
    return;
  }
  const job = await act("restart", { job_id: S.focus, modifications }, (j) => `restarted ${j.id}`);
  if (job) S.editing = false;
  render();
}

function dismissToast(key) {
  session.setDismissed([...session.dismissed(), key]);
  render();
}

// -- admin ---------------------------------------------------------------------------------

let adminTimer = null;
async function refreshAdmin() {
  clearTimeout(adminTimer);
  if (S.view !== "admin" || !S.me || !S.me.admin) return;
  adminTimer = setTimeout(refreshAdmin, 5000);
  if (!S.conn || S.conn.state !== "live") return;
  const fields = { limit: ADMIN_LIMIT };
  if (S.admin.user) fields.user_id = S.admin.user;
  if (S.admin.state) fields.state = S.admin.state;
  try {
    const [stats, jobs] = await Promise.all([S.conn.request("stats"), S.conn.request("list", fields)]);
    Object.assign(S.admin, { stats, jobs, error: null, at: now() });
  } catch (err) {
    S.admin.error = iso(err.message);
  }
  render();
}

function setView(view) {
  S.view = view;
  session.setView(view);
  if (view === "admin") refreshAdmin();
  render();
}

// -- rendering -----------------------------------------------------------------------------

let frame = null;
function render() {
  if (frame === null) frame = requestAnimationFrame(draw);
}

function draw() {
  frame = null;
  if (!S.conn) return;
  if (S.view === "admin" && !(S.me && S.me.admin)) S.view = "jobs";
  drawStatusBar();
  drawNav();
  drawNotice();
  $("view-jobs").hidden = S.view !== "jobs";
  $("view-admin").hidden = S.view !== "admin";
  if (S.view === "jobs") {
    drawList();
    drawDetail();
  } else drawAdmin();
  drawToasts();
}

function drawStatusBar() {
  const st = S.status;
  let text;
  if (st.state === "live") text = "live";
  else if (st.state === "connecting") text = "connecting…";
  else if (st.state === "lost") {
    const seconds = Math.max(0, (st.retryAt - Date.now()) / 1000);
    const why = st.lastClose && st.lastClose.code ? ` (close ${st.lastClose.code})` : "";
    text = `connection lost${why}: ${st.trying ? "reconnecting now…" : `reconnecting in ${seconds.toFixed(1)} s`}`;
  } else text = st.state;
  $("conn-state").textContent = text;
  $("statusbar").dataset.state = st.state;
  $("reconnect").disabled = Boolean(st.trying);
  $("reconnect").hidden = st.state !== "lost";
  const me = S.me;
  $("who").textContent = me ? `${iso(me.user_id)}${me.admin ? " (admin)" : ""}, token valid ${age(me.expires_at - now())}` : "";
  const job = S.focus && S.jobs.get(S.focus);
  $("focused").textContent = job
    ? `${iso(job.kind)} ${shortId(job.id)}: ${job.state} ${Math.round(job.progress || 0)}%`
    : "no job focused";
}

function drawNav() {
  $("nav-admin").hidden = !(S.me && S.me.admin);
  for (const [id, view] of [["nav-jobs", "jobs"], ["nav-admin", "admin"]]) {
    $(id).setAttribute("aria-current", S.view === view ? "page" : "false");
  }
}

function drawNotice() {
  const n = S.notice;
  $("notice").hidden = !n;
  if (n) {
    $("notice").dataset.kind = n.kind;
    $("notice-text").textContent = n.text;
  }
}

function filtered() {
  const { state, kind, text } = S.filters;
  const needle = text.toLowerCase();
  const mine = S.me ? S.me.user_id : null;
  return [...S.jobs.values()]
    .filter((j) => j.user_id === mine || j.id === S.focus) // an admin may open anyone's job
    .filter((j) => !state || (state === "active" ? !FINAL.has(j.state) : j.state === state))
    .filter((j) => !kind || j.kind === kind)
    .filter((j) => !needle || `${j.id} ${j.step || ""} ${j.kind}`.toLowerCase().includes(needle))
    .sort((a, b) => (b.created_at || 0) - (a.created_at || 0));
}

const rows = new Map(); // job id -> <tr>, kept so that keyboard focus survives updates

function jobRow(job) {
  let tr = rows.get(job.id);
  if (!tr) {
    const open = h("button", { class: "link", onclick: () => focusJob(job.id), title: job.id }, shortId(job.id));
    tr = h("tr", { "data-job": job.id },
      h("td", {}, open), h("td", { class: "kind" }), h("td", { class: "state" }),
      h("td", { class: "progress" }, h("progress", { max: 100 }), h("span")),
      h("td", { class: "step" }), h("td", { class: "age" }));
    rows.set(job.id, tr);
  }
  const [, kind, state, progress, step, when] = tr.children;
  kind.textContent = job.kind;
  state.replaceChildren(h("span", { class: `badge ${job.state}` }, job.state === "created" ? "waiting" : job.state));
  progress.firstChild.value = job.progress || 0;
  progress.lastChild.textContent = `${Math.round(job.progress || 0)}%`;
  step.textContent = brief(job.step, 60);
  when.textContent = age(now() - job.created_at);
  tr.classList.toggle("focused", job.id === S.focus);
  return tr;
}

function drawList() {
  const jobs = filtered();
  for (const id of rows.keys()) if (!S.jobs.has(id)) rows.delete(id);
  const wanted = jobs.map(jobRow);
  const body = $("jobs-body");
  // Rows are moved only when the order changes: moving a row would take keyboard focus away.
  if (wanted.length !== body.children.length || wanted.some((tr, i) => body.children[i] !== tr)) {
    replace(body, wanted);
  }
  $("jobs-empty").hidden = jobs.length > 0;
  $("jobs-count").textContent = `${jobs.length} of ${S.jobs.size} jobs`;
  const kinds = [...new Set([...S.jobs.values()].map((j) => j.kind))].sort();
  const select = $("filter-kind");
  if (select.options.length !== kinds.length + 1) {
    const chosen = select.value;
    replace(select, h("option", { value: "" }, "all kinds"), kinds.map((k) => h("option", { value: k }, k)));
    select.value = chosen;
  }
}

function drawDetail() {
  const job = S.focus && S.jobs.get(S.focus);
  $("detail-empty").hidden = Boolean(S.focus);
  $("detail-body").hidden = !S.focus;
  if (!S.focus) return;
  $("detail-title").textContent = job ? `${iso(job.kind)} ${job.id}` : S.focus;
  if (!job) return;
  $("detail-state").textContent = job.state === "created" ? "created (waiting)" : job.state;
  $("detail-state").className = `badge ${job.state}`;
  $("detail-progress").value = job.progress || 0;
  $("detail-step").textContent = `${Math.round(job.progress || 0)}% ${brief(job.step, 120)}`;
  drawActions(job);
  drawErrorBanner(job);
  drawFields(job);
  drawDebugPanel(job);
}

function drawActions(job) {
  const final = FINAL.has(job.state);
  $("act-pause").disabled = !(job.state === "running" || job.state === "created");
  $("act-resume").disabled = job.state !== "paused";
  $("act-cancel").disabled = final;
  $("act-restart").disabled = !(job.state === "paused" || job.state === "failed" || job.state === "cancelled");
  $("act-restart").setAttribute("aria-expanded", String(S.editing));
  $("restart-editor").hidden = !S.editing;
  $("restart-input").textContent = `input now: ${brief(job.input, 400)}`;
}

function toggleEditor(open) {
  S.editing = open;
  render();
  if (open) setTimeout(() => $("restart-mods").focus());
  else $("act-restart").focus();
}

function drawErrorBanner(job) {
  const banner = $("error-banner");
  const rec = S.details && S.details.recovery;
  const show = job.state === "failed" || (job.state === "paused" && job.pause_reason && job.pause_reason !== "user");
  banner.hidden = !show;
  if (!show) return;
  banner.dataset.kind = job.state;
  const title = job.state === "failed"
    ? `Failed${job.error ? `: ${iso(job.error.type)}: ${brief(job.error.message, 300)}` : ""}`
    : `Paused by ${iso(job.pause_reason)}`;
  const can = [];
  if (rec) {
    can.push(rec.reason);
    if (rec.resumable) can.push(`Resume continues from checkpoint v${rec.checkpoint_version}${rec.estimated_seconds_to_finish ? `, about ${age(rec.estimated_seconds_to_finish)} to finish` : ""}.`);
    if (rec.restartable) can.push("Restart runs it again from scratch, with modifications to its input if you give them.");
    can.push(`Recovery attempts: ${rec.recovery_attempts} of ${rec.max_recovery_attempts}.`);
  }
  replace(banner, h("strong", {}, title), h("ul", {}, can.map((c) => h("li", {}, c))));
}

const SHOWN = new Set(["id", "kind", "state", "progress", "step", "checkpoint"]);
function drawFields(job) {
  const entries = Object.entries(job).filter(([k]) => !SHOWN.has(k));
  const value = (k, v) => (k.endsWith("_at") && typeof v === "number" ? `${clock(v)} (${age(now() - v)} ago)` : brief(v, 300));
  replace($("fields"), entries.map(([k, v]) => [h("dt", {}, k), h("dd", {}, value(k, v))]));
}

function validation(job, cp) {
  const errors = [];
  const warnings = [];
  const has = cp.type !== "none";
  if (has !== cp.version > 0) errors.push(`version ${cp.version} does not match ${has ? "a present" : "an absent"} checkpoint`);
  if (has !== (cp.at !== null)) errors.push("saved-at must be set exactly when a checkpoint is");
  if (cp.version !== (job.checkpoint_version || 0)) warnings.push(`the job says version ${job.checkpoint_version}, the checkpoint is ${cp.version} (a newer one may be on its way)`);
  if (cp.size > CHECKPOINT_LIMIT) errors.push(`${cp.size} bytes is over the 1 MiB limit`);
  if (job.state === "created" && has) errors.push("a waiting job with a checkpoint from before a restart");
  if (job.state === "paused" && job.pause_reason === "recovery" && !has) errors.push("paused by recovery without a checkpoint");
  if (job.state === "paused" && !has) warnings.push("no checkpoint: resume starts from the beginning");
  return { errors, warnings };
}

function drawDebugPanel(job) {
  const d = S.details;
  const body = $("debug-body");
  if (!d || d.jobId !== job.id) {
    replace(body, h("p", {}, "loading…"));
    return;
  }
  if (d.error) {
    replace(body, h("p", { class: "error" }, d.error));
    return;
  }
  const cp = d.checkpoint;
  const check = validation(job, cp);
  const verdict = check.errors.length ? `invalid: ${check.errors.join("; ")}` : "valid";
  replace(body,
    h("dl", { class: "grid" },
      h("dt", {}, "version"), h("dd", { id: "debug-version" }, String(cp.version)),
      h("dt", {}, "saved at"), h("dd", {}, cp.at ? `${clock(cp.at)} (${age(now() - cp.at)} ago)` : "never"),
      h("dt", {}, "size"), h("dd", {}, bytes(cp.size)),
      h("dt", {}, "type"), h("dd", {}, cp.type),
      h("dt", {}, "keys"), h("dd", {}, cp.keys ? cp.keys.map(iso).join(", ") : "–"),
      h("dt", {}, "validation"), h("dd", { class: check.errors.length ? "error" : "ok" }, verdict),
      check.warnings.length ? [h("dt", {}, "warnings"), h("dd", {}, check.warnings.join("; "))] : null),
    h("p", {}, "sample"),
    h("pre", { class: "sample", tabindex: 0 }, JSON.stringify(cp.sample, null, 2)));
}

function timelineRow(e) {
  if (e.skipped) {
    return h("tr", { class: "skipped", "data-seq": e.seq, "data-type": "skipped" },
      h("td", {}, `${e.seq}–${e.seq + e.count - 1}`), h("td", {}), h("td", {}, "skipped"), h("td", {}),
      h("td", {}), h("td", {}), h("td", {}, `${e.count} progress event(s) superseded by a later one`));
  }
  const d = e.data || {};
  let detail;
  switch (e.type) {
    case "progress": detail = `${Math.round(d.progress)}% ${brief(d.step, 80)}`; break;
    case "failed": detail = d.error ? `${iso(d.error.type)}: ${brief(d.error.message, 120)}` : ""; break;
    case "paused": detail = `reason ${iso(d.reason)}, checkpoint v${d.checkpoint_version}`; break;
    case "recovery": detail = `${iso(d.reason)}; recovery attempt ${d.recovery_attempts}, checkpoint v${d.checkpoint_version}`; break;
    case "checkpoint": detail = `v${d.version}, ${bytes(d.size)}`; break;
    case "completed": detail = `result ${brief(d.result, 120)}`; break;
    default: detail = brief(d, 160); // created, restarted, and any type this page does not know
  }
  return h("tr", { class: `ev ${e.type}`, "data-seq": e.seq, "data-type": e.type },
    h("td", {}, String(e.seq)), h("td", {}, clock(e.at)), h("td", {}, e.type), h("td", {}, e.state || ""),
    h("td", {}, d.attempt !== undefined ? String(d.attempt) : ""), h("td", {}, e.actor || ""), h("td", {}, detail));
}

function timelineCount() {
  const t = S.timeline;
  const el = $("timeline-count");
  const dropped = t && t.dropped ? `, the newest ${MAX_TIMELINE} shown (${t.dropped} earlier left out)` : "";
  el.textContent = !t ? "" : `${t.events.length} events${dropped}${t.continuedFrom ? `, continued after #${t.continuedFrom} from before a reload` : ""}`;
  el.dataset.dropped = t && t.dropped ? t.dropped : "";
  el.dataset.continuedFrom = t && t.continuedFrom ? t.continuedFrom : "";
}

// The timeline keeps the newest MAX_TIMELINE events: memory, the page and the tab's storage
// stay bounded however many events a job has. New rows are added once per frame, in one go
// (a row per event, each measuring the layout, froze the page under thousands of events), and
// the timeline follows them while it is scrolled to its end, and stays put otherwise.
let pendingRows = [];
function appendTimelineRow(e) {
  const t = S.timeline;
  t.events.push(e);
  if (t.events.length > MAX_TIMELINE) {
    const extra = t.events.length - MAX_TIMELINE;
    t.events.splice(0, extra);
    t.dropped = (t.dropped || 0) + extra;
  }
  pendingRows.push(e);
  if (pendingRows.length > MAX_TIMELINE) pendingRows.splice(0, pendingRows.length - MAX_TIMELINE);
  if (pendingRows.length === 1) requestAnimationFrame(flushTimelineRows);
}

function flushTimelineRows() {
  if (pendingRows.length === 0) return;
  const box = $("timeline-scroll");
  const following = box.scrollTop + box.clientHeight >= box.scrollHeight - 8;
  const body = $("timeline-body");
  body.append(...pendingRows.map(timelineRow));
  pendingRows = [];
  for (let extra = body.children.length - MAX_TIMELINE; extra > 0; extra -= 1) body.firstChild.remove();
  if (following) box.scrollTop = box.scrollHeight;
  timelineCount();
}

function renderTimeline() {
  const t = S.timeline;
  pendingRows = [];
  replace($("timeline-body"), t ? t.events.map(timelineRow) : []);
  $("timeline-scroll").scrollTop = $("timeline-scroll").scrollHeight;
  replace($("timeline-resets"), t ? t.resets.map((r) => h("li", {}, `reset at ${clock(r.at)}: ${r.reason}; read again from the job's durable log`)) : []);
  timelineCount();
}

function drawToasts() {
  const dismissed = new Set(session.dismissed());
  const toasts = [...S.jobs.values()]
    .filter((j) => j.state === "paused" && TOAST_REASONS.has(j.pause_reason))
    .map((j) => ({ job: j, key: `${j.id}:${j.attempt}:${j.seq}` }))
    .filter(({ key }) => !dismissed.has(key));
  const region = $("toasts");
  const shown = new Set([...region.children].map((c) => c.dataset.key));
  if (toasts.length === shown.size && toasts.every(({ key }) => shown.has(key))) return;
  replace(region, toasts.map(({ job, key }) =>
    h("div", { class: "toast", role: "alert", "data-key": key, "data-job": job.id },
      h("p", {}, `${iso(job.kind)} job ${shortId(job.id)} was paused by ${iso(job.pause_reason)} at checkpoint v${job.checkpoint_version || 0} (${Math.round(job.progress || 0)}%).`),
      h("div", { class: "row" },
        h("button", { class: "primary resume", onclick: () => act("resume", { job_id: job.id }, (j) => `resumed ${j.id}`) }, "Resume"),
        h("button", { onclick: () => focusJob(job.id) }, "Show"),
        h("button", { onclick: () => dismissToast(key) }, "Dismiss")))));
}

// Says how much of the jobs asked for the view shows: the list stops at ADMIN_LIMIT, newest
// first, and the older ones are reached only by narrowing it.
function adminShown(a) {
  if (!a.at) return "";
  const total = !a.user && !a.state && a.stats ? a.stats.total : null;
  if (a.jobs.length < ADMIN_LIMIT) return `${a.jobs.length} job${a.jobs.length === 1 ? "" : "s"}`;
  const of = total === null || total === undefined ? "" : ` of ${total}`;
  return `the ${ADMIN_LIMIT} newest jobs${of} are shown: choose a user or a state to see older ones`;
}

function drawAdmin() {
  const a = S.admin;
  $("admin-error").hidden = !a.error;
  $("admin-error").textContent = a.error || "";
  $("admin-updated").textContent = a.at ? `updated ${clock(a.at)}` : "";
  $("admin-shown").textContent = adminShown(a);
  replace($("admin-stats"), a.stats ? Object.entries(a.stats).map(([k, v]) => h("div", { class: "stat" }, h("span", {}, k), h("strong", {}, typeof v === "object" ? brief(v, 60) : String(v)))) : []);
  const wanted = a.jobs.map(adminRow);
  const ids = new Set(a.jobs.map((j) => j.id));
  for (const id of adminRows.keys()) if (!ids.has(id)) adminRows.delete(id);
  const body = $("admin-body");
  // As in the job list: rows are kept and moved only when the order changes, so a refresh
  // (every 5 s, and every redraw) never takes keyboard focus away from a row.
  if (wanted.length !== body.children.length || wanted.some((tr, i) => body.children[i] !== tr)) {
    replace(body, wanted);
  }
}

const adminRows = new Map(); // job id -> <tr> of the admin view

function adminRow(j) {
  let tr = adminRows.get(j.id);
  if (!tr) {
    const open = h("button", { class: "link", title: j.id, onclick: () => { setView("jobs"); focusJob(j.id); } }, shortId(j.id));
    tr = h("tr", { "data-job": j.id }, h("td"), h("td", {}, open), h("td"), h("td"), h("td"), h("td"), h("td"));
    adminRows.set(j.id, tr);
  }
  const [user, , kind, state, progress, when, step] = tr.children;
  user.textContent = j.user_id;
  kind.textContent = j.kind;
  state.replaceChildren(h("span", { class: `badge ${j.state}` }, j.state));
  progress.textContent = `${Math.round(j.progress || 0)}%`;
  when.textContent = age(now() - j.created_at);
  step.textContent = brief(j.step, 60);
  return tr;
}

// -- wiring --------------------------------------------------------------------------------

function wire() {
  $("signin-form").addEventListener("submit", signIn);
  $("signout").addEventListener("click", () => signOut("Signed out."));
  $("reconnect").addEventListener("click", () => S.conn && S.conn.reconnectNow());
  $("nav-jobs").addEventListener("click", () => setView("jobs"));
  $("nav-admin").addEventListener("click", () => setView("admin"));
  $("notice-close").addEventListener("click", () => {
    S.notice = null;
    render();
  });
  $("filter-state").addEventListener("change", (e) => { S.filters.state = e.target.value; render(); });
  $("filter-kind").addEventListener("change", (e) => { S.filters.kind = e.target.value; render(); });
  $("filter-text").addEventListener("input", (e) => { S.filters.text = e.target.value; render(); });
  replace($("admin-state"), h("option", { value: "" }, "all states"), STATES.map((s) => h("option", { value: s }, s)));
  replace($("filter-state"), h("option", { value: "" }, "all states"), h("option", { value: "active" }, "not finished"), STATES.map((s) => h("option", { value: s }, s === "created" ? "created (waiting)" : s)));
  $("submit-form").addEventListener("submit", submitJob);
  $("submit-kind").addEventListener("change", (e) => {
    const template = TEMPLATES[e.target.value];
    if (template) $("submit-input").value = JSON.stringify(template, null, 1);
  });
  $("submit-input").value = JSON.stringify(TEMPLATES.research, null, 1);
  $("restart-editor").addEventListener("submit", restartJob);
  $("restart-close").addEventListener("click", () => toggleEditor(false));
  $("act-restart").addEventListener("click", () => toggleEditor(!S.editing));
  $("act-pause").addEventListener("click", () => act("pause", { job_id: S.focus }, (j) => `paused ${j.id}`));
  $("act-resume").addEventListener("click", () => act("resume", { job_id: S.focus }, (j) => `resumed ${j.id}`));
  $("act-cancel").addEventListener("click", () => act("cancel", { job_id: S.focus }, (j) => `cancelled ${j.id}`));
  $("debug-refresh").addEventListener("click", refreshDetails);
  $("detail-close").addEventListener("click", () => focusJob(null));
  $("admin-form").addEventListener("submit", (e) => {
    e.preventDefault();
    S.admin.user = $("admin-user").value.trim();
    S.admin.state = $("admin-state").value;
    refreshAdmin();
  });
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape" && S.editing) toggleEditor(false);
  });
  // The countdown and ages move on their own.
  setInterval(() => S.conn && render(), 500);
  addEventListener("pagehide", saveTimeline);
  // A signed-in URL opened in a tab that shows the page already changes only the fragment (no
  // new page load): the token is taken the same way, and the page starts again with it.
  addEventListener("hashchange", () => {
    if (!takeFragmentToken()) return;
    S.timeline = null; // not saved again on the way out: it was the previous user's
    location.reload();
  });
}

takeFragmentToken();
wire();
start();
