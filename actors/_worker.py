"""Worker actors: the handler API (:class:`JobContext`) and the task that runs one attempt."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import trio

from ._codec import check_kind
from ._endings import Ending, HandlerFailure, judge_exit
from ._errors import (
    InvalidInputError,
    JobspineError,
    PermanentError,
    StoreError,
    StoreUnavailableError,
    shown,
)
from ._job import Job, JobError
from ._joblog import job_fields
from ._states import JobState
from ._tracing import AttributeValue, span

if TYPE_CHECKING:
    from ._scheduling import RetryDecision
    from ._store import StoreClient

#: :attr:`Worker.outcome` of an attempt stopped before its handler started.
NOT_STARTED = "not_started"

#: ``decide(job as stored, error, permanent)``: whether a failed attempt is retried.
RetryDecider = Callable[[Job, JobError, bool], "RetryDecision"]

__all__ = [
    "NOT_STARTED",
    "ContextBacking",
    "ContextStore",
    "Handler",
    "HandlerFailure",
    "InputCheck",
    "JobContext",
    "Worker",
    "check_handler",
    "check_input",
    "validates",
]

log = logging.getLogger("jobspine.worker")


class Handler(Protocol):
    def __call__(self, ctx: JobContext, input: Any, /) -> Awaitable[Any]: ...


class ContextStore(Protocol):
    """Where a :class:`JobContext` writes: the store client in the server, the connection to
    the server in a ``jobspine worker``. Both fence every write by ``attempt``."""

    async def set_progress(
        self, job_id: str, attempt: int, pct: float, step: str | None, *, durable: bool = True
    ) -> object: ...

    async def checkpoint(self, job_id: str, attempt: int, data: Any) -> object: ...


class ContextBacking(Protocol):
    """What a :class:`JobContext` reports liveness to: a :class:`Worker` here, or its
    counterpart in a remote worker process."""

    keep_alive: int

    @property
    def store(self) -> ContextStore: ...

    def beat(self, *, persist: bool = False) -> None: ...

    def alive(self) -> None:
        """After a progress or checkpoint write: the job is alive (the write itself stores
        ``last_heartbeat_at``)."""


#: ``check(input)``: refuses a handler's input by raising (its return value is ignored).
InputCheck = Callable[[Any], object]
_H = TypeVar("_H", bound=Callable[..., Awaitable[Any]])


def validates(check: InputCheck) -> Callable[[_H], _H]:
    """Decorator giving a handler its input check, stored as its ``validate_input``
    attribute (a handler object may define a ``validate_input`` method instead).

    The runtime calls ``check(input)`` in ``create_job`` and in ``restart`` (on the input
    after the modifications), before anything is stored: raising :class:`InvalidInputError`
    (or ``ValueError``/``TypeError``) refuses the request with ``invalid_input``, so that
    input the handler cannot run never becomes a job that fails on its first line."""

    def mark(handler: _H) -> _H:
        handler.validate_input = check  # type: ignore[attr-defined]
        return handler

    return mark


def check_handler(kind: object, handler: object) -> None:
    """Raise :class:`InvalidInputError` unless ``kind`` is a name a job can be created with
    (:func:`~._codec.check_kind`) and ``handler`` can be called as ``handler(ctx, input)``:
    every registration checks both before it changes anything (a handler of None was taken,
    and its jobs never ran; one taking only ``ctx`` was taken, and each of its jobs failed
    with Python's ``TypeError`` naming neither the kind nor the fix)."""
    check_kind(kind)
    if not callable(handler):
        raise InvalidInputError(
            f"the handler of kind {shown(kind)} must be an async function (ctx, input),"
            f" not {type(handler).__name__}"
        )
    # The callable's own signature: a wrapper is called as it is, and the function its
    # functools.wraps names (__wrapped__) may take other arguments (one it injects, or no input).
    try:
        signature = inspect.signature(handler, follow_wrapped=False)
    except Exception:
        # A callable Python cannot describe (TypeError, ValueError), or whose own attributes
        # raise as inspect reads them (a __signature__ property, a __getattr__ raising other
        # than AttributeError): judged when called, never a crash of the registration.
        return
    try:
        signature.bind(None, None)
    except TypeError as exc:
        raise InvalidInputError(
            f"the handler of kind {shown(kind)} cannot be called with (ctx, input): {exc};"
            " a handler is async def handler(ctx, input)"
        ) from None


async def call_handler(handler: Handler, kind: str, ctx: JobContext, input: Any) -> Any:
    """Run ``handler(ctx, input)`` and return its result. A handler that is not async (a
    plain ``def``) has run to its end when it returns, and what it returned cannot be
    awaited: that raises :class:`PermanentError` saying so, never retried (every attempt
    would meet it again), instead of Python's ``object int can't be used in 'await'
    expression``, which named neither the kind nor the fix."""
    # Registration cannot tell: a plain function that returns a coroutine (a wrapper, a
    # lambda) is a handler too, so what it returns is what is checked.
    awaitable = handler(ctx, input)
    if not inspect.isawaitable(awaitable):
        raise PermanentError(
            f"the handler of kind {shown(kind)} returned {type(awaitable).__name__}, not an"
            " awaitable: a handler is an async function, async def handler(ctx, input)"
        )
    return await awaitable


def check_input(handler: Handler, kind: str, input: Any) -> None:
    """Run the handler's input check, if it has one; raises :class:`InvalidInputError` for
    whatever the check raises (a :class:`JobspineError` as it is)."""
    check: InputCheck | None = getattr(handler, "validate_input", None)
    if check is None:
        return
    try:
        check(input)
    except JobspineError:
        raise
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"{kind}: invalid input: {exc}") from None
    except Exception as exc:
        # A check that trips over the input (input["n"] of input without "n") refuses it
        # too, named by its error: never a crash of the create, or of a worker process.
        raise InvalidInputError(f"{kind}: invalid input: {type(exc).__name__}: {exc}") from None


class JobContext:
    """What a handler sees of its job. One context per attempt."""

    __slots__ = (
        "_stop",
        "_stop_requested",
        "_worker",
        "attempt",
        "job_id",
        "kind",
        "resumed_from",
        "user_id",
    )

    def __init__(self, worker: ContextBacking, job: Job, resumed_from: Any) -> None:
        self._worker = worker
        self.job_id = job.id
        self.user_id = job.user_id
        self.kind = job.kind
        self.attempt = job.attempt
        #: The checkpoint this attempt resumes from, or None on a fresh start.
        self.resumed_from = resumed_from
        self._stop_requested = False
        # Made by the first wait_stopping() only: most attempts never wait for a stop, and an
        # idle job's every object counts (an Event and its set are about 270 bytes).
        self._stop: trio.Event | None = None

    @property
    def stopping(self) -> bool:
        """True once the runtime asked this job to stop (a pause or shutdown). The handler has
        the grace period to save a checkpoint and return or raise :class:`JobStopped`;
        after it, the handler is cancelled. Also True once this attempt has ended: a task
        that kept the context past its handler's return stops too."""
        return self._stop_requested

    async def wait_stopping(self) -> None:
        """Returns once :attr:`stopping` is True (at once when it is already)."""
        if self._stop is None:
            self._stop = trio.Event()
            if self._stop_requested:
                self._stop.set()
        await self._stop.wait()

    def _request_stop(self) -> None:
        """The runtime (or a worker process's server) asks this attempt to stop."""
        self._stop_requested = True
        if self._stop is not None:
            self._stop.set()

    async def heartbeat(self) -> None:
        """Tell the supervisor this job is alive. Cheap, coalesced, never blocks on I/O."""
        self._worker.beat(persist=True)
        await trio.lowlevel.checkpoint()

    async def progress(self, pct: float, step: str | None = None) -> None:
        """Record progress (0..100) and the current step label; returns once the store has
        ordered it into its next group commit, without waiting for that commit: the event is
        durable within one commit (milliseconds), and no client sees it before it is. A
        crash in between loses it with the run's other progress since the last checkpoint,
        which is what a restart resumes from; :meth:`checkpoint` returns only once durable.

        Raises :class:`InvalidInputError` (or :class:`NotSerializableError`) for a value that
        cannot be stored, before anything is queued; :class:`StaleAttemptError` (or another
        :class:`JobspineError`) when the job no longer runs this attempt. While the database
        is unavailable it waits for the commit, and raises :class:`StoreUnavailableError` when
        the database stayed unavailable for ``store_retry_timeout`` (the job is then paused,
        not failed, if the handler lets it propagate). While the call waits on the database
        the job counts as alive."""
        worker = self._worker
        worker.keep_alive += 1
        try:
            await worker.store.set_progress(self.job_id, self.attempt, pct, step, durable=False)
        finally:
            worker.keep_alive -= 1
        worker.alive()

    async def checkpoint(self, data: Any) -> None:
        """Save ``data`` (JSON) as the job's checkpoint; returns once it is durable. Errors
        and liveness as for :meth:`progress`."""
        worker = self._worker
        worker.keep_alive += 1
        try:
            with span(
                "jobspine.checkpoint", lambda: {"job.id": self.job_id, "job.attempt": self.attempt}
            ):
                await worker.store.checkpoint(self.job_id, self.attempt, data)
        finally:
            worker.keep_alive -= 1
        worker.alive()

    @contextmanager
    def keep_alive(self) -> Iterator[None]:
        """Count this job as alive while the block runs (one long await with no heartbeats).

        No task is spawned: the supervisor's shared deadline check re-arms a kept-alive job
        instead of declaring it stalled.
        """
        self._worker.keep_alive += 1
        try:
            yield
        finally:
            self._worker.keep_alive -= 1
            self._worker.beat(persist=True)


class Worker:
    """One attempt of one job: its cancel scope (owned by the supervisor) and liveness state."""

    # Thousands live at once: slots keep each one small.
    __slots__ = (
        "_beat_queued",
        "_beats",
        "attempt",
        "ctx",
        "decide",
        "finished",
        "handler",
        "input",
        "job_id",
        "keep_alive",
        "kind",
        "last_beat",
        "non_retryable",
        "on_ordered",
        "on_started",
        "outcome",
        "outcome_stored",
        "persist_beat",
        "recording",
        "scope",
        "stop_reason",
        "store",
        "store_unavailable",
        "timeout",
        "unwound",
        "user_id",
    )

    def __init__(
        self,
        job: Job,
        handler: Handler,
        store: StoreClient,
        beats: trio.MemorySendChannel[Worker],
        resumed_from: Any,
        decide: RetryDecider,
        non_retryable: frozenset[str] = frozenset(),
    ) -> None:
        self.job_id = job.id
        self.decide = decide
        #: The kind's error types that are not retried: a failure raised as a group of
        #: several errors is recorded as the first of these it holds (see ``_endings.failure``).
        self.non_retryable = non_retryable
        #: Seconds this attempt may run (None: no limit).
        self.timeout = job.timeout
        self.user_id = job.user_id
        self.kind = job.kind
        self.attempt = job.attempt
        self.input = job.input
        self.handler = handler
        self.store = store
        self.scope = trio.CancelScope()
        self.ctx = JobContext(self, job, resumed_from)
        self.finished = trio.Event()  # set after the outcome is stored
        self.stop_reason: str | None = None
        self.outcome_stored = True
        #: How the attempt ended: completed, failed, retrying, stopped, fenced, not_stored,
        #: or not_started (stopped before its handler started: the job never ran here).
        self.outcome = NOT_STARTED
        #: Its handler returned or raised before any cancellation: its own outcome is being
        #: recorded (a stop waits for it, see Supervisor.stop).
        self.recording = False
        #: The attempt ended because the database was unavailable: recovered by a pause at
        #: its last checkpoint, never by failing it.
        self.store_unavailable = False
        self.keep_alive = 0
        self.last_beat = trio.current_time()
        self.persist_beat = False
        #: Called with this worker once its outcome is ordered in the store, before it is
        #: durable (the supervisor frees the attempt's slot then).
        self.on_ordered: Callable[[Worker], None] | None = None
        #: Called with this worker just before its handler starts (the supervisor starts
        #: the attempt's timeout then).
        self.on_started: Callable[[Worker], None] | None = None
        #: Set by the supervisor when this attempt supersedes attempts of the same job that
        #: have not finished unwinding (a cancel, a restart and a claim in quick succession):
        #: their ``finished`` events and the grace. The handler starts once they have ended,
        #: or ``stop_grace`` seconds at most (a handler that ignores its cancellation, in a
        #: thread, is not waited for longer).
        self.unwound: tuple[list[trio.Event], float] | None = None
        self._beats = beats
        self._beat_queued = False

    def alive(self) -> None:
        """Mark the job alive without a message to the supervisor (a progress or checkpoint
        write, which stores ``last_heartbeat_at`` itself): a beat only moves the job's stall
        deadline later, and the watch loop reads ``last_beat`` when the deadline it holds
        comes, re-arming it then (lazy re-arming), so the supervisor does not wake per write."""
        self.last_beat = trio.current_time()

    def beat(self, *, persist: bool = False) -> None:
        """Mark the job alive; ``persist`` asks for ``last_heartbeat_at`` to be written (a
        progress or checkpoint write already stores it)."""
        self.last_beat = trio.current_time()
        self.persist_beat = self.persist_beat or persist
        if self._beat_queued:
            return
        try:
            self._beats.send_nowait(self)
        except trio.WouldBlock:
            # The supervisor is behind; last_beat is read when it checks the deadline.
            return
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            return
        self._beat_queued = True

    def take_beat(self) -> tuple[float, bool]:
        persist, self.persist_beat = self.persist_beat, False
        self._beat_queued = False
        return self.last_beat, persist

    def request_stop(self, reason: str) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
        self.ctx._request_stop()

    def _span_attributes(self) -> dict[str, AttributeValue]:
        return {
            "job.id": self.job_id,
            "job.kind": self.kind,
            "user.id": self.user_id,
            "job.attempt": self.attempt,
        }

    async def run(
        self,
        on_exit: Callable[[Worker], None],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        task_status.started()
        # It keeps the temporary nursery it was started in (scope, cancel status and their
        # sets, about 1 KB) alive while this frame refers to it: for the whole attempt.
        del task_status
        try:
            with span("jobspine.job.attempt", self._span_attributes) as current:
                await self._run()
                current.set("outcome", self.outcome)
                if self.outcome == "failed":
                    current.error("the job failed")
        finally:
            on_exit(self)
            self.finished.set()
            # The attempt is over: a context kept past it (by a task of the application's
            # own) says so, and its wait_stopping() returns instead of waiting for ever.
            self.ctx._request_stop()

    async def _run(self) -> None:
        ending: Ending | None = None  # None: the handler returned
        result: Any = None
        with self.scope:
            if self.unwound is not None:
                await self._wait_unwound(*self.unwound)
                if self.stop_reason is not None:
                    return  # stopped (paused, handed back) before its handler started
            # From here on its handler has run, however briefly: a stop is a stop of the job.
            self.outcome = "stopped"
            if self.on_started is not None:
                self.on_started(self)
            try:
                result = await call_handler(self.handler, self.kind, self.ctx, self.input)
            except BaseException as raised:
                # Every way out of the handler is judged here (see split_raised): its own
                # exceptions end the attempt, BaseException or not; the runtime's (the
                # Cancelled of a stop, beside an error a child raised while unwinding; an
                # interrupt) propagate to the scope.
                ending, theirs = judge_exit(
                    raised,
                    job_id=self.job_id,
                    attempt=self.attempt,
                    stop_asked=self.stop_reason is not None,
                    non_retryable=self.non_retryable,
                )
                if theirs is raised:
                    raise
                if theirs is not None:
                    raise theirs from None
        if self.scope.cancel_called:
            # Stopped by the runtime: whoever stopped it records the outcome, also when the
            # handler ignored its cancellation and returned or raised after it (its late
            # result is not the attempt's: a timeout's attempt has failed, a paused job is
            # paused).
            if ending is not None and ending.error is not None:
                self._log_error(ending, "raised after it was cancelled", "stopped")
            return
        error: JobError | None = None
        permanent = False
        if ending is not None:
            if ending.how == "stopped":
                return  # acknowledged: the stop's asker records the outcome
            if ending.how == "fenced":
                # The job moved on from this attempt (a user cancelled, paused or restarted
                # it) before its worker was stopped: an expected race, and this attempt has
                # nothing left to record.
                self._fenced("ended", ending.cause)
                return
            if ending.how == "store_unavailable":
                # The database's fault, not the job's: paused at its last checkpoint.
                self.store_unavailable = True
                log.warning("job %s attempt %d: %s", self.job_id, self.attempt, ending.cause)
            else:
                error, permanent = ending.error, ending.permanent
                self._log_error(ending, "raised", "failed")
        # Waiting on the database to record the outcome is not a stall.
        self.keep_alive += 1
        self.recording = True
        try:
            await self._record(error, result, permanent)
        finally:
            self.keep_alive -= 1

    def _log_error(self, ending: Ending, what: str, event: str) -> None:
        """Log the error an attempt ended with, with its traceback (the stored error keeps
        only the type and the message); a remote worker's failure is logged there, with its
        own traceback, not here."""
        assert ending.error is not None
        if isinstance(ending.cause, HandlerFailure):
            return
        log.info(
            "job %s attempt %d %s %s: %s",
            self.job_id,
            self.attempt,
            what,
            ending.error.type,
            ending.error.message,
            exc_info=ending.cause,
            extra=self._fields(event),
        )

    async def _wait_unwound(self, finished: list[trio.Event], grace: float) -> None:
        # Waiting for the older attempts is not a stall of this one, and its handler gets
        # the whole heartbeat_timeout from its start (the beat below).
        self.keep_alive += 1
        try:
            with trio.move_on_after(grace):
                for event in finished:
                    await event.wait()
        finally:
            self.keep_alive -= 1
            self.unwound = None
        self.beat()

    async def _record(self, error: JobError | None, result: Any, permanent: bool) -> None:
        try:
            if self.store_unavailable:
                await self.store.pause(self.job_id, self.attempt, "system", "store_unavailable")
                return
            if error is None:
                try:
                    await self.store.complete(
                        self.job_id, self.attempt, result, ordered=self._ordered
                    )
                    self.outcome = "completed"
                    return
                except InvalidInputError as exc:  # unstorable or too large: the handler's fault
                    error = JobError(type(exc).__name__, str(exc))
                    permanent = True  # the same result would be refused again
            failed = error
            job = await self.store.retry(
                self.job_id,
                self.attempt,
                failed,
                lambda job: self.decide(job, failed, permanent),
                ordered=self._ordered,
            )
            self.outcome = "failed" if job.state is JobState.FAILED else "retrying"
        except StoreError as exc:
            # The database refused the outcome: the job is still "running" there, with no one
            # running it. The supervisor keeps its deadline and recovers it by the stall rule
            # (or, when the database was unavailable, by a pause).
            log.warning(
                "job %s attempt %d outcome not stored: %s",
                self.job_id,
                self.attempt,
                exc,
                extra=self._fields("outcome_not_stored"),
            )
            self.outcome_stored = False
            self.outcome = "not_stored"
            self.store_unavailable = self.store_unavailable or isinstance(
                exc, StoreUnavailableError
            )
        except JobspineError as exc:
            # Fenced out (stalled, cancelled or paused meanwhile): the newer decision stands.
            self._fenced("outcome not recorded", exc)

    def _ordered(self) -> None:
        if self.on_ordered is not None:
            self.on_ordered(self)

    def _fenced(self, what: str, exc: object) -> None:
        """The job moved on from this attempt: said at INFO, and the newer decision stands."""
        log.info(
            "job %s attempt %d %s: %s",
            self.job_id,
            self.attempt,
            what,
            exc,
            extra=self._fields("fenced"),
        )
        self.outcome = "fenced"

    def _fields(self, event: str) -> dict[str, object]:
        return job_fields(self.job_id, self.user_id, self.attempt, event)
