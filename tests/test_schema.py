"""Job schema v2: records round-trip, external data is validated precisely, v0 migrates."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actors import (
    InvalidInputError,
    Job,
    JobError,
    JobState,
    migrate_job_record,
    validate_job_record,
)


def record(**changes: Any) -> dict[str, Any]:
    base = Job("01J", "alice", "research", JobState.RUNNING, {"q": 1}, 10.0, 11.0).to_record()
    base.update(changes)
    return base


def test_round_trip() -> None:
    job = Job(
        "01J",
        "alice",
        "research",
        JobState.FAILED,
        {"q": 1},
        10.0,
        12.0,
        error=JobError("ValueError", "bad"),
        checkpoint={"i": 2},
        checkpoint_version=2,
        checkpoint_at=11.0,
        attempt=3,
    )
    assert validate_job_record(job.to_record()) == []
    assert Job.from_record(job.to_record()) == job


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"progress": 150}, "progress: expected a number in 0..100, got 150"),
        ({"progress": True}, "progress: expected a number in 0..100"),
        ({"state": "exploded"}, "state: expected one of"),
        ({"user_id": ""}, "user_id: expected a non-empty string"),
        ({"attempt": -1}, "attempt: expected a non-negative integer, got -1"),
        ({"result": 5}, "result: only a completed job has a result (state is running)"),
        ({"error": "boom"}, "error: expected {'type': str, 'message': str}"),
        ({"checkpoint": {"a": 1}}, "checkpoint_version: 0 does not match a present checkpoint"),
        ({"updated_at": 1.0}, "updated_at: 1.0 is before created_at 10.0"),
        ({"created_at": "yesterday"}, "created_at: expected Unix seconds, got 'yesterday'"),
        ({"tags": ["x", "x"]}, "tags: expected distinct strings"),
        ({"tags": "x"}, "tags: expected a list of at most 32 strings"),
        ({"priority": 1001}, "priority: expected an integer in 0..1000, got 1001"),
        ({"max_attempts": 0}, "max_attempts: expected an integer in 1..100, got 0"),
        ({"timeout": 0}, "timeout: expected seconds in (0, 604800] or null, got 0"),
        ({"failed_attempts": -1}, "failed_attempts: expected a non-negative integer"),
        ({"parent_id": ""}, "parent_id: expected a string of 1..256 characters or null"),
        ({"run_at": "soon"}, "run_at: expected Unix seconds or null, got 'soon'"),
        ({"colour": "red"}, "colour: unknown field"),
        ({"schema_version": 7}, "schema_version: expected 2, got 7"),
        ({"state": "completed", "progress": 40}, "progress: a completed job has progress 100"),
    ],
)
def test_precise_errors(changes: dict[str, Any], problem: str) -> None:
    problems = validate_job_record(record(**changes))
    assert any(p.startswith(problem) for p in problems), problems


def test_not_an_object() -> None:
    assert validate_job_record([1, 2]) == ["record: expected an object, got list"]


def test_from_record_refuses_invalid() -> None:
    with pytest.raises(InvalidInputError, match="progress"):
        Job.from_record(record(progress=-1))


def test_migrates_v1_with_queue_defaults() -> None:
    v1 = record(schema_version=1)
    for name in ("priority", "run_at", "max_attempts", "failed_attempts", "timeout", "tags"):
        del v1[name]
    job = Job.from_record(v1)
    assert job.schema_version == 2
    assert (job.priority, job.run_at, job.max_attempts, job.failed_attempts) == (0, None, 1, 0)
    assert (job.timeout, job.tags, job.parent_id, job.owner) == (None, (), None, None)


def test_migrates_predecessor_v0() -> None:
    v0 = {
        "id": "job-1",
        "userId": "bob",
        "type": "trade",
        "status": "paused",
        "query": {"symbol": "X"},
        "progress": 40,
        "currentStep": "slice 2",
        "checkpointData": {"fills": [1]},
        "createdAt": 1_000_000,
        "updatedAt": 2_000_000,
        "error": None,
        "recoveryAttempts": 1,
    }
    migrated = migrate_job_record(v0)
    assert validate_job_record(migrated) == []
    job = Job.from_record(v0)
    assert (job.user_id, job.kind, job.state, job.step) == (
        "bob",
        "trade",
        JobState.PAUSED,
        "slice 2",
    )
    assert (job.created_at, job.updated_at) == (1000.0, 2000.0)
    assert job.checkpoint == {"fills": [1]} and job.checkpoint_version == 1
    assert job.recovery_attempts == 1


def test_refuses_newer_schema() -> None:
    with pytest.raises(InvalidInputError, match="schema_version 3 is not supported"):
        migrate_job_record(record(schema_version=3))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=10,
)


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.dictionaries(st.sampled_from([*record(), "x", "tags"]), json_values))
def test_validate_never_raises_and_valid_means_loadable(changes: dict[str, Any]) -> None:
    data = record(**changes)
    problems = validate_job_record(data)
    assert all(isinstance(p, str) and ": " in p for p in problems)
    if not problems:
        assert Job.from_record(data).to_record()["id"] == data["id"]
