"""The job record, its schema v2, validation of external records and migration.

Schema v2 invariants (checked by :func:`validate_job_record`):

* ``id``, ``user_id`` and ``kind`` are non-empty strings; ``state`` is a :class:`JobState` value.
* ``0 <= progress <= 100``; ``progress == 100`` whenever ``state == "completed"``.
* ``result`` is set only when completed; ``error`` only when failed (``{"type", "message"}``).
* ``checkpoint_version`` counts saved checkpoints: 0 exactly when ``checkpoint`` is null, and
  ``checkpoint_at`` is set exactly when a checkpoint is.
* ``attempt`` (the fencing token) is 0 before the first run and grows by one at every start,
  resume or restart; ``recovery_attempts >= 0``; ``seq`` is the job's last event number.
* Timestamps are Unix seconds (wall clock); ``created_at <= updated_at``.
* ``run_seconds >= 0`` is the running time of finished runs; ``run_started_at`` is the start of
  the current run (both optional in stored records, which predate them).
* Queue fields (v2): ``0 <= priority <= 1000``; ``run_at`` (not before, Unix seconds) or null;
  ``1 <= max_attempts <= 100``; ``failed_attempts >= 0``; ``timeout`` null or in
  ``(0, 7 days]``; ``tags`` at most 32 distinct strings of 1..64 characters; ``parent_id`` and
  ``idempotency_key`` (1..256 characters) strings or null; ``owner`` and ``lease_expires_at``
  (the current claim) set only while a job is claimed.

Record schema v2 is what database schema v3 stores; a v1 record (no queue fields) migrates by
taking every queue field's default.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from ._codec import converter
from ._errors import InvalidInputError, shown
from ._states import JobState

__all__ = [
    "CURRENT_SCHEMA_VERSION",
    "MAX_ATTEMPTS",
    "MAX_PRIORITY",
    "MAX_TAGS",
    "MAX_TIMEOUT",
    "Job",
    "JobError",
    "migrate_job_record",
    "validate_job_record",
]

CURRENT_SCHEMA_VERSION = 2

#: Highest priority (higher runs first; 0 is the default and the lowest).
MAX_PRIORITY = 1000
#: Most attempts a job may be given (``max_attempts``).
MAX_ATTEMPTS = 100
#: Longest per-attempt timeout, in seconds (7 days).
MAX_TIMEOUT = 7 * 86_400.0
#: Longest wait before a job runs, in seconds (one year): a create's ``delay`` (and how far
#: ahead its ``run_at`` may be), and a retry policy's intervals.
MAX_DELAY = 365 * 86_400
#: Most tags on one job; each is 1..``MAX_TAG_LENGTH`` characters.
MAX_TAGS = 32
MAX_TAG_LENGTH = 64
#: Longest idempotency key, in characters.
MAX_KEY_LENGTH = 256


@attrs.frozen
class JobError:
    type: str
    message: str


@attrs.frozen
class Job:
    id: str
    user_id: str
    kind: str
    state: JobState
    input: Any
    created_at: float
    updated_at: float
    progress: float = 0.0
    step: str | None = None
    result: Any = None
    error: JobError | None = None
    checkpoint: Any = None
    checkpoint_version: int = 0
    checkpoint_at: float | None = None
    attempt: int = 0
    recovery_attempts: int = 0
    pause_reason: str | None = None
    started_at: float | None = None
    completed_at: float | None = None
    failed_at: float | None = None
    last_heartbeat_at: float | None = None
    seq: int = 0
    #: Seconds the finished runs of this job were running (each up to its end, or to its last
    #: sign of life when it was recovered after a stall or crash); cleared by a restart.
    run_seconds: float = 0.0
    #: When the current run started; None when the job is not running.
    run_started_at: float | None = None
    #: 0..1000, higher runs first.
    priority: int = 0
    #: Not before (Unix seconds): a delayed start or a retry's backoff; None: at once.
    run_at: float | None = None
    #: Failed attempts allowed before the job fails for good (1: no retry).
    max_attempts: int = 1
    #: Attempts that ended in failure (a pause, stall re-queue or resume does not count).
    failed_attempts: int = 0
    #: Seconds one attempt may run before it is stopped and counted as failed; None: no limit.
    timeout: float | None = None
    tags: tuple[str, ...] = ()
    #: The job that spawned this one (same user; fixed at create, so links never cycle).
    parent_id: str | None = None
    idempotency_key: str | None = None
    #: Node id of the runtime that claimed the job (None when no one has).
    owner: str | None = None
    #: Until when the claim holds unless its owner renews it (Unix seconds).
    lease_expires_at: float | None = None
    schema_version: int = CURRENT_SCHEMA_VERSION

    def to_record(self) -> dict[str, Any]:
        record: dict[str, Any] = converter.unstructure(self)
        return record

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Job:
        """Build a job from external data, migrating it first; raises on any invalid field."""
        migrated = migrate_job_record(record)
        problems = validate_job_record(migrated)
        if problems:
            raise InvalidInputError("invalid job record: " + "; ".join(problems))
        return converter.structure(migrated, cls)


_NUMBER = (int, float)
_STATE_VALUES = frozenset(s.value for s in JobState)
_OPTIONAL_TIMES = (
    "checkpoint_at",
    "started_at",
    "completed_at",
    "failed_at",
    "last_heartbeat_at",
    "run_started_at",
    "run_at",
    "lease_expires_at",
)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, _NUMBER) and not isinstance(value, bool) and value == value


def validate_job_record(record: object) -> list[str]:
    """Return every problem of a v1 record as ``"field: what is wrong"``; empty when valid."""
    if not isinstance(record, Mapping):
        return [f"record: expected an object, got {type(record).__name__}"]
    problems: list[str] = []
    known = {f.name for f in attrs.fields(Job)}
    for key in record:
        if key not in known:
            problems.append(f"{key}: unknown field")
    for name in ("id", "user_id", "kind"):
        value = record.get(name)
        if not isinstance(value, str) or not value:
            problems.append(f"{name}: expected a non-empty string, got {shown(value)}")
    state = record.get("state")
    if not isinstance(state, str) or state not in _STATE_VALUES:
        problems.append(f"state: expected one of {[s.value for s in JobState]}, got {shown(state)}")
        state = None
    if "input" not in record:
        problems.append("input: missing")
    progress = record.get("progress", 0.0)
    if not _is_number(progress) or not 0 <= progress <= 100:
        problems.append(f"progress: expected a number in 0..100, got {shown(progress)}")
    elif state == JobState.COMPLETED and progress != 100:
        problems.append(f"progress: a completed job has progress 100, got {shown(progress)}")
    step = record.get("step")
    if step is not None and not isinstance(step, str):
        problems.append(f"step: expected a string or null, got {shown(step)}")
    if record.get("result") is not None and state not in (None, JobState.COMPLETED):
        problems.append(f"result: only a completed job has a result (state is {state})")
    error = record.get("error")
    if error is not None:
        if not (
            isinstance(error, Mapping)
            and set(error) == {"type", "message"}
            and all(isinstance(v, str) for v in error.values())
        ):
            problems.append(f"error: expected {{'type': str, 'message': str}}, got {shown(error)}")
        elif state not in (None, JobState.FAILED):
            problems.append(f"error: only a failed job has an error (state is {state})")
    for name in ("created_at", "updated_at"):
        if not _is_number(record.get(name)):
            problems.append(f"{name}: expected Unix seconds, got {shown(record.get(name))}")
    for name in _OPTIONAL_TIMES:
        value = record.get(name)
        if value is not None and not _is_number(value):
            problems.append(f"{name}: expected Unix seconds or null, got {shown(value)}")
    created, updated = record.get("created_at"), record.get("updated_at")
    if isinstance(created, _NUMBER) and isinstance(updated, _NUMBER) and updated < created:
        problems.append(f"updated_at: {shown(updated)} is before created_at {shown(created)}")
    run_seconds = record.get("run_seconds", 0.0)
    if not _is_number(run_seconds) or run_seconds < 0:
        problems.append(f"run_seconds: expected a non-negative number, got {shown(run_seconds)}")
    for name in ("checkpoint_version", "attempt", "recovery_attempts", "seq"):
        value = record.get(name, 0)
        if not _is_int(value) or value < 0:
            problems.append(f"{name}: expected a non-negative integer, got {shown(value)}")
    has_checkpoint = record.get("checkpoint") is not None
    version = record.get("checkpoint_version", 0)
    if _is_int(version) and has_checkpoint != (version > 0):
        problems.append(
            f"checkpoint_version: {shown(version)} does not match "
            f"{'a present' if has_checkpoint else 'an absent'} checkpoint"
        )
    if has_checkpoint != (record.get("checkpoint_at") is not None):
        problems.append("checkpoint_at: must be set exactly when a checkpoint is")
    reason = record.get("pause_reason")
    if reason is not None and not isinstance(reason, str):
        problems.append(f"pause_reason: expected a string or null, got {shown(reason)}")
    problems += _queue_problems(record)
    version = record.get("schema_version", CURRENT_SCHEMA_VERSION)
    if version != CURRENT_SCHEMA_VERSION:
        problems.append(f"schema_version: expected {CURRENT_SCHEMA_VERSION}, got {shown(version)}")
    return problems


def _queue_problems(record: Mapping[str, Any]) -> list[str]:
    problems: list[str] = []
    priority = record.get("priority", 0)
    if not _is_int(priority) or not 0 <= priority <= MAX_PRIORITY:
        problems.append(
            f"priority: expected an integer in 0..{MAX_PRIORITY}, got {shown(priority)}"
        )
    max_attempts = record.get("max_attempts", 1)
    if not _is_int(max_attempts) or not 1 <= max_attempts <= MAX_ATTEMPTS:
        problems.append(
            f"max_attempts: expected an integer in 1..{MAX_ATTEMPTS}, got {shown(max_attempts)}"
        )
    failed = record.get("failed_attempts", 0)
    if not _is_int(failed) or failed < 0:
        problems.append(f"failed_attempts: expected a non-negative integer, got {shown(failed)}")
    timeout = record.get("timeout")
    if timeout is not None and (not _is_number(timeout) or not 0 < timeout <= MAX_TIMEOUT):
        problems.append(
            f"timeout: expected seconds in (0, {MAX_TIMEOUT:g}] or null, got {shown(timeout)}"
        )
    tags = record.get("tags", ())
    if not isinstance(tags, list | tuple) or len(tags) > MAX_TAGS:
        problems.append(f"tags: expected a list of at most {MAX_TAGS} strings, got {shown(tags)}")
    elif not all(isinstance(t, str) and 0 < len(t) <= MAX_TAG_LENGTH for t in tags) or len(
        set(tags)
    ) != len(tags):
        problems.append(
            f"tags: expected distinct strings of 1..{MAX_TAG_LENGTH} characters, got {shown(tags)}"
        )
    for name, limit in (("parent_id", 256), ("idempotency_key", MAX_KEY_LENGTH), ("owner", 256)):
        value = record.get(name)
        if value is not None and (not isinstance(value, str) or not 0 < len(value) <= limit):
            problems.append(f"{name}: expected a string of 1..{limit} characters or null")
    return problems


# The predecessor (schema 0) wrote camelCase keys, millisecond timestamps and a string error.
_V0_KEYS = {
    "userId": "user_id",
    "type": "kind",
    "status": "state",
    "query": "input",
    "currentStep": "step",
    "checkpointData": "checkpoint",
    "recoveryAttempts": "recovery_attempts",
}
_V0_TIMES = {
    "createdAt": "created_at",
    "updatedAt": "updated_at",
    "startedAt": "started_at",
    "completedAt": "completed_at",
    "failedAt": "failed_at",
    "lastActivityAt": "last_heartbeat_at",
}


def migrate_job_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """Upgrade a stored record to the current schema.

    Version 0 is the predecessor's camelCase shape; version 1 predates the queue fields (each
    takes its default); version 2 is returned as a copy. A record from a newer schema than
    this runtime knows is refused rather than silently truncated.
    """
    if not isinstance(record, Mapping):
        raise InvalidInputError(f"record: expected an object, got {type(record).__name__}")
    version = record.get(
        "schema_version", record.get("schemaVersion", 0 if "userId" in record else 1)
    )
    if version == CURRENT_SCHEMA_VERSION:
        return dict(record)
    if version == 1:
        return {**record, "schema_version": CURRENT_SCHEMA_VERSION}
    if version != 0:
        raise InvalidInputError(
            f"schema_version {shown(version)} is not supported by this runtime "
            f"(it reads 0 to {CURRENT_SCHEMA_VERSION})"
        )
    out: dict[str, Any] = {}
    for key, value in record.items():
        if key in _V0_KEYS:
            out[_V0_KEYS[key]] = value
        elif key in _V0_TIMES:
            out[_V0_TIMES[key]] = None if value is None else value / 1000
        elif key in ("schemaVersion", "schema_version"):
            continue
        else:
            out[key] = value
    if isinstance(out.get("error"), str):
        out["error"] = {"type": "Error", "message": out["error"]}
    out.setdefault("updated_at", out.get("created_at"))
    if out.get("checkpoint") is not None:
        out.setdefault("checkpoint_version", 1)
        out.setdefault("checkpoint_at", out.get("updated_at"))
    out["schema_version"] = CURRENT_SCHEMA_VERSION
    return out
