// Run by tests/test_dashboard_browser.py in the dashboard's page (execute_async_script): the
// page's protocol client against a scripted socket; the last argument is the callback.
const done = arguments[arguments.length - 1];
(async () => {
  const { Connection } = await import("/conn.js");
  const tick = () => new Promise((r) => setTimeout(r, 0));
  class FakeSocket {
    constructor(url) { this.sent = []; FakeSocket.opened.push(this); setTimeout(() => this.onopen()); }
    send(text) { this.sent.push(JSON.parse(text)); }
    close(code) { this.onclose({ code, reason: "" }); }
    deliver(message) { this.onmessage({ data: JSON.stringify(message) }); }
  }
  FakeSocket.opened = [];
  window.WebSocket = FakeSocket;
  const seen = [], skipped = [], resets = [], signedOut = [], saved = {};
  const conn = new Connection("ws://test/", "TOKEN", {
    status: () => {}, hello: () => {}, roomError: () => {},
    event: (e, rooms) => seen.push([e.seq, rooms]),
    skipped: (m, rooms) => skipped.push([m.seq, m.count, rooms]),
    reset: (room, result) => resets.push([room, result.reset_reason]),
    signedOut: (code) => signedOut.push(code),
    cursor: () => ({ epoch: "E", seq: 0 }),
    saveCursor: (room, cursor) => { saved[room] = cursor.seq; },
  });
  conn.start();
  await tick(); await tick();
  const ws = FakeSocket.opened[0];
  const ev = (seq) => ({ type: "event", event: { job_id: "J", user_id: "u", seq, user_seq: 100 + seq,
                                                 type: "progress", state: "running", data: {} } });
  const reply = (id, result) => ({ type: "reply", id, result });
  ws.deliver(reply(0, { epoch: "E", user_id: "u", admin: false, expires_at: 0 }));
  conn.join("job:J");
  const sub1 = ws.sent[1];
  // The reply makes the room live before the replay that follows it in the same batch;
  // a duplicate is ignored.
  ws.deliver({ type: "batch", messages: [
    reply(sub1.id, { room: "job:J", epoch: "E", head: 3, recovered: true, replayed: 3, reset_reason: null }),
    ev(1), ev(2), ev(2), ev(3)] });
  // A gap: resubscribe from the cursor (3), and ignore the room until the reply.
  ws.deliver(ev(5));
  ws.deliver(ev(6));
  const sub2 = ws.sent[2];
  ws.deliver(reply(sub2.id, { room: "job:J", epoch: "E", head: 6, recovered: true, replayed: 3, reset_reason: null }));
  ws.deliver({ type: "batch", messages: [ev(4), ev(5), ev(6)] });
  // A skipped marker covers 7 and 8: 8 is then a duplicate.
  ws.deliver({ type: "skipped", job_id: "J", user_id: "u", seq: 7, user_seq: 107, count: 2 });
  ws.deliver(ev(8));
  ws.deliver(ev(9));
  // A heartbeat head beyond the cursor: resubscribe from 9.
  ws.deliver({ type: "heartbeat", time: 0, epoch: "E", heads: { "job:J": 12 } });
  const sub3 = ws.sent[3];
  // A reset says why, and the room continues from the head.
  ws.deliver(reply(sub3.id, { room: "job:J", epoch: "F", head: 2, recovered: false, replayed: 0,
                              reset_reason: "epoch_changed: another database", snapshot: { job: {} } }));
  ws.deliver(ev(2));
  ws.deliver(ev(3));
  // An expired token: signed out, no reconnection.
  ws.close(4004);
  await new Promise((r) => setTimeout(r, 200));
  done({ seen, skipped, resets, signedOut, saved, sent: ws.sent, sockets: FakeSocket.opened.length });
})().catch((err) => done({ error: String(err) }));
