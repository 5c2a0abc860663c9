"""Stall detection and recovery under a mock clock (in-memory store, no threads)."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from actors import EventType, JobContext, JobEvent, JobState, KindOptions, RetryPolicy

from .conftest import memory_runtime, wait_for_state


async def beat_then_hang(ctx: JobContext, input: Any) -> Any:
    """Heartbeats ``beats`` times every ``every`` seconds, optionally checkpoints, then hangs."""
    if input.get("checkpoint"):
        await ctx.checkpoint({"at": ctx.attempt})
    for i in range(input.get("beats", 0)):
        await trio.sleep(input.get("every", 10))
        report = input.get("report", "heartbeat")
        if report == "progress":
            await ctx.progress(i, "working")
        elif report == "checkpoint":
            await ctx.checkpoint({"i": i})
        else:
            await ctx.heartbeat()
    if input.get("finish"):
        return "done"
    await trio.sleep_forever()


async def long_call(ctx: JobContext, input: Any) -> Any:
    with ctx.keep_alive():
        await trio.sleep(input["seconds"])  # one long await, no heartbeats
    return "finished"


HANDLERS = {"hang": beat_then_hang, "long": long_call}


async def next_event(stream: Any, job_id: str, *types: EventType) -> JobEvent:
    async for event in stream:
        if event.job_id == job_id and event.type in types:
            return event  # type: ignore[no-any-return]
    raise AssertionError("stream ended")


async def test_stall_detected_exactly_at_deadline(autojump_clock: trio.abc.Clock) -> None:
    async with memory_runtime(HANDLERS, heartbeat_timeout=30) as rt, rt.events() as stream:
        start = trio.current_time()
        job = await rt.create_job("hang", "alice", {"beats": 3, "every": 10, "checkpoint": True})
        event = await next_event(stream, job.id, EventType.RECOVERY, EventType.FAILED)
        # Last heartbeat at start + 30; deadline 30 s later, to the tick.
        assert trio.current_time() - start == pytest.approx(60.0, abs=1e-9)
        assert event.type is EventType.RECOVERY
        assert "no heartbeat or progress for 30 s" in event.data["reason"]
        assert rt.status().stalls_detected == 1


async def test_heartbeats_keep_a_slow_job_alive(autojump_clock: trio.abc.Clock) -> None:
    async with memory_runtime(HANDLERS, heartbeat_timeout=30) as rt:
        job = await rt.create_job("hang", "alice", {"beats": 20, "every": 29.9, "finish": True})
        done = await wait_for_state(rt, job.id, timeout=10_000)
        assert done.state is JobState.COMPLETED and done.result == "done"
        assert rt.status().stalls_detected == 0


@pytest.mark.parametrize("report", ["progress", "checkpoint"])
async def test_writes_keep_a_job_alive_and_its_stall_is_exact(
    autojump_clock: trio.abc.Clock, report: str
) -> None:
    """A progress or checkpoint write only marks the job alive (the supervisor is not woken
    per write: it re-arms the deadline it holds from the last write when that comes); the
    stall still comes exactly one timeout after the last write."""
    async with memory_runtime(HANDLERS, heartbeat_timeout=30) as rt, rt.events() as stream:
        start = trio.current_time()
        input = {"beats": 20, "every": 29.9, "report": report}
        job = await rt.create_job("hang", "alice", input)
        event = await next_event(stream, job.id, EventType.RECOVERY, EventType.FAILED)
        assert trio.current_time() - start == pytest.approx(20 * 29.9 + 30, abs=1e-6)
        assert rt.status().stalls_detected == 1
        # Without a checkpoint to resume from it fails; with one it pauses (a recovery).
        expected = EventType.RECOVERY if report == "checkpoint" else EventType.FAILED
        assert event.type is expected


async def test_keep_alive_covers_one_long_await(autojump_clock: trio.abc.Clock) -> None:
    async with memory_runtime(HANDLERS, heartbeat_timeout=30) as rt:
        job = await rt.create_job("long", "alice", {"seconds": 600})
        done = await wait_for_state(rt, job.id, timeout=10_000)
        assert done.state is JobState.COMPLETED
        assert rt.status().stalls_detected == 0


async def test_pause_with_checkpoint_fail_without(autojump_clock: trio.abc.Clock) -> None:
    async with memory_runtime(HANDLERS, heartbeat_timeout=30) as rt:
        saved = await rt.create_job("hang", "alice", {"checkpoint": True})
        unsaved = await rt.create_job("hang", "alice", {})
        paused = await wait_for_state(rt, saved.id, {JobState.PAUSED}, timeout=100)
        failed = await wait_for_state(rt, unsaved.id, {JobState.FAILED}, timeout=100)
        assert paused.pause_reason == "recovery" and paused.recovery_attempts == 1
        assert failed.error is not None and failed.error.type == "Stalled"
        assert "no checkpoint" in failed.error.message
        types = [e.type for e in await rt.read_events(unsaved.id)]
        assert types[-1] is EventType.FAILED
        status = rt.status()
        assert (status.recoveries, status.failures, status.running, status.watched) == (1, 1, 0, 0)


async def test_recovery_attempt_limit(autojump_clock: trio.abc.Clock) -> None:
    async with memory_runtime(HANDLERS, heartbeat_timeout=30, max_recovery_attempts=3) as rt:
        job = await rt.create_job("hang", "alice", {"checkpoint": True})
        for attempt in (1, 2, 3):
            paused = await wait_for_state(rt, job.id, {JobState.PAUSED}, timeout=100)
            assert paused.recovery_attempts == attempt
            await rt.resume(job.id, by="alice")
        failed = await wait_for_state(rt, job.id, {JobState.FAILED}, timeout=100)
        assert failed.recovery_attempts == 4
        assert failed.error is not None and "exhausted (4 > 3)" in failed.error.message


async def test_reset_recovery_attempts(autojump_clock: trio.abc.Clock) -> None:
    async with memory_runtime(HANDLERS, heartbeat_timeout=30, max_recovery_attempts=1) as rt:
        job = await rt.create_job("hang", "alice", {"checkpoint": True})
        await wait_for_state(rt, job.id, {JobState.PAUSED}, timeout=100)
        reset = await rt.reset_recovery_attempts(job.id, by="ops")
        assert reset.recovery_attempts == 0
        await rt.resume(job.id)
        again = await wait_for_state(rt, job.id, {JobState.PAUSED}, timeout=100)
        assert again.recovery_attempts == 1  # would have failed without the reset


async def test_trigger_recovery_now(autojump_clock: trio.abc.Clock) -> None:
    async with memory_runtime(HANDLERS, heartbeat_timeout=30) as rt:
        job = await rt.create_job("hang", "alice", {"checkpoint": True})
        await trio.sleep(1)
        recovered = await rt.recover_job(job.id)
        assert recovered.state is JobState.PAUSED
        assert trio.current_time() < 30
        assert rt.status().running == 0


async def test_stall_of_one_job_leaves_others_running(autojump_clock: trio.abc.Clock) -> None:
    async with memory_runtime(HANDLERS, heartbeat_timeout=30) as rt:
        healthy = await rt.create_job("hang", "bob", {"beats": 10, "every": 5, "finish": True})
        stalled = await rt.create_job("hang", "alice", {})
        await wait_for_state(rt, stalled.id, {JobState.FAILED}, timeout=100)
        done = await wait_for_state(rt, healthy.id, timeout=100)
        assert done.state is JobState.COMPLETED and done.attempt == 1


async def test_a_stalled_zombie_cannot_write(autojump_clock: trio.abc.Clock) -> None:
    """A handler that ignores cancellation inside a shielded block is fenced out."""
    wrote: list[BaseException] = []

    async def zombie(ctx: JobContext, input: Any) -> Any:
        with trio.CancelScope(shield=True):
            await trio.sleep(100)  # stalls while shielded from the supervisor's cancel
            try:
                await ctx.progress(99, "late")
            except Exception as exc:
                wrote.append(exc)
        return "late result"

    async with memory_runtime({"zombie": zombie}, heartbeat_timeout=30) as rt:
        job = await rt.create_job("zombie", "alice", None)
        await wait_for_state(rt, job.id, {JobState.FAILED}, timeout=50)
        await trio.sleep(100)
        final = await rt.get_job(job.id)
        assert final.state is JobState.FAILED and final.progress == 0
        assert wrote and "is failed: its attempt 1 has ended" in str(wrote[0])


async def test_a_frozen_process_charges_no_job_for_the_time_it_did_not_run(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The whole process stops running for 50 s (SIGSTOP, a paused VM: the clock jumps with
    no task running) while a job heartbeats every 10 s against a 30 s timeout: it is not
    stalled, and a job that really stops heartbeating is still stalled 30 s after its last
    heartbeat, not counting the freeze."""
    async with memory_runtime(HANDLERS, heartbeat_timeout=30) as rt, rt.events() as stream:
        alive = await rt.create_job("hang", "alice", {"beats": 12, "every": 10, "finish": True})
        await trio.sleep(5)
        quiet = await rt.create_job("hang", "bob", {"checkpoint": True})  # never beats
        await trio.sleep(5)
        autojump_clock.jump(50)  # nothing ran meanwhile
        resumed = trio.current_time()
        event = await next_event(stream, quiet.id, EventType.RECOVERY, EventType.FAILED)
        # Created 5 s before the freeze: 25 s of its timeout remained when it ended.
        assert trio.current_time() - resumed == pytest.approx(25.0, abs=1.01)
        done = await wait_for_state(rt, alive.id, timeout=1000)
        assert done.state is JobState.COMPLETED, done
        assert rt.status().stalls_detected == 1
        assert event.type is EventType.RECOVERY
        assert rt.supervisor.frozen_seconds >= 49


# -- a stall without a checkpoint is a failed attempt under the retry rule ----------------------

#: Backoff without jitter: 1 s after the first failed attempt, 2 s after the second, ...
EXACT = RetryPolicy(initial_interval=1.0, backoff_coefficient=2.0, jitter=0.0)


def hang_until(starts: list[float]) -> Any:
    """A handler whose attempts before ``succeed_at`` (every one without it) never heartbeat:
    they stall; later ones return at once. ``starts`` gets each attempt's start (Trio's
    clock)."""

    async def run(ctx: JobContext, input: Any) -> Any:
        starts.append(trio.current_time())
        if input.get("checkpoint"):
            await ctx.checkpoint({"at": ctx.attempt})
        if ctx.attempt >= input.get("succeed_at", 1_000):
            return "done"
        await trio.sleep_forever()

    return run


async def test_a_stall_without_checkpoint_is_retried_while_attempts_are_left(
    autojump_clock: trio.abc.Clock,
) -> None:
    """No checkpoint, ``max_attempts`` 3: each stall is a failed attempt of type ``Stalled``,
    back in the queue after the kind's backoff (a ``retrying`` event), and the third attempt
    completes; each stall counted a recovery attempt too."""
    starts: list[float] = []
    kinds = {"quiet": KindOptions(max_attempts=3, retry=EXACT)}
    async with memory_runtime(
        {"quiet": hang_until(starts)}, heartbeat_timeout=30, kinds=kinds
    ) as rt:
        job = await rt.create_job("quiet", "alice", {"succeed_at": 3})
        done = await wait_for_state(rt, job.id, timeout=1000)
        assert done.state is JobState.COMPLETED and done.result == "done"
        assert (done.attempt, done.failed_attempts, done.recovery_attempts) == (3, 2, 2)
        events = await rt.read_events(job.id)
        assert [e.type.value for e in events] == [
            "created",
            "started",
            "retrying",
            "started",
            "retrying",
            "started",
            "completed",
        ]
        retrying = [e.data for e in events if e.type is EventType.RETRYING]
        assert [(r["error"]["type"], r["failed_attempts"], r["delay"]) for r in retrying] == [
            ("Stalled", 1, 1.0),
            ("Stalled", 2, 2.0),
        ]
        assert all(r["max_attempts"] == 3 for r in retrying)
        assert "no heartbeat or progress for 30 s" in retrying[0]["error"]["message"]
        # Each retry starts its backoff after the stall: 30 s + 1 s, then 30 s + 2 s.
        first, second, third = starts
        assert second - first == pytest.approx(31.0, abs=0.01)
        assert third - second == pytest.approx(32.0, abs=0.01)
        status = rt.status()
        assert (status.stalls_detected, status.recoveries, status.failures) == (2, 2, 0)


async def test_the_last_attempt_that_stalls_fails_for_good(autojump_clock: trio.abc.Clock) -> None:
    starts: list[float] = []
    kinds = {"quiet": KindOptions(max_attempts=2, retry=EXACT)}
    async with memory_runtime(
        {"quiet": hang_until(starts)}, heartbeat_timeout=30, kinds=kinds
    ) as rt:
        job = await rt.create_job("quiet", "alice", {})
        failed = await wait_for_state(rt, job.id, timeout=1000)
        assert failed.state is JobState.FAILED
        assert (failed.attempt, failed.failed_attempts, failed.recovery_attempts) == (2, 2, 2)
        assert failed.error is not None and failed.error.type == "Stalled"
        assert failed.error.message.endswith("no attempts left (2 of 2 failed)")
        types = [e.type.value for e in await rt.read_events(job.id)]
        assert types == ["created", "started", "retrying", "started", "failed"]
        status = rt.status()
        assert (status.stalls_detected, status.recoveries, status.failures) == (2, 1, 1)


async def test_the_recovery_limit_ends_a_stalling_job_with_attempts_left(
    autojump_clock: trio.abc.Clock,
) -> None:
    """``max_recovery_attempts`` bounds every stall, retried or not: with 2, the third stall
    fails a job that had 10 attempts."""
    starts: list[float] = []
    kinds = {"quiet": KindOptions(retry=EXACT)}
    async with memory_runtime(
        {"quiet": hang_until(starts)}, heartbeat_timeout=30, max_recovery_attempts=2, kinds=kinds
    ) as rt:
        job = await rt.create_job("quiet", "alice", {}, max_attempts=10)
        failed = await wait_for_state(rt, job.id, timeout=1000)
        assert failed.state is JobState.FAILED and len(starts) == 3
        assert (failed.failed_attempts, failed.recovery_attempts) == (3, 3)
        assert failed.error is not None and "recovery attempts exhausted (3 > 2)" in (
            failed.error.message
        )


async def test_a_stall_with_a_checkpoint_is_paused_whatever_attempts_are_left(
    autojump_clock: trio.abc.Clock,
) -> None:
    starts: list[float] = []
    kinds = {"quiet": KindOptions(max_attempts=3, retry=EXACT)}
    async with memory_runtime(
        {"quiet": hang_until(starts)}, heartbeat_timeout=30, kinds=kinds
    ) as rt:
        job = await rt.create_job("quiet", "alice", {"checkpoint": True})
        paused = await wait_for_state(rt, job.id, {JobState.PAUSED}, timeout=100)
        assert (paused.pause_reason, paused.failed_attempts, paused.recovery_attempts) == (
            "recovery",
            0,
            1,
        )
