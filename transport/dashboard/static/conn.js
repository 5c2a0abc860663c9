// A client of the jobspine websocket protocol (transport/PROTOCOL.md), with no knowledge of the
// page: hello first, requests matched by id, rooms kept by the client rules of section 4
// (cursor per room, live from the subscribe reply, duplicates ignored, a gap resubscribes),
// skipped markers, heartbeat heads, `lagged`, and reconnection with the documented backoff.

// Closes that would happen again with the same hello (PROTOCOL.md section 6): the page signs
// out saying why, rather than reconnecting. 4010: a worker's token on the client endpoint.
const NO_RECONNECT = new Set([4002, 4003, 4010]);
const FULL_BACKOFF = new Set([1007, 1009, 1011, 4008, 4009, 4029]);
const BACKOFF_FIRST = 50; // ms, doubling
const BACKOFF_MAX = 10000; // ms
const STABLE_AFTER = 10000; // ms a connection must stay up before the backoff resets
const REQUEST_TIMEOUT = 15000; // ms

export class RequestError extends Error {
  constructor(code, message) {
    super(`${code}: ${message}`);
    this.code = code;
    this.detail = message;
  }
}

// Rooms a message belongs to, with the numbers it covers in each: [room, first, last].
function coverage(message) {
  if (message.type === "event") {
    const e = message.event;
    return [[`job:${e.job_id}`, e.seq, e.seq], [`user:${e.user_id}`, e.user_seq, e.user_seq]];
  }
  const n = message.count - 1;
  return [
    [`job:${message.job_id}`, message.seq, message.seq + n],
    [`user:${message.user_id}`, message.user_seq, message.user_seq + n],
  ];
}

export class Connection {
  // hooks: {status(info), hello(result), event(event, rooms), skipped(marker, rooms),
  //         reset(room, result), roomError(room, error), signedOut(code, reason),
  //         cursor(room): {epoch, seq} | null, saveCursor(room, cursor)}
  constructor(url, token, hooks) {
    this.url = url;
    this.token = token;
    this.hooks = hooks;
    this.ws = null;
    this.nextId = 1;
    this.pending = new Map();
    this.rooms = new Map(); // room -> {cursor, live, pending, retryTimer, failures}
    this.epoch = null;
    this.state = "connecting";
    this.failures = 0;
    this.retryAt = null;
    this.retryTimer = null;
    this.upSince = null;
    this.lastClose = null;
    this.lost = false; // a connection was lost and none is live again yet
    this.stopped = false;
  }

  start() {
    this.open();
  }

  stop() {
    this.stopped = true;
    clearTimeout(this.retryTimer);
    for (const room of this.rooms.values()) clearTimeout(room.retryTimer);
    if (this.ws) this.ws.close(1000);
  }

  status(state, extra = {}) {
    this.state = state;
    this.hooks.status({ state, retryAt: this.retryAt, lastClose: this.lastClose, ...extra });
  }

  open() {
    if (this.stopped) return;
    this.retryAt = null;
    this.status(this.lost ? "lost" : "connecting", { trying: true });
    let ws;
    try {
      ws = new WebSocket(this.url);
    } catch (err) {
      this.lastClose = { code: null, reason: String(err) };
      this.scheduleReconnect(false);
      return;
    }
    this.ws = ws;
    ws.onopen = () => {
      this.send({ op: "hello", id: 0, token: this.token, protocol: 1 });
    };
    ws.onmessage = (msg) => this.receive(msg.data);
    ws.onclose = (ev) => this.closed(ws, ev.code, ev.reason);
  }

  closed(ws, code, reason) {
    if (ws !== this.ws) return;
    this.ws = null;
    this.lost = true;
    this.lastClose = { code, reason };
    for (const [, entry] of this.pending) {
      clearTimeout(entry.timer);
      entry.reject(new RequestError("connection_lost", `connection closed (${code})`));
    }
    this.pending.clear();
    for (const room of this.rooms.values()) {
      room.live = false;
      room.pending = false;
      clearTimeout(room.retryTimer);
    }
    if (this.stopped) return;
    if (NO_RECONNECT.has(code) || code === 4004) {
      this.stopped = true;
      this.status("signed-out");
      this.hooks.signedOut(code, reason || (code === 4004 ? "the token expired" : "refused"));
      return;
    }
    const stayedUp = this.upSince !== null && Date.now() - this.upSince >= STABLE_AFTER;
    this.upSince = null;
    if (stayedUp) this.failures = 0;
    this.scheduleReconnect(FULL_BACKOFF.has(code));
  }

  scheduleReconnect(full) {
    const base = Math.min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** this.failures);
    this.failures += 1;
    const delay = full ? base : base * (0.5 + Math.random() / 2);
    this.retryAt = Date.now() + delay;
    this.status("lost", { trying: false });
    this.retryTimer = setTimeout(() => this.open(), delay);
  }

  reconnectNow() {
    if (this.state !== "lost" || this.ws) return;
    clearTimeout(this.retryTimer);
    this.open();
  }

  send(message) {
    this.ws.send(JSON.stringify(message));
  }

  // A request; resolves with its result, rejects with a RequestError. `onReply` runs in
  // message order (before any later message is processed), for what must not wait a tick.
  request(op, fields = {}, onReply = null) {
    return new Promise((resolve, reject) => {
      if (this.state !== "live") {
        reject(new RequestError("not_connected", "not connected to the server"));
        return;
      }
      const id = this.nextId++;
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new RequestError("timeout", `no reply to ${op} within ${REQUEST_TIMEOUT / 1000} s`));
      }, REQUEST_TIMEOUT);
      this.pending.set(id, { resolve, reject, timer, onReply });
      this.send({ op, id, ...fields });
    });
  }

  receive(text) {
    let message;
    try {
      message = JSON.parse(text);
    } catch {
      return;
    }
    const messages = message.type === "batch" ? message.messages : [message];
    for (const m of messages) this.process(m);
  }

  process(m) {
    switch (m.type) {
      case "reply":
      case "error":
        if (m.id === 0 && this.state !== "live") this.welcome(m);
        else this.answer(m);
        break;
      case "event":
      case "skipped":
        this.numbered(m);
        break;
      case "heartbeat":
        for (const [name, head] of Object.entries(m.heads || {})) {
          const room = this.rooms.get(name);
          if (room && room.live && head > room.cursor.seq) this.resubscribe(name);
        }
        break;
      case "lagged":
        for (const name of m.rooms || []) if (this.rooms.has(name)) this.resubscribe(name);
        break;
      default:
        break; // a message type this page does not know: ignored, as the protocol allows
    }
  }

  welcome(m) {
    if (m.type === "error") {
      this.lastClose = { code: null, reason: m.message };
      return; // the server closes the connection; closed() decides what follows
    }
    this.epoch = m.result.epoch;
    this.upSince = Date.now();
    this.lost = false;
    this.status("live");
    this.hooks.hello(m.result);
    for (const name of this.rooms.keys()) this.resubscribe(name);
  }

  answer(m) {
    const entry = this.pending.get(m.id);
    if (!entry) return;
    this.pending.delete(m.id);
    clearTimeout(entry.timer);
    if (m.type === "error") {
      const err = new RequestError(m.code, m.message);
      if (entry.onReply) entry.onReply(null, err);
      entry.reject(err);
    } else {
      if (entry.onReply) entry.onReply(m.result, null);
      entry.resolve(m.result);
    }
  }

  numbered(m) {
    const fresh = [];
    for (const [name, first, last] of coverage(m)) {
      const room = this.rooms.get(name);
      if (!room || !room.live) continue;
      if (last <= room.cursor.seq) continue; // a duplicate for this room
      if (first > room.cursor.seq + 1) {
        this.resubscribe(name); // a gap: ask again from the cursor
        continue;
      }
      room.cursor = { epoch: room.cursor.epoch, seq: last };
      fresh.push(name);
    }
    if (fresh.length === 0) return;
    if (m.type === "event") this.hooks.event(m.event, fresh);
    else this.hooks.skipped(m, fresh);
    for (const name of fresh) this.hooks.saveCursor(name, this.rooms.get(name).cursor);
  }

  // Wants `name` from now on: subscribes with its saved cursor (if any) whenever connected.
  join(name) {
    if (!this.rooms.has(name)) {
      this.rooms.set(name, { cursor: null, live: false, pending: false, retryTimer: null, failures: 0 });
    }
    if (this.state === "live") this.resubscribe(name);
  }

  leave(name) {
    const room = this.rooms.get(name);
    if (!room) return;
    clearTimeout(room.retryTimer);
    this.rooms.delete(name);
    if (this.state === "live") this.request("unsubscribe", { room: name }).catch(() => {});
  }

  // Asks for `name` again from the cursor this page holds (in memory, else saved); a refused
  // request is retried with a backoff until it succeeds or the room is left.
  resubscribe(name, cursorOverride) {
    const room = this.rooms.get(name);
    if (!room || room.pending) return;
    room.live = false;
    room.pending = true;
    clearTimeout(room.retryTimer);
    const cursor = cursorOverride !== undefined ? cursorOverride : room.cursor || this.hooks.cursor(name);
    const fields = { room: name };
    if (cursor) fields.cursor = { epoch: cursor.epoch, seq: cursor.seq };
    const onReply = (result, err) => {
      if (this.rooms.get(name) !== room) return;
      room.pending = false;
      if (err) return;
      room.failures = 0;
      room.live = true;
      const kept = result.recovered && cursor;
      room.cursor = { epoch: result.epoch, seq: kept ? cursor.seq : result.head };
      this.hooks.saveCursor(name, room.cursor);
      if (result.reset_reason) this.hooks.reset(name, result);
    };
    this.request("subscribe", fields, onReply).catch((err) => {
      if (this.rooms.get(name) !== room || err.code === "connection_lost") return;
      if (["forbidden", "unknown_job", "invalid_input", "bad_request"].includes(err.code)) {
        this.rooms.delete(name);
        this.hooks.roomError(name, err);
        return;
      }
      room.pending = false;
      const delay = Math.min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** room.failures++) * (0.5 + Math.random() / 2);
      room.retryTimer = setTimeout(() => this.resubscribe(name, cursorOverride), delay);
    });
  }
}
