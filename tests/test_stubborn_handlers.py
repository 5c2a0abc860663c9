"""A handler that ignores its cancellation (shielded here; blocked in a thread is the same) is
bounded all the same: once it is cancelled, whoever stopped it records the attempt's outcome
``stop_grace`` later at most (a timeout's ``JobTimeout``, a pause, a shutdown's pause), and
what the handler returns after that is not recorded (mock clock, in-memory store)."""

from __future__ import annotations

from typing import Any

import trio

from actors import JobContext, JobState, MemoryBackend

from .conftest import memory_runtime, wait_for_state

GRACE = 2.0
#: How long the handler goes on after it is asked to stop, ignoring its cancellation.
STUBBORN = 30.0


async def stubborn(ctx: JobContext, input: Any) -> Any:
    """Checkpoints, then runs ``STUBBORN`` seconds shielded from cancellation; returns."""
    await ctx.checkpoint({"at": 1})
    with trio.CancelScope(shield=True):
        await trio.sleep(STUBBORN)
    return "late result"


async def test_a_timeout_fails_an_attempt_that_ignores_its_cancellation(
    autojump_clock: trio.abc.Clock,
) -> None:
    """The attempt runs past its timeout (1 s) and past the grace, ignoring its cancellation:
    it fails with ``JobTimeout`` one grace after its cancellation, and its result, returned
    later, is not recorded. Before, the job completed with the late result."""
    async with memory_runtime({"k": stubborn}, stop_grace=GRACE) as rt:
        start = trio.current_time()
        job = await rt.create_job("k", "u", {}, timeout=1.0, max_attempts=1)
        failed = await wait_for_state(rt, job.id, {JobState.FAILED, JobState.COMPLETED})
        assert failed.state is JobState.FAILED and failed.error is not None
        assert failed.error.type == "JobTimeout"
        assert trio.current_time() - start <= 1.0 + 2 * GRACE + 0.5
        await trio.sleep(STUBBORN)  # the handler has returned by now
        after = await rt.get_job(job.id)
        assert after.state is JobState.FAILED and after.result is None


async def test_a_pause_of_an_attempt_that_ignores_its_cancellation_is_bounded(
    autojump_clock: trio.abc.Clock,
) -> None:
    """``pause`` returns the job paused at its checkpoint one grace after the handler's
    cancellation, though the handler goes on; its late result is not recorded. Before, the
    pause waited for the handler, which completed the job, and then failed (``completed ->
    paused``)."""
    async with memory_runtime({"k": stubborn}, stop_grace=GRACE) as rt:
        job = await rt.create_job("k", "u", {})
        await trio.sleep(0.5)
        asked = trio.current_time()
        paused = await rt.pause(job.id)
        assert trio.current_time() - asked <= 2 * GRACE + 0.1
        assert paused.state is JobState.PAUSED and paused.checkpoint == {"at": 1}
        await trio.sleep(STUBBORN)
        after = await rt.get_job(job.id)
        assert after.state is JobState.PAUSED and after.result is None


async def test_a_shutdown_pauses_an_attempt_that_ignores_its_cancellation(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A shutdown records the job paused (``shutdown``: resumed at the next start) one grace
    after the handler's cancellation; the runtime closes once the handler returns, and its
    late result is not recorded. Before, the shutdown pause was not written: the next start
    found the job running and paused it as a crash's recovery (not resumed by itself)."""
    backend = MemoryBackend()
    async with memory_runtime({"k": stubborn}, backend=backend, stop_grace=GRACE) as rt:
        job = await rt.create_job("k", "u", {})
        await trio.sleep(0.5)
    async with memory_runtime(
        {"k": stubborn}, backend=backend, stop_grace=GRACE, resume_on_start=False
    ) as rt:
        after = await rt.get_job(job.id)
        assert after.state is JobState.PAUSED, after
        assert after.pause_reason == "shutdown" and after.result is None
