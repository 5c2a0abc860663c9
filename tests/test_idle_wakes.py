"""An idle runtime sleeps until something happens. Its store woke once per
``heartbeat_flush_interval`` and its supervisor once per second (the freeze check) even with
no job at all: under a test's virtual clock each wake is a jump, so an idle virtual hour took
7,200 task steps (0.3 to 0.7 s of real time) and a day 20 s; in production, two wakes a second
for nothing. Both now sleep while there is nothing to flush, commit, probe or watch, and what
happens next still wakes them: a heartbeat is flushed within the interval, a stall is caught
at its deadline."""

from __future__ import annotations

from typing import Any

import trio

from actors import JobContext, JobState

from .conftest import memory_runtime, wait_for_state


class Steps(trio.abc.Instrument):
    """Counts the steps of every task but ``mine``."""

    def __init__(self, mine: trio.lowlevel.Task) -> None:
        self.mine = mine
        self.count = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task is not self.mine:
            self.count += 1


async def steps_while_sleeping(seconds: float) -> int:
    steps = Steps(trio.lowlevel.current_task())
    trio.lowlevel.add_instrument(steps)
    try:
        await trio.sleep(seconds)
    finally:
        trio.lowlevel.remove_instrument(steps)
    return steps.count


async def held(ctx: JobContext, input: Any) -> Any:
    with ctx.keep_alive():
        await trio.sleep(input["hold"])
    return "held"


async def silent(ctx: JobContext, input: Any) -> Any:
    await trio.sleep(3600)  # no heartbeat, no keep_alive: a stall


async def test_an_idle_runtime_does_not_wake(autojump_clock: trio.abc.Clock) -> None:
    async with memory_runtime({"held": held, "silent": silent}, heartbeat_timeout=5) as rt:
        await trio.sleep(1)  # started and settled
        assert await steps_while_sleeping(86_400) <= 10  # 172,800 before

        # Woken by what comes: heartbeats of a job kept alive are flushed within the interval.
        job = await rt.create_job("held", "alice", {"hold": 30})
        await wait_for_state(rt, job.id, {JobState.RUNNING})
        first = (await rt.get_job(job.id)).last_heartbeat_at
        await trio.sleep(12)
        later = (await rt.get_job(job.id)).last_heartbeat_at
        assert first is not None and later is not None and later - first >= 5
        assert (await rt.wait_job(job.id)).result == "held"

        # A job that stops beating is caught at its deadline, as before.
        stalled = await rt.create_job("silent", "bob", {})
        await wait_for_state(rt, stalled.id, {JobState.RUNNING})
        started = trio.current_time()
        done = await wait_for_state(rt, stalled.id, {JobState.PAUSED, JobState.FAILED})
        assert 5 <= trio.current_time() - started <= 7, done

        # And idle again once nothing runs.
        assert await steps_while_sleeping(3600) <= 10
