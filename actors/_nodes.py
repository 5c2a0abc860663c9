"""Nodes and their leases: which runtimes are alive on a shared database, and the takeover of
a dead one's jobs.

**A node** is one runtime process, registered in the database's ``nodes`` table under its
node id (``RuntimeConfig.node_id``, ``jobspine serve --node-id``). Every registration is a new
*incarnation* (a random id): the fencing token of everything the node claims. The claim
``owner`` written on jobs is ``"<node_id>#<incarnation>"`` (:attr:`NodeLease.owner`), so the
jobs of a dead incarnation stay recognisable when the same node id comes back.

**The lease.** A node renews its row every ``lease_renew_interval`` seconds (1 s by default),
moving ``lease_expires_at`` to the database's now plus ``lease_ttl`` (5 s). PostgreSQL
compares leases with its own clock (``clock_timestamp()``), so the nodes' clock skew does not
matter; memory and SQLite use ``time.time()`` (one machine). A node whose lease expired is
dead to the others: on every tick each node looks for expired rows and takes each over with
one conditional update (``state`` from ``alive`` to ``dead`` where the lease has expired):
exactly one survivor wins it. The winner applies the stall rule to the dead incarnation's
running jobs (:meth:`StoreClient.recover`: checkpoint → paused, or re-queued where the kind
asks ``requeue_stalled``; none → failed) and gives its claimed-but-not-started jobs back to
the queue, then wakes its dispatcher. Takeover comes within ``lease_ttl`` plus one renewal
interval of the dead node's last renewal.

**Fenced.** A node that finds its own row taken over (marked dead, or another incarnation
registered under its id), or whose lease lapsed locally without a successful renewal (the
database unreachable for ``lease_ttl``), *abandons* its running jobs without writing anything
(:meth:`Supervisor.abandon_all`): another node owns them now, or will. It then registers again
as a new incarnation and carries on. The local deadline counts from when the last successful
renewal was *sent*, so it never outlasts the lease the database holds.

**Replaced.** A fenced node whose node id another live process holds by then (a new process
started under the id while this one was frozen past its lease, or a second process given the
same id) cannot register again while that one lives: it stops with
:class:`NodeReplacedError`, raised out of the runtime, rather than stay half alive (no lease,
no claims, still serving its clients) retrying for as long as the other lives. ``jobspine
serve`` exits with status 7, as for a node id in use at start. An incarnation this process
registered itself, whose answer was lost, is not another process: it is replaced at once.

The decisions are :class:`LeasePolicy`'s (plain, given ``now``); :class:`NodeActor` does the
I/O.
"""

from __future__ import annotations

import logging
import math
import os
import socket
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

import attrs
import trio

from ._errors import JobspineError, RuntimeClosedError, shown
from ._ids import new_id
from ._joblog import job_fields
from ._repeats import RepeatedFailure

if TYPE_CHECKING:
    from ._store import StoreClient
    from ._supervisor import Supervisor

__all__ = [
    "LeasePolicy",
    "NodeActor",
    "NodeFencedError",
    "NodeIdInUseError",
    "NodeInfo",
    "NodeLease",
    "NodeReplacedError",
    "NodeState",
    "node_of",
]

log = logging.getLogger("jobspine.nodes")

#: Node states as stored: renewing its lease; left gracefully; taken over by another node.
NodeState = str
ALIVE, LEFT, DEAD = "alive", "left", "dead"

#: The owners of running jobs whose node row is not alive, with who took the row over (see
#: ``Backend.orphaned_owners``): the same statement on SQLite and PostgreSQL, a join of the
#: running jobs (the partial index ``jobs_leases``) with the small ``nodes`` table.
ORPHANED_OWNERS_SQL = (
    "SELECT DISTINCT j.owner, n.taken_over_by FROM jobs j LEFT JOIN nodes n"
    " ON n.node_id || '#' || n.incarnation = j.owner"
    " WHERE j.state = 'running' AND j.owner IS NOT NULL"
    " AND (n.state IS NULL OR n.state <> 'alive') ORDER BY j.owner"
)
#: Unanswered registrations a node remembers at most (see ``NodeActor._sent``): a thousand
#: tries, each one renewal interval apart at least, all unanswered within one lease.
SENT_KEPT = 1000
#: Renewal intervals between two looks for orphaned running jobs (and two
#: recounts of the jobs by state, which other nodes' commits change).
ORPHAN_SWEEP_EVERY = 5


class NodeIdInUseError(JobspineError):
    """Another live incarnation holds this node id (its lease has not expired): ``host``,
    ``pid`` and ``incarnation`` say which; ``expires_in``: seconds its lease still holds."""

    code = "node_id_in_use"

    def __init__(
        self, node_id: str, incarnation: str, host: str, pid: int, expires_in: float
    ) -> None:
        super().__init__(
            f"node id {shown(node_id)} is alive (process {pid} on {host}, lease for"
            f" {max(expires_in, 0):.1f} s more); give each node its own --node-id"
        )
        self.node_id = node_id
        self.incarnation = incarnation
        self.host = host
        self.pid = pid
        self.expires_in = expires_in


class NodeReplacedError(NodeIdInUseError):
    """This process lost its lease (it was fenced) and another live process holds its node id
    now (``host``, ``pid``, ``incarnation``): it cannot hold the id again while that one lives,
    so the runtime stops with this error (see :mod:`._nodes`, "Replaced")."""

    code = "node_replaced"

    def __init__(self, lost: str, held: NodeIdInUseError) -> None:
        JobspineError.__init__(
            self,
            f"node {lost} lost its lease and node id {shown(held.node_id)} is now held by process"
            f" {held.pid} on {held.host}: this process stops; give each node its own --node-id",
        )
        self.node_id = held.node_id
        self.incarnation = held.incarnation
        self.host = held.host
        self.pid = held.pid
        self.expires_in = held.expires_in


class NodeFencedError(JobspineError):
    """This incarnation's lease is gone: its row was taken over (marked dead) or another
    incarnation registered under the node id. Nothing it holds may be written any more."""

    code = "node_fenced"


@attrs.frozen
class NodeLease:
    """One incarnation's registration: ``expires_at`` (Unix s, the database's clock)."""

    node_id: str
    incarnation: str
    expires_at: float

    @property
    def owner(self) -> str:
        """The claim owner written on the jobs this incarnation claims."""
        return f"{self.node_id}#{self.incarnation}"


def node_of(owner: str) -> tuple[str, str | None]:
    """``(node id, incarnation)`` of a claim owner; an owner written before nodes existed
    (no ``#``) has no incarnation."""
    node_id, sep, incarnation = owner.rpartition("#")
    return (node_id, incarnation) if sep else (owner, None)


def _jobs(count: int) -> str:
    return f"{count} running job" + ("" if count == 1 else "s")


@attrs.frozen
class NodeInfo:
    """A row of the ``nodes`` table. Times are Unix seconds; ``running``: jobs the node ran at
    its last renewal; ``taken_over_by``: the owner (``node#incarnation``) that took it over."""

    node_id: str
    incarnation: str
    host: str
    pid: int
    started_at: float
    renewed_at: float
    lease_expires_at: float
    state: NodeState
    running: int = 0
    taken_over_by: str | None = None

    @property
    def owner(self) -> str:
        return f"{self.node_id}#{self.incarnation}"


def _process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (this process counts as alive)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


class LeasePolicy:
    """When to renew, when the lease has lapsed locally, when to look for dead nodes.

    ``ttl`` and ``renew_interval`` in seconds; ``now`` is any monotonic clock (the actor passes
    Trio's). Registration and each renewal are reported with the time their request was
    *sent*: the lease the database granted cannot have outlived ``sent + ttl``."""

    def __init__(self, ttl: float, renew_interval: float) -> None:
        if not 0 < renew_interval < ttl:
            raise ValueError("renew_interval must be positive and shorter than ttl")
        self.ttl = ttl
        self.renew_interval = renew_interval
        self._valid_until = -math.inf
        self._renew_at = -math.inf
        self._scan_at = -math.inf

    @property
    def registered(self) -> bool:
        return self._valid_until > -math.inf

    def granted(self, sent: float) -> None:
        """A registration or renewal sent at ``sent`` succeeded."""
        self._valid_until = max(self._valid_until, sent + self.ttl)
        self._renew_at = sent + self.renew_interval

    def failed(self, now: float) -> None:
        """A renewal failed (the database unreachable): try again after one interval."""
        self._renew_at = now + self.renew_interval

    def lost(self) -> None:
        """The lease is gone (fenced or lapsed): register again at once."""
        self._valid_until = -math.inf
        self._renew_at = -math.inf

    def renew_due(self, now: float) -> bool:
        return now >= self._renew_at

    def lapsed(self, now: float) -> bool:
        """The lease may have expired in the database: nothing held may be written."""
        return self.registered and now >= self._valid_until

    def scan_due(self, now: float) -> bool:
        """Time to look for expired nodes (once per renewal interval)."""
        if now < self._scan_at:
            return False
        self._scan_at = now + self.renew_interval
        return True

    @property
    def valid_until(self) -> float:
        """When the lease lapses locally (-inf when not registered)."""
        return self._valid_until

    def next_wake(self) -> float:
        """When the lease must be acted on next: a registration (again), a renewal, or the
        local lapse."""
        if not self.registered:
            return self._renew_at
        return min(self._renew_at, self._valid_until)

    def next_scan(self) -> float:
        """When to look for expired nodes next (a task of its own: a long takeover never
        delays a renewal)."""
        return self._scan_at


class NodeActor:
    """Registers this runtime as a node, renews its lease, takes over dead nodes.

    ``store``: a :class:`StoreClient`; ``supervisor``: abandons the running jobs when fenced,
    gives the recovery policy; ``on_owner``: called with the new claim owner after every
    registration; ``wake``: wakes the dispatcher after a takeover and, on a shared database,
    at every tick (a claim at least every ``renew_interval`` finds jobs other nodes made
    waiting, should no notification come).

    ``renewing`` False (a database one process owns: SQLite, memory): the node registers with
    a lease that ends at once, takes over every earlier incarnation at start (the owner lock
    proved them gone), and never renews: an idle runtime does not touch the database."""

    def __init__(
        self,
        store: StoreClient,
        supervisor: Supervisor,
        node_id: str,
        *,
        ttl: float,
        renew_interval: float,
        on_owner: Callable[[str], None],
        wake: Callable[[], None],
        renewing: bool = True,
    ) -> None:
        self.store = store
        self.supervisor = supervisor
        self.node_id = node_id
        self.policy = LeasePolicy(ttl, renew_interval)
        self._on_owner = on_owner
        self._wake = wake
        self.renewing = renewing
        self.lease: NodeLease | None = None
        #: The incarnation this process abandoned and has not replaced yet.
        self._abandoned: str | None = None
        # Each retried operation's failures are logged once per cause (a database down
        # fails them all, every interval, for as long as it is down).
        self._registering = RepeatedFailure()
        self._renewing = RepeatedFailure()
        self._scanning = RepeatedFailure()
        self._sweeping = RepeatedFailure()
        self._counting = RepeatedFailure()
        #: The incarnation this process held last (kept when it is fenced): what a
        #: replacement's error names.
        self._last_owner: str | None = None
        #: Incarnations this process asked to register since its last registration: one whose
        #: answer was lost (a timeout, a dropped connection) may be stored, and is then this
        #: process's own to replace, never another process holding the id. Tries come one
        #: renewal interval apart at most, and one sent longer than a lease ago has expired
        #: (it no longer holds the id): the last ttl / interval of them are enough, and no
        #: more than :data:`SENT_KEPT` (a lease of 1e20 s, or an interval of 1e-300 s, which
        #: the settings take, made that count too large for a deque, and every start failed
        #: with OverflowError).
        self._sent: deque[str] = deque(maxlen=math.ceil(min(ttl / renew_interval, SENT_KEPT)) + 1)
        #: Trio time of the last successful renewal (or registration).
        self.renewed_at: float | None = None
        #: Nodes this one took over, and times it found itself fenced, since it started.
        self.takeovers = 0
        #: Incarnations taken over whose jobs await recovery: owner -> the taker's owner.
        self._pending: dict[str, str] = {}
        self._have_pending = trio.Event()
        self.fenced = 0
        self._scope: trio.CancelScope | None = None
        self.host = socket.gethostname()
        self.pid = os.getpid()

    @property
    def owner(self) -> str | None:
        return None if self.lease is None else self.lease.owner

    def lease_age(self) -> float | None:
        """Seconds since the last successful renewal; None before registration, and for a
        node that holds a SQLite file's lock instead of renewing a lease."""
        if self.renewed_at is None or not self.renewing:
            return None
        return trio.current_time() - self.renewed_at

    @property
    def valid_owner(self) -> str | None:
        """This incarnation's claim owner while its lease is valid (registered and not lapsed
        locally), else None: the only owner whose jobs this node may act on."""
        return self.owner if self.healthy else None

    @property
    def healthy(self) -> bool:
        """Registered and the lease has not lapsed locally."""
        if self.lease is None:
            return False
        return not self.renewing or not self.policy.lapsed(trio.current_time())

    async def register(self) -> NodeLease:
        """Register a new incarnation. Raises :class:`NodeIdInUseError` while another live
        process holds the node id; one that is gone from this host (a node restarted after a
        crash, its lease not expired yet) is replaced: its lease ends now, so that it is taken
        over at once (by this node's first scan, if no other node is quicker)."""
        sent = trio.current_time()
        ttl = self.policy.ttl if self.renewing else 0.0
        incarnation = new_id()
        self._sent.append(incarnation)
        try:
            # An incarnation this process abandoned is replaced: its lease ends now.
            lease = await self.store.register_node(
                self.node_id, incarnation, ttl, self.host, self.pid, replacing=self._abandoned
            )
        except NodeIdInUseError as exc:
            own = exc.incarnation in self._sent
            if not own and (exc.host != self.host or _process_alive(exc.pid)):
                raise
            log.warning(
                "node %s: replacing incarnation %s (%s)",
                self.node_id,
                exc.incarnation,
                "this process's own, its registration unanswered"
                if own
                else f"process {exc.pid} is gone",
            )
            lease = await self.store.register_node(
                self.node_id, incarnation, ttl, self.host, self.pid, replacing=exc.incarnation
            )
        self.policy.granted(sent)
        self.lease, self.renewed_at, self._abandoned = lease, sent, None
        self._last_owner = lease.owner
        # One live incarnation per node id: none of the unanswered ones can be stored now.
        self._sent.clear()
        self._on_owner(lease.owner)
        log.info("node %s registered as %s", self.node_id, lease.owner)
        return lease

    async def run(
        self, *, task_status: trio.TaskStatus[NodeActor] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Renew, take over, re-register until :meth:`close`. The first registration (its
        refusal, :class:`NodeIdInUseError`, is raised from ``nursery.start``) and a first
        takeover of the expired nodes happen before ``task_status.started``."""
        async with self.store:
            with trio.CancelScope() as self._scope:
                await self.register()
                self.policy.scan_due(trio.current_time())
                # One process's database: the start-up recovery brings its jobs back.
                await self.take_over_expired(recover=self.renewing)
                await self._recover_pending()
                task_status.started(self)
                if not self.renewing:
                    await trio.sleep_forever()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._scan_loop)
                    nursery.start_soon(self._recovery_loop)
                    while True:
                        await trio.sleep_until(self.policy.next_wake())
                        await self.tick()

    # Three tasks, so that none waits on another's database calls: renewals (the lease's
    # connection), takeovers (the lease's connection too: they end a dead node's sessions,
    # which frees whatever it held), and recoveries (the store's connection, whose commits
    # may wait on a frozen node's row locks until its own takeover ends its sessions).

    async def _scan_loop(self) -> None:
        """Take over expired nodes once per renewal interval while this node's lease holds."""
        while True:
            await trio.sleep_until(self.policy.next_scan())
            if self.policy.scan_due(trio.current_time()) and self.healthy:
                await self.take_over_expired()

    async def _recovery_loop(self) -> None:
        """Recover the jobs of the nodes taken over as they come; every
        :data:`ORPHAN_SWEEP_EVERY` renewal intervals, look for orphaned running jobs and
        count the jobs by state again (other nodes' commits move them too)."""
        every = ORPHAN_SWEEP_EVERY * self.policy.renew_interval
        sweep_at = trio.current_time() + every
        while True:
            with trio.move_on_at(sweep_at):
                await self._have_pending.wait()
            await self._recover_pending()
            if trio.current_time() < sweep_at:
                continue
            sweep_at = trio.current_time() + every
            if self.lease is not None:
                await self._recover_orphans(self.lease.owner)
                await self._recover_pending()
                try:
                    await self.store.recount_jobs()
                except RuntimeClosedError:
                    raise
                except JobspineError as exc:
                    log.log(
                        self._counting.level(exc),
                        "node %s: counting jobs failed: %s",
                        self.node_id,
                        exc,
                    )
                else:
                    self._counting.succeeded()

    async def _recover_pending(self) -> None:
        """Apply the stall rule to the jobs of every incarnation taken over and not recovered
        yet (shielded: a node won is recovered in full, nobody else will take it over)."""
        self._have_pending = trio.Event()
        while self._pending:
            owner, by = next(iter(self._pending.items()))
            with trio.CancelScope(shield=True):
                await self._recover_jobs(owner, by)
            del self._pending[owner]
            self._wake()

    def _queue_recovery(self, owner: str, by: str) -> None:
        self._pending.setdefault(owner, by)
        self._have_pending.set()

    def close(self) -> None:
        if self._scope is not None:
            self._scope.cancel()

    async def leave(self) -> None:
        """Mark this incarnation ``left`` (graceful shutdown); a failure is only logged."""
        lease = self.lease
        if lease is None or (self.renewing and self.policy.lapsed(trio.current_time())):
            return
        try:
            await self.store.leave_node(lease)
        except JobspineError as exc:
            log.warning("node %s: leave not recorded: %s", lease.owner, exc)

    async def tick(self) -> None:
        """One step: re-register if the lease is lost, renew if due. Raises
        :class:`NodeReplacedError` if another live process holds the node id meanwhile."""
        now = trio.current_time()
        if self.lease is None or self.policy.lapsed(now):
            if self.lease is not None:
                self._abandon(f"lease lapsed: not renewed for {self.policy.ttl:g} s")
            try:
                # A database that does not answer: tried again after one interval.
                with trio.move_on_after(self.policy.ttl) as attempt:
                    await self.register()
                if attempt.cancelled_caught:
                    unanswered = f"unanswered for {self.policy.ttl:g} s"
                    log.log(
                        self._registering.level(unanswered),
                        "node %s: registration %s (retried)",
                        self.node_id,
                        unanswered,
                    )
            except NodeIdInUseError as exc:
                # This process held the id before (it is registering again after it was
                # fenced) and another live process holds it now: not an outage that passes.
                # Retried, it would stay half alive for as long as that process lives,
                # serving clients with no lease and no claims.
                lost = self._last_owner or self.node_id
                log.error("node %s replaced: %s", lost, exc)
                raise NodeReplacedError(lost, exc) from None
            except RuntimeClosedError:
                raise
            except JobspineError as exc:
                log.log(
                    self._registering.level(exc),
                    "node %s: registration failed (retried): %s",
                    self.node_id,
                    exc,
                )
            if self.lease is None:
                self.policy.failed(trio.current_time())
                return
            self._registering.succeeded()
        elif self.policy.renew_due(now):
            # A renewal still unanswered when the lease lapses locally is given up: the next
            # tick abandons the jobs (the database may be gone, or this process was paused).
            with trio.move_on_at(self.policy.valid_until):
                await self._renew(now)

    async def _renew(self, sent: float) -> None:
        lease = self.lease
        assert lease is not None
        try:
            self.lease = await self.store.renew_node(
                lease, self.policy.ttl, len(self.supervisor.workers)
            )
        except NodeFencedError as exc:
            self._abandon(str(exc))
            return
        except RuntimeClosedError:
            raise
        except JobspineError as exc:
            log.log(
                self._renewing.level(exc), "node %s: lease renewal failed: %s", lease.owner, exc
            )
            self.policy.failed(sent)
            return
        self._renewing.succeeded()
        self.policy.granted(sent)
        self.renewed_at = sent

    def _abandon(self, why: str) -> None:
        self.fenced += 1
        owner = self.owner
        count = self.supervisor.abandon_all()
        if owner is not None:
            self.store.forget_owner(owner)  # the takers' to change now: read, not cached
        log.error("node %s fenced (%s): abandoned %s", owner, why, _jobs(count))
        self._abandoned = None if self.lease is None else self.lease.incarnation
        self.lease = None
        self.policy.lost()

    async def take_over_expired(self, *, recover: bool = True) -> int:
        """Take over every expired node this one wins and, with ``recover``, queue the stall
        rule for its running jobs (see :meth:`_recover_pending`); returns how many nodes."""
        assert self.lease is not None
        by = self.lease.owner
        try:
            expired = await self.store.expired_nodes()
        except RuntimeClosedError:
            raise
        except JobspineError as exc:
            log.log(
                self._scanning.level(exc), "node %s: looking for dead nodes failed: %s", by, exc
            )
            return 0
        self._scanning.succeeded()
        won = 0
        for node in expired:
            if node.owner == by:
                continue  # this incarnation (one process's database: its lease ends at once)
            # Shielded: a node won is queued for recovery (nobody else will take it over).
            with trio.CancelScope(shield=True):
                try:
                    if not await self.store.take_over(node, by):
                        continue  # another survivor won it, or it renewed meanwhile
                except RuntimeClosedError:
                    raise
                except JobspineError as exc:
                    log.warning("node %s: takeover of %s failed: %s", by, node.owner, exc)
                    continue
                won += 1
                self.takeovers += 1
                if recover:
                    self._queue_recovery(node.owner, by)
        if won:
            self._wake()  # its claimed jobs went back to the queue
        return won

    async def _recover_orphans(self, by: str) -> int:
        """The stall rule for running jobs whose owner is gone and whose taker is gone too
        (it died while recovering them, or a graceful leave was cut short), or is this node
        (a recovery write of it failed, or the answer of its takeover was lost: stored, it
        was taken for a failure and no recovery queued): nobody else will end them. The
        sweep runs between recoveries (one task), so a running job left to this node is no
        recovery under way. Exactly once as every
        recovery: the write is fenced (``seq``), and ``took_over`` refuses a job its owner no
        longer holds."""
        try:
            orphans = await self.store.orphaned_owners()
            gone = [
                owner
                for owner, taker in orphans
                if taker is None or taker == by or not await self.store.node_alive(taker)
            ]
        except RuntimeClosedError:
            raise
        except JobspineError as exc:
            log.log(
                self._sweeping.level(exc), "node %s: looking for orphaned jobs failed: %s", by, exc
            )
            return 0
        self._sweeping.succeeded()
        for owner in gone:
            self._queue_recovery(owner, by)
        return len(gone)

    async def _recover_jobs(self, owner: str, by: str) -> None:
        """The stall rule for the dead incarnation's running jobs (its claimed ones went back
        to the queue with the takeover itself); a job whose write failed stays running under
        ``owner`` until the next orphan sweep."""
        store, supervisor = self.store, self.supervisor
        cause = f"node {owner} stopped renewing its lease (taken over by {by})"
        try:
            jobs = await store.running_jobs_of(owner)
        except RuntimeClosedError:
            raise
        except JobspineError as exc:
            log.warning("node %s: reading the jobs of %s failed: %s", by, owner, exc)
            return
        log.warning("node %s takes over %s: %s", by, owner, _jobs(len(jobs)))
        for job in jobs:
            try:
                recovered = await store.recover(
                    job.id, job.attempt, supervisor.recovery_rule(cause), took_over=(owner, by)
                )
            except RuntimeClosedError:
                raise
            except JobspineError as exc:
                log.warning(
                    "job %s not taken over: %s",
                    job.id,
                    exc,
                    extra=job_fields(job.id, job.user_id, job.attempt, "recovery"),
                )
            else:
                supervisor.count_recovery(recovered)
