"""Sans-I/O decision logic, tested without Trio."""

from __future__ import annotations

import math
from typing import Any

import attrs

from actors import Job, JobState, RecoveryPolicy, StallDetector


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


def test_policy_pauses_with_checkpoint_fails_without() -> None:
    policy = RecoveryPolicy(max_recovery_attempts=3)
    paused = policy.decide(job(checkpoint={"i": 1}, checkpoint_version=1), "stalled")
    assert paused.to_state is JobState.PAUSED and paused.recovery_attempts == 1
    assert "checkpoint v1" in paused.reason
    failed = policy.decide(job(), "stalled")
    assert failed.to_state is JobState.FAILED and "no checkpoint" in failed.reason


def test_policy_gives_up_past_the_limit() -> None:
    policy = RecoveryPolicy(max_recovery_attempts=3)
    with_checkpoint = job(checkpoint={"i": 1}, checkpoint_version=1)
    assert policy.decide(attrs.evolve(with_checkpoint, recovery_attempts=2), "s").to_state is (
        JobState.PAUSED
    )
    final = policy.decide(attrs.evolve(with_checkpoint, recovery_attempts=3), "s")
    assert final.to_state is JobState.FAILED and final.recovery_attempts == 4
    assert "exhausted (4 > 3)" in final.reason
