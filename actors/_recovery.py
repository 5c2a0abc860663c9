"""Recovery metadata, sans-I/O: what can be done with a job and what its checkpoint holds."""

from __future__ import annotations

from typing import Any

import attrs
import orjson

from ._job import Job
from ._states import JobState

__all__ = [
    "CheckpointDetails",
    "CheckpointValidation",
    "RecoveryOptions",
    "checkpoint_details",
    "recovery_options",
    "running_seconds",
    "validate_checkpoint",
]

#: States a restart (from scratch, with new input if given) accepts: a waiting job's restart
#: replaces its input.
RESTARTABLE = frozenset({JobState.CREATED, JobState.PAUSED, JobState.FAILED, JobState.CANCELLED})


@attrs.frozen
class RecoveryOptions:
    job_id: str
    state: JobState
    resumable: bool
    restartable: bool
    has_checkpoint: bool
    checkpoint_version: int
    checkpoint_size: int
    checkpoint_age: float | None
    progress: float
    recovery_attempts: int
    max_recovery_attempts: int
    #: Seconds, from the progress made per second of running time (:func:`running_seconds`);
    #: None until there is a rate to go by.
    estimated_seconds_to_finish: float | None
    reason: str


@attrs.frozen
class CheckpointDetails:
    job_id: str
    version: int
    at: float | None
    size: int
    type: str
    keys: list[str] | None
    sample: Any


@attrs.frozen
class CheckpointValidation:
    job_id: str
    valid: bool
    errors: list[str]
    warnings: list[str]


def _size(value: Any) -> int:
    return 0 if value is None else len(orjson.dumps(value))


def running_seconds(job: Job) -> float:
    """Seconds the job has been running, over all its runs since it was created or restarted:
    finished runs, plus the current one up to its last sign of life. Time spent paused, or with
    the server down, does not count."""
    ran = job.run_seconds
    if job.run_started_at is not None and job.last_heartbeat_at is not None:
        ran += max(0.0, job.last_heartbeat_at - job.run_started_at)
    return ran


def recovery_options(job: Job, now: float, max_recovery_attempts: int) -> RecoveryOptions:
    resumable = job.state is JobState.PAUSED
    restartable = job.state in RESTARTABLE
    if resumable:
        how = (
            f"from checkpoint v{job.checkpoint_version}"
            if job.checkpoint_version
            else "from the start (no checkpoint)"
        )
        reason = f"paused ({job.pause_reason or 'user'}); resume runs {how}"
    elif job.state is JobState.CREATED:
        reason = "waiting (created); nothing to recover: a restart replaces its input"
    elif restartable:
        reason = f"{job.state.value}; only a restart (from scratch) brings it back"
    else:
        reason = f"{job.state.value}; nothing to recover"
    estimate = None
    ran = running_seconds(job)
    if ran > 0 and 0 < job.progress < 100:
        estimate = ran / job.progress * (100 - job.progress)
    return RecoveryOptions(
        job_id=job.id,
        state=job.state,
        resumable=resumable,
        restartable=restartable,
        has_checkpoint=job.checkpoint_version > 0,
        checkpoint_version=job.checkpoint_version,
        checkpoint_size=_size(job.checkpoint),
        checkpoint_age=None if job.checkpoint_at is None else max(0.0, now - job.checkpoint_at),
        progress=job.progress,
        recovery_attempts=job.recovery_attempts,
        max_recovery_attempts=max_recovery_attempts,
        estimated_seconds_to_finish=estimate,
        reason=reason,
    )


def _sample(value: Any, items: int) -> Any:
    if isinstance(value, dict):
        return {k: _sample(v, 3) for k, v in list(value.items())[:items]}
    if isinstance(value, list):
        return [_sample(v, 3) for v in value[:items]]
    if isinstance(value, str) and len(value) > 80:
        return value[:77] + "..."
    return value


def checkpoint_details(job: Job, sample_items: int = 5) -> CheckpointDetails:
    data = job.checkpoint
    return CheckpointDetails(
        job_id=job.id,
        version=job.checkpoint_version,
        at=job.checkpoint_at,
        size=_size(data),
        type="none" if data is None else type(data).__name__,
        keys=sorted(data) if isinstance(data, dict) else None,
        sample=_sample(data, sample_items),
    )


def validate_checkpoint(job: Job, warn_size: int, limit: int) -> CheckpointValidation:
    errors: list[str] = []
    warnings: list[str] = []
    has = job.checkpoint is not None
    try:
        size = _size(job.checkpoint)
    except TypeError as exc:
        errors.append(f"checkpoint does not encode as JSON: {exc}")
        size = 0
    if has != (job.checkpoint_version > 0):
        errors.append(
            f"checkpoint_version {job.checkpoint_version} does not match "
            f"{'a present' if has else 'an absent'} checkpoint"
        )
    if has != (job.checkpoint_at is not None):
        errors.append("checkpoint_at must be set exactly when a checkpoint is")
    if size > limit:
        errors.append(f"checkpoint is {size} bytes, over the hard limit of {limit}")
    elif size > warn_size:
        warnings.append(f"checkpoint is {size} bytes, over the warning size of {warn_size}")
    if job.state is JobState.CREATED and has:
        errors.append("a created job has no checkpoint (restart clears it)")
    if job.state is JobState.PAUSED and job.pause_reason == "recovery" and not has:
        errors.append("paused by recovery without a checkpoint")
    if job.state is JobState.PAUSED and not has:
        warnings.append("no checkpoint: resume starts from the beginning")
    return CheckpointValidation(job.id, not errors, errors, warnings)
