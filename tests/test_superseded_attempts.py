"""A job's newer attempt supersedes one still unwinding (a cancel, a restart by another
client and a claim in quick succession): its handler starts once every superseded attempt's
handler has returned, or ``stop_grace`` after its launch, never beside them; the wait counts
against neither its stall deadline nor its timeout, and a stop meanwhile is recorded without
its handler starting (mock clock, in-memory store)."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from actors import JobContext, JobState, JobStopped, KindOptions

from .conftest import memory_runtime, wait_for_state

S = JobState


async def runs_until_cancelled(unwinding: float) -> None:
    """A handler's body that runs until cancelled, then cleans up (shielded) for
    ``unwinding`` seconds."""
    try:
        await trio.sleep(1000)
    finally:
        with trio.CancelScope(shield=True):
            await trio.sleep(unwinding)


@pytest.mark.parametrize("unwinding", [1.0, 30.0], ids=["unwinds", "ignores_its_cancel"])
async def test_a_newer_attempt_starts_once_the_one_it_supersedes_has_unwound(
    autojump_clock: trio.abc.Clock, unwinding: float
) -> None:
    """A cancel is stored and, while its attempt 1 unwinds (its handler cleans up, shielded,
    for ``unwinding`` seconds), another client restarts the job and attempt 2 is claimed.
    Attempt 2's handler starts once attempt 1's has returned, or ``stop_grace`` (5 s) after
    its launch if that takes longer; before, it started at once and the job's handlers ran
    side by side."""
    spans: dict[int, list[float]] = {}

    async def slow_to_unwind(ctx: JobContext, input: Any) -> Any:
        spans[ctx.attempt] = [trio.current_time()]
        try:
            with ctx.keep_alive():
                await trio.sleep(100)
        finally:
            if ctx.attempt == 1:
                with trio.CancelScope(shield=True):
                    await trio.sleep(unwinding)  # its cleanup
            spans[ctx.attempt].append(trio.current_time())
        return ctx.attempt

    async with memory_runtime({"k": slow_to_unwind}, stop_grace=5.0) as rt:
        job = await rt.create_job("k", "u", {})
        await trio.sleep(0.1)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(rt.cancel, job.id)  # waits for attempt 1, up to the grace
            await wait_for_state(rt, job.id, {JobState.CANCELLED})
            restarted = trio.current_time()
            await rt.restart(job.id)  # another client
            with trio.fail_after(200):
                while 2 not in spans:  # noqa: ASYNC110 - no event for a handler's start
                    await trio.sleep(0.01)
        await trio.sleep(unwinding + 1)
        assert len(spans[1]) == 2  # attempt 1 has ended
        if unwinding < 5.0:
            assert spans[2][0] >= spans[1][1], spans
        else:  # not waited for past the grace
            assert restarted + 5.0 <= spans[2][0] < spans[1][1], (restarted, spans)
        await rt.cancel(job.id)


async def _supersede(rt: Any, job_id: str, nursery: trio.Nursery, attempt: int) -> None:
    """cancel (not waited for), restart by another client, until ``attempt`` is launched."""
    nursery.start_soon(rt.cancel, job_id)
    await wait_for_state(rt, job_id, {S.CANCELLED})
    await rt.restart(job_id)
    with trio.fail_after(100):
        while True:
            w = rt.supervisor.workers.get(job_id)
            if w is not None and w.attempt == attempt:
                return
            await trio.sleep(0.01)


async def test_chain_attempt_3_waits_for_attempt_1(autojump_clock: trio.abc.Clock) -> None:
    """Attempt 1 unwinds (shielded, 3 s); attempt 2 is launched and waits; it is cancelled
    and attempt 3 launched: attempt 3 waits for attempt 1 too, not only for attempt 2 (which
    ends at once). Found in review."""
    spans: dict[int, list[float]] = {}

    async def slow(ctx: JobContext, input: Any) -> Any:
        spans[ctx.attempt] = [trio.current_time()]
        try:
            await trio.sleep(100)
        finally:
            if ctx.attempt == 1:
                with trio.CancelScope(shield=True):
                    await trio.sleep(3)
            spans[ctx.attempt].append(trio.current_time())

    async with memory_runtime({"k": slow}, stop_grace=5.0) as rt:
        job = await rt.create_job("k", "u", {})
        await trio.sleep(0.1)
        async with trio.open_nursery() as nursery:
            await _supersede(rt, job.id, nursery, 2)
            await _supersede(rt, job.id, nursery, 3)
            with trio.fail_after(50):
                while 3 not in spans:  # noqa: ASYNC110
                    await trio.sleep(0.01)
            await trio.sleep(5)
            assert 2 not in spans  # attempt 2 never started its handler
            assert len(spans[1]) == 2
            # Never two handlers of the job at once: attempt 3 starts once attempt 1 ended.
            assert spans[3][0] >= spans[1][1], spans
            await rt.cancel(job.id)


async def test_first_stall_window_not_shortened_by_the_wait(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Attempt 2 waits 4 s for attempt 1; its handler then works 27 s before its first
    heartbeat (less than heartbeat_timeout, 30 s): its stall deadline counts from its
    handler's start, not from the launch (found in review)."""
    beats: list[float] = []

    async def h(ctx: JobContext, input: Any) -> Any:
        if ctx.attempt == 1:
            await runs_until_cancelled(unwinding=4)
        await trio.sleep(27)  # its first step, under heartbeat_timeout
        await ctx.heartbeat()
        beats.append(trio.current_time())
        return "done"

    async with memory_runtime({"k": h}, stop_grace=5.0, heartbeat_timeout=30.0) as rt:
        job = await rt.create_job("k", "u", {})
        await trio.sleep(0.1)
        async with trio.open_nursery() as nursery:
            await _supersede(rt, job.id, nursery, 2)
        done = await wait_for_state(rt, job.id, {S.COMPLETED, S.FAILED, S.PAUSED, S.CREATED})
        assert rt.supervisor.status().stalls_detected == 0
        assert done.state is S.COMPLETED, done


async def test_timeout_not_spent_waiting(autojump_clock: trio.abc.Clock) -> None:
    """timeout=2 s, max_attempts=1. Attempt 2 waits 3 s for attempt 1: its timeout counts
    from its handler's start, not from the launch (which failed it with JobTimeout before its
    handler had run; found in review)."""
    started: list[float] = []

    async def h(ctx: JobContext, input: Any) -> Any:
        if ctx.attempt == 1:
            await runs_until_cancelled(unwinding=3)
        started.append(trio.current_time())
        for _ in range(10):  # 10 steps of 0.1 s: 1 s, within its timeout
            if ctx.stopping:
                raise JobStopped
            await trio.sleep(0.1)
        return "done"

    kinds = {"k": KindOptions(timeout=2.0, max_attempts=1)}
    async with memory_runtime({"k": h}, stop_grace=5.0, kinds=kinds) as rt:
        job = await rt.create_job("k", "u", {})
        await trio.sleep(0.1)
        async with trio.open_nursery() as nursery:
            await _supersede(rt, job.id, nursery, 2)
        done = await wait_for_state(rt, job.id, {S.COMPLETED, S.FAILED})
        assert len(started) == 1  # attempt 2 (attempt 1 never gets past its sleep)
        assert done.state is S.COMPLETED, (done.state, done.error)


@pytest.mark.parametrize("stop", ["pause", "hand_back", "cancel", "shutdown", "recover"])
@pytest.mark.parametrize("unwinding", [3.0, 30.0], ids=["unwinds", "ignores"])
async def test_stopped_while_waiting_is_recorded_and_uncounted(
    autojump_clock: trio.abc.Clock, stop: str, unwinding: float
) -> None:
    started: list[tuple[int, float, bool]] = []

    async def h(ctx: JobContext, input: Any) -> Any:
        started.append((ctx.attempt, trio.current_time(), ctx.stopping))
        if ctx.attempt == 1:
            await ctx.checkpoint({"at": 1})
            try:
                await trio.sleep(10_000)
            finally:
                with trio.CancelScope(shield=True):
                    await trio.sleep(unwinding)
        with ctx.keep_alive():
            await trio.sleep(10_000)

    """Attempt 2 waits for attempt 1 (unwinding in 3 s, or ignoring its cancel) and is
    stopped meanwhile: its handler never starts, the stop is recorded, nothing stays
    running or counted."""
    async with memory_runtime({"k": h}, stop_grace=5.0) as rt:
        job = await rt.create_job("k", "u", {})
        await trio.sleep(0.1)
        async with trio.open_nursery() as nursery:
            await _supersede(rt, job.id, nursery, 2)
            await trio.sleep(0.5)
            if stop == "pause":
                await rt.pause(job.id)
            elif stop == "hand_back":
                await rt.supervisor.hand_back(job.id, "drain")
            elif stop == "cancel":
                await rt.cancel(job.id)
            elif stop == "recover":
                await rt.recover_job(job.id)
            else:
                await rt.supervisor.shutdown()
        sup = rt.supervisor
        final = await rt.get_job(job.id)
        if stop == "hand_back" and job.id in sup.workers:  # claimed again: attempt 3
            assert (sup.workers[job.id].attempt, final.attempt) == (3, 3)
            assert sup.running_counts() == (1, {"u": 1}, {"k": 1})
            await rt.cancel(job.id)
            final = await rt.get_job(job.id)
        assert job.id not in sup.workers
        assert sup.orphans == {}
        assert sup._finishing == set()
        assert sup.running_counts() == (0, {}, {})
        assert final.state in {S.PAUSED, S.CREATED, S.CANCELLED, S.FAILED}
        assert 2 not in [attempt for attempt, _, _ in started]


async def test_max_running_counts_executing_handlers(autojump_clock: trio.abc.Clock) -> None:
    """max_running=2: A's attempt 1 unwinds 3 s after a cancel; A is restarted and claimed
    (superseding it), and B, C wait. Handlers executing code never exceed 2."""
    executing: dict[str, int] = {}
    peak: list[int] = [0]

    async def h(ctx: JobContext, input: Any) -> Any:
        executing[ctx.job_id] = executing.get(ctx.job_id, 0) + 1
        peak[0] = max(peak[0], sum(executing.values()))
        try:
            try:
                await trio.sleep(input["t"])
            finally:
                if input.get("slow") and ctx.attempt == 1:
                    with trio.CancelScope(shield=True):
                        await trio.sleep(3)
        finally:
            executing[ctx.job_id] -= 1
        return "ok"

    async with memory_runtime({"k": h}, stop_grace=5.0, max_running=2) as rt:
        a = await rt.create_job("k", "u", {"t": 100, "slow": True})
        await trio.sleep(0.1)
        async with trio.open_nursery() as nursery:
            await _supersede(rt, a.id, nursery, 2)
            b = await rt.create_job("k", "u", {"t": 1})
            c = await rt.create_job("k", "u", {"t": 1})
        for job in (b, c):
            await wait_for_state(rt, job.id, {S.COMPLETED})
        await rt.cancel(a.id)
    assert peak[0] <= 2, peak
