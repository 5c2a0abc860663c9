"""The repository and workers end to end on a real SQLite file (real time, short delays)."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from actors import (
    AUDIT_TYPES,
    DEMO_HANDLERS,
    CheckpointTooLargeError,
    EventStreamLagged,
    EventType,
    IllegalTransitionError,
    InvalidInputError,
    JobContext,
    JobState,
    JobStopped,
    Runtime,
    RuntimeConfig,
    UnknownJobError,
    UnknownKindError,
    open_runtime,
)

from .conftest import memory_runtime, wait_for_state

FAST = 0.01


async def run_to_end(rt: Runtime, kind: str, input: dict[str, Any]) -> Any:
    job = await rt.create_job(kind, "ref", {**input, "delay": 0})
    done = await wait_for_state(rt, job.id)
    assert done.state is JobState.COMPLETED, done.error
    return done.result


@pytest.mark.parametrize(
    ("kind", "input"),
    [
        ("research", {"query": "structured concurrency", "depth": 6}),
        ("trade", {"symbol": "ACME", "side": "sell", "quantity": 120, "slices": 6}),
        ("analysis", {"content": "the cat sat on the mat " * 40, "chunk_size": 90}),
    ],
)
async def test_resume_continues_from_checkpoint(
    jobspine_runtime: Runtime, kind: str, input: dict[str, Any]
) -> None:
    rt = jobspine_runtime
    expected = await run_to_end(rt, kind, input)
    job = await rt.create_job(kind, "alice", {**input, "delay": 0.05})
    async with rt.events() as stream:
        async for event in stream:
            if (
                event.job_id == job.id
                and event.type is EventType.CHECKPOINT
                and event.data["version"] >= 2
            ):
                break
    paused = await rt.pause(job.id, by="alice")
    assert paused.state is JobState.PAUSED and paused.checkpoint_version >= 2
    saved = paused.checkpoint
    resumed = await rt.resume(job.id, by="alice")
    assert (resumed.state, resumed.attempt) == (JobState.CREATED, 1)  # back in the queue
    assert (await wait_for_state(rt, job.id, {JobState.RUNNING})).attempt == 2
    done = await wait_for_state(rt, job.id)
    assert done.state is JobState.COMPLETED
    assert done.result == expected
    # The second attempt started where the checkpoint left off: its first progress event is
    # past zero.
    events = await rt.read_events(job.id)
    resumed_at = next(e.seq for e in events if e.type is EventType.RESUMED)
    first = next(e for e in events if e.seq > resumed_at and e.type is EventType.PROGRESS)
    assert first.data["progress"] > 0, (saved, first)
    # And says so: the research demo's resumed run began with its first run's "planning"
    # (a watcher read "28.5%  planning" after a takeover), not the step it resumed at.
    start = next(e for e in events if e.type is EventType.PROGRESS)
    assert first.data["step"] != start.data["step"], (start, first)


async def test_stop_grace_lets_the_handler_checkpoint(jobspine_runtime: Runtime) -> None:
    rt = jobspine_runtime
    job = await rt.create_job(
        "research", "alice", {"query": "q", "depth": 50, "delay": 0.02, "checkpoint_every": 1000}
    )
    await trio.sleep(0.15)
    paused = await rt.pause(job.id, by="alice")
    # No periodic checkpoint was due: this one was written in the grace period.
    assert paused.checkpoint_version == 1 and paused.checkpoint["done"] > 0
    assert paused.pause_reason == "user"


async def test_a_handler_ignoring_stop_is_cancelled_after_grace() -> None:
    seen: list[Any] = []

    async def stubborn(ctx: JobContext, input: Any) -> Any:
        seen.append(ctx.resumed_from)
        await trio.sleep_forever()

    async with memory_runtime({"stubborn": stubborn}, stop_grace=0.2) as rt:
        job = await rt.create_job("stubborn", "alice", {})
        await trio.sleep(0.05)
        start = trio.current_time()
        paused = await rt.pause(job.id)
        assert 0.2 <= trio.current_time() - start < 1
        assert paused.state is JobState.PAUSED and paused.checkpoint is None
        await rt.resume(job.id)
        await trio.sleep(0.05)
        assert seen == [None, None]  # no checkpoint: the resumed run starts from the beginning


async def test_restart_with_modified_input(jobspine_runtime: Runtime) -> None:
    rt = jobspine_runtime
    order = {"symbol": "ACME", "side": "sell", "quantity": 1, "slices": 50}
    job = await rt.create_job("trade", "alice", order)
    await wait_for_state(rt, job.id, {JobState.RUNNING})
    failed = await rt.mark_failed(job.id, "exchange unreachable")
    assert failed.state is JobState.FAILED and failed.error is not None
    with pytest.raises(InvalidInputError, match="'buy' or 'sell'"):  # checked before stored
        await rt.restart(job.id, {"side": "hold"}, by="alice")
    assert await rt.get_job(job.id) == failed
    await rt.restart(job.id, {"side": "buy", "slices": 5, "delay": 0}, by="alice")
    done = await wait_for_state(rt, job.id)
    assert done.state is JobState.COMPLETED and done.error is None
    assert done.input == {"symbol": "ACME", "side": "buy", "quantity": 1, "slices": 5, "delay": 0}
    assert done.result["filled"] == 1.0 and done.attempt == 2
    audit = await rt.get_audit(job.id)
    assert [(e.type, e.actor) for e in audit] == [(EventType.RESTARTED, "alice")]


async def test_pausing_or_cancelling_one_leaves_the_others(jobspine_runtime: Runtime) -> None:
    rt = jobspine_runtime
    input = {"query": "q", "depth": 8, "delay": 0.03}
    expected = await run_to_end(rt, "research", input)
    jobs = [await rt.create_job("research", user, input) for user in ("a", "b", "c")]
    await trio.sleep(0.1)
    await rt.pause(jobs[0].id, by="a")
    cancelled = await rt.cancel(jobs[1].id, by="b")
    assert cancelled.state is JobState.CANCELLED
    done = await wait_for_state(rt, jobs[2].id)
    assert done.state is JobState.COMPLETED and done.result == expected and done.attempt == 1
    assert (await rt.get_job(jobs[0].id)).state is JobState.PAUSED
    after = await rt.get_job(jobs[1].id)
    assert after.state is JobState.CANCELLED and after.seq == cancelled.seq  # nothing after it
    events = await rt.read_events(jobs[2].id)
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert not any(e.type in AUDIT_TYPES for e in events)


async def test_handler_errors_and_bad_results_fail_the_job() -> None:
    async def broken(ctx: JobContext, input: Any) -> Any:
        if input == "raise":
            raise KeyError("missing thing")
        if input == "progress":
            await ctx.progress(250)
        if input == "big":
            await ctx.checkpoint({"blob": "x" * 5000})
        return object()

    async with memory_runtime({"broken": broken}, checkpoint_limit=1000) as rt:
        outcomes = {}
        for mode in ("raise", "progress", "big", "result"):
            job = await rt.create_job("broken", "alice", mode)
            done = await wait_for_state(rt, job.id)
            assert done.state is JobState.FAILED and done.error is not None
            outcomes[mode] = (done.error.type, done.error.message)
        assert outcomes["raise"] == ("KeyError", "'missing thing'")
        assert outcomes["progress"][0] == "InvalidInputError"
        assert outcomes["big"][0] == "CheckpointTooLargeError"
        assert outcomes["result"][0] == "NotSerializableError"


async def test_repository_bad_input(jobspine_runtime: Runtime) -> None:
    rt = jobspine_runtime
    with pytest.raises(UnknownKindError, match="no handler registered for job kind 'mining'"):
        await rt.create_job("mining", "alice", {})
    assert (await rt.get_stats())["total"] == 0  # nothing stored
    with pytest.raises(UnknownJobError):
        await rt.get_job("01NOTAJOB")
    with pytest.raises(UnknownJobError):
        await rt.pause("01NOTAJOB")
    job = await rt.create_job(
        "trade", "alice", {"symbol": "X", "side": "buy", "quantity": 1, "delay": 0}
    )
    done = await wait_for_state(rt, job.id)
    with pytest.raises(IllegalTransitionError, match="completed -> paused"):
        await rt.pause(job.id)
    with pytest.raises(IllegalTransitionError, match="completed -> created"):
        await rt.resume(job.id)
    with pytest.raises(IllegalTransitionError, match="completed -> created"):
        await rt.restart(job.id)
    with pytest.raises(IllegalTransitionError, match="completed -> cancelled"):
        await rt.cancel(job.id)
    with pytest.raises(InvalidInputError, match=r"0\.\.100"):
        await rt.update_progress(job.id, 1, -1)
    with pytest.raises(CheckpointTooLargeError):
        await rt.checkpoint(job.id, 1, {"x": "y" * (2 * 1024 * 1024)})
    assert await rt.get_job(job.id) == done


async def test_user_queries_stats_and_audit(jobspine_runtime: Runtime) -> None:
    rt = jobspine_runtime
    quick = {"symbol": "X", "side": "buy", "quantity": 1, "delay": 0}
    a1 = await rt.create_trade_job("alice", "X", "buy", 1, slices=1)
    await wait_for_state(rt, a1.id)
    a2 = await rt.create_research_job("alice", "q", depth=100)
    b1 = await rt.create_job("trade", "bob", {**quick, "slices": 1000, "delay": 1})
    await rt.mark_failed(b1.id, "exchange unreachable")
    assert [j.id for j in await rt.get_user_jobs("alice")] == [a2.id, a1.id]
    assert [j.id for j in await rt.get_user_active_jobs("alice")] == [a2.id]
    assert [j.id for j in await rt.get_user_completed_jobs("alice")] == [a1.id]
    assert [j.id for j in await rt.get_user_failed_jobs("bob")] == [b1.id]
    await rt.pause(a2.id, by="alice")
    assert [j.id for j in await rt.get_resumable_jobs("alice")] == [a2.id]
    await rt.resume(a2.id, by="support")
    await rt.cancel(a2.id, by="alice")
    audit = await rt.get_audit(a2.id)
    assert [(e.type, e.actor) for e in audit] == [
        (EventType.PAUSED, "alice"),
        (EventType.RESUMED, "support"),
        (EventType.CANCELLED, "alice"),
    ]
    assert all(e.at > 0 for e in audit)
    assert (await rt.get_user_stats("alice"))["cancelled"] == 1
    stats = await rt.get_stats()
    assert (stats["completed"], stats["failed"], stats["cancelled"], stats["total"]) == (1, 1, 1, 3)


async def test_recovery_metadata(jobspine_runtime: Runtime) -> None:
    rt = jobspine_runtime
    job = await rt.create_analysis_job("alice", "alpha beta gamma " * 200, chunk_size=100)
    async with rt.events() as stream:
        async for event in stream:
            if event.job_id == job.id and event.type is EventType.CHECKPOINT:
                break
    await rt.pause(job.id)
    options = await rt.get_recovery_options(job.id)
    assert options.resumable and options.restartable and options.has_checkpoint
    assert options.checkpoint_size > 0 and options.checkpoint_age is not None
    assert options.max_recovery_attempts == 3
    details = await rt.get_checkpoint_details(job.id)
    assert details.keys == ["counts", "index"] and details.size == options.checkpoint_size
    assert set(details.sample["counts"]) <= {"alpha", "beta", "gamma"}
    check = await rt.validate_checkpoint(job.id)
    assert check.valid and check.errors == [] and check.warnings == []
    await rt.cancel(job.id)
    options = await rt.get_recovery_options(job.id)
    assert not options.resumable and options.restartable
    # A waiting job: a restart replaces its input (it is accepted), so it is restartable.
    later = {"content": "later", "chunk_size": 100}
    waiting = await rt.create_job("analysis", "alice", later, delay=3600)
    options = await rt.get_recovery_options(waiting.id)
    assert (options.resumable, options.restartable) == (False, True)
    assert options.reason == "waiting (created); nothing to recover: a restart replaces its input"
    restarted = await rt.restart(waiting.id, {"content": "now"})
    assert restarted.input["content"] == "now"


async def test_checkpoint_validation_warns_on_size(tmp_path: Any) -> None:
    saved = trio.Event()

    async def big(ctx: JobContext, input: Any) -> Any:
        await ctx.checkpoint({"blob": "x" * 3000})
        saved.set()
        await trio.sleep_forever()

    config = RuntimeConfig(checkpoint_warn_size=1000, stop_grace=0.1, sqlite_synchronous="NORMAL")
    async with open_runtime(tmp_path / "w.db", handlers={"big": big}, config=config) as rt:
        job = await rt.create_job("big", "alice", {})
        await saved.wait()
        check = await rt.validate_checkpoint(job.id)
        assert check.valid and "over the warning size of 1000" in check.warnings[0]


async def test_lagging_event_consumer_is_cut_off(jobspine_runtime: Runtime) -> None:
    rt = jobspine_runtime
    async with rt.events(buffer=3) as stream:
        job = await rt.create_trade_job("alice", "X", "buy", 1, slices=3)
        await wait_for_state(rt, job.id)
        received = []
        with pytest.raises(EventStreamLagged) as lagged:
            async for event in stream:
                received.append(event)
        assert [e.seq for e in received] == [1, 2, 3]
        # It names the bound it crossed and how to catch up (it said "event stream buffer
        # overflowed").
        assert str(lagged.value) == (
            "event stream cut off: its reader fell more than 3 events or 67,108,864 bytes"
            " behind (events(buffer=, max_bytes=) set them); what it missed is in each job's"
            " durable log: read_events(job_id, after_seq=the last seq read)"
        )
        missed = await rt.read_events(job.id, after_seq=received[-1].seq)
        assert missed[0].seq == 4 and missed[-1].type == "completed"


async def test_a_thousand_concurrent_jobs(tmp_path: Any) -> None:
    config = RuntimeConfig(sqlite_synchronous="NORMAL")
    async with open_runtime(tmp_path / "k.db", handlers=DEMO_HANDLERS, config=config) as rt:
        async with rt.events(buffer=100_000) as stream:
            jobs = []

            async def submit(n: int) -> None:
                input = {
                    "symbol": f"S{n % 37}",
                    "side": "buy",
                    "quantity": n + 1,
                    "slices": 3,
                    "delay": FAST,
                }
                jobs.append(await rt.create_job("trade", f"user{n % 10}", input))

            async with trio.open_nursery() as nursery:
                for n in range(1000):
                    nursery.start_soon(submit, n)
            with trio.fail_after(120):
                done = 0
                async for event in stream:
                    if event.type is EventType.COMPLETED:
                        done += 1
                        if done == 1000:
                            break
                # A completed event is published at its commit, a moment before its worker
                # task ends and leaves the supervisor's count.
                while rt.status().running:  # noqa: ASYNC110 - polls the supervisor's count
                    await trio.sleep(0.01)
            assert rt.status().running == 0
        for job in jobs:
            final = await rt.get_job(job.id)
            assert final.state is JobState.COMPLETED
            assert final.result["filled"] == pytest.approx(job.input["quantity"])
        assert (await rt.get_stats())["completed"] == 1000


async def test_body_exception_propagates_unwrapped(tmp_path: Any) -> None:
    with pytest.raises(ValueError, match="from the body"):
        async with open_runtime(tmp_path / "e.db", handlers=DEMO_HANDLERS):
            raise ValueError("from the body")


async def test_job_stopped_is_not_a_failure() -> None:
    async def polite(ctx: JobContext, input: Any) -> Any:
        await ctx.wait_stopping()
        await ctx.checkpoint({"polite": True})
        raise JobStopped

    async with memory_runtime({"polite": polite}) as rt:
        job = await rt.create_job("polite", "alice", {})
        await trio.sleep(0.01)
        paused = await rt.pause(job.id)
        assert paused.state is JobState.PAUSED and paused.checkpoint == {"polite": True}
        assert paused.error is None


async def test_wait_job_returns_the_job_once_finished_whatever_way(
    autojump_clock: trio.abc.Clock,
) -> None:
    """``wait_job`` returns a job once completed, failed or cancelled (the README's loop over
    events never ended for a cancelled job), or in the states asked for; an unknown id is
    ``UnknownJobError`` at once."""

    async def slow(ctx: JobContext, input: Any) -> Any:
        await trio.sleep(input["s"])
        if input.get("fail"):
            raise RuntimeError("no")
        return input["s"]

    async with memory_runtime({"slow": slow}) as rt:
        done = await rt.create_job("slow", "u", {"s": 5})
        assert (await rt.wait_job(done.id)).result == 5
        failed = await rt.create_job("slow", "u", {"s": 1, "fail": True}, max_attempts=1)
        assert (await rt.wait_job(failed.id)).state is JobState.FAILED
        cancelled = await rt.create_job("slow", "u", {"s": 100})
        async with trio.open_nursery() as nursery:
            nursery.start_soon(rt.cancel, cancelled.id)
            assert (await rt.wait_job(cancelled.id)).state is JobState.CANCELLED
        running = await rt.create_job("slow", "u", {"s": 100})
        job = await rt.wait_job(running.id, {JobState.RUNNING})
        assert job.state is JobState.RUNNING
        with pytest.raises(UnknownJobError):
            await rt.wait_job("no-such-job")
        await rt.cancel(running.id)
