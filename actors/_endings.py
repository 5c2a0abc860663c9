"""Sans-I/O: how the exception a handler raised ends its attempt.

Every way out of a handler ends its attempt in an outcome someone records: it returned (the
worker stores the result), it was stopped (whoever asked for the stop stores that decision,
which :func:`judge` reports as ``stopped``), the job moved on from the attempt (the decision
that moved it is stored already: ``fenced``), the database was unavailable (the worker pauses
the job at its last checkpoint: ``store_unavailable``), or it failed (the worker stores the
failure, retried by the kind's retry policy: ``failed``). ``stopped`` is only ever the answer
when a stop was asked: a handler raising :class:`JobStopped` unasked fails its attempt, since
no one else would record anything and the job would stay running with nothing running it.

**Exception groups** (a handler's own nursery) are public boundaries too, so they become one
typed error: their leaves are judged together. A leaf saying the database was unavailable
decides for the whole attempt; leaves acknowledging an asked stop are set aside (all of them:
``stopped``); then a leaf proving the job moved on decides; the rest fail the attempt, recorded
as one of them (see :func:`failure`).

**What a handler raises** ends its attempt, ``BaseException`` or not (see
:func:`split_raised`): only an interrupt and a cancellation of the attempt propagate.
``sys.exit()`` in a handler's code (argparse or click refusing arguments call it too) is that
job's fault, not a request to stop the process running every other job: pytest treats it in a
test the same way, and Celery fails the task whose process exited.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import attrs
import trio

from ._errors import (
    JobspineError,
    JobStopped,
    PermanentError,
    StaleAttemptError,
    StoreUnavailableError,
    leaves,
)
from ._job import JobError

__all__ = [
    "STRAY_CANCELLED",
    "UNASKED_STOP",
    "Ending",
    "HandlerFailure",
    "describe",
    "failure",
    "judge",
    "judge_exit",
    "split_raised",
]

#: The message an unasked :class:`JobStopped` fails its attempt with.
UNASKED_STOP = (
    "JobStopped raised with no stop asked: it only acknowledges a stop (a pause, a shutdown or"
    " a hand-back, once ctx.stopping is true)"
)
#: The message a ``trio.Cancelled`` raised with no cancellation of its attempt under way fails
#: the attempt with.
STRAY_CANCELLED = (
    "trio.Cancelled raised with no cancellation of this attempt under way (one kept from a"
    " cancel scope that has ended, raised again?)"
)
#: Leaves of a group named in the recorded message besides the one it is recorded as.
MAX_NAMED_LEAVES = 10


class HandlerFailure(Exception):  # noqa: N818 - carries an outcome, like JobStopped
    """Raised by a handler that runs the job elsewhere (a remote worker) to record the
    failure reported there: the job fails with ``error`` as given, not with this type."""

    def __init__(self, error: JobError, permanent: bool = False) -> None:
        super().__init__(f"{error.type}: {error.message}")
        self.error = error
        #: The handler raised a :class:`PermanentError` there: no retry.
        self.permanent = permanent


@attrs.frozen
class Ending:
    """How an attempt whose handler raised ends.

    ``how``: ``stopped`` (a stop was asked and acknowledged: its asker records it),
    ``fenced`` (the store refused this attempt's write: the job moved on), ``store_unavailable``
    (paused at the last checkpoint, no failure counted) or ``failed``. ``error`` is the error
    recorded for ``failed`` (and what the other endings log), None for ``stopped``;
    ``permanent``: no retry whatever attempts are left. ``cause``: what to log with its
    traceback: the exception ``error`` comes from (the whole group when it was recorded from
    one of several), None for ``stopped``."""

    how: Literal["stopped", "fenced", "store_unavailable", "failed"]
    error: JobError | None = None
    permanent: bool = False
    cause: BaseException | None = None


def split_raised(
    raised: BaseException, *, cancelled: bool
) -> tuple[BaseException | None, BaseException | None]:
    """``raised`` (what a handler raised: one exception or a group) split into the handler's
    own, which end its attempt (:func:`judge`), and the runtime's, which propagate: a
    ``KeyboardInterrupt``, and a ``trio.Cancelled`` while ``cancelled`` (the attempt, or
    the runtime around it, is being cancelled). Either part is None when empty.

    Every other exit is the handler's, ``BaseException`` or not: a ``SystemExit`` (argparse
    or ``sys.exit`` called in a handler), a ``GeneratorExit``, an ``asyncio.CancelledError``,
    a ``trio.Cancelled`` with no cancellation under way (kept from a cancel scope that has
    ended and raised again). Propagated, it would end the task that runs every attempt, and
    every other job with it (or, a stray Cancelled, end it silently: no job ever ran again)."""

    def runtime(exc: BaseException) -> bool:
        return isinstance(exc, KeyboardInterrupt) or (cancelled and isinstance(exc, trio.Cancelled))

    if isinstance(raised, BaseExceptionGroup):
        theirs, own = raised.split(runtime)
        return own, theirs
    return (None, raised) if runtime(raised) else (raised, None)


def judge_exit(
    raised: BaseException,
    *,
    job_id: str,
    attempt: int,
    stop_asked: bool,
    non_retryable: frozenset[str] = frozenset(),
) -> tuple[Ending | None, BaseException | None]:
    """What a handler's call raised (in its ``except BaseException`` block), split by
    :func:`split_raised` as the current task stands (being cancelled or not): the ending of
    the handler's own part (:func:`judge`; None when all of it is the runtime's) and the
    runtime's part, which the caller raises again (None when there is none)."""
    cancelled = trio.current_effective_deadline() == -math.inf
    own, theirs = split_raised(raised, cancelled=cancelled)
    if own is None:
        return None, theirs
    judged = judge(
        own, job_id=job_id, attempt=attempt, stop_asked=stop_asked, non_retryable=non_retryable
    )
    return judged, theirs


def judge(
    raised: BaseException,
    *,
    job_id: str,
    attempt: int,
    stop_asked: bool,
    non_retryable: frozenset[str] = frozenset(),
) -> Ending:
    """How ``raised`` (an exception, or a group of them, from attempt ``attempt`` of job
    ``job_id``) ends the attempt; ``stop_asked``: the runtime asked the attempt to stop (a
    pause, a shutdown, a hand-back, a timeout, a cancel, a stall); ``non_retryable``: the
    kind's error type names that are not retried (see :func:`failure`)."""
    found = leaves(raised)
    for leaf in found:
        # The database's fault, not the job's, even beside the errors it caused.
        if isinstance(leaf, StoreUnavailableError):
            return Ending("store_unavailable", _error_of(leaf), cause=leaf)
    if stop_asked:
        # JobStopped acknowledges the stop; a runtime error while stopping means the job was
        # taken from this attempt meanwhile. Its asker records the outcome either way.
        found = [leaf for leaf in found if not isinstance(leaf, JobStopped | JobspineError)]
        if not found:
            return Ending("stopped")
    for leaf in found:
        # The store raises it with this attempt's own job and number when it refuses the
        # attempt's write: the decision that moved the job on is stored, and any write of
        # this attempt would be refused too. (One of another attempt, from a context kept
        # past its attempt, proves nothing about this one: recorded as a failure, which the
        # store refuses if the job did move on.)
        if (
            isinstance(leaf, StaleAttemptError)
            and leaf.job_id == job_id
            and leaf.attempt == attempt
        ):
            return Ending("fenced", _error_of(leaf), cause=leaf)
    ending = failure(found, non_retryable)
    if len(found) > 1:
        # Logged with every leaf's traceback, not only the recorded one's.
        ending = attrs.evolve(ending, cause=raised)
    return ending


def failure(found: Sequence[BaseException], non_retryable: frozenset[str]) -> Ending:
    """The ``failed`` ending of an attempt whose handler raised the exceptions ``found``
    (one or more: the leaves of a group), recorded as one of them: the first that stops
    retries (a :class:`PermanentError`, or of a type in ``non_retryable``), else the first.
    The recorded message names the others after its own.

    Why one leaf that stops retries is enough: a retry runs the whole attempt again, so it
    meets each leaf's cause again, and one that no retry can fix makes every retry futile (and
    repeats the side effects of the rest). Temporal and Celery decide a retry on the type of
    the error a task raised (Temporal's non-retryable errors and ``non_retryable_error_types``,
    Celery's ``autoretry_for`` and ``dont_autoretry_for``): their users expect the errors their
    code raised to decide, not the group Trio wraps them in, and an error they marked as not
    retryable never to be retried, whatever was raised beside it. Recording the deciding leaf
    keeps the stored error type the one the decision was made on: ``non_retryable`` matches
    it, and a reader sees why the job was not retried."""
    errors = [_error_of(leaf) for leaf in found]
    final = [
        i for i, leaf in enumerate(found) if _permanent(leaf) or errors[i].type in non_retryable
    ]
    chosen = final[0] if final else 0
    error = errors[chosen]
    others = errors[:chosen] + errors[chosen + 1 :]
    if others:
        named = "; ".join(f"{e.type}: {e.message}" for e in others[:MAX_NAMED_LEAVES])
        unnamed = len(others) - MAX_NAMED_LEAVES
        more = f"; and {unnamed} more" if unnamed > 0 else ""
        plural = "s" if len(others) > 1 else ""
        error = JobError(
            error.type,
            f"{error.message} (and {len(others)} other error{plural} from this attempt:"
            f" {named}{more})",
        )
    return Ending("failed", error, _permanent(found[chosen]), found[chosen])


def _permanent(leaf: BaseException) -> bool:
    if isinstance(leaf, HandlerFailure):
        return leaf.permanent
    return isinstance(leaf, PermanentError)


def _error_of(leaf: BaseException) -> JobError:
    if isinstance(leaf, HandlerFailure):
        return leaf.error
    if isinstance(leaf, SystemExit):
        return JobError("SystemExit", f"sys.exit({_exit_argument(leaf)}) in the handler")
    if isinstance(leaf, JobStopped):
        # Set aside when a stop was asked (see judge): here, raised with none.
        detail = f" ({describe(leaf)})" if leaf.args else ""
        return JobError("JobStopped", UNASKED_STOP + detail)
    if isinstance(leaf, trio.Cancelled):
        # Only a stray one is judged (see split_raised): its own text says nothing useful.
        return JobError("Cancelled", STRAY_CANCELLED)
    return JobError(type(leaf).__name__, describe(leaf))


def _exit_argument(exit: SystemExit) -> str:
    """The argument ``sys.exit`` was given (its code, or its message), as written in a call."""
    try:
        return repr(exit.code) if exit.code is not None else ""
    except Exception:  # the handler's object: its __repr__ may raise
        return "…"


def describe(exc: BaseException) -> str:
    """The message recorded for a handler's exception. An exception is the handler's object:
    its ``__str__`` or ``__repr__`` may raise, and that must fail its job, not the runtime."""
    for render in (str, repr):
        try:
            text = render(exc)
        except Exception:  # the next rendering is the fallback
            continue
        if text:
            return text
    return f"{type(exc).__name__} (its message could not be rendered)"
