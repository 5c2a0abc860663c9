"""Slow consumers attacked with real servers and clients: what a connection that reads
slowly, or not at all, makes the server hold, and what a fast reader receives."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import trio

from actors import (
    BroadcasterConfig,
    Cursor,
    JobContext,
    MemoryBackend,
    Outbox,
    open_runtime,
)

from .serving import GATES, eventually, raw, receive, request, send, serving


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


async def _bursts(ctx: JobContext, input: Any) -> None:
    """Ten progress events, then, once ``gate`` opens, ``count`` more of ``pad`` bytes (one
    per 0.1 ms)."""
    for i in range(10):
        await ctx.progress(i, "first")
    await GATES.setdefault(input["gate"], trio.Event()).wait()
    for i in range(input["count"]):
        await ctx.progress(i % 100, "x" * input["pad"])
        await trio.sleep(0.0001)


async def test_events_held_during_a_join_count_towards_the_lag_limits(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Live events of a room are held while its join waits to build the replay (for one of
    the server's ``replay_builds``), then queued after it as replayed events, which are never
    coalesced or dropped: a join that waited while the user's jobs emitted 1 MB queued 1 MB,
    past both replay_bytes (20 KB: what a replay may hold) and overflow_bytes (100 KB: what
    live events may), unbounded. Held events now count towards the lag limits as queued
    live events do: past them the connection lagged, and is told so after the reply."""
    config = BroadcasterConfig(replay_bytes=20_000, overflow_bytes=100_000, replay_builds=1)
    gate = "held-during-join"
    async with open_runtime(
        backend=MemoryBackend(), handlers={"bursts": _bursts}, broadcast=config
    ) as rt:
        assert rt.broadcaster is not None
        broadcaster = rt.broadcaster
        await rt.create_job("bursts", "u", {"gate": gate, "count": 2000, "pad": 500})
        await trio.sleep(1)  # its first ten events are committed
        assert await broadcaster.store.user_head("u") >= 10
        outbox = Outbox(config)
        async with trio.open_nursery() as nursery:

            async def join() -> None:
                await broadcaster.join(outbox, "user:u", Cursor(rt.epoch, 1))
                outbox.push_control(b'{"type":"reply","id":1,"result":{}}')
                broadcaster.finish_join(outbox, "user:u")

            async with broadcaster._builds:  # another replay is being built meanwhile
                nursery.start_soon(join)
                GATES.setdefault(gate, trio.Event()).set()
                await trio.sleep(1)  # the job emits its 2,000 events (1 MB)
        held = outbox.replay_bytes + outbox.queued_bytes
        assert held <= config.replay_bytes + config.overflow_bytes, held
        messages = [orjson.loads(m) for m in outbox.take(10**9)]
        assert [m["type"] for m in messages][-2:] == ["reply", "lagged"], messages[-3:]
        assert messages[-1]["rooms"] == ["user:u"]


async def test_nothing_of_a_lagged_room_follows_its_lagged(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """PROTOCOL.md: after ``lagged`` a connection receives nothing more for its rooms until
    it subscribes again. A connection live in a job's room while it joined its user's room
    (its replay waiting) lagged on an event held for the user room, after that event had
    been picked for the job room: it was queued right after the ``lagged``."""
    # Each event is held (user room), then queued (job room): the 201st lags on a hold.
    config = BroadcasterConfig(overflow_after=200, replay_builds=1)
    gate = "lagged-room"
    async with open_runtime(
        backend=MemoryBackend(), handlers={"bursts": _bursts}, broadcast=config
    ) as rt:
        assert rt.broadcaster is not None
        broadcaster = rt.broadcaster
        job = await rt.create_job("bursts", "u", {"gate": gate, "count": 2000, "pad": 500})
        await trio.sleep(1)  # its first ten events are committed
        outbox = Outbox(config)
        await broadcaster.join(outbox, f"job:{job.id}", None)
        broadcaster.finish_join(outbox, f"job:{job.id}")
        async with trio.open_nursery() as nursery:

            async def join() -> None:
                await broadcaster.join(outbox, "user:u", Cursor(rt.epoch, 1))
                broadcaster.finish_join(outbox, "user:u")

            async with broadcaster._builds:  # another replay is being built meanwhile
                nursery.start_soon(join)
                GATES.setdefault(gate, trio.Event()).set()
                await trio.sleep(1)
        types = [orjson.loads(m)["type"] for m in outbox.take(10**9)]
        assert "lagged" in types
        assert "event" not in types[types.index("lagged") :], types[-5:]
