"""The broadcaster's outboxes and joins, without sockets."""

from __future__ import annotations

import tracemalloc
from typing import Any

import orjson
import trio

from actors import (
    Broadcaster,
    BroadcasterConfig,
    Cursor,
    EventHub,
    EventType,
    JobContext,
    JobEvent,
    JobState,
    MemoryBackend,
    Outbox,
    encode_batch,
    open_runtime,
)


def event(seq: int, type: EventType = EventType.PROGRESS, job: str = "j1") -> JobEvent:
    return JobEvent(job, "u", seq, type, JobState.RUNNING, 0.0, {}, None, seq)


def push(outbox: Outbox, *events: JobEvent) -> None:
    for e in events:
        outbox.push_event(e, orjson.dumps(e.seq), live=True)


async def test_progress_is_coalesced_into_markers_in_place() -> None:
    outbox = Outbox(BroadcasterConfig(coalesce_after=2, overflow_after=100))
    push(outbox, event(1), event(2), event(3, EventType.CHECKPOINT), event(4), event(5))
    items = [orjson.loads(item) for item in outbox.take()]
    # Past two queued events, a newer progress event of the same job supersedes the queued
    # one (4 supersedes 2, then 5 supersedes 4): each becomes a skipped marker where it was.
    assert items == [
        1,
        {"type": "skipped", "job_id": "j1", "user_id": "u", "seq": 2, "user_seq": 2, "count": 1},
        3,
        {"type": "skipped", "job_id": "j1", "user_id": "u", "seq": 4, "user_seq": 4, "count": 1},
        5,
    ]
    assert outbox.coalesced == 2


async def test_overflow_asks_to_resubscribe_then_disconnects() -> None:
    config = BroadcasterConfig(coalesce_after=1000, overflow_after=10, max_lags=2)
    outbox = Outbox(config)
    outbox.push_control(b'{"type":"reply"}')
    push(outbox, *(event(n, EventType.CHECKPOINT) for n in range(1, 12)))
    items = outbox.take()
    assert items[0] == b'{"type":"reply"}'  # control messages survive an overflow
    lagged = orjson.loads(items[-1])
    assert lagged["type"] == "lagged" and len(items) == 2
    assert outbox.close_reason is None
    for _ in range(2):
        push(outbox, *(event(n, EventType.CHECKPOINT) for n in range(1, 12)))
    assert outbox.close_reason is not None and "slow consumer" in outbox.close_reason
    # The last lagged is sent before the close point; nothing after it.
    assert [orjson.loads(m)["type"] for m in outbox.take()] == ["lagged", "lagged"]
    outbox.push_control(b'{"type":"heartbeat"}')
    assert outbox.take() == [] and outbox.closed


async def test_take_caps_frame_size() -> None:
    outbox = Outbox()
    for _ in range(10):
        outbox.push_control(b"x" * 100)
    first = outbox.take(max_bytes=350)
    assert len(first) == 3 and len(encode_batch(first)) <= 350
    rest = outbox.take(max_bytes=10)
    assert len(rest) == 1  # always at least one message
    assert len(outbox) == 6


async def test_join_during_a_burst_is_gap_free() -> None:
    """A subscriber joining mid-stream from a cursor gets every event once, in order."""

    async def burst(ctx: JobContext, input: Any) -> Any:
        for n in range(300):
            await ctx.progress(n / 3)
        return n

    async with open_runtime(
        backend=MemoryBackend(),
        handlers={"burst": burst},
        broadcast=BroadcasterConfig(backlog=50, coalesce_after=10_000),
    ) as rt:
        assert rt.broadcaster is not None
        job = await rt.create_job("burst", "u", None)
        await trio.sleep(0.01)  # part of the burst is out already
        outbox = Outbox(rt.broadcaster.config)
        joined = await rt.broadcaster.join(outbox, f"job:{job.id}", Cursor(rt.epoch, 0))
        rt.broadcaster.finish_join(outbox, f"job:{job.id}")
        assert joined.recovered
        events: list[dict[str, Any]] = []
        with trio.fail_after(10):
            while not events or events[-1]["type"] != "completed":
                await outbox.wait()
                items = outbox.take()
                events.extend(orjson.loads(item)["event"] for item in items)
        seqs = [e["seq"] for e in events]
        assert seqs == list(range(1, len(seqs) + 1))
        assert (await rt.get_job(job.id)).seq == len(seqs)


def progress_event(n: int) -> JobEvent:
    return JobEvent(
        f"job-{n:020d}", "user-1", n, EventType.PROGRESS, JobState.RUNNING, 1.0,
        {"progress": n / 7, "step": f"step {n}"}, None, n,
    )  # fmt: skip


async def test_encoded_events_hold_only_their_own_size() -> None:
    """orjson's output keeps a 4 KiB buffer; what the broadcaster keeps is copied exact."""
    broadcaster = Broadcaster(None, EventHub())  # type: ignore[arg-type]  # encode only
    events = [progress_event(n) for n in range(2000)]
    tracemalloc.start()
    try:
        kept = [broadcaster.encode(e) for e in events]
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert held / len(kept) < 2 * max(len(data) for data in kept) + 200


async def test_backlogs_stay_within_their_byte_budget() -> None:
    """Backlogs are bounded in bytes: the least recently active rooms go first, and the
    estimate per entry is an upper bound of what an entry really holds."""
    budget = 200_000
    config = BroadcasterConfig(backlog=200, backlog_rooms=2000, backlog_bytes=budget)
    broadcaster = Broadcaster(None, EventHub(), config)  # type: ignore[arg-type]
    tracemalloc.start()
    try:
        for n in range(5000):
            broadcaster.publish(progress_event(n))  # one job room (+ the user room) each
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert 0 < broadcaster.backlog_bytes <= budget
    assert held <= budget + 64 * 1024  # the estimate covers what entries hold
    rooms = list(broadcaster._backlogs)
    assert "user:user-1" in rooms  # active at every event: never the least recent
    assert f"job:job-{4999:020d}" in rooms and f"job:job-{0:020d}" not in rooms
    # One busy room alone beyond the budget keeps its newest events.
    alone = Broadcaster(None, EventHub(), BroadcasterConfig(backlog_bytes=10_000))  # type: ignore[arg-type]
    for n in range(1, 200):
        alone._remember("job:j", n, progress_event(n), alone.encode(progress_event(n)))
    kept = [seq for seq, _, _ in alone._backlogs["job:j"]]
    assert alone.backlog_bytes <= 10_000 and kept == list(range(200 - len(kept), 200))


async def test_a_cursor_past_the_evicted_backlog_replays_from_the_log() -> None:
    async def steps(ctx: JobContext, input: Any) -> Any:
        for n in range(50):
            await ctx.progress(n / 50)
        return None

    async with open_runtime(
        backend=MemoryBackend(),
        handlers={"steps": steps},
        broadcast=BroadcasterConfig(backlog_bytes=4000),  # a few events in all
    ) as rt:
        assert rt.broadcaster is not None
        async with rt.events() as stream:
            job = await rt.create_job("steps", "u", None)
            with trio.fail_after(10):
                async for e in stream:
                    if e.job_id == job.id and e.type is EventType.COMPLETED:
                        break
        await rt.broadcaster.drained()
        assert rt.broadcaster.backlog_bytes <= 4000
        outbox = Outbox(rt.broadcaster.config)
        joined = await rt.broadcaster.join(outbox, f"job:{job.id}", Cursor(rt.epoch, 0))
        rt.broadcaster.finish_join(outbox, f"job:{job.id}")
        seqs = [orjson.loads(item)["event"]["seq"] for item in outbox.take(max_bytes=1 << 20)]
        assert joined.recovered and seqs == list(range(1, joined.head + 1))


def test_an_event_is_encoded_as_the_converter_writes_it() -> None:
    """The broadcaster's own record of an event writes the same bytes as the converter's,
    for every shape of ``data``; a value only the converter can write (an attrs instance)
    goes through it."""
    import attrs

    from actors import JobError
    from actors._codec import converter

    broadcaster = Broadcaster(None, EventHub(), None)  # type: ignore[arg-type]
    shapes: list[dict[str, Any]] = [
        {},
        {"progress": 5.0, "step": "x"},
        {"nested": {"a": [1, (2, 3)], "b": None}, "text": "é\u2028"},
        {"error": attrs.asdict(JobError("ValueError", "bad"))},
    ]
    for data in shapes:
        for actor in (None, "ops"):
            e = JobEvent("j1", "u", 3, EventType.FAILED, JobState.FAILED, 2.5, data, actor, 9)
            expected = orjson.dumps({"type": "event", "event": converter.unstructure(e)})
            assert broadcaster.encode(e) == expected
    e = JobEvent(
        "j1", "u", 3, EventType.FAILED, JobState.FAILED, 2.5, {"error": JobError("T", "m")}
    )
    assert orjson.loads(broadcaster.encode(e))["event"]["data"] == {
        "error": {"type": "T", "message": "m"}
    }


async def test_a_replay_past_its_byte_budget_is_a_snapshot_reset() -> None:
    """A cursor whose missed events encode to more than ``replay_bytes`` gets
    ``cursor_too_far`` (a snapshot reset) in its job room and its user room, and the
    broadcaster holds no more than that meanwhile; a nearer cursor is replayed."""

    async def steps(ctx: JobContext, input: Any) -> Any:
        for n in range(100):
            await ctx.progress(n / 100, f"step {n}")
        return None

    async with open_runtime(
        backend=MemoryBackend(),
        handlers={"steps": steps},
        # Backlogs of a few events: the replays come from the durable log.
        broadcast=BroadcasterConfig(backlog_bytes=2000, replay_bytes=6000),
    ) as rt:
        assert rt.broadcaster is not None
        async with rt.events() as stream:
            job = await rt.create_job("steps", "u", None)
            with trio.fail_after(10):
                async for e in stream:
                    if e.job_id == job.id and e.type is EventType.COMPLETED:
                        break
        await rt.broadcaster.drained()
        for room in (f"job:{job.id}", "user:u"):
            outbox = Outbox(rt.broadcaster.config)
            joined = await rt.broadcaster.join(outbox, room, Cursor(rt.epoch, 0))
            rt.broadcaster.finish_join(outbox, room)
            assert not joined.recovered and joined.replayed == 0
            assert joined.reset_reason is not None
            assert joined.reset_reason.startswith("cursor_too_far: the 1"), joined
            assert "6,000 bytes" in joined.reset_reason
            assert outbox.take() == []
            near = Cursor(rt.epoch, joined.head - 10)
            joined = await rt.broadcaster.join(outbox, room, near)
            rt.broadcaster.finish_join(outbox, room)
            assert joined.recovered and joined.replayed == 10
            seqs = [orjson.loads(item)["event"]["seq"] for item in outbox.take(max_bytes=1 << 20)]
            assert len(seqs) == 10
