"""A user's control of a job races its attempts: the job is what it acts on."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import trio

from actors import JobContext, JobState

from .conftest import memory_runtime, wait_for_state


async def forever(ctx: JobContext, input: Any) -> Any:
    await ctx.checkpoint({"started": True})
    await trio.sleep_forever()


async def test_a_pause_that_races_a_new_attempt_pauses_that_attempt() -> None:
    """The attempt a pause read ends and the job's next attempt starts before the pause is
    applied (another client paused and resumed it meanwhile): the pause applies to the new
    attempt. Before, it was refused with the worker-only ``stale_attempt`` and the job ran on."""
    async with memory_runtime({"forever": forever}, stop_grace=0.1) as rt:
        job = await rt.create_job("forever", "alice", None)
        await wait_for_state(rt, job.id, {JobState.RUNNING})
        supervisor = rt._supervisor
        settled = supervisor.settled
        raced = False

        async def racing_settled() -> None:
            nonlocal raced
            if not raced:  # the first pause, between reading the job and stopping it
                raced = True
                await rt.pause(job.id, by="bob")
                await rt.resume(job.id, by="bob")
                with trio.fail_after(10):
                    while (await rt.get_job(job.id)).attempt < 2:  # noqa: ASYNC110
                        await trio.sleep(0.01)
                await wait_for_state(rt, job.id, {JobState.RUNNING})
                # As when attempt 2 is claimed but not launched here yet: no worker to stop.
                stop = supervisor.stop

                async def not_launched(
                    job_id: str, reason: str, attempt: int | None = None
                ) -> None:
                    supervisor.stop = stop  # type: ignore[method-assign]

                supervisor.stop = not_launched  # type: ignore[method-assign]
            await settled()

        supervisor.settled = racing_settled  # type: ignore[method-assign]
        paused = await rt.pause(job.id, by="alice")
        assert raced
        assert (paused.state, paused.attempt) == (JobState.PAUSED, 2)
        assert paused.pause_reason == "user"


async def test_a_handler_fenced_out_by_a_users_cancel_ends_without_a_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The job is cancelled in the store before its worker is stopped: the handler's next
    report is refused (stale attempt) and the handler lets it propagate. That is the race a
    cancel, pause or restart always has with a running handler: one line, no traceback (it
    was logged as the handler's failure, with its stack), and the cancel stands."""
    go = trio.Event()

    async def reporting(ctx: JobContext, input: Any) -> Any:
        await go.wait()
        await ctx.progress(50)

    async with memory_runtime({"reporting": reporting}, stop_grace=0.1) as rt:
        job = await rt.create_job("reporting", "alice", None)
        await wait_for_state(rt, job.id, {JobState.RUNNING})
        await rt._store.cancel(job.id, "bob")  # stored; the worker not stopped yet
        with caplog.at_level(logging.INFO, logger="jobspine"):
            go.set()
            with trio.fail_after(10):
                while job.id in rt._supervisor.workers:  # noqa: ASYNC110
                    await trio.sleep(0.01)
        ended = [r for r in caplog.records if r.name == "jobspine.worker"]
        assert [r.getMessage().split(":")[0] for r in ended] == [f"job {job.id} attempt 1 ended"]
        assert all(r.exc_info is None for r in caplog.records)
        assert (await rt.get_job(job.id)).state is JobState.CANCELLED
