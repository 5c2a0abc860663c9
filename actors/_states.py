"""The job state machine: every allowed transition, in one table, enforced in one place.

There is no separate "queued" or "retrying" state: ``created`` is waiting in the queue. A
waiting job's ``run_at`` (not before, Unix seconds; None: at once) covers a delayed start and
the backoff before a retry, so one state means one claim query and one index over waiting
jobs, and clients that know ``created`` keep working. A job waiting to be retried is told apart
by ``failed_attempts > 0`` and by the ``retrying`` event that put it back.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

from ._errors import IllegalTransitionError, InvalidInputError, shown

__all__ = ["TERMINAL_STATES", "TRANSITIONS", "JobState", "check_transition", "parse_states"]


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
    # created (waiting): claimed by a worker, cancelled or paused before it ran, restarted
    # with new input, or refused at dispatch.
    S.CREATED: frozenset({S.RUNNING, S.CANCELLED, S.FAILED, S.PAUSED, S.CREATED}),
    # running: finishes, fails, is cancelled, is paused (by a user, by shutdown or by stall
    # recovery with a checkpoint), or goes back to the queue (a retry after a failed attempt,
    # a stalled job re-queued at its checkpoint).
    S.RUNNING: frozenset({S.COMPLETED, S.FAILED, S.CANCELLED, S.PAUSED, S.CREATED}),
    # paused: resumed (back to the queue, claimed from its checkpoint), restarted from
    # scratch, cancelled.
    S.PAUSED: frozenset({S.CREATED, S.CANCELLED}),
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


def parse_states(values: object, name: str = "states") -> frozenset[JobState]:
    """A filter's states: ``values`` an iterable (a list, a tuple, a set) of distinct states,
    at least one, each a :class:`JobState` or its value (``"created"``). A string, one state
    included, is refused rather than read as its characters or guessed at: one state is
    ``["created"]``, as the protocol's ``states`` array. Raises :class:`InvalidInputError`
    naming the filter (``name``)."""
    known = ", ".join(state.value for state in JobState)
    if isinstance(values, str | bytes):
        raise InvalidInputError(
            f"{name} must be a list of states, not a string: [{shown(str(values))}] for one"
        )
    if not isinstance(values, Iterable):
        raise InvalidInputError(f"{name} must be a list of states, not {type(values).__name__}")
    given = list(values)
    unknown = [value for value in given if not (isinstance(value, str) and value in _VALUES)]
    if unknown or not given or len(set(given)) != len(given):
        raise InvalidInputError(
            f"{name} must be distinct states, at least one, of: {known}"
            + (f" (unknown: {shown(unknown[0])})" if unknown else "")
        )
    return frozenset(JobState(value) for value in given)


#: Every state's value; a JobState is equal to (and hashes as) its value.
_VALUES = frozenset(state.value for state in JobState)
