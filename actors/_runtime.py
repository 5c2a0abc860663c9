"""Embedding: ``open_runtime`` starts the store, the supervisor and the repository."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import attrs
import trio

from ._backend import POSTGRES_URL_SCHEMES, Backend
from ._broadcaster import Broadcaster, BroadcasterConfig
from ._clock import wall_time
from ._codec import check_kind
from ._dispatcher import Dispatcher, WallClock
from ._errors import (
    InvalidInputError,
    JobspineError,
    RuntimeClosedError,
    RuntimeCrashedError,
    leaves,
    shown,
)
from ._events import EventHub
from ._fanout import Fanout, FanoutConfig
from ._ids import new_id
from ._joblog import job_fields
from ._keyfilter import FILTER_BYTES
from ._nodes import NodeActor, NodeReplacedError
from ._options import KindOptions
from ._ranges import check_count, check_fields
from ._repository import Repository
from ._retention import PruneReport, RetentionPolicy
from ._routing import RemoteControls
from ._scheduling import ClaimLimits
from ._sqlite import SqliteBackend
from ._store import StoreActor, StoreClient, StoreConfig, StoreHealth
from ._supervisor import (
    Supervisor,
    SupervisorConfig,
    SupervisorStatus,
    recovery_event,
    recovery_outcome,
)
from ._worker import Handler, check_handler

if TYPE_CHECKING:
    from ._pg_notify import PgNotifier

#: Seconds past stop grace + lease time-to-live that a control of a job running on another
#: node is awaited (see :mod:`._routing`).
CONTROL_MARGIN = 1.0

__all__ = ["Runtime", "RuntimeConfig", "open_runtime"]

log = logging.getLogger("jobspine.runtime")


#: Numbers of :class:`RuntimeConfig` for which 0 means something (see its checks).
_ZERO_ALLOWED = frozenset(
    {"stop_grace", "shutdown_timeout", "sqlite_busy_timeout", "max_recovery_attempts"}
)


@attrs.frozen
class RuntimeConfig:
    #: A running job with no heartbeat, progress or checkpoint for this long is stalled.
    heartbeat_timeout: float = 30.0
    #: Stalls a job may recover from (paused at its checkpoint); the next one fails it.
    max_recovery_attempts: int = 3
    #: Time a handler gets to save a checkpoint when asked to stop (pause, shutdown).
    stop_grace: float = 5.0
    #: Checkpoints larger than this (encoded JSON bytes) are refused.
    checkpoint_limit: int = 1024 * 1024
    #: Job results larger than this (encoded JSON bytes) are refused at completion: the job
    #: fails with ``ResultTooLargeError`` naming the limit.
    result_limit: int = 1024 * 1024
    #: Checkpoint validation warns above this size.
    checkpoint_warn_size: int = 256 * 1024
    #: Longest delay before a heartbeat is written to the database.
    heartbeat_flush_interval: float = 1.0
    #: Bound on stopping the running jobs at shutdown (grace periods included): past it a
    #: handler still running is cancelled. The exit then still waits for the writes on their
    #: way (a claim in progress, whose jobs go back to the queue unstarted), each bounded by
    #: ``store_retry_timeout`` while the database is unavailable.
    shutdown_timeout: float = 30.0
    #: Resume, at start, the jobs a previous graceful shutdown paused.
    resume_on_start: bool = True
    #: This runtime's node id (see :mod:`._nodes`): registered in the database's ``nodes``
    #: table, one live incarnation per id; the ``owner`` of the jobs it claims is
    #: ``"<node_id>#<incarnation>"``. None: a new random id at every open.
    node_id: str | None = None
    #: Jobs this runtime runs at once; more wait in the queue.
    max_running: int = 1000
    #: Jobs of one user this runtime runs at once (a capacity limit: more wait). None: none.
    max_running_per_user: int | None = None
    #: Jobs of a kind this runtime runs at once, per kind (absent: no limit but max_running).
    max_running_per_kind: Mapping[str, int] = attrs.field(factory=dict)
    #: Jobs one user may have waiting; a create beyond it fails with ``too_many_jobs``.
    max_waiting_per_user: int = 100_000
    #: Seconds a claim and this node's lease hold without renewal, and how often they are
    #: renewed. On a shared database (PostgreSQL) a node whose lease expired is taken over by
    #: another within about ``lease_ttl + lease_renew_interval``.
    lease_ttl: float = 5.0
    lease_renew_interval: float = 1.0
    #: Seconds an idempotency key keeps returning the job it created.
    idempotency_window: float = 86_400.0
    #: Users whose event head, waiting count and idempotency keys the store keeps in memory
    #: (see :class:`StoreConfig`); the least recently used past it are read again from the
    #: database when next needed.
    users_cached: int = 10_000
    #: Bytes of idempotency-key hashes kept in memory, all users together (see
    #: :class:`StoreConfig`): 64 MiB, about 400,000 keys.
    key_filter_bytes: int = FILTER_BYTES
    #: Queue options per kind (retries, timeout, stall rule); see :class:`KindOptions`.
    kinds: Mapping[str, KindOptions] = attrs.field(factory=dict)
    #: SQLite ``PRAGMA synchronous``: FULL makes a commit durable against power loss too.
    sqlite_synchronous: str = "FULL"
    #: Seconds one SQLite statement waits for a lock another program holds (``busy_timeout``).
    #: Short on purpose: the store retries a busy write with backoff for
    #: ``store_retry_timeout``, and reads wait for no longer than one attempt.
    sqlite_busy_timeout: float = 0.2
    #: Seconds a write waits out an unavailable database (retried with backoff) before it
    #: fails with ``StoreUnavailableError``; jobs are then paused, never failed.
    store_retry_timeout: float = 30.0
    #: False: registered handlers only check input, and every attempt runs in a connected
    #: worker (``jobspine serve --worker-processes``); True: they also run in this process
    #: when no worker has a free slot for their kind.
    in_process_handlers: bool = True
    #: Finished jobs and their events removed when due, every ``retention.interval`` seconds
    #: (see :class:`RetentionPolicy`). None: kept forever (``Runtime.prune`` still applies
    #: the default policy on demand).
    retention: RetentionPolicy | None = None

    def __attrs_post_init__(self) -> None:
        """Refuse a setting that would stop the queue (no job ever runs, every create
        refused), spin (a lease renewed in a busy loop) or break supervision, with
        :class:`InvalidInputError` naming the setting and the value: every number of seconds
        is finite and above 0, but ``stop_grace`` (0: a stopped job is cancelled at once),
        ``shutdown_timeout`` (0: every job cancelled at once, no pause) and
        ``sqlite_busy_timeout`` (0: a locked database not waited for) may be 0; every count
        and size is an integer from 1 (``max_recovery_attempts`` from 0: a stall fails the
        job at once); ``lease_renew_interval`` is shorter than ``lease_ttl``; ``retention`` a
        :class:`RetentionPolicy` or None. Taken as given, a NaN ``heartbeat_timeout``
        crashed the runtime at its first job, a negative one failed every job as stalled at
        once, and a NaN or negative ``stop_grace`` hung every pause and shutdown for good."""
        check_fields(self, zero=_ZERO_ALLOWED)
        counts: dict[str, object] = {
            **({} if self.max_running_per_user is None else {
                "max_running_per_user": self.max_running_per_user}),
            **{f"max_running_per_kind[{shown(kind)}]": n
               for kind, n in dict(self.max_running_per_kind).items()},
        }  # fmt: skip
        for name, value in counts.items():
            check_count(name, value)
        for kind in (*dict(self.max_running_per_kind), *dict(self.kinds)):
            check_kind(kind)  # as a handler's registration: a kind no job can be created with
        if self.lease_renew_interval >= self.lease_ttl:
            raise InvalidInputError(
                f"lease_renew_interval ({self.lease_renew_interval:g} s) must be shorter than"
                f" lease_ttl ({self.lease_ttl:g} s): a claim would lapse between renewals"
            )
        if self.node_id is not None:
            if not isinstance(self.node_id, str) or not self.node_id or "#" in self.node_id:
                raise InvalidInputError("node_id must be a non-empty string without '#'")
            # Stored and indexed in text columns (nodes, a claimed job's owner) and shown in
            # logs and metrics labels: a name as a kind is, alike on every backend (a NUL or
            # a lone surrogate failed the first write of it, on PostgreSQL or on both, as a
            # StoreError with a traceback).
            check_kind(self.node_id, "node_id")
        for kind, options in dict(self.kinds).items():
            if not isinstance(options, KindOptions):
                raise InvalidInputError(f"kinds[{shown(kind)}] must be a KindOptions")
        if self.retention is not None and not isinstance(self.retention, RetentionPolicy):
            raise InvalidInputError(
                f"retention must be a RetentionPolicy or None, not {shown(self.retention)}"
            )


class Runtime(Repository):
    """A running jobspine runtime: the repository plus supervision status."""

    def __init__(
        self,
        store: StoreClient,
        supervisor: Supervisor,
        hub: EventHub,
        handlers: dict[str, Handler],
        config: RuntimeConfig,
        store_actor: StoreActor,
        broadcaster: Broadcaster | None,
        node: NodeActor,
        fanout: Fanout | None = None,
    ) -> None:
        super().__init__(
            store,
            supervisor,
            hub,
            handlers,
            checkpoint_warn_size=config.checkpoint_warn_size,
            max_waiting_per_user=config.max_waiting_per_user,
            idempotency_window=config.idempotency_window,
        )
        self.config = config
        self.supervisor = supervisor
        self.store_actor = store_actor
        #: Present when ``open_runtime(broadcast=...)`` started one.
        self.broadcaster = broadcaster
        #: Present when ``open_runtime(fanout=...)`` started one (cluster mode).
        self.fanout = fanout
        #: The actor that claims waiting jobs (``claims``, ``dispatched``); set once started.
        self.dispatcher: Dispatcher | None = None
        #: This runtime's node: ``node_id``, ``owner`` (the current incarnation's claim
        #: owner), ``lease_age()``, ``healthy``, ``takeovers``, ``fenced``.
        self.node = node
        self.lease_holder = lambda: node.valid_owner

    def status(self) -> SupervisorStatus:
        return self.supervisor.status()

    async def stop_jobs(self) -> None:
        """The graceful part of a shutdown, which leaving ``open_runtime`` does (a server
        does it first, while its clients still get the events): see :func:`_stop_jobs`."""
        await _stop_jobs(self.dispatcher, self.supervisor, self.store_actor.backend.shared)

    @property
    def store_health(self) -> StoreHealth:
        """Whether the database takes writes now (``ok``), and if not why (``reason``)."""
        return self.store_actor.health

    async def prune(self, *, older_than: float | None = None, dry_run: bool = False) -> PruneReport:
        """Remove the finished jobs (and their events) the retention policy says are due now
        (``config.retention``, else the default :class:`RetentionPolicy`; with ``older_than``
        seconds, every kind's age limit replaced by it), ``batch_size`` jobs per store
        transaction, letting other requests in between. ``dry_run``: only count them. A job
        whose idempotency key is still kept (created less than ``idempotency_window`` ago),
        or that has children, is not removed yet, whatever the policy says (see
        :meth:`StoreClient.prune`)."""
        policy = self.config.retention or RetentionPolicy()
        if older_than is not None:
            policy = policy.older_than(older_than)
        now = wall_time()
        window = self.config.idempotency_window
        if dry_run:
            found = await self._store.prune(
                policy, now, 2**62, dry_run=True, idempotency_window=window
            )
            return PruneReport(len(found.job_ids), 0, 0, True, found.job_ids)
        jobs, events, batches = 0, 0, 0
        ids: list[str] = []
        while True:
            pruned = await self._store.prune(
                policy, now, policy.batch_size, idempotency_window=window
            )
            if not pruned.job_ids:
                break
            batches += 1
            jobs += len(pruned.job_ids)
            events += pruned.events
            ids += pruned.job_ids
            if self.broadcaster is not None:
                self.broadcaster.forget(pruned.job_ids)
            # A short batch is no end: the parents of the jobs it removed may be due now (a
            # tree goes from its leaves up). Only a batch that removes nothing ends the run.
            # Yield between batches: requests queued meanwhile are served before the next.
            await trio.lowlevel.checkpoint()
        if jobs:
            log.info("retention: removed %d finished jobs and %d events", jobs, events)
        return PruneReport(jobs, events, batches, False, tuple(ids))

    async def _retain(self, policy: RetentionPolicy, scope: trio.CancelScope) -> None:
        """Apply ``policy`` at start and every ``policy.interval`` seconds until ``scope``
        is cancelled; a failed run is logged and tried again at the next interval."""
        with scope:
            while True:
                try:
                    await self.prune()
                except RuntimeClosedError:
                    return
                except JobspineError as exc:
                    log.warning(
                        "retention: prune failed (retried in %g s): %s", policy.interval, exc
                    )
                await trio.sleep(policy.interval)

    async def _recover_on_start(self) -> None:
        """Bring back what a previous process left: a job still marked running whose owner is
        not a live node (its node dead, left, expired or unknown; a job claimed before nodes
        existed) lost its worker (the stall rule applies at once); a live node's jobs are left
        alone. Jobs paused by a graceful shutdown go back to the queue: only SQLite (one node)
        pauses at shutdown, a shared database's nodes hand their jobs back instead, so such a
        job on PostgreSQL was paused by a runtime from before nodes existed. The dispatcher,
        started next, claims every waiting job."""
        store = self._store
        rule = self.supervisor.recovery_rule("the process running it stopped (recovered at start)")
        for job in await store.find_running():
            if job.owner is not None and await store.node_alive(job.owner):
                continue
            try:
                job = await store.recover(job.id, job.attempt, rule)
            except JobspineError as exc:
                log.warning(
                    "job %s not recovered: %s",
                    job.id,
                    exc,
                    extra=job_fields(job.id, job.user_id, job.attempt, "recovery"),
                )
                continue
            self.supervisor.count_recovery(job)
            log.warning(
                "recovered job %s at start: %s",
                job.id,
                recovery_outcome(job),
                extra=job_fields(job.id, job.user_id, job.attempt, recovery_event(job)),
            )
        if self.config.resume_on_start:
            # Every kind: one served only by worker processes waits until they connect.
            # ``worker_shutdown``: handed back by a worker's drain before drains re-queued.
            for job in await store.find_resumable():
                if job.pause_reason in ("shutdown", "worker_shutdown"):
                    await store.resume(job.id, "system")


async def _actor(
    run: Callable[..., Awaitable[object]],
    scopes: list[trio.CancelScope],
    *,
    task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run one actor inside a cancel scope of its own, which ``open_runtime`` shields."""
    with trio.CancelScope() as scope:
        scopes.append(scope)
        await run(task_status=task_status)


async def _start_routing(
    backend: Backend,
    runtime: Runtime,
    dispatcher: Dispatcher,
    nursery: trio.Nursery,
    actors: list[trio.CancelScope],
) -> PgNotifier | None:
    """On PostgreSQL (several nodes may share the database): listen for queue wake-ups and
    controls, and route this node's controls of jobs running elsewhere (:mod:`._routing`)."""
    if not backend.assigns_user_seq:
        return None
    from ._pg_notify import PgNotifier
    from ._postgres import PostgresBackend

    if not isinstance(backend, PostgresBackend):
        return None
    notifier = PgNotifier(
        backend.url,
        runtime.node.node_id,
        lambda: dispatcher.wake(None),
        runtime.apply_control,
        own_instance=backend.instance,
    )
    await nursery.start(_actor, notifier.run, actors)
    config = runtime.config
    runtime.remote = RemoteControls(
        lambda: dispatcher.node_id,
        notifier.send,
        runtime._store.get,
        bound=config.stop_grace + config.lease_ttl + CONTROL_MARGIN,
    )
    return notifier


async def _stop_jobs(dispatcher: Dispatcher | None, supervisor: Supervisor, shared: bool) -> None:
    """Claim nothing more, start no attempt, stop every running one with the grace period
    and record it (:func:`~._policy.shutdown_state`: paused; re-queued on a ``shared``
    database, whose other nodes take it at once, or if its handler never started), then wait
    for the dispatcher. A claim in progress cannot be withdrawn (the store commits it even if
    nobody waits): answered now or after the shutdown's bound (a database another program
    keeps locked), its jobs go back to the queue without running, so the running jobs are
    stopped without waiting for it."""
    if dispatcher is not None:
        dispatcher.close()
    await supervisor.shutdown(hand_back=shared)
    if dispatcher is not None:
        await dispatcher.stopped.wait()


def _shield(scopes: list[trio.CancelScope], shield: bool) -> None:
    for scope in scopes:
        scope.shield = shield


def _backend_for(database: str | os.PathLike[str], config: RuntimeConfig) -> Backend:
    """The backend ``database`` names: a ``postgresql://`` (or ``postgres://``) URL is a
    :class:`~._postgres.PostgresBackend`, anything else a SQLite file. Raises
    :class:`ValueError` for a URL libpq cannot parse."""
    if isinstance(database, str) and database.startswith(POSTGRES_URL_SCHEMES):
        # Imported only when used: psycopg takes longer to load than the rest of jobspine.
        from ._postgres import TAKEOVER_LOCK_TIMEOUT, PostgresBackend

        # See "Frozen writers" in ._postgres: a frozen node's transaction ends at the latest
        # when its lease would (its takeover ends its sessions anyway); a takeover never holds
        # the lease's connection for more than half the lease's margin.
        # Both in PostgreSQL's whole milliseconds, 1 at least (a lease under 1 ms, which the
        # runtime's settings allow, was refused here with a traceback naming idle_timeout).
        margin = (config.lease_ttl - config.lease_renew_interval) / 2
        return PostgresBackend(
            database,
            idle_timeout=max(config.lease_ttl, 0.001),
            takeover_lock_timeout=max(min(TAKEOVER_LOCK_TIMEOUT, margin), 0.001),
        )
    return SqliteBackend(
        database,
        synchronous=config.sqlite_synchronous,
        busy_timeout=config.sqlite_busy_timeout,
    )


@asynccontextmanager
async def open_runtime(
    database: str | os.PathLike[str] | None = None,
    *,
    handlers: Mapping[str, Handler] | None = None,
    config: RuntimeConfig | None = None,
    backend: Backend | None = None,
    broadcast: BroadcasterConfig | None = None,
    fanout: FanoutConfig | None = None,
) -> AsyncIterator[Runtime]:
    """Run a jobspine runtime for the duration of the ``async with`` block.

    ``database`` is a SQLite file (created if missing) or a PostgreSQL URL
    (``postgresql://user@host/dbname``, the database must exist; schema created on open);
    pass ``backend`` instead for another store (``MemoryBackend()`` for logic tests). The
    runtime registers as a node (``config.node_id``, see :mod:`._nodes`); on PostgreSQL
    several nodes share the database, each taking over the jobs of nodes whose lease expired.
    On start, jobs a dead process left running are recovered (never a live node's). On exit,
    no handler starts any more (a job claimed but not started goes back to the queue), running
    jobs get the grace period to checkpoint and are paused (resumed by the next runtime on the
    same SQLite file) or, on a shared database, handed back to the queue for the other nodes;
    every acknowledged write is durable. With ``broadcast``, a :class:`Broadcaster` actor
    serves rooms of events (``rt.broadcaster``); with ``fanout`` too (cluster mode: several
    nodes on one PostgreSQL database), its rooms get every node's events through Redis
    (``rt.fanout``, see :mod:`actors._fanout`), in messages signed with a key derived from
    ``fanout.secret`` or, given none, the database's own (read once it is open, before the
    fan-out starts; see :attr:`FanoutConfig.secret`). With ``config.retention``, finished
    jobs are pruned at start and every ``retention.interval`` seconds (see
    :meth:`Runtime.prune`).

    One process owns a SQLite file at a time: while another holds it, this raises
    :class:`DatabaseLockedError` (naming the owner) having read and written nothing. A node id
    alive in another process raises :class:`NodeIdInUseError`; once running, a node that
    lost its lease and finds its node id held by another live process stops: the block is
    cancelled and :class:`NodeReplacedError` raised (see :mod:`._nodes`, "Replaced"). A
    database that cannot be opened (or a PostgreSQL server that cannot be reached) raises
    :class:`StoreError`. A kind in ``handlers`` that no job could be created with (empty,
    over 1,024 characters, holding NUL or another unprintable character) raises
    :class:`InvalidInputError` naming it, before anything is opened, as does a ``config``,
    ``broadcast`` or ``fanout`` of another type (a dict of fields) or ``handlers`` that is not
    a mapping. An exception from the
    block propagates unchanged; a failure of the runtime itself is raised as
    :class:`RuntimeCrashedError`. Every way out (return, exception, cancellation,
    KeyboardInterrupt) closes the database.
    """
    for name, value, wanted in (
        ("config", config, RuntimeConfig),
        ("broadcast", broadcast, BroadcasterConfig),
        ("fanout", fanout, FanoutConfig),
    ):
        # A dict of fields (a jobspine_config fixture returning {"stop_grace": 5}) failed
        # deep inside with AttributeError.
        if value is not None and not isinstance(value, wanted):
            raise InvalidInputError(
                f"{name} must be a {wanted.__name__} or None, not {type(value).__name__}"
            )
    if handlers is not None and not isinstance(handlers, Mapping):
        raise InvalidInputError(
            f"handlers must be a mapping of kind to handler, not {type(handlers).__name__}"
        )
    config = config or RuntimeConfig()
    for kind, handler in (handlers or {}).items():
        check_handler(kind, handler)  # as rt.register does
    if fanout is not None and broadcast is None:
        raise InvalidInputError("fanout delivers to a broadcaster: pass broadcast= too")
    node_id = config.node_id or new_id()
    if backend is None:
        if database is None:
            raise TypeError("open_runtime() needs a database path or a backend")
        backend = _backend_for(database, config)
    if fanout is None and broadcast is not None and backend.shared:
        # Other nodes may commit events of the rooms this one serves: without Redis, they are
        # read from the log (the clients of a node left out of the fan-out missed them).
        fanout = FanoutConfig(None)
    hub = EventHub()
    store_actor = StoreActor(
        backend,
        hub,
        StoreConfig(
            checkpoint_limit=config.checkpoint_limit,
            result_limit=config.result_limit,
            heartbeat_flush_interval=config.heartbeat_flush_interval,
            store_retry_timeout=config.store_retry_timeout,
            users_cached=config.users_cached,
            key_filter_bytes=config.key_filter_bytes,
        ),
    )
    # Clients exist before the store starts: it serves until the last of them is closed.
    supervisor_store, repo_store = store_actor.client(), store_actor.client()
    broadcaster = None
    fanout_actor = None
    if fanout is not None:
        fanout_actor = Fanout(store_actor.client(), hub, fanout, node_id)
    if broadcast is not None:
        broadcaster = Broadcaster(store_actor.client(), hub, broadcast, fanout_actor)
    registry: dict[str, Handler] = dict(handlers or {})
    supervisor = Supervisor(
        supervisor_store,
        registry,
        SupervisorConfig(
            heartbeat_timeout=config.heartbeat_timeout,
            max_recovery_attempts=config.max_recovery_attempts,
            stop_grace=config.stop_grace,
            in_process=config.in_process_handlers,
        ),
        config.kinds,
    )
    dispatcher: Dispatcher | None = None
    notifier: PgNotifier | None = None
    owner: list[str] = []  # the node's current claim owner, for the dispatcher

    def on_owner(new_owner: str) -> None:
        owner[:] = [new_owner]
        if dispatcher is not None:
            dispatcher.node_id = new_owner
            dispatcher.wake()  # it claimed nothing while the node was fenced

    def wake() -> None:
        if dispatcher is not None:
            dispatcher.wake()

    node = NodeActor(
        store_actor.client(),
        supervisor,
        node_id,
        ttl=config.lease_ttl,
        renew_interval=config.lease_renew_interval,
        on_owner=on_owner,
        wake=wake,
        renewing=backend.shared,
    )
    body_error: BaseException | None = None
    started = False
    retention = trio.CancelScope()  # the periodic prune: ends before the shutdown begins
    try:
        async with trio.open_nursery() as nursery:
            actors: list[trio.CancelScope] = []
            await nursery.start(_actor, store_actor.run, actors)
            await nursery.start(_actor, supervisor.run, actors)
            clock = WallClock()
            supervisor.set_clock(clock)
            if broadcaster is not None:
                await nursery.start(_actor, broadcaster.run, actors)
            await nursery.start(_actor, node.run, actors)
            if fanout_actor is not None:
                await nursery.start(_actor, fanout_actor.run, actors)
            async with repo_store:
                runtime = Runtime(
                    repo_store,
                    supervisor,
                    hub,
                    registry,
                    config,
                    store_actor,
                    broadcaster,
                    node,
                    fanout_actor,
                )
                try:
                    # A cancelled caller still gets the graceful shutdown below, which needs
                    # the store: the actors are shielded until it is over.
                    _shield(actors, True)
                    await runtime._recover_on_start()
                    dispatcher = Dispatcher(
                        repo_store.clone(),
                        supervisor,
                        ClaimLimits(
                            config.max_running,
                            config.max_running_per_kind,
                            config.max_running_per_user,
                        ),
                        node_id=owner[0],
                        clock=clock,
                        to_trio=clock.trio_time,
                        lease_ttl=config.lease_ttl,
                        lease_renew_interval=config.lease_renew_interval,
                        may_claim=lambda: node.healthy,
                    )
                    await nursery.start(_actor, dispatcher.run, actors)
                    runtime.dispatcher = dispatcher
                    runtime.wake_dispatcher = dispatcher.wake
                    supervisor.capacity_listeners.append(dispatcher.wake)
                    notifier = await _start_routing(backend, runtime, dispatcher, nursery, actors)
                    started = True
                    if config.retention is not None:
                        nursery.start_soon(runtime._retain, config.retention, retention)
                    yield runtime
                except BaseException as exc:
                    body_error = exc
                    raise
                finally:
                    retention.cancel()
                    with trio.move_on_after(config.shutdown_timeout, shield=True) as bound:
                        if notifier is not None:
                            notifier.close()
                        await _stop_jobs(dispatcher, supervisor, backend.shared)
                        await node.leave()
                    if bound.cancelled_caught:
                        # What is left is recorded once the database answers: a claim still
                        # waiting hands its jobs back, queued writes commit (the store
                        # waits out an outage for store_retry_timeout); handlers still
                        # running are cancelled now.
                        log.warning(
                            "shutdown not finished within shutdown_timeout (%g s): %s",
                            config.shutdown_timeout,
                            "the database is unavailable"
                            if not store_actor.health.ok
                            else "stopping jobs and claims",
                        )
                    node.close()
                    supervisor.close()
                    hub.close()
                    _shield(actors, False)
    except BaseExceptionGroup as group:
        found = [e for e in leaves(group) if not isinstance(e, trio.Cancelled)]
        from_body = [] if body_error is None else leaves(body_error)
        if found and all(any(e is b for b in from_body) for e in found):
            raise (found[0] if len(found) == 1 else body_error) from None  # type: ignore[misc]
        failures = [e for e in found if not any(e is b for b in from_body)]
        if not started and len(failures) == 1 and isinstance(failures[0], JobspineError):
            # A refusal to start (database in use, unreadable, newer) is the caller's answer.
            raise failures[0] from None
        interrupts = [e for e in failures if isinstance(e, KeyboardInterrupt)]
        if interrupts:
            # An interrupt that landed in an actor's task (a handler running when Ctrl-C
            # came): the application is interrupted, as if it had landed in its own code.
            raise interrupts[0] from None
        replaced = [e for e in failures if isinstance(e, NodeReplacedError)]
        if replaced:
            # Not a crash: the node's defined end once another process holds its id.
            raise replaced[0] from None
        if failures and all(isinstance(e, Exception) for e in failures):
            raise RuntimeCrashedError(
                f"a runtime actor failed: {shown(failures[0], 1000)}"
            ) from group
        raise
