"""The recovery estimate counts running time only: not time paused, nor the server's downtime."""

from __future__ import annotations

import pytest

from actors import Job, JobState
from actors import _ops as ops
from actors._policy import RecoveryDecision
from actors._recovery import recovery_options, running_seconds

PAUSED = RecoveryDecision(JobState.PAUSED, "orphaned", 1)
FAILED = RecoveryDecision(JobState.FAILED, "stalled", 4)


def _running(at: float) -> Job:
    job, _ = ops.create("j1", "alice", "research", {"query": "q"}, now=at)
    job, _ = ops.start(job, now=at)
    return job


def test_crash_downtime_is_not_running_time() -> None:
    # Ran 2 s to 50 %, then the server died; it came back 98 s later and paused the job.
    job = _running(1000.0)
    job, _ = ops.progress(job, 1, 50.0, "half", now=1002.0)
    job, _ = ops.recover(job, 1, PAUSED, now=1100.0)
    assert running_seconds(job) == pytest.approx(2.0)
    options = recovery_options(job, now=1200.0, max_recovery_attempts=3)
    assert options.estimated_seconds_to_finish == pytest.approx(2.0)


def test_time_paused_between_runs_is_not_running_time() -> None:
    # 4 s to 20 %, paused by the user for an hour, resumed, 4 s more to 40 %.
    job = _running(0.0)
    job, _ = ops.progress(job, 1, 20.0, "a", now=4.0)
    job, _ = ops.pause(job, None, now=4.0, actor="alice", reason="user")
    job, _ = ops.resume(job, now=3604.0, actor="alice")
    job, _ = ops.start(job, now=3604.0)  # claimed at once
    job, _ = ops.progress(job, 2, 40.0, "b", now=3608.0)
    assert running_seconds(job) == pytest.approx(8.0)
    options = recovery_options(job, now=3608.0, max_recovery_attempts=3)
    assert options.estimated_seconds_to_finish == pytest.approx(12.0)


def test_a_stall_that_fails_the_job_ends_its_run_at_the_last_sign_of_life() -> None:
    job = _running(10.0)
    job, _ = ops.progress(job, 1, 10.0, "x", now=13.0)
    job, _ = ops.recover(job, 1, FAILED, now=60.0)
    assert job.state is JobState.FAILED and running_seconds(job) == pytest.approx(3.0)


def test_restart_clears_running_time_and_old_records_have_none() -> None:
    job = _running(0.0)
    job, _ = ops.progress(job, 1, 30.0, "x", now=5.0)
    job, _ = ops.cancel(job, now=6.0, actor="alice")
    assert running_seconds(job) == pytest.approx(6.0)
    job, _ = ops.restart(job, now=7.0, actor="alice", modifications=None)
    assert running_seconds(job) == 0.0 and job.run_started_at is None
    legacy = {k: v for k, v in job.to_record().items() if not k.startswith("run_")}
    assert Job.from_record(legacy).run_seconds == 0.0
    assert (
        recovery_options(job, now=8.0, max_recovery_attempts=3).estimated_seconds_to_finish is None
    )
