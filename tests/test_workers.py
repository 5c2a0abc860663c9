"""One behavioural suite, run against in-process handlers and against the same handlers in a
connected worker: completion, failure, pause/resume from the checkpoint, cancel (cascading to
children), restart, stall recovery (and its re-queue), per-attempt timeouts, retries
(PermanentError and non-retryable types included) and graceful shutdown must be
indistinguishable (states, events, stored fields)."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from actors import JobState, KindOptions, RetryPolicy

from .conftest import wait_for_state
from .worker_handlers import QUICK
from .worker_support import MODES, served

pytestmark = pytest.mark.parametrize("mode", MODES)


async def wait_progress(rt, job_id: str, at_least: float) -> None:  # type: ignore[no-untyped-def]
    with trio.fail_after(20):
        async with rt.events() as stream:
            if (await rt.get_job(job_id)).progress >= at_least:
                return
            async for event in stream:
                if event.job_id == job_id and event.data.get("progress", 0) >= at_least:
                    return


async def event_types(rt, job_id: str) -> list[str]:  # type: ignore[no-untyped-def]
    return [e.type.value for e in await rt.read_events(job_id)]


async def test_complete_and_fail(tmp_path: Path, mode: str) -> None:
    async with served(tmp_path / "db", mode) as s:
        rt = s.runtime
        job = await rt.create_job("steps", "alice", {"n": 3})
        done = await wait_for_state(rt, job.id)
        assert done.state is JobState.COMPLETED
        assert done.result == {"done": 3, "from": 0}
        assert done.checkpoint == {"i": 3} and done.checkpoint_version == 3
        types = await event_types(rt, job.id)
        assert types == ["created", "started"] + ["progress", "checkpoint"] * 3 + ["completed"]

        bad = await rt.create_job("boom", "alice", {"why": "no"})
        failed = await wait_for_state(rt, bad.id)
        assert failed.state is JobState.FAILED
        assert failed.error is not None
        assert (failed.error.type, failed.error.message) == ("ValueError", "bad thing: no")


async def test_pause_resumes_from_the_checkpoint(tmp_path: Path, mode: str) -> None:
    async with served(tmp_path / "db", mode) as s:
        rt = s.runtime
        job = await rt.create_job("steps", "alice", {"n": 100, "delay": 0.02})
        await wait_progress(rt, job.id, 5)
        paused = await rt.pause(job.id, by="alice")
        assert paused.state is JobState.PAUSED and paused.pause_reason == "user"
        at = paused.checkpoint["i"]
        assert at >= 5
        await trio.sleep(0.2)  # the stopped attempt reports nothing more
        assert (await rt.get_job(job.id)).checkpoint == {"i": at}
        resumed = await rt.resume(job.id, by="alice")
        assert resumed.state is JobState.CREATED  # back in the queue
        done = await wait_for_state(rt, job.id)
        assert done.state is JobState.COMPLETED and done.attempt == 2
        assert done.result == {"done": 100, "from": at}


async def test_cancel_then_restart(tmp_path: Path, mode: str) -> None:
    async with served(tmp_path / "db", mode) as s:
        rt = s.runtime
        job = await rt.create_job("steps", "alice", {"n": 200, "delay": 0.02})
        await wait_progress(rt, job.id, 2)
        cancelled = await rt.cancel(job.id, by="alice")
        assert cancelled.state is JobState.CANCELLED
        seq = (await rt.get_job(job.id)).seq
        await trio.sleep(0.3)
        assert (await rt.get_job(job.id)).seq == seq  # nothing from the cancelled attempt
        assert rt.supervisor.workers == {}
        if s.worker is not None:
            assert s.worker.session is not None and s.worker.session.attempts == {}
        await rt.restart(job.id, {"n": 2}, by="alice")
        done = await wait_for_state(rt, job.id)
        assert done.result == {"done": 2, "from": 0}


async def test_stall_is_recovered_by_the_rule(tmp_path: Path, mode: str) -> None:
    async with served(tmp_path / "db", mode, heartbeat_timeout=0.6) as s:
        rt = s.runtime
        job = await rt.create_job("silent", "alice", None)
        failed = await wait_for_state(rt, job.id, timeout=10)
        # No checkpoint: the stall rule fails it (with one, it would be paused).
        assert failed.state is JobState.FAILED
        assert failed.error is not None and "stalled" in failed.error.message
        assert rt.status().stalls_detected == 1


async def test_a_stall_with_attempts_left_is_retried_by_the_rule(tmp_path: Path, mode: str) -> None:
    kinds = {"silent": KindOptions(max_attempts=2, retry=QUICK)}
    async with served(tmp_path / "db", mode, heartbeat_timeout=0.6, kinds=kinds) as s:
        rt = s.runtime
        job = await rt.create_job("silent", "alice", None)
        failed = await wait_for_state(rt, job.id, timeout=10)
        # No checkpoint: each stall is a failed attempt (Stalled), retried while one is left.
        assert failed.state is JobState.FAILED
        assert (failed.attempt, failed.failed_attempts, failed.recovery_attempts) == (2, 2, 2)
        assert failed.error is not None and failed.error.type == "Stalled"
        types = await event_types(rt, job.id)
        assert types == ["created", "started", "retrying", "started", "failed"]


async def test_shutdown_pauses_with_a_checkpoint(tmp_path: Path, mode: str) -> None:
    async with served(tmp_path / "db", mode) as s:
        rt = s.runtime
        job = await rt.create_job("steps", "alice", {"n": 500, "delay": 0.02})
        await wait_progress(rt, job.id, 1)
    # Read back where nothing resumes it (resume_on_start would put it back in the queue).
    async with served(tmp_path / "db", "in_process", resume_on_start=False) as s:
        stored = await s.runtime.get_job(job.id)
        assert stored.state is JobState.PAUSED and stored.pause_reason == "shutdown"
        assert stored.checkpoint["i"] >= 5


async def test_failed_attempts_are_retried_from_the_checkpoint(tmp_path: Path, mode: str) -> None:
    async with served(tmp_path / "db", mode) as s:
        rt = s.runtime
        job = await rt.create_job("flaky", "alice", {"n": 2, "succeed_at": 3})
        done = await wait_for_state(rt, job.id)
        assert done.state is JobState.COMPLETED
        assert done.result == {"attempt": 3, "from": 2}  # the retry resumed from i = 2
        assert (done.failed_attempts, done.attempt) == (2, 3)
        events = await rt.read_events(job.id)
        retrying = [e.data for e in events if e.type.value == "retrying"]
        assert [r["error"]["type"] for r in retrying] == ["RuntimeError", "RuntimeError"]
        assert [r["failed_attempts"] for r in retrying] == [1, 2]
        assert [r["delay"] for r in retrying] == [0.05, 0.1]
        started = [e.data for e in events if e.type.value == "started"]
        assert [d["resumed_from_checkpoint"] for d in started] == [None, 2, 2]

        # Out of attempts: failed for good with the last attempt's error.
        spent = await rt.create_job("flaky", "alice", {"n": 1, "succeed_at": 9}, max_attempts=2)
        failed = await wait_for_state(rt, spent.id)
        assert failed.state is JobState.FAILED and failed.failed_attempts == 2
        assert failed.error is not None and failed.error.type == "RuntimeError"


@pytest.mark.parametrize("error", ["refused", "value"])
async def test_permanent_and_non_retryable_errors_are_not_retried(
    tmp_path: Path, mode: str, error: str
) -> None:
    # A PermanentError subclass is known as permanent only where it was raised (the worker);
    # a non-retryable type is matched on the type the worker reports.
    kinds = {"flaky": KindOptions(max_attempts=3, non_retryable=("ValueError",))}
    async with served(tmp_path / "db", mode, kinds=kinds) as s:
        rt = s.runtime
        job = await rt.create_job("flaky", "alice", {"n": 1, "succeed_at": 9, "error": error})
        failed = await wait_for_state(rt, job.id)
        assert failed.state is JobState.FAILED
        assert failed.error is not None
        assert failed.error.type == {"refused": "RefusedError", "value": "ValueError"}[error]
        assert (failed.attempt, failed.failed_attempts) == (1, 1)
        assert "retrying" not in await event_types(rt, job.id)


async def test_an_attempt_past_its_timeout_is_stopped_and_retried(
    tmp_path: Path, mode: str
) -> None:
    kinds = {"steps": KindOptions(retry=RetryPolicy(initial_interval=0.05, jitter=0.0))}
    async with served(tmp_path / "db", mode, kinds=kinds) as s:
        rt = s.runtime
        job = await rt.create_job(
            "steps", "alice", {"n": 10_000, "delay": 0.02}, timeout=0.5, max_attempts=2
        )
        failed = await wait_for_state(rt, job.id, timeout=20)
        assert failed.state is JobState.FAILED
        assert failed.error is not None and failed.error.type == "JobTimeout"
        assert (failed.attempt, failed.failed_attempts) == (2, 2)
        events = await rt.read_events(job.id)
        retrying = [e.data for e in events if e.type.value == "retrying"]
        assert len(retrying) == 1 and retrying[0]["error"]["type"] == "JobTimeout"
        # Stopped with grace: each attempt checkpointed, the second resumed from the first's.
        started = [e.data for e in events if e.type.value == "started"]
        assert started[0]["resumed_from_checkpoint"] is None
        assert started[1]["resumed_from_checkpoint"] >= 1
        assert failed.checkpoint["i"] > started[1]["resumed_from_checkpoint"]
        seq = failed.seq
        await trio.sleep(0.3)
        assert (await rt.get_job(job.id)).seq == seq  # nothing from the timed-out attempt


async def test_a_stall_of_a_requeuing_kind_goes_back_to_the_queue(
    tmp_path: Path, mode: str
) -> None:
    async with served(tmp_path / "db", mode, heartbeat_timeout=0.6, max_recovery_attempts=1) as s:
        rt = s.runtime
        job = await rt.create_job("hang", "alice", None)
        failed = await wait_for_state(rt, job.id, timeout=15)
        events = await rt.read_events(job.id)
        recoveries = [e for e in events if e.type.value == "recovery"]
        assert recoveries[0].state is JobState.CREATED and recoveries[0].data["requeued"]
        started = [e.data for e in events if e.type.value == "started"]
        assert [d["resumed_from_checkpoint"] for d in started] == [None, 1]
        # The second stall is over the recovery limit: failed by the rule.
        assert failed.state is JobState.FAILED and failed.recovery_attempts == 2
        assert rt.status().stalls_detected == 2


async def test_cancel_cascades_to_running_and_waiting_children(tmp_path: Path, mode: str) -> None:
    async with served(tmp_path / "db", mode) as s:
        rt = s.runtime
        slow = {"n": 10_000, "delay": 0.02}
        parent = await rt.create_job("steps", "alice", slow)
        child = await rt.create_job("steps", "alice", slow, parent_id=parent.id)
        later = await rt.create_job("steps", "alice", slow, parent_id=child.id, delay=3600)
        await wait_progress(rt, child.id, 0.01)
        await rt.cancel(parent.id, by="alice")
        for job_id in (parent.id, child.id, later.id):
            assert (await rt.get_job(job_id)).state is JobState.CANCELLED
        seqs = [(await rt.get_job(j)).seq for j in (parent.id, child.id)]
        await trio.sleep(0.3)
        assert [(await rt.get_job(j)).seq for j in (parent.id, child.id)] == seqs
        assert not rt.supervisor.workers  # every attempt stopped
