"""Slow consumers attacked with real servers and clients: what a connection that reads
slowly, or not at all, makes the server hold, and what a fast reader receives."""

from __future__ import annotations

from pathlib import Path

import trio

from .serving import eventually, raw, receive, request, send, serving


async def test_replies_not_read_hold_a_bounded_amount(tmp_path: Path) -> None:
    """A client that sent requests and read no reply made the server queue every reply: 100
    ``get`` of a job with a 60 KB input held 6 MB (at 50 requests/s, 3 MB more each second,
    for as long as it took 64 KiB per 10 s, or 2 MB replies of ``list``: 100 MB/s). The
    server now reads no further request while the replies queued hold over
    ``max_message_size``: at most that, and the replies of the requests in flight."""
    # No heartbeats, and no drop for a frame not taken.
    serve = serving(tmp_path / "r.db", heartbeat_interval=60.0, send_timeout=60.0)
    async with serve as running, raw(running) as ws:
        created = await request(ws, "create", 1, kind="sized", input={"pad": "p" * 60_000})
        job = created["result"]["id"]
        (conn,) = running.server.connections
        # At most: max_message_size, one more reply, those in flight (and small refusals).
        server = running.server.config
        bound = server.max_message_size + (1 + server.max_inflight) * 62_000
        most = 0
        for i in range(150):  # within the rate limit: none refused for rate
            await send(ws, {"op": "get", "id": 10 + i, "job_id": job})
            await trio.sleep(0.025)
            most = max(most, sum(len(entry[1]) for entry in conn.outbox._entries))
        assert 0 < most <= bound, (most, bound)
        # Nothing is lost: reading them lets the rest be served. Some may be refused (busy,
        # or rate_limited: the requests that waited in the socket are read at once).
        answered: set[int] = set()
        with trio.fail_after(30):
            while len(answered) < 150:
                message = await receive(ws)
                for inner in message.get("messages", [message]):
                    assert inner["type"] == "reply" or inner["code"] in ("busy", "rate_limited")
                    answered.add(inner["id"])
        assert answered == set(range(10, 160))
        await eventually(lambda: conn.outbox.control_bytes == 0 and not len(conn.outbox))
