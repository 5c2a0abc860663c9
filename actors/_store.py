"""The store actor: the one task that touches the database, and its request/reply client.

Requests are queued on a bounded channel. The actor takes every request waiting (up to
``max_batch``), applies them in order to an overlay of pending changes, commits the whole group
in one transaction (group commit) and only then answers each caller and publishes the events.
So a reply means durable. ``get`` and ``user_head`` read committed state and are answered at
once (a failing write elsewhere does not fail them); queries are barriers: pending writes are
committed before a query reads the database.

A fault stays with its cause:

* Every value is validated in the caller's task before it is queued
  (:func:`~._codec.dumps_json_value`, :func:`~._codec.check_text`): a value the database
  cannot store is refused at the call that brought it and never joins a group. So is a name
  holding NUL (:func:`~._codec.check_name`), which PostgreSQL's text cannot hold or be
  compared with, or a lone surrogate, which no driver can send, alike on every backend: at a
  create, as a list or stats filter (:class:`InvalidInputError`); a job id holding one names
  no job (:class:`UnknownJobError`, its heartbeat dropped).
* A group whose commit fails for a reason tied to a request (anything but an outage, see
  :func:`~._backend.is_outage`) is not answered: its requests, and those of every group
  applied on top of it, are applied and committed again one at a time, so only the culprit
  gets :class:`StoreError`. A job lost to another writer sharing the database
  (:class:`StaleWriteError`, PostgreSQL's fenced writes) is such a failure: the job is
  reloaded and its request applied again, alone, which the ops' own checks then refuse (or it
  commits); at most :data:`MAX_CONFLICTS` times, so that conflicts cannot livelock the store.
* An outage (the database locked by another program, unreachable, full) is retried with
  exponential backoff for ``store_retry_timeout`` seconds without failing anyone; meanwhile
  :attr:`StoreActor.health` says why the store is unhealthy and reads are served from
  committed state. Past the timeout, writes fail with :class:`StoreUnavailableError` until
  the database is back, which a periodic probe notices by itself.

Event numbers: ``seq`` per job is assigned here; ``user_seq`` too while the store is the only
writer, else (``Backend.assigns_user_seq``: PostgreSQL) in the commit's transaction, and the
events published are the ones the commit returns, as stored.

Heartbeats are state, not requests: ``heartbeat()`` records the latest one per job without
awaiting, and the actor writes them with the next commit or after ``heartbeat_flush_interval``.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import attrs
import orjson
import trio

from . import _ops as ops
from ._backend import (
    Backend,
    ClaimRequest,
    JobQuery,
    Pruned,
    QueueStats,
    is_corruption,
    is_outage,
)
from ._clock import wall_time
from ._codec import (
    MAX_STEP_LENGTH,
    check_name,
    check_text,
    dumps_json_value,
    may_be_name,
    sanitize_text,
)
from ._errors import (
    IdempotencyConflictError,
    IllegalTransitionError,
    InvalidInputError,
    InvalidParentError,
    JobspineError,
    RuntimeClosedError,
    StaleAttemptError,
    StaleWriteError,
    StoreError,
    StoreUnavailableError,
    TooManyJobsError,
    UnknownJobError,
    one_line,
    shown,
)
from ._events import EventHub, EventType, JobEvent, StoredEvent
from ._fast_start import FastStarter, QueueVerdict
from ._ids import new_id
from ._job import Job, JobError
from ._keyfilter import FILTER_BYTES, KeyFilter
from ._metrics import StoreMetrics, move
from ._nodes import NodeInfo, NodeLease
from ._options import CreateOptions
from ._policy import RecoveryDecision
from ._ranges import check_fields
from ._retention import RetentionPolicy
from ._scheduling import RetryDecision
from ._states import JobState, check_transition
from ._tracing import span

__all__ = ["StoreActor", "StoreClient", "StoreConfig", "StoreHealth"]

log = logging.getLogger("jobspine.store")
T = TypeVar("T")


@attrs.frozen
class StoreConfig:
    #: Largest checkpoint, in encoded JSON bytes.
    checkpoint_limit: int = 1024 * 1024
    #: Largest job result, in encoded JSON bytes (a larger one fails the job at completion).
    result_limit: int = 1024 * 1024
    max_batch: int = 512
    #: Progress writes of one job answered before their commit and not yet committed, at
    #: most (see :meth:`StoreClient.set_progress`); the job's next one is answered at its own
    #: commit. 2: measured best on the fanout benchmark (1: a fifth fewer events per second,
    #: same latency; unbounded: twice the p99 latency).
    progress_window: int = 2
    queue_size: int = 1024
    heartbeat_flush_interval: float = 1.0
    #: Seconds a write waits out a database outage (retried with backoff) before it fails.
    store_retry_timeout: float = 30.0
    #: First and longest delay between retries of a write during an outage, in seconds.
    retry_backoff: float = 0.05
    retry_backoff_max: float = 2.0
    #: Users whose event head, waiting count and idempotency-key filter the store keeps in
    #: memory, at most: past it, the least recently used are forgotten (down to seven
    #: eighths of it, at a commit) and read again from the database when next needed (one
    #: query each). A user whose events are staged or committing is never forgotten.
    users_cached: int = 10_000
    #: Bytes of idempotency-key hashes the store keeps in memory, all users together (about
    #: 168 bytes a key): past it, the least recently used users' are forgotten, and a user
    #: with more keys than that in its window keeps none (each of its keys looked up).
    key_filter_bytes: int = FILTER_BYTES

    def __attrs_post_init__(self) -> None:
        """Refuse, with :class:`InvalidInputError` naming it and its value, a number out of
        range: every duration finite seconds above 0, every count or size an integer from 1
        (``progress_window`` and ``queue_size`` from 0: no write answered before its commit,
        an unbuffered queue)."""
        check_fields(self, zero=("progress_window", "queue_size"))


@attrs.define
class StoreHealth:
    """Whether the database takes writes now. ``reason`` says why not; ``since`` is when the
    outage began (Unix seconds); ``outages`` counts them since the store started. ``corrupt``
    says what a read or write found damaged, once one did: it stays (only a restored file
    mends it), and the server reports itself not ready."""

    ok: bool = True
    reason: str | None = None
    since: float | None = None
    outages: int = 0
    corrupt: str | None = None


WRITE, READ, BARRIER, CLAIM = "write", "read", "barrier", "claim"

#: Times a request committed alone may lose a job to another writer and be applied again
#: before it gets the :class:`StaleWriteError` (each time the job is reloaded first).
MAX_CONFLICTS = 3
#: Seconds between two warnings about requests and reads that failed on an outage.
OUTAGE_LOG_INTERVAL = 60.0

#: An idempotency key of a user: ``(user_id, key)``.
_Key = tuple[str, str]
#: A create's key and the start of its window: ``(user_id, key, since)``.
_KeyRequest = tuple[str, str, float]


class _Request:
    """``WRITE``: applied, then answered after its group commits. ``READ``: of committed state
    only, answered at once. ``BARRIER``: runs after every earlier write has committed.
    ``CLAIM``: runs after every earlier write that changes the waiting jobs has committed; its
    writes are answered after they commit."""

    __slots__ = (
        "conflicts",
        "done",
        "early",
        "error",
        "fn",
        "job_id",
        "key",
        "mode",
        "ordered",
        "replay",
        "staged_before",
        "value",
    )

    def __init__(
        self,
        fn: Callable[[], Awaitable[Any]],
        mode: str,
        key: _KeyRequest | None = None,
        *,
        early: bool = False,
        job_id: str | None = None,
        ordered: Callable[[], None] | None = None,
    ) -> None:
        self.fn = fn
        self.mode = mode
        #: Called once, in the store's task, when the write is applied without error (ordered
        #: into its group; durable with the group's commit): a worker's outcome frees its
        #: slot then (see :meth:`StoreClient.complete`).
        self.ordered = ordered
        #: A write answered once applied (ordered into the group), before its commit, while
        #: the database is healthy and fewer than ``progress_window`` earlier such writes of
        #: ``job_id`` are uncommitted: progress (see :meth:`StoreClient.set_progress`).
        self.early = early
        self.job_id = job_id
        #: A create's idempotency key and window, looked up with its batch's others.
        self.key = key
        self.done = trio.Event()
        self.value: Any = None
        self.error: Exception | None = None
        #: Its group was void without its fault: applied again, alone, before it is answered.
        self.replay = False
        #: Refused when applied while its group held uncommitted writes (judged on them).
        self.staged_before = False
        #: Commits of it, alone, that lost a job to another writer (:class:`StaleWriteError`).
        self.conflicts = 0

    async def answer(self) -> Any:
        """Wait until the request is answered: its value, or its error raised."""
        await self.done.wait()
        if self.error is not None:
            raise self.error
        return self.value


@attrs.define(eq=False)
class _Group:
    """Requests applied together and committed in one transaction."""

    generation: int
    requests: list[_Request] = attrs.field(factory=list)
    jobs: dict[str, Job] = attrs.field(factory=dict)
    events: list[JobEvent] = attrs.field(factory=list)
    deleted: set[str] = attrs.field(factory=set)
    beats: dict[str, tuple[int, float]] = attrs.field(factory=dict)
    #: Jobs of ``jobs`` whose every change in this group is a progress report: only their
    #: progress fields differ from their previous write (see ``Backend.commit``).
    progress_only: set[str] = attrs.field(factory=set)
    #: Jobs per state gained (lost, if negative) by this group, for the metrics.
    moves: dict[JobState, int] = attrs.field(factory=dict)
    #: Jobs started in their create's commit (the fast path), launched once it commits.
    fast: list[Job] = attrs.field(factory=list)
    #: Jobs created with an idempotency key: job id -> the start of the key's window (the
    #: commit of a database shared by several writers checks no other job took the key).
    keyed: dict[str, float] = attrs.field(factory=dict)
    #: The group changes what a claim reads: a job that was or becomes waiting (created), or
    #: a deletion. A claim waits for such groups to commit, and for no other.
    queue_writes: bool = False
    committed: bool = False

    def __bool__(self) -> bool:
        return bool(self.requests or self.writes)

    @property
    def writes(self) -> bool:
        return bool(self.jobs or self.events or self.deleted or self.beats)


class StoreActor:
    """Owns a :class:`Backend`; serves :class:`StoreClient` requests until every client closes.

    Commits are pipelined one deep: while one group commits (in the database's thread), the
    next is applied in this task, reading through the overlays of both. A failed commit voids
    every group built on top of it and drops every cached state, which is reloaded from the
    database; the void groups' requests are replayed one at a time (a request-tied failure)
    or answered with :class:`StoreError` (an outage that outlasted ``store_retry_timeout``).
    """

    def __init__(self, backend: Backend, hub: EventHub, config: StoreConfig | None = None) -> None:
        self.backend = backend
        self.hub = hub
        self.config = config or StoreConfig()
        self._send, self._receive = trio.open_memory_channel[_Request](self.config.queue_size)
        # Committed state of the running jobs (the ones written often): waiting, paused and
        # finished jobs live in the database only, so 100,000 waiting cost no memory here.
        self._cache: dict[str, Job] = {}
        # Incarnations of this node that lost their lease (forget_owner): their jobs are
        # another node's to change now, so a commit of one of them is not cached.
        self._gone_owners: set[str] = set()
        # Per owner: the lease its last renewal stored (renew_leases writes the column alone;
        # the cached jobs keep their claim's, which a read of a job by id brings up to date).
        self._renewed: dict[str, float] = {}
        # Per user: jobs waiting (created), staged changes included; loaded on first use.
        # Least recently used first: like ``_user_heads`` and the key filter, at most
        # ``users_cached`` users (see :meth:`_forget_users`), else every user that ever
        # created a job stayed here for the life of the process.
        self._waiting: OrderedDict[str, int] = OrderedDict()
        self._inflight: list[_Group] = []  # handed to the committer, oldest first
        #: Each job's writes answered early and not yet committed (``progress_window`` at
        #: most), oldest first.
        self._early: dict[str | None, list[_Request]] = {}
        self._generation = 0  # bumped by a failed commit: older groups are void
        # Why each void generation is void: None (a request-tied failure: its requests are
        # replayed) or the error its requests get; kept while a group of it is in flight
        # (one entry per failed commit otherwise, for good).
        self._void: dict[int, Exception | None] = {}
        self._replay: list[_Request] = []  # in request order
        self._group = _Group(0)  # being applied
        self._batch: list[_Request] = []  # taken from the channel, being applied
        self._beats: dict[str, tuple[int, float]] = {}
        # Per user: the head ``user_seq``, staged, uncommitted events included; least
        # recently used first.
        self._user_heads: OrderedDict[str, int] = OrderedDict()
        self._idle = trio.Event()
        self._idle.set()
        self._wake = trio.CancelScope()
        # Reads served beside the actor during an outage, by a task in the backend's context.
        self._reads_send, self._reads_receive = trio.open_memory_channel[_Request](
            self.config.queue_size
        )
        # When a request or read failing on an outage was last logged, and how many since:
        # during an outage every read fails, tens a second (one warning a minute).
        self._outage_logged_at = -math.inf
        self._outage_failures = 0
        # Held around every commit: a read that bypasses the actor during an outage never
        # sees a transaction half-written.
        self._commit_lock = trio.Lock()
        self._outage_deadline = math.inf  # trio time when writes stop waiting out the outage
        self._outage_began = 0.0  # trio time the current outage began
        self._closing = False  # past the final drain: an outage is no longer waited out
        #: Whether the database takes writes now (``/readyz`` reports it).
        self.health = StoreHealth()
        self.commits = 0
        self.committed_requests = 0
        self.metrics = StoreMetrics()
        #: Whether a create may start at once (see :mod:`._fast_start`), and who decides.
        self.queue = QueueVerdict()
        self.fast_starter: FastStarter | None = None
        # The newest job per idempotency key of the keyed creates of the batch being applied
        # (None: not looked up), valid while ``_generation`` is ``_keys_generation``.
        self._keys: dict[_Key, Job | None] | None = None
        self._keys_generation = 0
        self._key_filter = KeyFilter(self.config.users_cached, self.config.key_filter_bytes)

    def client(self) -> StoreClient:
        """A new client owning its own clone of the request channel; close it when done.

        Make the first clients before :meth:`run` (it serves until the last client closes);
        later ones come from :meth:`StoreClient.clone`."""
        return StoreClient(self, self._send.clone())

    async def run(
        self, *, task_status: trio.TaskStatus[StoreActor] = trio.TASK_STATUS_IGNORED
    ) -> None:
        try:
            await self._run(task_status)
        finally:
            # Its committer has ended: a job started at its create and not committed by
            # then never will be. Its starter is told (it waits for every such decision).
            undecided = [job for group in (*self._inflight, self._group) for job in group.fast]
            if undecided and self.fast_starter is not None:
                self.fast_starter.voided(undecided)

    async def _run(self, task_status: trio.TaskStatus[StoreActor]) -> None:
        async with self._receive:
            try:
                async with self.backend.opened(), trio.open_nursery() as nursery:
                    # Only clients hold send ends: the loop ends when the last client closes.
                    self._send.close()
                    self.metrics.load(await self.backend.count_by_state(None))
                    to_committer, from_actor = trio.open_memory_channel[_Group](0)
                    nursery.start_soon(self._committer, from_actor)
                    nursery.start_soon(self._reader)
                    task_status.started(self)
                    async with to_committer:
                        self._handoff = to_committer
                        try:
                            await self._serve()
                        finally:
                            with trio.move_on_after(5, shield=True):
                                await self._drain()
                                await self._replay_void()
                            self._closing = True
                            self._reads_send.close()  # the reader ends
            finally:
                self._refuse_unanswered()

    def _refuse_unanswered(self) -> None:
        """Answer every request the actor took or had queued and never answered (it stopped
        on a fault, or its close ran out of time): each caller gets a ``StoreError`` instead
        of waiting forever, as the dispatcher's shielded claim would. After a clean close only
        the requests not replayed in time are left."""
        self._reads_send.close()  # a read sent from now on is refused (RuntimeClosedError)
        pending = [*self._batch, *self._replay, *self._group.requests]
        for group in self._inflight:
            pending += group.requests
        for channel in (self._receive, self._reads_receive):
            while True:
                try:
                    pending.append(channel.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                    break
        self._reads_receive.close()
        for request in pending:
            if not request.done.is_set():
                request.error = StoreError("the store stopped before it answered this request")
                request.done.set()

    async def _serve(self) -> None:
        receive = self._receive
        while True:
            if self._replay:
                await self._replay_void()
            # Wake at least every flush interval while there is something to flush, commit
            # or probe: heartbeats arrive without a request (one arriving while this sleeps
            # for longer brings the wake forward, :meth:`StoreClient.heartbeat`). Idle, it
            # sleeps until a request comes: an idle runtime under a test's virtual clock
            # let a virtual hour pass in 3,600 wakes.
            first: _Request | None = None
            busy = self._beats or self._group or self._inflight or not self.health.ok
            try:
                with trio.move_on_after(
                    self.config.heartbeat_flush_interval if busy else math.inf
                ) as self._wake:
                    first = await receive.receive()
            except trio.EndOfChannel:
                return
            if first is None:
                if self._beats or self._group:
                    await self._cut()
                elif not self.health.ok and not self._inflight:
                    await self._probe()
                continue
            # Let every task that is ready to send a request do so before the group is cut.
            await trio.lowlevel.cancel_shielded_checkpoint()
            batch = [first]
            while len(batch) < self.config.max_batch:
                try:
                    batch.append(receive.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            self._batch = batch
            await self._process(batch)

    async def _process(self, batch: list[_Request]) -> None:
        for i, request in enumerate(batch):
            if request.mode is CLAIM and not self._queue_written():
                # It waits for the commit in flight anyway (the commit lock): if that fails,
                # the group being applied is void and the claim must not join it.
                await self._idle.wait()
            if request.mode is BARRIER or (
                request.mode is CLAIM
                and (self._queue_written() or self._group.generation != self._generation)
            ):
                self._keys = None  # a barrier may remove jobs (prune): looked up again
                await self._drain()
            elif request.key is not None and self._keys is None:
                await self._look_up_keys(batch[i:])
            staged = bool(self._group.jobs or self._group.deleted)
            try:
                request.value = await request.fn()
            except JobspineError as exc:
                request.error = exc
                request.staged_before = staged
            except Exception as exc:
                if is_corruption(exc):
                    request.error = self._corrupted(exc)
                elif is_outage(exc):
                    # The database unavailable (a dropped connection, a lock): the caller's
                    # to retry, no fault of the code (no traceback).
                    self._log_outage_failure(exc)
                    request.error = StoreError(f"store request failed: {shown(exc, 1000)}")
                else:
                    log.exception("store request failed")
                    request.error = StoreError(f"store request failed: {shown(exc, 1000)}")
            if request.mode is WRITE or request.mode is CLAIM:
                self._group.requests.append(request)
                if request.ordered is not None and request.error is None:
                    ordered, request.ordered = request.ordered, None  # once, not on a replay
                    ordered()
                if (
                    request.early
                    and request.error is None
                    and self.health.ok
                    and not request.done.is_set()  # replayed after its early answer: held
                    and len(self._early.get(request.job_id, ())) < self.config.progress_window
                ):
                    # Ordered: the hub publishes it only once its group has committed, and
                    # the caller's next write joins this group or a later one. At most
                    # progress_window per job at a time: past it, the job's next one is
                    # answered at its own commit, so what is answered but not durable stays
                    # within a few events per running job (and a handler reporting back to
                    # back cannot run ahead of the disk: its events reach clients within a
                    # few commits).
                    self._early.setdefault(request.job_id, []).append(request)
                    request.done.set()
            else:
                request.done.set()
        self._keys = None
        if self._inflight and len(self._group.requests) < self.config.max_batch:
            # The committer is busy with the group before: this one keeps growing with what
            # arrives meanwhile (one commit for all of it), and is handed over as soon as
            # the committer is free (it wakes this task, see _committer).
            return
        await self._cut()

    def _queue_written(self) -> bool:
        """A group applied or committing changes what a claim reads. If none does, a claim
        need not wait for them: it reads only waiting jobs (and the earliest run_at among
        them), which they leave as committed; the running counts it plans with come from the
        dispatcher. Progress, checkpoints and ends of running jobs (most writes) then no
        longer hold a claim for two commits, and every request behind it meanwhile."""
        return self._group.queue_writes or any(group.queue_writes for group in self._inflight)

    async def _look_up_keys(self, requests: list[_Request]) -> None:
        """One query for the idempotency keys of ``requests`` up to the next barrier (instead
        of one per create). Jobs staged or committing now are found in the overlays first;
        what is staged from here on is added by :meth:`_stage`."""
        keys: dict[_Key, float] = {}  # the earliest window start of each
        for request in requests:
            if request.mode is BARRIER or request.mode is CLAIM:
                break
            if request.key is not None:
                user_id, key, since = request.key
                keys[(user_id, key)] = min(since, keys.get((user_id, key), since))
        found: dict[_Key, Job | None] = {}
        for group in (self._group, *reversed(self._inflight)):
            for job in group.jobs.values():
                staged = job.idempotency_key
                if staged is not None and (job.user_id, staged) in keys:
                    found.setdefault((job.user_id, staged), job)
        try:
            maybe = set()
            for (user_id, key), since in keys.items():
                if (user_id, key) in found:
                    continue
                if self.backend.shared:
                    # Other nodes create keyed jobs too, which no filter of this store's
                    # holds: every key is looked up (one query for the batch).
                    maybe.add((user_id, key))
                    continue
                if self._key_filter.needs_load(user_id, since):
                    await self._load_keys(user_id, since)
                if self._key_filter.may_exist(user_id, key, since):
                    maybe.add((user_id, key))
            stored = await self.backend.find_by_keys(maybe) if maybe else {}
        except Exception:
            # Each create then looks its key up alone, and gets the error that deserves.
            log.warning("idempotency keys not looked up as a batch", exc_info=True)
            return
        self._keys = {key: found.get(key) or stored.get(key) for key in keys}
        self._keys_generation = self._generation

    async def _load_keys(self, user_id: str, since: float) -> None:
        # Staged or committing now, maybe not committed when the query reads: taken first
        # (a group that commits meanwhile is then in one or the other).
        staged = [
            job.idempotency_key
            for group in (self._group, *self._inflight)
            for job in group.jobs.values()
            if job.user_id == user_id and job.idempotency_key is not None
        ]
        loaded_at = wall_time()
        # One more than the filter holds, at most: a user with more keeps no set (each key
        # looked up), and a load never reads more than the budget into memory.
        most = self._key_filter.max_hashes
        keys = [*staged, *await self.backend.keys_since(user_id, since, most + 1)]
        self._key_filter.load(user_id, since, loaded_at, keys if len(keys) <= most else None)

    async def _replay_void(self) -> None:
        """Apply and commit again, one at a time, the requests of groups a request-tied
        failure voided: each gets the answer its own write deserves."""
        await self._drain()  # every void group reaches the committer and queues its requests
        while self._replay:
            request = self._replay.pop(0)
            request.replay = False
            request.value = request.error = None
            await self._process([request])
            await self._drain()

    async def _cut(self) -> None:
        """Hand the group being applied to the committer (waits while it is busy)."""
        group, self._group = self._group, _Group(self._generation)
        group.beats, self._beats = self._beats, {}
        if not group:
            return
        self._inflight.append(group)
        self._idle = trio.Event()
        await self._handoff.send(group)

    async def _drain(self) -> None:
        """Commit everything applied so far and wait until it is done."""
        await self._cut()
        await self._idle.wait()

    async def _committer(self, groups: trio.MemoryReceiveChannel[_Group]) -> None:
        async with groups:
            async for group in groups:
                try:
                    await self._commit(group)
                finally:
                    self._inflight.remove(group)
                    if self._void:
                        # A void generation's cause is read by its own groups only, and no
                        # group of an older generation than the ones left is ever made.
                        live = min(g.generation for g in (self._group, *self._inflight))
                        for generation in [g for g in self._void if g < live]:
                            del self._void[generation]
                    limit = self.config.users_cached
                    if len(self._user_heads) > limit or len(self._waiting) > limit:
                        self._forget_users()
                    if group.fast and self.fast_starter is not None:
                        if group.committed:
                            self.fast_starter.committed(group.fast)
                        else:
                            self.fast_starter.voided(group.fast)
                    if not self._inflight:
                        self._idle.set()
                        if self._group:
                            self._wake.cancel()  # hand over the group that grew meanwhile
                    for request in group.requests:
                        if request.replay:
                            self._replay.append(request)
                        else:
                            held = self._early.get(request.job_id)
                            if held is not None and request in held:
                                held.remove(request)
                                if not held:
                                    del self._early[request.job_id]
                                if request.error is not None:
                                    # Answered already: nobody else hears of it.
                                    log.warning(
                                        "progress answered early was not saved: %s",
                                        request.error,
                                    )
                            request.done.set()
                    if self._replay:
                        self._wake.cancel()

    async def _commit(self, group: _Group) -> None:
        error: Exception
        built_on_void = group.generation != self._generation
        if built_on_void:
            cause = self._void.get(group.generation)
            if cause is None:
                self._mark_replay(group)
                return
            error = cause
        elif not group.writes:
            return  # reads only: answered in order, after the writes before them
        else:
            started = time.perf_counter()
            try:
                with span(
                    "jobspine.store.commit",
                    lambda: {"requests": len(group.requests), "events": len(group.events)},
                ):
                    await self._write(group)
            except Exception as exc:
                self.metrics.failed_commits += 1
                corrupt = is_corruption(exc)
                if corrupt:
                    exc = self._corrupted(exc)  # the error its requests get, said once
                # Every group applied on top of this one is void; cached state is reloaded.
                void = self._generation
                self._generation += 1
                self.queue.unsettle()
                self._cache.clear()
                self._user_heads.clear()
                self._waiting.clear()
                if not self._group:  # nothing applied on the void state yet
                    self._group.generation = self._generation
                if isinstance(exc, StoreUnavailableError):
                    error = exc
                    self._void[void] = StoreUnavailableError(
                        f"an earlier write failed, nothing of this was saved: {exc}"
                    )
                else:
                    # Tied to a request: every void group is replayed, one request at a time.
                    # A job lost to another writer is reloaded by then: the request, applied
                    # again, is refused by its own checks, or commits. Bounded per request,
                    # so that a storm of conflicts cannot livelock the store.
                    self._void[void] = None
                    if isinstance(exc, StaleWriteError) and len(group.requests) == 1:
                        request = group.requests[0]
                        request.conflicts += 1
                        if request.conflicts <= MAX_CONFLICTS:
                            self._mark_replay(group)
                            return
                    if len(group.requests) > 1:
                        log.warning(
                            "commit of %d requests failed (%r); committing them one at a time",
                            len(group.requests),
                            exc,
                        )
                        self._mark_replay(group)
                        return
                    if not corrupt:
                        log.warning("write refused by the database: %r", exc)
                    if isinstance(exc, StaleWriteError):
                        error = exc
                    else:
                        error = StoreError(f"database write failed, nothing was saved: {exc}")
            else:
                self.metrics.committed(
                    len(group.requests), group.events, group.moves, time.perf_counter() - started
                )
                self._committed(group)
                return
        for request in group.requests:
            # A request refused when it was applied, on top of writes that were not saved
            # (a void group's before it, or this group's before it), was judged on them:
            # that refusal is no verdict either (a worker would take a refused outcome for a
            # newer decision and leave the job running with no one on it). One judged on
            # committed state stands.
            if request.error is None or built_on_void or request.staged_before:
                request.error = error
                request.value = None

    @staticmethod
    def _mark_replay(group: _Group) -> None:
        for request in group.requests:
            request.replay = True

    async def _write(self, group: _Group) -> None:
        """Commit ``group``, waiting out an outage with exponential backoff until
        ``store_retry_timeout`` after it began; then raise :class:`StoreUnavailableError`."""
        delay = self.config.retry_backoff
        while True:
            try:
                async with self._commit_lock:
                    committed = await self.backend.commit(
                        group.jobs.values(),
                        group.events,
                        group.deleted,
                        group.beats,
                        progress_only=group.progress_only,
                        keyed=group.keyed,
                    )
            except Exception as exc:
                if not is_outage(exc):
                    raise
                self._outage(exc)
                if self._closing or trio.current_time() >= self._outage_deadline:
                    raise StoreUnavailableError(
                        f"the database is unavailable ({one_line(exc)}) for longer than"
                        f" store_retry_timeout ({self.config.store_retry_timeout:g} s);"
                        " nothing was saved"
                    ) from exc
                await trio.sleep(min(delay, self._outage_deadline - trio.current_time()))
                delay = min(delay * 2, self.config.retry_backoff_max)
            else:
                self._healthy()
                # As stored: the backend may have numbered them (assigns_user_seq).
                group.events = list(committed)
                return

    async def _probe(self) -> None:
        """Check whether an unavailable database is back, with no write waiting to tell."""
        try:
            async with self._commit_lock:
                await self.backend.ping()
        except Exception as exc:
            if is_corruption(exc):
                # The probe writes (a page of SQLite's meta table, of PostgreSQL's probes
                # table): damage it meets is reported as a request's is, and the database
                # stays unavailable.
                self._corrupted(exc)
                return
            if not is_outage(exc):
                raise
            self._outage(exc)
        else:
            self._healthy()

    def _outage(self, exc: Exception) -> None:
        health = self.health
        # One line: the reason is /readyz's, and a driver's message may be several (psycopg's
        # "could not extend file ...: No space left on device" is followed by a HINT line).
        reason = one_line(exc)
        if health.ok:
            log.warning("database unavailable, writes wait and are retried: %s", reason)
            health.ok, health.since = False, time.time()
            health.outages += 1
            self._outage_began = trio.current_time()  # its length: the wall clock may be set
            self._outage_deadline = self._outage_began + self.config.store_retry_timeout
        health.reason = f"database unavailable: {reason}"

    def _log_outage_failure(self, exc: Exception) -> None:
        """A request or read failed because the database is unavailable: a warning without
        traceback, at most one a minute (:data:`OUTAGE_LOG_INTERVAL`), with the count since."""
        self._outage_failures += 1
        now = trio.current_time()
        if now >= self._outage_logged_at + OUTAGE_LOG_INTERVAL:
            log.warning(
                "%d store requests and reads failed since the last such warning, the database"
                " unavailable: %r",
                self._outage_failures,
                exc,
            )
            self._outage_logged_at = now
            self._outage_failures = 0

    def _corrupted(self, exc: Exception) -> StoreError:
        """The error for a request that met damaged storage; logged (with its traceback)
        the first time only: every later request that reads the same pages meets it too."""
        message = (
            f"the database is corrupt ({one_line(exc)}): stop the server and restore it from a"
            " backup (for a SQLite file, sqlite3's .recover command saves what it can read)"
        )
        if self.health.corrupt is None:
            self.health.corrupt = message
            log.error("%s; requests that read the damaged part fail", message, exc_info=exc)
        return StoreError(message)

    def forget_owner(self, owner: str) -> None:
        """``owner`` (an incarnation of this node) lost its lease: drop its running jobs from
        the cache, and cache none of them again (a write of one still on its way). Another
        node takes them over and changes them in the database; the cache would keep showing
        them running on ``owner``, refuse a resume of one that was paused ("it is running
        already") and send its pauses and cancels to ``owner``, which is gone, for as long
        as this process runs. Read from the database instead, they are what that node made
        of them."""
        self._gone_owners.add(owner)
        for job_id in [job.id for job in self._cache.values() if job.owner == owner]:
            del self._cache[job_id]

    def _healthy(self) -> None:
        health = self.health
        if not health.ok:
            log.warning(
                "database available again after %.1f s", trio.current_time() - self._outage_began
            )
            health.ok, health.reason, health.since = True, None, None
            self._outage_deadline = math.inf

    def _committed(self, group: _Group) -> None:
        group.committed = True
        self.commits += 1
        self.committed_requests += len(group.requests)
        cache = self._cache
        for job_id, (attempt, at) in group.beats.items():
            cached = cache.get(job_id)
            if cached and cached.state is JobState.RUNNING and cached.attempt == attempt:
                cache[job_id] = attrs.evolve(cached, last_heartbeat_at=at)
        for job in group.jobs.values():
            if job.state is JobState.RUNNING and job.owner not in self._gone_owners:
                cache[job.id] = job
            else:
                cache.pop(job.id, None)
        for job_id in group.deleted:
            cache.pop(job_id, None)
        self.hub.publish(group.events)

    def _forget_users(self) -> None:
        """Forget the least recently used users' heads and waiting counts, down to seven
        eighths of ``users_cached`` (so a trim comes once per eighth of new users, not at
        every commit); called as a group leaves the pipeline. A head is forgotten only if no
        event of its user is staged or committing: the database's head is then the same,
        and read again on a miss (so the bound is exceeded by the users in flight at most).
        A waiting count may go at any time: it is read again after a drain
        (:meth:`_waiting_of`)."""
        keep = self.config.users_cached - self.config.users_cached // 8
        busy = {event.user_id for g in (self._group, *self._inflight) for event in g.events}
        heads = self._user_heads
        for user_id in list(heads):  # least recently used first
            if len(heads) <= keep:
                break
            if user_id not in busy:
                del heads[user_id]
        waiting = self._waiting
        while len(waiting) > keep:
            waiting.popitem(last=False)

    async def _read_committed(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Run a read beside the actor, between commits: while the database is unavailable
        the actor may be stuck behind a write, and committed state is all a read needs."""
        request = _Request(fn, READ)
        try:
            self._reads_send.send_nowait(request)
        except trio.WouldBlock:
            raise StoreError("too many reads wait on an unavailable database") from None
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise RuntimeClosedError("the store is closed") from None
        value: T = await request.answer()
        return value

    async def _reader(self) -> None:
        """Serve :meth:`_read_committed` beside the actor, in its nursery (with which it ends),
        each read under the commit lock."""
        async for request in self._reads_receive:
            try:
                async with self._commit_lock:
                    request.value = await request.fn()
            except JobspineError as exc:
                request.error = exc
            except Exception as exc:
                if is_outage(exc):  # what these reads are for: no fault of the code
                    self._log_outage_failure(exc)
                else:
                    log.exception("store read failed")
                request.error = StoreError(f"store read failed: {shown(exc, 1000)}")
            finally:
                request.done.set()

    # -- helpers used by request functions (run inside the actor task) -------------------------

    async def _job(self, job_id: str) -> Job:
        if not _may_name_a_job(job_id):
            raise UnknownJobError(job_id)
        for group in (self._group, *reversed(self._inflight)):
            if job_id in group.deleted:
                raise UnknownJobError(job_id)
            job = group.jobs.get(job_id)
            if job is not None:
                return job
        job = self._cache.get(job_id)
        if job is None:
            job = await self._load(job_id)
            if job is None:
                raise UnknownJobError(job_id)
        return job

    async def _committed_job(self, job_id: str) -> Job:
        if not _may_name_a_job(job_id):
            raise UnknownJobError(job_id)
        job = self._cache.get(job_id) or await self._load(job_id)
        if job is None or any(job_id in group.deleted for group in self._inflight):
            raise UnknownJobError(job_id)
        # The lease as stored (see renew_leases), not the claim's, in the past once renewed.
        lease = job.lease_expires_at
        renewed = self._renewed.get(job.owner) if job.owner is not None else None
        if lease is not None and renewed is not None and lease < renewed:
            job = attrs.evolve(job, lease_expires_at=renewed)
        return job

    async def _load(self, job_id: str) -> Job | None:
        """The stored job, None if there is none: every look-up of a job by id ends here."""
        if not _may_name_a_job(job_id):
            return None
        return await self.backend.load(job_id)

    async def _user_head(self, user_id: str) -> int:
        head = self._user_heads.get(user_id)
        if head is None:
            head = self._user_heads[user_id] = await self.backend.user_head(user_id)
        else:
            self._user_heads.move_to_end(user_id)
        return head

    async def _stage(self, change: ops.Change) -> Job:
        job, event = change
        if self.backend.assigns_user_seq:
            user_seq = 0  # provisional: the commit numbers it, in its transaction
        else:
            user_seq = await self._user_head(job.user_id) + 1
            self._user_heads[job.user_id] = user_seq
        group = self._group
        if event.type is EventType.PROGRESS and (
            job.id in group.progress_only or job.id not in group.jobs
        ):
            group.progress_only.add(job.id)
        else:
            group.progress_only.discard(job.id)
        group.jobs[job.id] = job
        if job.idempotency_key is not None:
            self._key_filter.add(job.user_id, job.idempotency_key)
        if self._keys is not None and job.idempotency_key is not None:
            key = (job.user_id, job.idempotency_key)
            if key in self._keys:
                newest = self._keys[key]
                if newest is None or newest.id <= job.id:
                    self._keys[key] = job
        if event.user_seq != user_seq:
            event = JobEvent(
                event.job_id,
                event.user_id,
                event.seq,
                event.type,
                event.state,
                event.at,
                event.data,
                event.actor,
                user_seq,
            )
        self._group.events.append(event)
        return job

    async def _change(self, job_id: str, fn: Callable[[Job, float], ops.Change]) -> Job:
        return await self._apply(await self._job(job_id), fn)

    async def _apply(self, old: Job, fn: Callable[[Job, float], ops.Change]) -> Job:
        job = await self._stage(fn(old, wall_time()))
        if old.state is JobState.CREATED or job.state is JobState.CREATED:
            self._group.queue_writes = True
        if job.state is not old.state:
            self._move(job.user_id, old.state, job.state)
        self.queue.staged(old.state, job)
        return job

    async def _start_at_create(self, job: Job) -> Job | None:
        """The fast path (see :mod:`._fast_start`): stage the start of ``job``, just staged
        as created, if the dispatcher admits it; returns it as claimed (still created, owner
        and lease set), None when it waits for a claim."""
        starter = self.fast_starter
        if starter is None or not self.queue.settled:
            return None
        claim = starter.admit(job, self.queue.until)
        if claim is None:
            return None
        owner, lease = claim
        claimed = attrs.evolve(job, owner=owner, lease_expires_at=lease)
        started = await self._apply(claimed, lambda job, now: ops.start(job, now, owner, lease))
        self._group.fast.append(started)
        return claimed

    def _move(self, user_id: str, old: JobState | None, new: JobState | None) -> None:
        """Count a staged change of state (metrics, the user's waiting jobs)."""
        move(self._group.moves, old, new)
        if old is JobState.CREATED or new is JobState.CREATED or new is None:
            self._group.queue_writes = True
        waiting = self._waiting.get(user_id)
        if waiting is not None:
            waiting += (new is JobState.CREATED) - (old is JobState.CREATED)
            self._waiting[user_id] = waiting

    async def _waiting_of(self, user_id: str) -> int:
        count = self._waiting.get(user_id)
        if count is None:
            # Committed count plus what is staged and in flight, which the count misses.
            await self._drain()
            stored = await self.backend.count_by_state(user_id)
            count = self._waiting[user_id] = stored.get(JobState.CREATED.value, 0)
        else:
            self._waiting.move_to_end(user_id)
        return count

    async def _created_with(self, job: Job, input: Any) -> bool:
        """Whether ``job`` was created with ``input``: its input now, or, once a restart with
        modifications changed that, the input of its ``created`` event. (Compared with the
        input now only, a create sent again with its key after such a restart, as a client
        does whose reply was lost, was refused as another request.)"""
        wanted = _canonical(input)
        if _canonical(job.input) == wanted:
            return True
        for group in (*self._inflight, self._group):
            for event in group.events:
                if event.job_id == job.id and event.type is EventType.CREATED:
                    return "input" in event.data and _canonical(event.data["input"]) == wanted
        created = await self.backend.read_events(job.id, 0, 1, frozenset({EventType.CREATED}))
        return (
            bool(created)
            and "input" in created[0].data
            and (_canonical(created[0].data["input"]) == wanted)
        )

    async def _find_by_key(self, user_id: str, key: str, since: float) -> Job | None:
        keys = self._keys if self._keys_generation == self._generation else None
        if keys is not None and (user_id, key) in keys:
            found = keys[(user_id, key)]
            return found if found is not None and found.created_at >= since else None
        for group in (self._group, *reversed(self._inflight)):
            for job in group.jobs.values():
                if job.user_id == user_id and job.idempotency_key == key:
                    return job
        return await self.backend.find_by_key(user_id, key, since)


class StoreClient:
    """Request/reply access to the store actor. Every method returns after the commit."""

    def __init__(self, actor: StoreActor, send: trio.MemorySendChannel[_Request]) -> None:
        self._actor = actor
        self._send = send

    async def __aenter__(self) -> StoreClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._send.aclose()

    def clone(self) -> StoreClient:
        return StoreClient(self._actor, self._send.clone())

    @property
    def epoch(self) -> str:
        return self._actor.backend.epoch

    @property
    def fanout_key(self) -> bytes:
        """The database's key for signing fan-out messages (:attr:`Backend.fanout_key`): read
        once the store is open."""
        return self._actor.backend.fanout_key

    @property
    def checkpoint_limit(self) -> int:
        return self._actor.config.checkpoint_limit

    @property
    def result_limit(self) -> int:
        return self._actor.config.result_limit

    @property
    def retry_timeout(self) -> float:
        """Seconds a write waits out an unavailable database before it fails: every write
        is answered within about that long once the store takes it."""
        return self._actor.config.store_retry_timeout

    @property
    def health(self) -> StoreHealth:
        return self._actor.health

    def set_fast_starter(self, starter: FastStarter, *, capacity_matters: bool = True) -> None:
        """Let ``starter`` start new jobs in their create's commit (see :mod:`._fast_start`);
        ``capacity_matters``: whether limits other than the total can leave jobs waiting."""
        self._actor.fast_starter = starter
        self._actor.queue.capacity_matters = capacity_matters

    def forget_owner(self, owner: str) -> None:
        """This node's incarnation ``owner`` lost its lease: its jobs are read from the
        database from now on (see :meth:`StoreActor.forget_owner`). Never blocks."""
        self._actor.forget_owner(owner)

    def unsettle(self) -> None:
        """Capacity freed or a job became claimable outside the store's sight: no create
        starts at once until the next claim has looked. Never blocks."""
        self._actor.queue.unsettle()

    async def _call(
        self,
        fn: Callable[[], Awaitable[T]],
        mode: str = WRITE,
        key: _KeyRequest | None = None,
        *,
        early: bool = False,
        job_id: str | None = None,
        ordered: Callable[[], None] | None = None,
    ) -> T:
        request = _Request(fn, mode, key, early=early, job_id=job_id, ordered=ordered)
        # A cancelled caller queues nothing (as with ``send``). Queued without a scheduler
        # round of its own when there is room: the wait for the answer is this call's
        # checkpoint, one task switch per request instead of two.
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            try:
                self._send.send_nowait(request)
            except trio.WouldBlock:
                await self._send.send(request)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise RuntimeClosedError("the store is closed") from None
        value: T = await request.answer()
        return value

    async def _read(self, fn: Callable[[], Awaitable[T]], mode: str) -> T:
        """A read: through the actor (in order with writes) while the database is healthy;
        during an outage directly from committed state, so that reads keep being served."""
        if self._actor.health.ok:
            return await self._call(fn, mode)
        return await self._actor._read_committed(fn)

    # -- writes ---------------------------------------------------------------------------------
    # Every value is validated here, in the caller's task, before it is queued: a value the
    # database cannot store never joins a commit group.

    async def create(
        self,
        user_id: str,
        kind: str,
        input: Any,
        options: CreateOptions | None = None,
        *,
        max_waiting: int | None = None,
        idempotency_window: float = 86_400.0,
        start_at_once: bool = False,
        now: float | None = None,
    ) -> Job:
        """Store a waiting job. ``options`` are checked, with the kind's defaults in. ``now``:
        the wall time (Unix seconds) the options' ``run_at`` was computed from, the job's
        ``created_at`` (default: read here). Raises
        :class:`InvalidParentError` (no such job of this user), :class:`TooManyJobsError`
        (``max_waiting`` of the user's jobs wait), :class:`IdempotencyConflictError`; with an
        idempotency key already used for the same request within ``idempotency_window``
        seconds, returns that job unchanged. A job made under a cancelled parent is stored
        cancelled (by ``system``) in the same commit: it never runs. ``start_at_once``: the
        queue's create (the runtime's dispatcher launches what starts): start the job in this
        commit if the next claim would (see :mod:`._fast_start`); it is returned created, with
        its claim's ``owner`` and ``lease_expires_at`` set."""
        actor = self._actor
        # Built (and its values checked) in the caller's task, before it joins a group.
        # One reading for both: a delay's run_at from one and created_at from the next were
        # a float's least step apart under a test's clock (which makes each reading later
        # than the one before), so a job delayed 3600 s was stored 3599.99999976 s apart and
        # started that much early by the test's clock.
        now = wall_time() if now is None else now
        change = ops.create(new_id(), user_id, kind, input, now, options)
        new = change[0]

        async def fn() -> Job:
            key = new.idempotency_key
            if key is not None:
                found = await actor._find_by_key(user_id, key, new.created_at - idempotency_window)
                if found is not None:
                    if _same_options(found, new) and await actor._created_with(found, new.input):
                        return found
                    raise IdempotencyConflictError(key, found.id)
            parent_cancelled = False
            if new.parent_id is not None:
                try:
                    parent = await actor._job(new.parent_id)
                except UnknownJobError:
                    raise InvalidParentError(new.parent_id) from None
                if parent.user_id != user_id:
                    raise InvalidParentError(new.parent_id)
                parent_cancelled = parent.state is JobState.CANCELLED
            if max_waiting is not None and await actor._waiting_of(user_id) >= max_waiting:
                raise TooManyJobsError(
                    f"user {shown(user_id)} already has {max_waiting} jobs waiting"
                    " (max_waiting_per_user)"
                )
            job = await actor._stage(change)
            if key is not None:
                actor._group.keyed[job.id] = new.created_at - idempotency_window
            actor._move(user_id, None, job.state)
            if parent_cancelled:
                # Cancelled in its create's commit, never claimable: staged created, the fast
                # path started it, and a quick handler had completed before a cancel after
                # the create reached it.
                return await actor._apply(job, lambda job, now: ops.cancel(job, now, "system"))
            claimed = await actor._start_at_create(job) if start_at_once else None
            if claimed is not None:
                return claimed
            actor.queue.staged(None, job)
            return job

        key = new.idempotency_key
        since = new.created_at - idempotency_window
        return await self._call(fn, key=None if key is None else (user_id, key, since))

    async def claim(self, request: ClaimRequest) -> tuple[list[Job], float | None]:
        """Claim the next waiting jobs (see :meth:`Backend.claim`) and start them: returns
        them as stored, running with their new attempt, and the earliest later ``run_at``
        (Unix seconds) among waiting jobs, None if none. Every earlier write that changes the
        waiting jobs (a create, a retry, a cancel...) is committed first."""
        actor = self._actor
        owner, lease = request.owner, request.lease_expires_at

        async def fn() -> tuple[list[Job], float | None]:
            epoch = actor.queue.epoch
            starter = actor.fast_starter
            fresh = request if starter is None else starter.claiming(request)
            async with actor._commit_lock:
                result = await actor.backend.claim(fresh)
            until = result.next_run_at
            slots = fresh.planner().slots()
            if starter is not None and len(result.jobs) < slots:
                # Jobs another owner marked (a process that died between its claim and the
                # start) become claimable when its lease lapses: the verdict ends then, so
                # that a create after it goes through the claim. Read before any start is
                # applied: a claim answered with an error must leave nothing to commit (a
                # start committed with no one told of it is a job stored as running that no
                # worker runs, until the stall rule finds it).
                async with actor._commit_lock:
                    held = await actor.backend.held_until(owner, request.now)
                if held is not None and (until is None or held < until):
                    until = held
            started = [
                await actor._apply(job, lambda job, now: ops.start(job, now, owner, lease))
                for job in result.jobs
            ]
            if starter is not None:
                starter.claimed(started)
            actor.queue.claimed(epoch, len(started), slots, until)
            return started, result.next_run_at

        return await self._call(fn, CLAIM)

    async def renew_leases(self, owner: str, lease_expires_at: float) -> int:
        """Extend every claim of ``owner`` to ``lease_expires_at`` (Unix seconds)."""
        actor = self._actor

        async def fn() -> int:
            async with actor._commit_lock:
                renewed = await actor.backend.renew_leases(owner, lease_expires_at)
            actor._renewed[owner] = lease_expires_at
            return renewed

        return await self._call(fn, BARRIER)

    # -- nodes (see :mod:`._nodes` and the :class:`Backend` methods of the same names) -----

    async def _node_call(self, fn: Callable[[Backend], Awaitable[T]], *, read: bool = False) -> T:
        """A call about nodes. On a shared database it runs beside the actor, on the backend's
        own connection for nodes: a commit held up by another node's row locks (a frozen
        node's, until its takeover ends its sessions) never delays this node's renewals, nor
        the takeover that frees it. Elsewhere in order with the writes (after a drain), under
        the commit lock. Errors as the actor's: :class:`StoreError` for anything not ours."""
        actor = self._actor
        if actor.backend.shared:
            try:
                return await fn(actor.backend)
            except JobspineError:
                raise
            except Exception as exc:
                if not is_outage(exc):  # an outage is the caller's to log (and retry)
                    log.exception("node request failed")
                raise StoreError(f"node request failed: {shown(exc, 1000)}") from None
        if read:
            return await self._read(lambda: fn(actor.backend), BARRIER)

        async def call() -> T:
            async with actor._commit_lock:
                return await fn(actor.backend)

        return await self._call(call, BARRIER)

    async def register_node(
        self,
        node_id: str,
        incarnation: str,
        ttl: float,
        host: str,
        pid: int,
        replacing: str | None = None,
    ) -> NodeLease:
        return await self._node_call(
            lambda b: b.register_node(node_id, incarnation, ttl, host, pid, replacing)
        )

    async def renew_node(self, lease: NodeLease, ttl: float, running: int) -> NodeLease:
        return await self._node_call(lambda b: b.renew_node(lease, ttl, running))

    async def leave_node(self, lease: NodeLease) -> None:
        await self._node_call(lambda b: b.leave_node(lease))

    async def expired_nodes(self) -> list[NodeInfo]:
        return await self._node_call(lambda b: b.expired_nodes())

    async def take_over(self, node: NodeInfo, by: str) -> bool:
        return await self._node_call(lambda b: b.take_over(node, by))

    async def list_nodes(self) -> list[NodeInfo]:
        return await self._node_call(lambda b: b.list_nodes(), read=True)

    async def node_alive(self, owner: str) -> bool:
        return await self._node_call(lambda b: b.node_alive(owner), read=True)

    async def running_jobs_of(self, owner: str) -> list[Job]:
        return await self._read(lambda: self._actor.backend.running_jobs_of(owner), BARRIER)

    async def recount_jobs(self) -> None:
        """Load the jobs-by-state gauge (:attr:`StoreActor.metrics`) from the database again:
        on a shared database other nodes' commits change the counts too."""
        actor = self._actor

        async def fn() -> None:
            actor.metrics.load(await actor.backend.count_by_state(None))

        await self._read(fn, BARRIER)

    async def orphaned_owners(self) -> list[tuple[str, str | None]]:
        return await self._read(lambda: self._actor.backend.orphaned_owners(), BARRIER)

    async def queue_stats(self, now: float, user_id: str | None = None) -> QueueStats:
        """Raises :class:`InvalidInputError` for a ``user_id`` holding NUL."""
        check_name(user_id, "user_id")
        return await self._read(lambda: self._actor.backend.queue_stats(now, user_id), BARRIER)

    async def retry(
        self,
        job_id: str,
        attempt: int,
        error: JobError,
        decide: Callable[[Job], RetryDecision],
        *,
        ordered: Callable[[], None] | None = None,
    ) -> Job:
        """Record a failed attempt: back to the queue, or failed for good, as ``decide`` (given
        the job as stored) says. Fenced by ``attempt``. ``ordered``: as for :meth:`complete`."""
        error = JobError(sanitize_text(str(error.type)), sanitize_text(str(error.message)))

        def change(job: Job, now: float) -> ops.Change:
            decision = decide(job)
            if decision.retry:
                return ops.retry(job, attempt, error, decision, now)
            return ops.fail(job, attempt, error, now, None, decision.failed_attempts)

        return await self._call(lambda: self._actor._change(job_id, change), ordered=ordered)

    async def requeue(self, job_id: str, attempt: int, reason: str) -> Job:
        """Put a running attempt's job back in the queue, no attempt counted against it (see
        :func:`ops.requeue`). Fenced by ``attempt``."""
        check_text(reason, "reason")
        return await self._call(
            lambda: self._actor._change(
                job_id, lambda job, now: ops.requeue(job, attempt, now, reason)
            )
        )

    async def get(self, job_id: str) -> Job:
        """The job as last committed (a failing write elsewhere does not affect it)."""
        return await self._read(lambda: self._actor._committed_job(job_id), READ)

    async def start(self, job_id: str) -> Job:
        """Start a waiting job now, outside the queue's order (no claim: no owner)."""
        return await self._call(lambda: self._actor._change(job_id, ops.start))

    async def resume(self, job_id: str, actor: str | None) -> Job:
        check_text(actor, "actor", optional=True)
        return await self._call(
            lambda: self._actor._change(job_id, lambda job, now: ops.resume(job, now, actor))
        )

    async def set_progress(
        self, job_id: str, attempt: int, pct: float, step: str | None, *, durable: bool = True
    ) -> Job:
        """Record progress; returns the job as staged. ``durable`` False: answered once
        ordered into the next group commit, not after it (while the database is healthy and
        fewer than ``StoreConfig.progress_window`` of the job's progress writes answered so
        are uncommitted, else at its commit; the ops' own refusals, such as a stale attempt,
        are still raised): the event is published only once committed, so no client sees an
        event that is not durable."""
        check_text(step, "step", optional=True, limit=MAX_STEP_LENGTH, max_bytes=None)
        return await self._call(
            lambda: self._actor._change(
                job_id, lambda job, now: ops.progress(job, attempt, pct, step, now)
            ),
            early=not durable,
            job_id=job_id,
        )

    async def checkpoint(self, job_id: str, attempt: int, data: Any) -> Job:
        limit = self.checkpoint_limit
        encoded = dumps_json_value(data, "checkpoint")
        return await self._call(
            lambda: self._actor._change(
                job_id, lambda job, now: ops.checkpoint(job, attempt, data, now, limit, encoded)
            )
        )

    async def complete(
        self,
        job_id: str,
        attempt: int,
        result: Any,
        *,
        ordered: Callable[[], None] | None = None,
    ) -> Job:
        """Store the outcome. Raises :class:`ResultTooLargeError` for a result larger than
        ``result_limit`` encoded bytes, :class:`NotSerializableError` for one that cannot be
        stored (the job is unchanged: its worker then fails it with that error).
        ``ordered``: called once the outcome is applied, in order with every other write,
        before the commit that makes it durable (and that this call waits for); not called
        if the write is refused."""
        limit = self.result_limit
        encoded = dumps_json_value(result, "job result")
        return await self._call(
            lambda: self._actor._change(
                job_id, lambda job, now: ops.complete(job, attempt, result, now, limit, encoded)
            ),
            ordered=ordered,
        )

    async def fail(
        self, job_id: str, attempt: int | None, error: JobError, actor: str | None = None
    ) -> Job:
        """Record a failure. The error is never refused: text the database cannot store (a
        lone surrogate from a file name) is replaced by its escape, so the real error stays."""
        check_text(actor, "actor", optional=True)
        error = JobError(sanitize_text(str(error.type)), sanitize_text(str(error.message)))
        return await self._call(
            lambda: self._actor._change(
                job_id, lambda job, now: ops.fail(job, attempt, error, now, actor)
            )
        )

    async def cancel(self, job_id: str, actor: str | None, attempt: int | None = None) -> Job:
        """Cancel the job; ``attempt``: only while it runs that attempt (else
        :class:`StaleAttemptError`, nothing written)."""
        check_text(actor, "actor", optional=True)
        return await self._call(
            lambda: self._actor._change(
                job_id, lambda job, now: ops.cancel(job, now, actor, attempt)
            )
        )

    async def pause(
        self,
        job_id: str,
        attempt: int | None,
        actor: str | None,
        reason: str = "user",
        *,
        waiting: bool = False,
    ) -> Job:
        """Pause a job (``attempt`` fences a running one). ``waiting``: only a waiting job,
        else :class:`IllegalTransitionError` (it was claimed meanwhile: its worker must be
        stopped first)."""
        check_text(actor, "actor", optional=True)
        check_text(reason, "reason")

        def change(job: Job, now: float) -> ops.Change:
            if waiting and job.state is not JobState.CREATED:
                raise IllegalTransitionError(job.id, job.state.value, JobState.PAUSED.value)
            return ops.pause(job, attempt, now, actor, reason)

        return await self._call(lambda: self._actor._change(job_id, change))

    async def recover(
        self,
        job_id: str,
        attempt: int | None,
        decide: Callable[[Job], RecoveryDecision],
        *,
        took_over: tuple[str, str] | None = None,
    ) -> Job:
        """Apply the recovery rule to a running job, atomically with reading it: ``decide``
        (given the job as stored: ``Supervisor.decide_recovery``, the one stall rule) says
        what becomes of it. ``took_over``: ``(dead owner, new owner)`` of a node takeover,
        recorded in the event's data as ``taken_over_from`` and ``taken_over_by``; the job
        must still be the dead owner's."""
        extra = None
        if took_over is not None:
            extra = {"taken_over_from": took_over[0], "taken_over_by": took_over[1]}

        def change(job: Job, now: float) -> ops.Change:
            if took_over is not None and job.owner != took_over[0]:
                raise StaleAttemptError(job.id, job.attempt, job.attempt, job.state.value)
            decision = decide(job)
            # The reason is stored (an event's reason, a failure's message): a cause naming
            # what the database cannot hold (a lone surrogate) is escaped, never refused.
            decision = attrs.evolve(decision, reason=sanitize_text(decision.reason))
            return ops.recover(job, attempt, decision, now, extra)

        return await self._call(lambda: self._actor._change(job_id, change))

    async def restart(
        self,
        job_id: str,
        actor: str | None,
        modifications: Mapping[str, Any] | None = None,
        *,
        check: Callable[[str, Any], None] | None = None,
    ) -> Job:
        """Restart the job with ``modifications`` merged into its input as stored when the
        restart is applied; ``check(kind, input)`` (the kind's input check) refuses that
        input, by raising, before anything is staged. (Checked by the caller beforehand, on
        the input it had read, two restarts at once each passed and stored together input the
        check refuses.)"""
        check_text(actor, "actor", optional=True)
        if modifications:
            if not isinstance(modifications, Mapping):
                raise InvalidInputError("modifications must be an object")
            dumps_json_value(dict(modifications), "modifications")

        def change(job: Job, now: float) -> ops.Change:
            restarted = ops.restart(job, now, actor, modifications)
            if check is not None:
                check(job.kind, restarted[0].input)
            return restarted

        return await self._call(lambda: self._actor._change(job_id, change))

    async def reset_recovery_attempts(self, job_id: str, actor: str | None) -> Job:
        check_text(actor, "actor", optional=True)
        return await self._call(
            lambda: self._actor._change(
                job_id, lambda job, now: ops.reset_recovery(job, now, actor)
            )
        )

    async def set_state(self, job_id: str, state: JobState, actor: str | None = None) -> Job:
        """Move a job to ``state`` by the one operation that leads there without a payload."""
        job = await self.get(job_id)
        if state is JobState.RUNNING:
            if job.state is JobState.PAUSED:
                await self.resume(job_id, actor)  # back to the queue, then started from it
            return await self.start(job_id)
        if state is JobState.PAUSED:
            return await self.pause(job_id, None, actor)
        if state is JobState.CANCELLED:
            return await self.cancel(job_id, actor)
        if state is JobState.CREATED:
            return await self.restart(job_id, actor)
        if state is JobState.FAILED:
            return await self.fail(job_id, None, JobError("Failed", "set failed"), actor)
        check_transition(job_id, job.state, JobState.COMPLETED)
        return await self.complete(job_id, job.attempt, None)

    async def delete(self, job_id: str, actor: str | None = None) -> None:
        """Remove a job that is not running. Its event log stays, closed by a ``deleted``
        event, so that cursors on the job's and its user's rooms never see a gap."""
        store = self._actor
        check_text(actor, "actor", optional=True)

        async def fn() -> None:
            job, event = ops.delete(await store._job(job_id), wall_time(), actor)
            await store._stage((job, event))
            store._move(job.user_id, job.state, None)
            store._keys = None  # it may be the job of a key: looked up again
            del store._group.jobs[job_id]
            store._group.deleted.add(job_id)

        await self._call(fn)

    def heartbeat(self, job_id: str, attempt: int) -> None:
        """Record a heartbeat; written with the next commit. Never blocks."""
        if not _may_name_a_job(job_id):
            # Of no job (see _load); in a commit it would fail everyone's writes with it.
            return
        actor = self._actor
        if not actor._beats:  # the actor may be asleep until the next request: not that long
            flush_at = trio.current_time() + actor.config.heartbeat_flush_interval
            actor._wake.deadline = min(actor._wake.deadline, flush_at)
        actor._beats[job_id] = (attempt, wall_time())

    # -- queries (barriers) ---------------------------------------------------------------------

    async def list_jobs(self, query: JobQuery) -> list[Job]:
        """The jobs ``query`` matches (see :class:`JobQuery`). Raises
        :class:`InvalidInputError` for a filter holding NUL (naming it): no job has such a
        name (see :func:`~._codec.check_name`)."""
        for name in ("user_id", "kind", "tag", "parent_id"):
            check_name(getattr(query, name), name)
        for parent_id in query.parent_ids or ():
            check_name(parent_id, "parent_ids")
        return await self._read(lambda: self._actor.backend.query(query), BARRIER)

    async def find_running(self) -> list[Job]:
        return await self.list_jobs(JobQuery(states=frozenset({JobState.RUNNING})))

    async def find_stale_running(self, older_than: float) -> list[Job]:
        """Running jobs whose last heartbeat is more than ``older_than`` seconds ago."""
        cutoff = wall_time() - older_than
        return await self.list_jobs(
            JobQuery(states=frozenset({JobState.RUNNING}), heartbeat_before=cutoff)
        )

    async def find_resumable(self, user_id: str | None = None) -> list[Job]:
        return await self.list_jobs(JobQuery(user_id=user_id, states=frozenset({JobState.PAUSED})))

    async def get_stats(self, user_id: str | None = None) -> dict[str, Any]:
        """``{state: count}`` for every state, ``"total"``, and ``"waiting_by_kind"``:
        ``{kind: jobs waiting}`` (kinds with none left out). Raises
        :class:`InvalidInputError` for a ``user_id`` holding NUL."""
        check_name(user_id, "user_id")
        actor = self._actor

        async def fn() -> dict[str, Any]:
            counts = await actor.backend.count_by_state(user_id)
            queue = await actor.backend.queue_stats(wall_time(), user_id)
            stats: dict[str, Any] = {state.value: counts.get(state.value, 0) for state in JobState}
            stats["total"] = sum(counts.values())
            stats["waiting_by_kind"] = dict(queue.waiting_by_kind)
            return stats

        return await self._read(fn, BARRIER)

    async def prune(
        self,
        policy: RetentionPolicy,
        now: float,
        limit: int,
        *,
        dry_run: bool = False,
        idempotency_window: float = 86_400.0,
    ) -> Pruned:
        """Remove up to ``limit`` finished jobs that ``policy`` says are due at ``now``, with
        their events, in one transaction (with ``dry_run``, only find them). A job created
        with an idempotency key less than ``idempotency_window`` seconds before ``now``, and a
        job that has children, are kept whatever the policy says (see
        :meth:`Backend.oldest_finished`). A barrier: it runs once every
        earlier write has committed, and nothing else is applied meanwhile, so no pending
        change (a restart) can race it."""
        actor = self._actor
        keyed_since = now - idempotency_window

        async def fn() -> Pruned:
            backend = actor.backend
            due: list[str] = []
            for kind, finished in sorted((await backend.finished_counts()).items()):
                if len(due) >= limit:
                    break
                oldest = await backend.oldest_finished(kind, limit - len(due), keyed_since)
                due += policy.rule(kind).due(finished, oldest, now)
            if dry_run or not due:
                return Pruned(tuple(due))
            async with actor._commit_lock:
                pruned = await backend.prune(due)
            actor.metrics.jobs.subtract(
                {JobState(state): count for state, count in pruned.states.items()}
            )
            return pruned

        return await self._call(fn, BARRIER)

    async def user_horizon(self, user_id: str) -> int:
        """The highest ``user_seq`` removed by retention (0 if none): a cursor below it
        cannot be continued from the user's event log."""
        return await self._read(lambda: self._actor.backend.user_horizon(user_id), READ)

    async def user_head(self, user_id: str) -> int:
        """The ``user_seq`` of the user's latest event (0 if none)."""
        actor = self._actor
        if actor.backend.assigns_user_seq:
            # Other writers advance it too: the committed head is the only true one.
            return await self._read(lambda: actor.backend.user_head(user_id), READ)
        if actor.health.ok:
            return await self._call(lambda: actor._user_head(user_id), READ)
        return await actor._read_committed(lambda: actor.backend.user_head(user_id))

    async def read_user_events(
        self, user_id: str, after_seq: int = 0, limit: int = 1000
    ) -> list[JobEvent]:
        """Events of all the user's jobs with ``user_seq > after_seq``, in order."""
        return await self._read(
            lambda: self._actor.backend.read_user_events(user_id, after_seq, limit), BARRIER
        )

    async def read_users_events(
        self, heads: Mapping[str, int], limit: int = 500
    ) -> dict[str, list[JobEvent]]:
        """For each user of ``heads`` (user id -> ``user_seq``), its events after that head,
        in order, at most ``limit`` each; users with none are left out. One request."""
        return await self._read(
            lambda: self._actor.backend.read_users_events(heads, limit), BARRIER
        )

    async def read_events(
        self,
        job_id: str,
        after_seq: int = 0,
        limit: int = 1000,
        types: frozenset[EventType] | None = None,
    ) -> list[JobEvent]:
        return await self._read(
            lambda: self._actor.backend.read_events(job_id, after_seq, limit, types), BARRIER
        )

    async def read_records(
        self, room_kind: str, ident: str, after_seq: int = 0, limit: int = 1000
    ) -> list[StoredEvent]:
        """A job's (``room_kind`` ``"job"``) or a user's (``"user"``) logged events after
        ``after_seq``, records unparsed (see :meth:`Backend.read_records`)."""
        return await self._read(
            lambda: self._actor.backend.read_records(room_kind, ident, after_seq, limit),
            BARRIER,
        )


def _may_name_a_job(job_id: object) -> bool:
    """Whether ``job_id`` may be a job's id. A value that is not a string (None, a number,
    bytes, a list: an application's mistake) names no job, and neither does a string holding
    NUL (create refuses the name, and PostgreSQL's text cannot be compared with one) or a
    lone surrogate (no driver can send it: it failed the request with ``UnicodeEncodeError``,
    logged as a store failure): unknown, as on every backend, never a failure of the store's
    request (see :func:`~._codec.may_be_name`)."""
    return may_be_name(job_id)


def _same_options(first: Job, again: Job) -> bool:
    """Whether a create repeats the kind and options of the request that made ``first`` (a
    delay is relative to each call, so ``run_at`` is not compared; the input, which a restart
    may have changed since, is :meth:`StoreActor._created_with`'s)."""
    return (
        first.kind == again.kind
        and first.priority == again.priority
        and first.max_attempts == again.max_attempts
        and first.timeout == again.timeout
        and first.tags == again.tags
        and first.parent_id == again.parent_id
    )


def _canonical(value: Any) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
