"""Sans-I/O decision logic, tested without Trio."""

from __future__ import annotations

import math
import random
from typing import Any

import attrs
import pytest

from actors import (
    EventType,
    Job,
    JobState,
    KindOptions,
    RecoveryDecision,
    RecoveryPolicy,
    RetryPolicy,
    StaleAttemptError,
    StallDetector,
)
from actors import _ops as ops
from actors._options import CreateOptions
from actors._scheduling import RetryDecision


def job(**changes: Any) -> Job:
    return attrs.evolve(Job("j", "u", "k", JobState.RUNNING, None, 0.0, 0.0), **changes)


def test_detector_expires_exactly_at_deadline() -> None:
    d = StallDetector()
    d.watch("a", now=0.0, timeout=30.0)
    assert d.next_deadline() == 30.0
    assert d.pop_expired(29.999) == []
    assert d.pop_expired(30.0) == ["a"]
    assert "a" not in d and d.next_deadline() == math.inf


def test_beats_push_the_deadline_without_heap_work() -> None:
    d = StallDetector()
    d.watch("a", 0.0, 10.0)
    for t in range(1, 10):
        d.beat("a", float(t))
    assert len(d._heap) == 1  # a beat never touches the heap
    assert d.pop_expired(10.0) == []  # re-armed lazily at 19
    assert d.deadline_of("a") == 19.0 and d.next_deadline() == 19.0
    assert d.pop_expired(19.0) == ["a"]


def test_expiry_order_and_unwatch() -> None:
    d = StallDetector()
    d.watch("late", 0.0, 20.0)
    d.watch("early", 0.0, 5.0)
    d.watch("gone", 0.0, 1.0)
    d.unwatch("gone")
    assert d.next_deadline() == 5.0
    assert d.pop_expired(100.0) == ["early", "late"]


def test_rewatch_leaves_one_live_entry() -> None:
    d = StallDetector()
    d.watch("a", 0.0, 5.0)
    d.unwatch("a")
    d.watch("a", 1.0, 5.0)
    assert d.pop_expired(5.0) == []
    assert d.pop_expired(6.0) == ["a"]
    assert d.pop_expired(100.0) == [] and len(d) == 0


#: Backoff without jitter: 1 s after the first failed attempt, 2 s after the second, ...
EXACT = KindOptions(retry=RetryPolicy(1.0, 2.0, 10.0, 0.0))


def decide(
    j: Job, options: KindOptions = EXACT, max_recovery_attempts: int = 3
) -> RecoveryDecision:
    policy = RecoveryPolicy(max_recovery_attempts)
    return policy.decide(j, "stalled", options, 1000.0, random.Random(0))


def test_policy_pauses_with_checkpoint_fails_without() -> None:
    paused = decide(job(checkpoint={"i": 1}, checkpoint_version=1))
    assert paused.to_state is JobState.PAUSED and paused.recovery_attempts == 1
    assert "checkpoint v1" in paused.reason and paused.failed_attempt is None
    failed = decide(job())  # one attempt (the default): none left
    assert failed.to_state is JobState.FAILED and "no checkpoint" in failed.reason
    assert failed.failed_attempt == RetryDecision(False, 1)
    assert failed.reason.endswith("no attempts left (1 of 1 failed)")


def test_policy_gives_up_past_the_limit() -> None:
    with_checkpoint = job(checkpoint={"i": 1}, checkpoint_version=1)
    again = decide(attrs.evolve(with_checkpoint, recovery_attempts=2))
    assert again.to_state is JobState.PAUSED
    final = decide(attrs.evolve(with_checkpoint, recovery_attempts=3))
    assert final.to_state is JobState.FAILED and final.recovery_attempts == 4
    assert "exhausted (4 > 3)" in final.reason


def test_a_stall_without_checkpoint_is_retried_while_attempts_are_left() -> None:
    """A failed attempt of type ``Stalled`` under the retry rule: back in the queue after the
    kind's backoff while ``failed_attempts < max_attempts``; the last one fails for good."""
    first = decide(job(max_attempts=3))
    assert (first.to_state, first.recovery_attempts) == (JobState.CREATED, 1)
    assert first.failed_attempt == RetryDecision(True, 1, 1.0, 1001.0)
    assert first.reason == "stalled; no checkpoint to resume from"
    second = decide(job(max_attempts=3, failed_attempts=1, recovery_attempts=1))
    assert second.to_state is JobState.CREATED
    assert second.failed_attempt == RetryDecision(True, 2, 2.0, 1002.0)
    last = decide(job(max_attempts=3, failed_attempts=2, recovery_attempts=2))
    assert (last.to_state, last.recovery_attempts) == (JobState.FAILED, 3)
    assert last.failed_attempt == RetryDecision(False, 3)
    assert last.reason == "stalled; no checkpoint to resume from, no attempts left (3 of 3 failed)"


def test_a_stall_of_a_kind_that_never_retries_stalled_fails_at_once() -> None:
    options = attrs.evolve(EXACT, non_retryable=("Stalled",))
    failed = decide(job(max_attempts=3), options)
    assert failed.to_state is JobState.FAILED and failed.failed_attempt == RetryDecision(False, 1)
    assert "(Stalled is not retried for this kind)" in failed.reason


def test_a_checkpoint_keeps_its_rule_whatever_attempts_are_left() -> None:
    """Paused at the checkpoint (or re-queued for a kind with ``requeue_stalled``), and no
    failed attempt counted: attempts left do not turn it into a retry."""
    saved = job(max_attempts=3, checkpoint={"i": 1}, checkpoint_version=1)
    paused = decide(saved)
    assert (paused.to_state, paused.failed_attempt) == (JobState.PAUSED, None)
    requeued = decide(saved, attrs.evolve(EXACT, requeue_stalled=True))
    assert (requeued.to_state, requeued.failed_attempt) == (JobState.CREATED, None)
    assert "re-queued at checkpoint v1" in requeued.reason


def test_the_recovery_limit_ends_a_job_with_attempts_left() -> None:
    """Each stall counts a recovery attempt, retried or not: past ``max_recovery_attempts`` the
    job fails (a job that kills its node again and again ends), counted as a failed attempt."""
    crashing = job(max_attempts=10, failed_attempts=2, recovery_attempts=2)
    retried = decide(crashing, max_recovery_attempts=3)
    assert (retried.to_state, retried.recovery_attempts) == (JobState.CREATED, 3)
    final = decide(attrs.evolve(crashing, failed_attempts=3, recovery_attempts=3))
    assert (final.to_state, final.recovery_attempts) == (JobState.FAILED, 4)
    assert final.failed_attempt == RetryDecision(False, 4)
    assert "recovery attempts exhausted (4 > 3)" in final.reason


def running_job(**options: Any) -> Job:
    created, _ = ops.create("j", "u", "k", {}, 0.0, CreateOptions(**options))
    started, _ = ops.start(created, 10.0, "n#1")
    return started


def test_a_recovered_retry_is_a_retrying_event_of_a_stalled_attempt() -> None:
    """Applied: back in the queue until the backoff ends, the failed attempt and the
    recovery counted, the run ended at its last sign of life; a takeover's fields added."""
    stalled = attrs.evolve(running_job(max_attempts=3), last_heartbeat_at=15.0)
    decision = decide(stalled)
    extra = {"taken_over_from": "n#1", "taken_over_by": "m#2"}
    retried, event = ops.recover(stalled, 1, decision, 45.0, extra)
    assert (retried.state, retried.run_at, retried.owner) == (JobState.CREATED, 1001.0, None)
    assert (retried.failed_attempts, retried.recovery_attempts) == (1, 1)
    assert (retried.run_seconds, retried.run_started_at) == (5.0, None)
    assert event.type is EventType.RETRYING and event.state is JobState.CREATED
    assert event.data == {
        "error": {"type": "Stalled", "message": "stalled; no checkpoint to resume from"},
        "failed_attempts": 1,
        "max_attempts": 3,
        "next_attempt_at": 1001.0,
        "delay": 1.0,
        **extra,
    }
    with pytest.raises(StaleAttemptError):
        ops.recover(stalled, 2, decision, 45.0)


def test_a_recovered_failure_counts_the_failed_attempt() -> None:
    stalled = running_job()  # one attempt: none left
    failed, event = ops.recover(stalled, 1, decide(stalled), 45.0)
    assert (failed.state, failed.failed_attempts, failed.recovery_attempts) == (
        JobState.FAILED,
        1,
        1,
    )
    assert failed.error is not None and failed.error.type == "Stalled"
    assert event.type is EventType.FAILED and event.data["failed_attempts"] == 1
