"""Typed errors raised by the runtime.

Every error a caller can provoke is a subclass of :class:`JobspineError` and carries a short,
stable ``code`` (used by the transport layer) next to a human-readable message.
"""

from __future__ import annotations

import trio

__all__ = [
    "CheckpointTooLargeError",
    "IdempotencyConflictError",
    "IllegalTransitionError",
    "InvalidInputError",
    "InvalidParentError",
    "JobspineError",
    "JobStopped",
    "NotSerializableError",
    "PermanentError",
    "ResultTooLargeError",
    "RuntimeClosedError",
    "RuntimeCrashedError",
    "StaleAttemptError",
    "StaleWriteError",
    "StoreError",
    "StoreUnavailableError",
    "TooManyJobsError",
    "UnknownJobError",
    "UnknownKindError",
    "shown",
    "shown_names",
]

#: Characters of a caller's value that an error message or a log line quotes (see
#: :func:`shown`).
SHOWN_LIMIT = 100


def shown(value: object, limit: int = SHOWN_LIMIT) -> str:
    """``value`` quoted for an error message or a log line that echoes what a caller gave (a
    job id, a kind, a field name, a header): its ``repr``, so that every character that is not
    printable is escaped (a newline cannot forge a line, an escape drive a terminal), cut past
    about ``limit`` characters with an ellipsis and its length: ``'01ABC'… (300,000
    characters)``. The one helper of every such message, so that a value of any size gives a
    message of a bounded size (an error reply always fits in a frame). An integer too long
    for ``repr`` (over Python's 4,300 digits) is shown by its size."""
    if isinstance(value, str):
        head = value[:limit]
        text = repr(head)
        # Escapes take up to 10 characters (\U0001f600): keep the quote about ``limit`` long.
        while len(text) > limit + 2 and len(head) > 1:
            head = head[: max(1, len(head) * limit // len(text))]
            text = repr(head)
        if len(head) == len(value):
            return text
        return f"{text}… ({len(value):,} characters)"
    try:
        text = repr(value)
    except ValueError:  # int's digit limit: no str() of it at all
        return f"an integer of {value.bit_length():,} bits"  # type: ignore[attr-defined]
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text):,} characters)"


def shown_names(names: list[str], count: int = 20, width: int = 64) -> str:
    """``names`` (kinds, say) for a message or a log line: the first ``count``, each as it is
    when printable and at most ``width`` characters, else quoted by :func:`shown`, and how
    many more (a hello may declare 256 kinds of 1,024 characters)."""
    cut = [
        name if len(name) <= width and name.isprintable() else shown(name, width)
        for name in names[:count]
    ]
    more = f" and {len(names) - count:,} more" if len(names) > count else ""
    return ", ".join(cut) + more


def one_line(error: BaseException) -> str:
    """``error``'s message on one line: every run of whitespace, newlines included, one space.
    For a reason or a log line quoting a driver's error, which may be several lines (psycopg
    adds the server's ``HINT:`` and ``DETAIL:`` on lines of their own)."""
    return " ".join(str(error).split())


class JobspineError(Exception):
    """Base class of every error the runtime raises on purpose."""

    code = "error"


class UnknownJobError(JobspineError, LookupError):
    code = "unknown_job"

    def __init__(self, job_id: str) -> None:
        super().__init__(f"no job with id {shown(job_id)}")
        self.job_id = job_id


class UnknownKindError(JobspineError, LookupError):
    code = "unknown_kind"

    def __init__(self, kind: str, known: list[str] | None = None) -> None:
        hint = f" (registered: {shown_names(sorted(known))})" if known else ""
        super().__init__(f"no handler registered for job kind {shown(kind)}{hint}")
        self.kind = kind


def _transition_hint(from_state: str, to_state: str) -> str | None:
    """Why a job in ``from_state`` cannot move to ``to_state``, in a user's words."""
    if from_state == "completed":
        return "a completed job is final: its result is kept"
    if from_state == to_state:
        return (
            "it is waiting in the queue already"
            if from_state == "created"
            else (f"it is {from_state} already")
        )
    if to_state == "paused":
        return "only a waiting or running job can be paused"
    if to_state == "cancelled":
        return "it has ended already"
    if to_state == "recovering":
        return "only a running job is recovered"
    if from_state == "running" and to_state in ("created", "deleted"):
        return "it is running: pause or cancel it first"
    return None


class IllegalTransitionError(JobspineError):
    code = "illegal_transition"

    def __init__(
        self, job_id: str, from_state: str, to_state: str, *, hint: str | None = None
    ) -> None:
        """``hint``: the operation's own reason, where the transition alone would mislead
        (``resume`` of a running job is not fixed by pausing it first)."""
        hint = hint or _transition_hint(from_state, to_state)
        super().__init__(
            f"job {job_id}: illegal transition {from_state} -> {to_state}"
            + (f" ({hint})" if hint else "")
        )
        self.job_id = job_id
        self.from_state = from_state
        self.to_state = to_state


class StaleAttemptError(JobspineError):
    """An update carried an attempt (fencing token) that is no longer the job's current run:
    ``attempt`` the update's, ``current`` the job's latest, ``state`` the job's state.
    ``what``: the update, as the message names it (``progress``, ``a checkpoint``...)."""

    code = "stale_attempt"

    def __init__(
        self, job_id: str, attempt: int, current: int, state: str, what: str = "an update"
    ) -> None:
        if state != "running" and attempt <= current:
            # The job runs no attempt now: say the attempt is over, not which one runs.
            later = "" if attempt == current else f" (attempt {current} came after it)"
            message = (
                f"job {job_id} is {state}: its attempt {attempt} has ended{later};"
                f" {what} after the end is refused"
            )
        else:
            message = (
                f"job {job_id}: {what} from attempt {attempt} rejected:"
                f" the job is {state} with current attempt {current}"
            )
        super().__init__(message)
        self.job_id = job_id
        self.attempt = attempt
        self.current = current


class InvalidInputError(JobspineError, ValueError):
    """A value given by a caller is out of range or of the wrong shape."""

    code = "invalid_input"


class NotSerializableError(InvalidInputError):
    code = "not_serializable"


class CheckpointTooLargeError(InvalidInputError):
    code = "checkpoint_too_large"

    def __init__(self, job_id: str, size: int, limit: int) -> None:
        super().__init__(
            f"job {job_id}: checkpoint of {size} bytes exceeds the limit of {limit} bytes;"
            " the previous checkpoint is kept"
        )
        self.size = size
        self.limit = limit


class ResultTooLargeError(InvalidInputError):
    """A handler returned a result larger than ``result_limit``; the job fails with this."""

    code = "result_too_large"

    def __init__(self, job_id: str, size: int, limit: int, setting: str = "result_limit") -> None:
        """``setting``: what sets ``limit`` (a ``jobspine worker``'s reports are bounded by
        the server's frame size too)."""
        super().__init__(
            f"job {job_id}: result of {size} bytes exceeds the limit of {limit} bytes"
            f" ({setting}); store large outputs elsewhere and return a reference"
        )
        self.size = size
        self.limit = limit


class InvalidParentError(InvalidInputError):
    """``parent_id`` names no job of the caller's user. The message is the same whether the
    job does not exist or belongs to another user, so it reveals neither."""

    code = "invalid_parent"

    def __init__(self, parent_id: str) -> None:
        super().__init__(f"no job {shown(parent_id)} of this user to be the parent")
        self.parent_id = parent_id


class IdempotencyConflictError(JobspineError):
    """A create reused an idempotency key of the same user, within ``idempotency_window``,
    for a different request (kind, input or options). The same request gets the first job."""

    code = "idempotency_conflict"

    def __init__(self, key: str, job_id: str) -> None:
        super().__init__(
            f"idempotency key {shown(key)} was used for job {job_id} with a different request"
            " (kind, input or options); use a new key for a new job"
        )
        self.key = key
        self.job_id = job_id


class TooManyJobsError(JobspineError):
    """The user's waiting quota (``max_waiting_per_user`` jobs waiting) is full."""

    code = "too_many_jobs"


class StoreError(JobspineError):
    """The database failed; the request was not applied."""

    code = "store_error"


class StoreUnavailableError(StoreError):
    """The database stayed unavailable (locked, unreachable, out of space) for longer than
    ``store_retry_timeout``; nothing of the request was applied. Not the job's fault: a
    worker whose write got this is paused, never failed."""


class StaleWriteError(StoreError):
    """A commit lost a job to another writer: the job as stored is no longer the one the
    change was based on (another node took it over or changed it since it was read). Tied to
    the request, not an outage: the store reloads the job and applies the request again,
    which its own checks then refuse (:class:`StaleAttemptError`, :class:`IllegalTransitionError`).
    ``job_ids``: the jobs lost, sorted. Its code is ``store_error``'s."""

    def __init__(self, job_ids: list[str]) -> None:
        super().__init__(
            f"job {', '.join(job_ids)} changed by another writer since it was read;"
            " nothing was saved"
        )
        self.job_ids = job_ids


class RuntimeClosedError(JobspineError):
    code = "runtime_closed"


class RuntimeCrashedError(JobspineError):
    """An actor of the runtime failed; ``__cause__`` holds what it raised."""

    code = "runtime_crashed"


def leaves(error: BaseException) -> list[BaseException]:
    """The exceptions inside nested exception groups."""
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in leaves(inner)]
    return [error]


def unwrap_group(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one exception a group stands for at a public boundary: its only non-cancellation
    leaf, else the group itself. One exception raised in two tasks (a client's fatal error,
    from its connection task and from the ``events()`` the application iterates) is one."""
    found = {id(e): e for e in leaves(group) if not isinstance(e, trio.Cancelled)}
    return next(iter(found.values())) if len(found) == 1 else group


class PermanentError(Exception):
    """Raised by a handler for a failure that no retry can fix (bad data, a refused request):
    the job fails at once, whatever attempts it has left. Recorded with its own type name
    (``PermanentError`` or the subclass's) and message."""


class JobStopped(Exception):  # noqa: N818 - a signal, not an error condition
    """Raised by a handler to acknowledge a stop request (a pause, a shutdown, a hand-back:
    ``ctx.stopping`` is true), alone or from its nursery.

    The runtime then records the stop; it is never recorded as the job's failure. Raised with
    no stop asked, it acknowledges nothing: the attempt fails (error type ``JobStopped``, saying
    so), retried by the kind's policy like any failure, so that the job never stays running
    with nothing running it.
    """
