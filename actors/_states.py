"""The job state machine: every allowed transition, in one table, enforced in one place."""

from __future__ import annotations

import enum

from ._errors import IllegalTransitionError

__all__ = ["TERMINAL_STATES", "TRANSITIONS", "JobState", "check_transition"]


class JobState(enum.StrEnum):
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


S = JobState

#: from-state -> the states it may move to, and why.
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    # created: dispatched to a worker, cancelled before it ran, or refused at dispatch.
    S.CREATED: frozenset({S.RUNNING, S.CANCELLED, S.FAILED}),
    # running: finishes, fails, is cancelled, or is paused (by a user, by shutdown or by stall
    # recovery with a checkpoint).
    S.RUNNING: frozenset({S.COMPLETED, S.FAILED, S.CANCELLED, S.PAUSED}),
    # paused: resumed (a new attempt), restarted from scratch, cancelled.
    S.PAUSED: frozenset({S.RUNNING, S.CREATED, S.CANCELLED}),
    # failed and cancelled: only a restart brings a job back.
    S.FAILED: frozenset({S.CREATED}),
    S.CANCELLED: frozenset({S.CREATED}),
    # completed is final: its result is never overwritten.
    S.COMPLETED: frozenset(),
}

TERMINAL_STATES = frozenset({S.COMPLETED, S.FAILED, S.CANCELLED})


def check_transition(job_id: str, from_state: JobState, to_state: JobState) -> None:
    """Raise :class:`IllegalTransitionError` unless ``from_state -> to_state`` is allowed."""
    if to_state not in TRANSITIONS[from_state]:
        raise IllegalTransitionError(job_id, from_state.value, to_state.value)
