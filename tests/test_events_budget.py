"""Each subscriber of the in-process event stream is bounded in bytes, not only in events
(:meth:`EventHub.subscribe`'s ``max_bytes``)."""

from __future__ import annotations

import time
import tracemalloc
from collections.abc import AsyncIterator

import orjson
import pytest
import trio

from actors import EventStream, EventStreamLagged, JobEvent, Runtime
from actors._events import EVENT_OVERHEAD, EventHub, EventType, event_bytes
from actors._states import JobState

from .conftest import wait_for_state


def _event(i: int, step: str = "s") -> JobEvent:
    data = {"progress": float(i % 100), "step": step}
    return JobEvent(f"job{i}", "alice", i + 1, EventType.PROGRESS, JobState.RUNNING, 1.5, data)


async def test_a_stream_that_does_not_read_is_cut_off_at_its_byte_budget() -> None:
    hub = EventHub()
    step = "x" * 10_000
    cost = event_bytes(_event(0, step))
    assert cost == EVENT_OVERHEAD + len(orjson.dumps(_event(0, step).data))
    async with hub.subscribe(buffer=1_000_000, max_bytes=2**20) as stream:
        published = 0
        while stream.pending() == published:  # not cut off yet
            hub.publish([_event(published, step)])
            published += 1
            assert published < 1_000
        # Cut off by bytes, far below the count: it holds at most its budget, then lags.
        buffered = published - 1
        held = sum(event_bytes(_event(i, step)) for i in range(buffered))
        assert held <= 2**20 < held + event_bytes(_event(buffered, step))
        assert stream.queued_bytes == held and buffered * cost > 2**20 * 0.95
        received = [event.seq async for event in _until_lagged(stream)]
        assert received == list(range(1, buffered + 1))
        assert stream.queued_bytes == 0


async def _until_lagged(stream: EventStream) -> AsyncIterator[JobEvent]:
    with pytest.raises(EventStreamLagged):
        async for event in stream:
            yield event


async def test_a_stream_that_reads_keeps_up_within_its_budget() -> None:
    hub = EventHub()
    step = "x" * 10_000
    async with hub.subscribe(buffer=1_000_000, max_bytes=2**20) as stream:
        for i in range(2_000):  # 20 MB in all, 50 events at a time
            if i % 50 == 0:
                while stream.pending():
                    stream.receive_nowait()
                assert stream.queued_bytes == 0
            hub.publish([_event(i, step)])
        assert not stream.lagged


async def test_a_group_is_accepted_whole_or_not_at_all() -> None:
    hub = EventHub()
    async with hub.subscribe(max_bytes=10 * EVENT_OVERHEAD) as stream:
        hub.publish([_event(i) for i in range(2)])
        hub.publish([_event(i) for i in range(2, 20)])  # over the budget: nothing of it
        assert stream.pending() == 2 and stream.lagged


async def test_pending_is_what_the_stream_holds_unread() -> None:
    """``pending`` (the broadcaster drains a commit's events by it) counts each event
    buffered, read or not, including a commit cut off by the count part way through."""
    hub = EventHub()
    async with hub.subscribe(buffer=5) as stream:
        hub.publish([_event(i) for i in range(3)])
        assert stream.pending() == 3
        await stream.__anext__()
        stream.receive_nowait()
        assert stream.pending() == 1
        hub.publish([_event(i) for i in range(3, 8)])  # four fit the buffer of 5: cut off
        assert stream.pending() == 5
        for _ in range(5):
            stream.receive_nowait()
        assert stream.pending() == 0
        with pytest.raises(EventStreamLagged):
            await stream.__anext__()


@pytest.mark.parametrize("max_bytes", [0, -1])
async def test_the_budget_must_be_positive(max_bytes: int) -> None:
    with pytest.raises(ValueError, match="max_bytes must be > 0"):
        async with EventHub().subscribe(max_bytes=max_bytes):
            pass


def test_the_overhead_is_an_upper_bound_of_what_a_buffered_event_holds() -> None:
    async def main() -> tuple[float, float]:
        hub = EventHub()
        async with hub.subscribe(buffer=1_000_000, max_bytes=2**40) as stream:
            tracemalloc.start()
            try:
                before = tracemalloc.get_traced_memory()[0]
                for i in range(5_000):
                    data = {"progress": float(i % 100), "step": f"{time.time():.6f}"}
                    hub.publish(
                        [
                            JobEvent(
                                f"01JOB{i:021d}",
                                f"user-{i % 10}",
                                i + 1,
                                EventType.PROGRESS,
                                JobState.RUNNING,
                                time.time(),
                                data,
                                None,
                                i + 1,
                            )
                        ]
                    )
                held = (tracemalloc.get_traced_memory()[0] - before) / 5_000
            finally:
                tracemalloc.stop()
            return held, stream.queued_bytes / 5_000

    held, counted = trio.run(main)
    assert held <= counted


async def test_the_runtimes_event_streams_are_bounded_in_bytes(
    jobspine_runtime: Runtime,
) -> None:
    rt = jobspine_runtime
    async with rt.events(buffer=1_000_000, max_bytes=3 * EVENT_OVERHEAD) as stream:
        job = await rt.create_trade_job("alice", "X", "buy", 1, slices=5)
        await wait_for_state(rt, job.id)
        with pytest.raises(EventStreamLagged):
            async for _ in stream:
                pass
