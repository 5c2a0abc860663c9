"""The repository: the single entry point for applications and the transport."""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, TypeVar

import attrs
import trio

from ._backend import JobQuery, QueueStats
from ._clock import wall_time
from ._codec import INT64_MAX
from ._errors import (
    IllegalTransitionError,
    InvalidInputError,
    JobspineError,
    RuntimeClosedError,
    StaleAttemptError,
    StoreError,
    UnknownJobError,
    shown,
)
from ._events import AUDIT_TYPES, STREAM_BYTES, EventHub, EventStream, EventStreamLagged, JobEvent
from ._job import Job, JobError
from ._joblog import job_fields
from ._options import CreateOptions, KindOptions
from ._ranges import check_number
from ._recovery import (
    CheckpointDetails,
    CheckpointValidation,
    RecoveryOptions,
    checkpoint_details,
    recovery_options,
    validate_checkpoint,
)
from ._routing import Control, RemoteControls, refusal
from ._states import TERMINAL_STATES, JobState, parse_states
from ._store import StoreClient
from ._supervisor import Supervisor
from ._worker import Handler, check_handler

__all__ = ["Repository"]

log = logging.getLogger("jobspine.notify")

S = JobState
T = TypeVar("T")
_ACTIVE = frozenset({S.CREATED, S.RUNNING})

#: Children of one cancelled job cancelled at a time: enough to share commits, few enough
#: that other users' writes queued meanwhile wait behind a few dozen, not thousands.
CANCEL_WAVE = 64
#: Listings of a cancelled tree's children at a time (each is a barrier: the store commits
#: what is pending first, and serves nothing else meanwhile), and parents per listing.
LIST_WAVE = 8
PARENTS_PER_LIST = 500
#: Seconds between two reads of a job :meth:`Repository.wait_job` waits for (its events wake
#: it sooner when this runtime commits them).
WAIT_POLL = 1.0
#: Times a pause or a cancel is tried when the attempt it read ends otherwise before it is
#: applied (another client paused or restarted the job; its node died and was taken over).
CONTROL_RACES = 5


def list_query(
    user_id: object,
    states: object,
    kind: object,
    tag: object,
    parent_id: object,
    limit: object,
) -> JobQuery:
    """:meth:`Repository.list_jobs`'s arguments, checked as the protocol's ``list`` checks
    them (PROTOCOL.md section 6), as a query; raises :class:`InvalidInputError` naming the
    argument."""
    if limit is not None:
        limit = _check_int(limit, "limit", 1, ", or None for every job")
    return JobQuery(
        user_id=_filter_text(user_id, "user_id"),
        states=None if states is None else parse_states(states),
        kind=_filter_text(kind, "kind"),
        limit=limit,
        tag=_filter_text(tag, "tag", empty=False),
        parent_id=_filter_text(parent_id, "parent_id", empty=False),
    )


def _check_int(value: object, name: str, low: int, other: str = "") -> int:
    """Refuse anything but an int (no bool) from ``low`` within the signed 64-bit range, the
    range every database takes (beyond it SQLite's driver raised ``OverflowError``: a
    ``StoreError`` with its traceback logged), with :class:`InvalidInputError` naming
    ``name``; ``other`` names what else is accepted."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= INT64_MAX:
        raise InvalidInputError(
            f"{name} must be an integer >= {low}{other} (at most 2**63 - 1), not {shown(value)}"
        )
    return value


def _filter_text(value: object, name: str, *, empty: bool = True) -> str | None:
    """A text filter: a string (``empty``: "" too), or None for no filter."""
    if value is not None and not isinstance(value, str):
        raise InvalidInputError(f"{name} must be a string, or None for no filter")
    if value == "" and not empty:
        raise InvalidInputError(f"{name} must not be empty (None: no filter)")
    return value


async def _each(items: list[T], fn: Callable[[T], Awaitable[None]], at_once: int) -> None:
    """``fn(item)`` for every item, ``at_once`` at a time (tasks that take the next item)."""
    pending = iter(items)  # shared: each task takes the next item

    async def take() -> None:
        for item in pending:
            await fn(item)

    async with trio.open_nursery() as nursery:
        for _ in range(min(at_once, len(items))):
            nursery.start_soon(take)


def _no_dispatcher(run_at: float | None) -> None:
    """Before the dispatcher starts: it claims everything waiting when it does."""


def _no_lease() -> str | None:
    """Before the runtime gives its node's: no lease, so no control is applied."""
    return None


class Repository:
    """Every operation on jobs. Methods that change a job return it as stored afterwards;
    ``by`` names who asked (recorded in the audit trail)."""

    def __init__(
        self,
        store: StoreClient,
        supervisor: Supervisor,
        hub: EventHub,
        handlers: dict[str, Handler],
        *,
        checkpoint_warn_size: int,
        max_waiting_per_user: int | None = None,
        idempotency_window: float = 86_400.0,
    ) -> None:
        self._max_waiting = max_waiting_per_user
        #: Woken when a job becomes claimable, with its ``run_at`` (set by the runtime to its
        #: dispatcher's wake).
        self.wake_dispatcher: Callable[[float | None], None] = _no_dispatcher
        #: Routes the controls of jobs running on other nodes (set by the runtime on
        #: PostgreSQL, see :mod:`._routing`); None: every job runs here.
        self.remote: RemoteControls | None = None
        #: This node's claim owner while its lease is valid, else None (set by the runtime to
        #: its node's :attr:`~._nodes.NodeActor.valid_owner`): the one incarnation whose
        #: controls it applies (:meth:`apply_control`).
        self.lease_holder: Callable[[], str | None] = _no_lease
        self._idempotency_window = idempotency_window
        self._store = store
        self._supervisor = supervisor
        self._hub = hub
        self._handlers = handlers
        self._checkpoint_warn_size = checkpoint_warn_size

    @property
    def epoch(self) -> str:
        return self._store.epoch

    def register(self, kind: str, handler: Handler, options: KindOptions | None = None) -> None:
        """Run jobs of ``kind`` with ``handler``. ``options``: the kind's retries, timeout and
        stall rule (else ``RuntimeConfig.kinds[kind]``, else the handler's
        :func:`kind_options`, else the defaults). ``kind`` is a name a job can be created
        with (1 to 1,024 printable characters, see :func:`~._codec.check_kind`) and ``handler``
        callable as ``handler(ctx, input)``, else :class:`InvalidInputError` names it and
        nothing is registered."""
        check_handler(kind, handler)
        self._supervisor.set_kind_options(kind, options)  # checked before anything changes
        self._handlers[kind] = handler
        self._supervisor.capacity_changed()  # its waiting jobs became claimable

    def kind_options(self, kind: str) -> KindOptions:
        """The options jobs of ``kind`` run with; raises :class:`UnknownKindError`."""
        return self._supervisor.options_for(kind)

    @property
    def kinds(self) -> list[str]:
        """Kinds with a handler registered here or served by a connected worker."""
        return self._supervisor.known_kinds()

    def events(
        self, buffer: int | float = 10_000, max_bytes: int = STREAM_BYTES
    ) -> AbstractAsyncContextManager[EventStream]:
        """``async with repo.events() as stream: async for event in stream`` — every event
        committed after it was opened, in commit order. A stream that falls ``buffer`` events
        or ``max_bytes`` (each event counted as ``EVENT_OVERHEAD`` bytes plus its data's JSON)
        behind is cut off: it raises :class:`EventStreamLagged` after what it had buffered
        (a commit's events are taken whole while nothing waits, however much they weigh).

        ``buffer`` is an integer >= 1 (or ``math.inf``), ``max_bytes`` an integer >= 1:
        :class:`InvalidInputError` otherwise. Once the runtime is closed, raises
        :class:`RuntimeClosedError` (a stream open then ends when the runtime closes)."""
        if buffer != math.inf and (
            isinstance(buffer, bool) or not isinstance(buffer, int) or buffer < 1
        ):
            raise InvalidInputError(f"buffer must be an integer >= 1 (events), not {shown(buffer)}")
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
            raise InvalidInputError(f"max_bytes must be an integer >= 1, not {shown(max_bytes)}")
        if self._hub.closed:
            raise RuntimeClosedError("the runtime is closed: no more events")
        return self._hub.subscribe(buffer, max_bytes)

    # -- creation -------------------------------------------------------------------------------

    async def create_job(
        self,
        kind: str,
        user_id: str,
        input: Any,
        *,
        priority: int = 0,
        delay: float | None = None,
        run_at: float | None = None,
        max_attempts: int | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - the job's per-attempt limit
        tags: Sequence[str] = (),
        parent_id: str | None = None,
        idempotency_key: str | None = None,
    ) -> Job:
        """Store a job in the queue and return it at once (state ``created``); it starts when
        capacity allows (see :class:`RuntimeConfig`), by priority, fairly across users.

        ``priority``: 0..1000, higher first. ``delay`` (seconds) or ``run_at`` (Unix seconds):
        not before. ``max_attempts`` (1..100) and ``timeout`` (seconds per attempt, up to 7
        days): default to the kind's :class:`KindOptions`. ``tags``: a list (or tuple) of up
        to 32 distinct strings of 1..64 characters (see ``list_jobs(tag=)``). ``parent_id``:
        a job of the same user (cancelling it cancels this one; a job created under a
        cancelled parent is cancelled at once). ``idempotency_key`` (1..256
        characters): a second create of the same user with the same key within
        ``idempotency_window`` returns the first job unchanged if the request (kind, input,
        options) is the same.

        Raises :class:`UnknownKindError`; :class:`InvalidInputError` (a bad option, or the
        handler's input check, see :func:`validates`); :class:`InvalidParentError`;
        :class:`IdempotencyConflictError` (the key was used for a different request);
        :class:`TooManyJobsError` (``max_waiting_per_user`` jobs of the user wait). Nothing
        is stored when it raises."""
        self._supervisor.check_input(kind, input)
        defaults = self._supervisor.options_for(kind)
        now = self._supervisor.now()
        options = CreateOptions.check(
            now,
            priority=priority,
            delay=delay,
            run_at=run_at,
            max_attempts=max_attempts,
            timeout=timeout,
            tags=tags,
            parent_id=parent_id,
            idempotency_key=idempotency_key,
        )
        options = attrs.evolve(
            options,
            max_attempts=options.max_attempts or defaults.max_attempts,
            timeout=options.timeout if options.timeout is not None else defaults.timeout,
        )
        job = await self._store.create(
            user_id,
            kind,
            input,
            options,
            max_waiting=self._max_waiting,
            idempotency_window=self._idempotency_window,
            start_at_once=True,
            now=now,  # created_at: a delay is exactly run_at - created_at
        )
        if job.parent_id is not None and job.state is S.CREATED:
            try:
                parent: Job | None = await self._store.get(job.parent_id)
            except UnknownJobError:
                # Deleted since the job was made (a finished parent; a running one cannot
                # be): nothing left to cancel it with. Raised, it failed a create that had
                # stored its job, and a key's resend of it, with the parent's unknown_job.
                parent = None
            if parent is not None and parent.state is S.CANCELLED:
                # Created under a parent being cancelled, maybe after the cancel's walk listed
                # its children: cancelled with it, whichever came first.
                try:
                    return await self.cancel(job.id, by="system")
                except IllegalTransitionError:
                    pass  # finished or cancelled meanwhile
        if job.owner is None:  # else claimed at its create: it starts with no claim
            self.wake_dispatcher(job.run_at)
        return job

    async def create_research_job(self, user_id: str, query: str, *, depth: int = 3) -> Job:
        return await self.create_job("research", user_id, {"query": query, "depth": depth})

    async def create_trade_job(
        self, user_id: str, symbol: str, side: str, quantity: float, *, slices: int = 5
    ) -> Job:
        return await self.create_job(
            "trade",
            user_id,
            {"symbol": symbol, "side": side, "quantity": quantity, "slices": slices},
        )

    async def create_analysis_job(
        self, user_id: str, content: str, *, chunk_size: int = 200
    ) -> Job:
        return await self.create_job(
            "analysis", user_id, {"content": content, "chunk_size": chunk_size}
        )

    # -- retrieval ------------------------------------------------------------------------------

    async def get_job(self, job_id: str) -> Job:
        return await self._store.get(job_id)

    async def wait_job(
        self, job_id: str, states: Iterable[JobState | str] = TERMINAL_STATES
    ) -> Job:
        """The job as stored once it is in one of ``states`` (by default finished: completed,
        failed or cancelled; a paused job is waited for until it is resumed and finishes, so
        pass ``PAUSED`` too to hear of it). Bound it with ``trio.fail_after``. Woken by the
        job's events, and reading the job again every ``WAIT_POLL`` seconds (a job another
        node runs commits its events there). ``states`` as for :meth:`list_jobs` (a bare
        string would wait for ever on its letters): :class:`InvalidInputError` otherwise.
        Raises :class:`UnknownJobError` for a job that does not exist, or is deleted
        meanwhile."""
        wanted = parse_states(states)
        while True:
            # Subscribed before each read: an event committed after the read wakes the wait.
            async with self._hub.subscribe(buffer=1_000) as stream:
                try:
                    while True:
                        job = await self._store.get(job_id)
                        if job.state in wanted:
                            return job
                        with trio.move_on_after(WAIT_POLL):
                            async for event in stream:
                                if event.job_id == job_id and event.state in wanted:
                                    break
                            else:  # the hub closed (a shutdown): only the reads are left
                                await trio.sleep_forever()
                except EventStreamLagged:
                    continue  # behind the other jobs' events: subscribed again, read again

    async def list_jobs(
        self,
        user_id: str | None = None,
        *,
        states: Iterable[JobState | str] | None = None,
        kind: str | None = None,
        tag: str | None = None,
        parent_id: str | None = None,
        limit: int | None = 50,
    ) -> list[Job]:
        """The user's jobs (all users' with None), newest first, filtered by state, kind,
        tag and parent; at most ``limit`` (None: all).

        ``states``: a list (any iterable but a string) of distinct states, at least one, each
        a :class:`JobState` or its value; None: every state. ``limit``: an integer >= 1, or
        None. Raises :class:`InvalidInputError` naming the argument for any other value (as
        the protocol's ``list`` refuses it), and for a filter holding NUL."""
        query = list_query(user_id, states, kind, tag, parent_id, limit)
        return await self._store.list_jobs(query)

    async def list_children(self, job_id: str) -> list[Job]:
        """The jobs created with ``parent_id=job_id``, newest first. Raises
        :class:`UnknownJobError` for an unknown job."""
        await self._store.get(job_id)
        return await self._store.list_jobs(JobQuery(parent_id=job_id))

    async def get_user_jobs(self, user_id: str, limit: int = 50) -> list[Job]:
        return await self.list_jobs(user_id, limit=limit)

    async def get_user_active_jobs(self, user_id: str) -> list[Job]:
        return await self.list_jobs(user_id, states=_ACTIVE, limit=None)

    async def get_user_completed_jobs(self, user_id: str, limit: int = 50) -> list[Job]:
        return await self.list_jobs(user_id, states=[S.COMPLETED], limit=limit)

    async def get_user_failed_jobs(self, user_id: str, limit: int = 50) -> list[Job]:
        return await self.list_jobs(user_id, states=[S.FAILED], limit=limit)

    async def read_events(
        self, job_id: str, after_seq: int = 0, limit: int = 1000
    ) -> list[JobEvent]:
        """The job's events with ``seq > after_seq``, in order, at most ``limit``: integers
        (``after_seq`` from 0, ``limit`` from 1), else :class:`InvalidInputError` naming the
        argument (a float or a huge integer failed in the database, a negative limit read
        every event). Raises :class:`UnknownJobError` for an unknown job."""
        _check_int(after_seq, "after_seq", 0)
        _check_int(limit, "limit", 1)
        await self._store.get(job_id)
        return await self._store.read_events(job_id, after_seq, limit)

    async def get_audit(self, job_id: str) -> list[JobEvent]:
        """Who paused, resumed, cancelled or restarted the job, and when."""
        await self._store.get(job_id)
        return await self._store.read_events(job_id, 0, 10_000, AUDIT_TYPES)

    # -- reports from workers (for external workers; handlers use their JobContext) --------------

    async def update_progress(
        self, job_id: str, attempt: int, progress: float, step: str | None = None
    ) -> Job:
        return await self._store.set_progress(job_id, attempt, progress, step)

    async def checkpoint(self, job_id: str, attempt: int, data: Any) -> Job:
        return await self._store.checkpoint(job_id, attempt, data)

    async def complete(self, job_id: str, attempt: int, result: Any) -> Job:
        return await self._store.complete(job_id, attempt, result)

    async def heartbeat(self, job_id: str, attempt: int) -> None:
        worker = self._supervisor.workers.get(job_id)
        if worker is not None and worker.attempt == attempt:
            worker.beat()
        else:
            self._store.heartbeat(job_id, attempt)
        await trio.lowlevel.checkpoint()

    async def mark_failed(
        self,
        job_id: str,
        error: str | JobError,
        *,
        attempt: int | None = None,
        by: str | None = None,
    ) -> Job:
        if isinstance(error, str):
            error = JobError("Error", error)
        job = await self._store.fail(job_id, attempt, error, by)
        await self._supervisor.settled()
        self._supervisor.kill(job_id, "failed", job.attempt)
        return job

    # -- control --------------------------------------------------------------------------------

    async def cancel(self, job_id: str, *, by: str | None = None) -> Job:
        """Cancel a waiting, running or paused job, and with it its children that have not
        finished (recursively; each recorded with ``by``). A job running on another node is
        cancelled there (:class:`RemoteControlError` if that node does not within the bound)."""
        remote = self.remote
        if remote is not None:
            for _ in range(CONTROL_RACES):
                found = await self._store.get(job_id)
                if not remote.is_remote(found):
                    break
                job = await remote.control(found, Control.of("cancel", found, by))
                if job.state is S.CANCELLED:
                    await self._cancel_children(job_id, by)
                    return job
                # The attempt ended otherwise before the control reached it (its node died
                # and the takeover requeued or paused the job; it finished by itself): a
                # cancel is of the job, applied to it as it is now (finished: refused, as a
                # cancel of a finished job is).
        return await self._cancel_here(job_id, by)

    async def _cancel_here(self, job_id: str, by: str | None, attempt: int | None = None) -> Job:
        """Cancel the job here; ``attempt``: only while it runs that attempt (else
        :class:`StaleAttemptError`, nothing written)."""
        job = await self._store.cancel(job_id, by, attempt)
        await self._supervisor.settled()
        worker = self._supervisor.kill(job_id, "cancel", job.attempt)
        if worker is not None:
            with trio.move_on_after(self._supervisor.config.stop_grace):
                await worker.finished.wait()
        await self._cancel_children(job_id, by)
        return job

    async def _cancel_children(self, job_id: str, by: str | None) -> None:
        # Parent links are fixed at create and point to older jobs: the walk ends. The whole
        # tree is listed first (a generation at a time, PARENTS_PER_LIST parents per query:
        # one query per parent held others' writes for seconds), then every unfinished descendant
        # is cancelled at once, so that the writes share commits: one by one, with a list
        # query (a barrier, which commits what is pending) between them, 1,000 children
        # took 1,000 commits. Bounded, listings (LIST_WAVE) and cancels (CANCEL_WAVE): all at
        # once, 16,000 children filled the store's queue and held everyone's writes behind
        # them for 50 s. A failed cancel does not stop the others; the first such error is
        # raised at the end.
        unfinished: list[str] = []
        below: list[str] = []

        async def list_children(parents: frozenset[str]) -> None:
            for child in await self._store.list_jobs(JobQuery(parent_ids=parents)):
                below.append(child.id)
                if child.state in _ACTIVE or child.state is S.PAUSED:
                    unfinished.append(child.id)

        level = [job_id]
        while level:
            chunks = [
                frozenset(level[i : i + PARENTS_PER_LIST])
                for i in range(0, len(level), PARENTS_PER_LIST)
            ]
            await _each(chunks, list_children, LIST_WAVE)
            level, below = below, []

        errors: list[JobspineError] = []

        async def cancel_child(child_id: str) -> None:
            try:
                child = await self._store.cancel(child_id, by)
            except (IllegalTransitionError, UnknownJobError):
                return  # it finished, or was deleted (not running then), meanwhile
            except JobspineError as exc:
                errors.append(exc)
                return
            await self._supervisor.settled()
            self._supervisor.kill(child_id, "cancel", child.attempt)

        await _each(unfinished, cancel_child, CANCEL_WAVE)
        if errors:
            raise errors[0]

    async def pause(self, job_id: str, *, by: str | None = None, reason: str = "user") -> Job:
        """Pause a job: a waiting one leaves the queue until resumed; a running one is stopped
        (its handler gets the grace period to checkpoint), on the node that runs it."""
        return await self._pause(job_id, by, reason)

    async def _pause(self, job_id: str, by: str | None, reason: str) -> Job:
        # A pause is of the job, not of an attempt: should the attempt read here end and the
        # next one start before the pause is applied (another client paused and resumed it,
        # the new attempt not launched here yet), the job is read again and that one paused.
        for _ in range(CONTROL_RACES - 1):
            try:
                return await self._pause_once(job_id, by, reason)
            except StaleAttemptError:
                continue
        return await self._pause_once(job_id, by, reason)

    async def _pause_once(self, job_id: str, by: str | None, reason: str) -> Job:
        job = await self._store.get(job_id)
        if job.state is S.CREATED:
            try:
                return await self._store.pause(job_id, None, by, reason, waiting=True)
            except IllegalTransitionError:
                # Claimed since it was read: stopped below as a running job.
                job = await self._store.get(job_id)
        if job.state is not S.RUNNING:
            raise IllegalTransitionError(job_id, job.state.value, S.PAUSED.value)
        if self.remote is not None and self.remote.is_remote(job):
            now = await self.remote.control(job, Control.of("pause", job, by, reason))
            if now.state is S.CREATED or now.state is S.RUNNING:
                # The attempt ended otherwise before the control reached it (its node died,
                # the takeover requeued the job, which may run again): read again, and that
                # job paused.
                raise StaleAttemptError(job_id, job.attempt, now.attempt, now.state.value)
            if now.state is not S.PAUSED:  # it finished meanwhile
                raise IllegalTransitionError(job_id, now.state.value, S.PAUSED.value)
            return now
        await self._supervisor.settled()
        worker = await self._supervisor.stop(job_id, reason)
        attempt = job.attempt if worker is None else worker.attempt
        try:
            return await self._store.pause(job_id, attempt, by, reason)
        except StoreError as exc:
            if worker is not None:
                self._supervisor.unrecorded(worker, exc)
            raise

    async def resume(self, job_id: str, *, by: str | None = None) -> Job:
        """Put a paused job back in the queue (state ``created``); its next attempt resumes
        from its checkpoint (from the start if it has none)."""
        job = await self._store.get(job_id)
        self._supervisor.check_known(job.kind)
        job = await self._store.resume(job_id, by)
        self.wake_dispatcher(None)
        return job

    async def restart(
        self,
        job_id: str,
        modifications: Mapping[str, Any] | None = None,
        *,
        by: str | None = None,
    ) -> Job:
        """Put a waiting, paused, failed or cancelled job back in the queue from scratch (state
        ``created``, checkpoint and failed attempts cleared), with modified input: its input
        as stored when the restart is applied, with ``modifications`` merged in, which the
        kind's input check must accept (else :class:`InvalidInputError`, nothing changed)."""
        job = await self._store.restart(
            job_id, by, modifications, check=self._supervisor.check_input
        )
        self.wake_dispatcher(None)
        return job

    async def delete_job(self, job_id: str) -> None:
        await self._store.delete(job_id)

    # -- recovery -------------------------------------------------------------------------------

    async def find_stale_jobs(self, stalled_seconds: float) -> list[Job]:
        """Running jobs with no sign of life for ``stalled_seconds`` (a finite number >= 0,
        else :class:`InvalidInputError`)."""
        check_number("stalled_seconds", stalled_seconds, zero=True)
        return await self._store.find_stale_running(stalled_seconds)

    async def recover_job(self, job_id: str) -> Job:
        """Apply the recovery rule to a running job now, on the node that runs it."""
        job = await self._store.get(job_id)
        if job.state is not S.RUNNING:
            raise IllegalTransitionError(job_id, job.state.value, "recovering")
        if self.remote is not None and self.remote.is_remote(job):
            return await self.remote.control(job, Control.of("recover", job))
        return await self._supervisor.trigger_recovery(job_id)

    async def apply_control(self, control: Control) -> Job | None:
        """Apply a control another node sent for an attempt running here, locally (never
        routed on: a job that moved meanwhile is the sender's to see). Dropped, returning
        None, unless the job still runs the control's attempt under this node's incarnation
        and this node's lease is valid (:func:`~._routing.refusal`); every write it makes is
        fenced by that attempt, so a job that leaves it meanwhile (a takeover while the
        handler checkpoints) is refused at the write."""
        job = await self._store.get(control.job_id)
        if not self._addressed_here(control, job):
            return None
        if control.op == "cancel":
            return await self._cancel_here(control.job_id, control.by, control.attempt)
        if control.op == "recover":
            await self._supervisor.settled()
            return await self._supervisor.trigger_recovery(control.job_id, attempt=control.attempt)
        await self._supervisor.settled()
        worker = await self._supervisor.stop(control.job_id, control.reason, control.attempt)
        # The handler's grace may outlast this node's lease (a freeze meanwhile): the lease is
        # looked at again before the pause is written, as a fenced node writes nothing.
        if not self._addressed_here(control, job):
            return None
        try:
            return await self._store.pause(
                control.job_id, control.attempt, control.by, control.reason
            )
        except StoreError as exc:
            if worker is not None:
                self._supervisor.unrecorded(worker, exc)
            raise

    def _addressed_here(self, control: Control, job: Job) -> bool:
        why = refusal(control, job, self.lease_holder())
        if why is not None:
            log.info(
                "control %s of job %s (attempt %d of %s) dropped: %s",
                control.op,
                control.job_id,
                control.attempt,
                control.owner,
                why,
                extra=job_fields(job.id, job.user_id, control.attempt, "control_dropped"),
            )
        return why is None

    async def get_resumable_jobs(self, user_id: str | None = None) -> list[Job]:
        return await self._store.find_resumable(_filter_text(user_id, "user_id"))

    async def reset_recovery_attempts(self, job_id: str, *, by: str | None = None) -> Job:
        return await self._store.reset_recovery_attempts(job_id, by)

    async def get_recovery_options(self, job_id: str) -> RecoveryOptions:
        job = await self._store.get(job_id)
        return recovery_options(job, wall_time(), self._supervisor.config.max_recovery_attempts)

    async def get_checkpoint_details(self, job_id: str) -> CheckpointDetails:
        return checkpoint_details(await self._store.get(job_id))

    async def validate_checkpoint(self, job_id: str) -> CheckpointValidation:
        job = await self._store.get(job_id)
        return validate_checkpoint(job, self._checkpoint_warn_size, self._store.checkpoint_limit)

    # -- stats ----------------------------------------------------------------------------------

    async def get_stats(self) -> dict[str, Any]:
        """``{state: count}`` for every state, ``"total": n`` and ``"waiting_by_kind":
        {kind: jobs waiting}``."""
        return await self._store.get_stats()

    async def get_user_stats(self, user_id: str) -> dict[str, Any]:
        """As :meth:`get_stats`, for one user's jobs."""
        return await self._store.get_stats(_filter_text(user_id, "user_id"))

    async def queue_stats(self, user_id: str | None = None) -> QueueStats:
        """Waiting (ready now, scheduled later), running, waiting per kind and per user."""
        return await self._store.queue_stats(
            self._supervisor.now(), _filter_text(user_id, "user_id")
        )
