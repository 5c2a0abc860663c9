"""The persistence interface under the store actor, and its in-memory implementation.

A backend is only ever called by the store actor, one call at a time, so it needs no locking
within a process. ``commit`` applies one group of changes atomically: either all of them are
durable when it returns, or it raises and none are.

Waiting jobs (state ``created``) live in the database only. :meth:`Backend.claim` is how a
runtime takes them: it picks the next ready jobs under the caller's limits and marks them
claimed (``owner``, ``lease_expires_at``) in one atomic step; the caller then commits each
job's start (state ``running``, ``attempt + 1``: the fencing token). A backend shared by several
processes must make the pick-and-mark atomic across them, e.g. PostgreSQL's ``SELECT ... FOR
UPDATE SKIP LOCKED`` then ``UPDATE`` in one transaction, so that no job is claimed twice; every
later write of a running job is fenced by its ``attempt`` (and ``owner``), so a stale owner's
writes are refused.
"""

from __future__ import annotations

import bisect
import secrets
import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Callable, Collection, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Protocol

import attrs

from ._errors import StoreUnavailableError
from ._events import EventType, JobEvent, StoredEvent, encode_event
from ._ids import new_id
from ._job import Job
from ._nodes import ALIVE, DEAD, LEFT, NodeFencedError, NodeIdInUseError, NodeInfo, NodeLease
from ._scheduling import Candidate, ClaimLimits, ClaimPlanner, GroupKey, ServedTurns, ready_at
from ._states import TERMINAL_STATES, JobState

__all__ = [
    "POSTGRES_URL_SCHEMES",
    "Backend",
    "ClaimRequest",
    "ClaimResult",
    "JobQuery",
    "MemoryBackend",
    "Pruned",
    "QueueStats",
    "is_outage",
]

#: URL schemes that name a PostgreSQL database (libpq accepts both); anything else is a file.
POSTGRES_URL_SCHEMES = ("postgresql://", "postgres://")


@attrs.frozen
class ClaimRequest:
    """One claim by ``owner`` (a runtime's node id) at ``now`` (Unix seconds): up to the free
    capacity of ``limits`` given what the owner runs now (``running`` in all, ``by_user``,
    ``by_kind``) and when it last served each user (``served``: the round-robin among users
    tied on running jobs). Claimed jobs hold the claim until ``lease_expires_at`` unless
    renewed."""

    owner: str
    now: float
    lease_expires_at: float
    limits: ClaimLimits
    running: int = 0
    by_user: Mapping[str, int] = attrs.field(factory=dict)
    by_kind: Mapping[str, int] = attrs.field(factory=dict)
    #: Kinds the owner can run (None: any); jobs of other kinds are left waiting.
    kinds: frozenset[str] | None = None
    served: ServedTurns = attrs.field(factory=ServedTurns)

    def planner(self) -> ClaimPlanner:
        return ClaimPlanner(
            self.limits,
            self.running,
            dict(self.by_user),
            dict(self.by_kind),
            self.kinds,
            self.served,
        )


@attrs.frozen
class ClaimResult:
    """``jobs``: claimed, in claim order, still ``created`` with ``owner`` and
    ``lease_expires_at`` set (the caller commits their start). ``next_run_at``: the earliest
    ``run_at`` after ``now`` among waiting jobs (Unix seconds), None if none: when to claim
    again if nothing else wakes the caller."""

    jobs: list[Job]
    next_run_at: float | None


@attrs.frozen
class QueueStats:
    """Counts of the queue: ``waiting`` (state created) = ``ready`` (claimable now) +
    ``scheduled`` (``run_at`` in the future); ``running``; waiting jobs per kind and per
    user (``{name: count}``, only non-zero counts)."""

    waiting: int = 0
    ready: int = 0
    scheduled: int = 0
    running: int = 0
    waiting_by_kind: Mapping[str, int] = attrs.field(factory=dict)
    waiting_by_user: Mapping[str, int] = attrs.field(factory=dict)


@attrs.frozen
class Pruned:
    """What :meth:`Backend.prune` removed: job ids, how many were in each state, events."""

    job_ids: tuple[str, ...] = ()
    states: Mapping[str, int] = attrs.field(factory=dict)
    events: int = 0


@attrs.frozen
class JobQuery:
    """Filters for listing jobs; results are newest first (ids sort by creation)."""

    user_id: str | None = None
    states: frozenset[JobState] | None = None
    kind: str | None = None
    heartbeat_before: float | None = None
    limit: int | None = None
    #: Only jobs carrying this tag.
    tag: str | None = None
    #: Only the children of this job.
    parent_id: str | None = None
    #: Only the children of these jobs (one query for a generation of a tree).
    parent_ids: frozenset[str] | None = None

    def matches(self, job: Job) -> bool:
        return (
            (self.user_id is None or job.user_id == self.user_id)
            and (self.states is None or job.state in self.states)
            and (self.kind is None or job.kind == self.kind)
            and (self.tag is None or self.tag in job.tags)
            and (self.parent_id is None or job.parent_id == self.parent_id)
            and (self.parent_ids is None or job.parent_id in self.parent_ids)
            and (
                self.heartbeat_before is None
                or (
                    job.last_heartbeat_at is not None
                    and job.last_heartbeat_at < self.heartbeat_before
                )
            )
        )


# SQLite primary result codes that say "the database is unavailable now", not "this write is
# wrong": BUSY, LOCKED, IOERR, FULL, CANTOPEN, PROTOCOL.
_SQLITE_OUTAGE_CODES = frozenset({5, 6, 10, 13, 14, 15})
# SQLite primary result codes that say "the file is damaged": CORRUPT, NOTADB.
_SQLITE_CORRUPT_CODES = frozenset({11, 26})


def is_corruption(error: BaseException) -> bool:
    """True when a backend call failed because the database's storage is damaged (SQLite:
    "database disk image is malformed"; PostgreSQL: SQLSTATE class XX001/XX002): no retry and
    no other write helps; the file or cluster must be restored."""
    if isinstance(error, sqlite3.DatabaseError):
        code = getattr(error, "sqlite_errorcode", None)
        if code is not None:
            return code & 0xFF in _SQLITE_CORRUPT_CODES
        return "malformed" in str(error)
    return getattr(error, "sqlstate", None) in ("XX001", "XX002")


def is_outage(error: BaseException) -> bool:
    """True when a backend call failed because the database is unavailable (locked by another
    program, unreachable, out of space; for PostgreSQL also a lost connection, an admin
    shutdown, a serialization failure or deadlock): retrying the same write later may
    succeed. Anything else (a constraint, an unencodable value, bad data) is tied to the
    write itself."""
    if isinstance(error, StoreUnavailableError | OSError):
        return True
    if "psycopg" in sys.modules:  # a psycopg error exists only once psycopg is loaded
        from ._postgres import is_postgres_outage

        if is_postgres_outage(error):
            return True
    if isinstance(error, sqlite3.OperationalError):
        code = getattr(error, "sqlite_errorcode", None)
        if code is not None:
            return code & 0xFF in _SQLITE_OUTAGE_CODES
        message = str(error)
        return any(
            text in message for text in ("locked", "busy", "disk I/O", "disk is full", "open")
        )
    return False


class Backend(Protocol):
    #: True: :meth:`commit` numbers each user's events (``user_seq``) in its transaction, as
    #: several writers share the database; the store's own numbers are provisional and its
    #: user heads are read from the database. False: the store is the only writer and its
    #: numbers are final.
    assigns_user_seq: bool
    #: Whether several runtimes (nodes) may use the database at once (PostgreSQL); if not
    #: (SQLite, memory), one process owns it and node leases need no renewal.
    shared: bool

    @property
    def epoch(self) -> str:
        """Identifies one database's history; it changes only with a new database."""
        ...

    @property
    def fanout_key(self) -> bytes:
        """32 random bytes every node opening this database reads alike once it is open: the
        key their fan-out messages are signed with when they are given no secret (see
        :attr:`~._fanout.FanoutConfig.secret`). A shared database keeps it (made once, by the
        first node to open it); a database one process owns at a time (SQLite, memory) may
        make one per opening, as no other node publishes on its channel meanwhile."""
        ...

    def opened(self) -> AbstractAsyncContextManager[None]:
        """Holds the database open (schema created or migrated on entry)."""
        ...

    async def load(self, job_id: str) -> Job | None: ...

    async def ping(self) -> None:
        """Raise unless a write could be made now (the store probes a database it found
        unavailable with this, to notice by itself when it is back)."""
        ...

    async def commit(
        self,
        jobs: Collection[Job],
        events: Sequence[JobEvent],
        deleted: Collection[str],
        heartbeats: Mapping[str, tuple[int, float]],
        *,
        progress_only: Collection[str] = (),
        keyed: Mapping[str, float] | None = None,
    ) -> Sequence[JobEvent]:
        """Write jobs, append events, delete jobs (their events stay) and record heartbeats
        (``job id -> (attempt, time)``, applied only to that running attempt) atomically.
        Returns the events as stored: with their final ``user_seq`` where the backend assigns
        it (:attr:`assigns_user_seq`), else as given. A backend shared by several writers may
        raise :class:`StaleWriteError` (nothing written) for a job that is no longer what the
        change was based on.

        ``progress_only``: ids of ``jobs`` that differ from their previous write only in
        ``progress``, ``step``, ``updated_at``, ``last_heartbeat_at`` and ``seq`` (progress
        reports, the hot path). That previous write is committed before this one or this
        one is never committed (a failed commit voids every group after it), so a backend
        may write just those fields of them; writing them whole is as right.

        ``keyed``: the jobs of ``jobs`` created with an idempotency key, each with the start
        of its key's window (Unix seconds). The store found no other job of the user with
        that key in the window when it staged the create; a backend shared by several
        writers must check so again in the commit's transaction (another node may have
        committed one since) and raise :class:`StaleWriteError` naming the new job if one
        did: the store then applies the create again, which finds that job. A backend with
        one writer may ignore it."""
        ...

    async def query(self, query: JobQuery) -> list[Job]: ...

    async def read_events(
        self,
        job_id: str,
        after_seq: int,
        limit: int,
        types: frozenset[EventType] | None = None,
    ) -> list[JobEvent]: ...

    async def read_user_events(self, user_id: str, after_seq: int, limit: int) -> list[JobEvent]:
        """Events of the user's jobs with ``user_seq > after_seq``, by ``user_seq``."""
        ...

    async def read_records(
        self, room_kind: str, ident: str, after_seq: int, limit: int
    ) -> list[StoredEvent]:
        """The log of a job (``room_kind`` ``"job"``: ``seq > after_seq``, by ``seq``) or of
        a user (``"user"``: by ``user_seq``), at most ``limit``, records unparsed."""
        ...

    async def read_users_events(
        self, heads: Mapping[str, int], limit: int
    ) -> dict[str, list[JobEvent]]:
        """For each user of ``heads``, its events with ``user_seq`` above its head, by
        ``user_seq``, at most ``limit`` each (users with none left out): the cluster fan-out's
        fill and poll, one round trip for many users where the database allows."""
        ...

    async def user_head(self, user_id: str) -> int:
        """The highest ``user_seq`` stored for the user, 0 if none."""
        ...

    async def user_horizon(self, user_id: str) -> int:
        """The highest ``user_seq`` of the user's events removed by :meth:`prune`, 0 if none:
        the user's event log is complete only after it."""
        ...

    async def count_by_state(self, user_id: str | None) -> dict[str, int]: ...

    async def finished_counts(self) -> dict[str, int]:
        """Finished (completed, failed, cancelled) jobs per kind."""
        ...

    async def oldest_finished(
        self, kind: str, limit: int, keyed_since: float
    ) -> list[tuple[str, float]]:
        """Up to ``limit`` finished jobs of ``kind`` as ``(id, finished at)``, oldest first
        (finished at: the job's ``updated_at``, Unix seconds), leaving out those retention
        keeps whatever its policy says: a job created with an idempotency key at or after
        ``keyed_since`` (the key still returns it: removed, a create sent again with it, as
        by a client whose reply was lost, made a second job) and a job that has children (a
        cancel reaches a job's descendants through them: a tree goes from its leaves up).
        Left out in the query, not after it: else ``limit`` such jobs at the head of the
        kind hid every due one behind them for good."""
        ...

    async def prune(self, job_ids: Collection[str]) -> Pruned:
        """Remove, in one transaction, the finished jobs among ``job_ids`` and all their
        events (ids of jobs not finished, or gone, are skipped). Each affected user's head
        stays where it was (``user_head`` never goes back, so a ``user_seq`` is never
        reused) and their horizon (:meth:`user_horizon`) moves up to the highest
        ``user_seq`` removed."""
        ...

    async def claim(self, request: ClaimRequest) -> ClaimResult:
        """Pick the next waiting jobs and mark them claimed by ``request.owner``, atomically.

        Claimable: state ``created``, ready (``run_at`` null or ``<= now``), and not held by
        another owner's claim (``owner`` null or the caller, or ``lease_expires_at < now``).
        Order and limits are :class:`ClaimPlanner`'s (priority, then the user with the fewest
        running jobs, then the user ``request.served`` served least recently, then
        ``(ready_at, id)``; ``ready_at`` is ``run_at``, else ``created_at``): a backend reads
        the groups' heads and leaves the ranking to the planner. Marking sets ``owner`` and
        ``lease_expires_at`` and nothing else: the job stays ``created`` until the owner
        commits its start (a mark whose start never commits lapses with its lease). The cost
        must not grow with the number of waiting jobs (an index on waiting jobs by
        ``(priority, user_id, kind, ready_at, id)``, walked group by group). Several
        processes: atomic across them (``FOR UPDATE SKIP LOCKED``)."""
        ...

    async def renew_leases(self, owner: str, lease_expires_at: float) -> int:
        """Extend every claim ``owner`` holds (running or claimed jobs) to
        ``lease_expires_at``; returns how many."""
        ...

    async def queue_stats(self, now: float, user_id: str | None = None) -> QueueStats:
        """Queue counts at ``now`` (of one user's jobs, or of all)."""
        ...

    async def find_by_key(self, user_id: str, key: str, since: float) -> Job | None:
        """The newest job of ``user_id`` created with idempotency key ``key`` at or after
        ``since`` (Unix seconds), None if none."""
        ...

    async def find_by_keys(self, keys: Collection[tuple[str, str]]) -> dict[tuple[str, str], Job]:
        """The newest job (highest id) of each ``(user_id, idempotency key)`` in ``keys``;
        keys no job has are left out. One query for a batch of creates."""
        ...

    async def keys_since(self, user_id: str, since: float, limit: int) -> list[str]:
        """The idempotency keys of the user's jobs created at or after ``since`` (Unix s), at
        most ``limit`` of them (any: the store reads one more than it keeps, to know)."""
        ...

    async def held_until(self, owner: str, now: float) -> float | None:
        """The earliest ``lease_expires_at`` (Unix s) of waiting jobs marked by another owner
        whose lease holds at ``now`` (a claim skips them until then), None if none."""
        ...

    # -- nodes (see :mod:`._nodes`); times are the database's clock, Unix seconds ------------

    async def register_node(
        self,
        node_id: str,
        incarnation: str,
        ttl: float,
        host: str,
        pid: int,
        replacing: str | None = None,
    ) -> NodeLease:
        """Add the row of a new incarnation of ``node_id``, alive for ``ttl`` seconds. Raises
        :class:`NodeIdInUseError` (nothing written) while another incarnation of the id is
        alive and its lease holds, unless it is ``replacing`` (a process known to be gone):
        that one's lease is ended (expired now, to be taken over). Older incarnations whose
        lease expired stay, to be taken over."""
        ...

    async def renew_node(self, lease: NodeLease, ttl: float, running: int) -> NodeLease:
        """Move the lease to now + ``ttl`` and record ``running``. Raises
        :class:`NodeFencedError` (nothing written) if the row is no longer alive (taken over,
        left) or a newer incarnation of the node id registered since."""
        ...

    async def leave_node(self, lease: NodeLease) -> None:
        """Mark the incarnation ``left`` (a graceful shutdown); a row no longer alive stays."""
        ...

    async def expired_nodes(self) -> list[NodeInfo]:
        """Alive rows whose lease has expired, oldest lease first."""
        ...

    async def take_over(self, node: NodeInfo, by: str) -> bool:
        """Atomically, if ``node``'s incarnation is still alive with its lease expired: mark it
        ``dead``, ``taken_over_by = by``, and give its claimed-but-not-started jobs back to
        the queue (owner and lease cleared). True for the one caller that did it, False for
        every other (or if the node renewed meanwhile). Its running jobs are the caller's
        to recover (:meth:`running_jobs_of`)."""
        ...

    async def list_nodes(self) -> list[NodeInfo]:
        """Every row, by node id then start time."""
        ...

    async def node_alive(self, owner: str) -> bool:
        """Whether the claim owner ``"node#incarnation"`` is a live node now (its row alive and
        its lease holding). An owner with no row (legacy, or a random id) is not."""
        ...

    async def running_jobs_of(self, owner: str) -> list[Job]:
        """The running jobs whose claim ``owner`` holds."""
        ...

    async def orphaned_owners(self) -> list[tuple[str, str | None]]:
        """``(owner, taken_over_by)`` of every owner of running jobs whose node row is not
        alive (dead, left, or none: a job claimed before nodes existed), ``taken_over_by``
        None where nobody took it over. Rows alive with an expired lease are not listed:
        :meth:`expired_nodes` gives those."""
        ...


class MemoryBackend:
    """Dicts in memory: for logic tests and for timing tests under a mock clock (no threads).
    ``clock``: Unix seconds for node leases (a test under a mock clock passes one that moves
    with it)."""

    #: The store numbers events (one writer: it knows every head).
    assigns_user_seq = False
    shared = False

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._epoch = new_id()
        # One process's database: no other node shares the key (see Backend.fanout_key).
        self._fanout_key = secrets.token_bytes(32)
        self._clock = clock
        self._nodes: dict[tuple[str, str], NodeInfo] = {}
        self._jobs: dict[str, Job] = {}
        self._events: dict[str, list[JobEvent]] = {}
        self._user_events: dict[str, list[JobEvent]] = {}
        # Per user: the head and horizon recorded by prune (the head outlives its events).
        self._heads: dict[str, int] = {}
        self._horizons: dict[str, int] = {}

    @property
    def epoch(self) -> str:
        return self._epoch

    @property
    def fanout_key(self) -> bytes:
        return self._fanout_key

    @asynccontextmanager
    async def opened(self) -> AsyncIterator[None]:
        yield

    async def load(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    async def ping(self) -> None:
        return None

    async def commit(
        self,
        jobs: Collection[Job],
        events: Sequence[JobEvent],
        deleted: Collection[str],
        heartbeats: Mapping[str, tuple[int, float]],
        *,
        progress_only: Collection[str] = (),
        keyed: Mapping[str, float] | None = None,
    ) -> Sequence[JobEvent]:
        for job in jobs:
            stored = self._jobs.get(job.id)
            if (
                stored is not None
                and job.owner is not None
                and stored.owner == job.owner
                and (stored.lease_expires_at or 0) > (job.lease_expires_at or 0)
            ):
                # A renewal (renew_leases) is not moved back by a write of the same claim.
                job = attrs.evolve(job, lease_expires_at=stored.lease_expires_at)
            self._jobs[job.id] = job
        for event in events:
            self._events.setdefault(event.job_id, []).append(event)
            self._user_events.setdefault(event.user_id, []).append(event)
        for job_id in deleted:
            self._jobs.pop(job_id, None)
        for job_id, (attempt, at) in heartbeats.items():
            found = self._jobs.get(job_id)
            if found and found.state is JobState.RUNNING and found.attempt == attempt:
                self._jobs[job_id] = attrs.evolve(found, last_heartbeat_at=at)
        return events  # the only writer: numbered as staged

    async def query(self, query: JobQuery) -> list[Job]:
        found = [job for job in self._jobs.values() if query.matches(job)]
        found.sort(key=lambda job: job.id, reverse=True)
        return found if query.limit is None else found[: query.limit]

    async def read_events(
        self,
        job_id: str,
        after_seq: int,
        limit: int,
        types: frozenset[EventType] | None = None,
    ) -> list[JobEvent]:
        log = self._events.get(job_id, [])
        start = bisect.bisect_right(log, after_seq, key=lambda event: event.seq)
        selected = [e for e in log[start:] if types is None or e.type in types]
        return selected[:limit]

    async def read_user_events(self, user_id: str, after_seq: int, limit: int) -> list[JobEvent]:
        log = self._user_events.get(user_id, [])
        start = bisect.bisect_right(log, after_seq, key=lambda event: event.user_seq)
        return log[start : start + limit]

    async def read_records(
        self, room_kind: str, ident: str, after_seq: int, limit: int
    ) -> list[StoredEvent]:
        if room_kind == "job":
            events = await self.read_events(ident, after_seq, limit)
        else:
            events = await self.read_user_events(ident, after_seq, limit)
        return [
            StoredEvent(e.job_id, e.user_id, e.seq, e.user_seq, encode_event(e)) for e in events
        ]

    async def read_users_events(
        self, heads: Mapping[str, int], limit: int
    ) -> dict[str, list[JobEvent]]:
        found = {u: await self.read_user_events(u, h, limit) for u, h in heads.items()}
        return {u: events for u, events in found.items() if events}

    async def user_head(self, user_id: str) -> int:
        log = self._user_events.get(user_id)
        return max(log[-1].user_seq if log else 0, self._heads.get(user_id, 0))

    async def user_horizon(self, user_id: str) -> int:
        return self._horizons.get(user_id, 0)

    def _finished(self, kind: str | None = None) -> list[Job]:
        return [
            job
            for job in self._jobs.values()
            if job.state in TERMINAL_STATES and (kind is None or job.kind == kind)
        ]

    async def finished_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for job in self._finished():
            counts[job.kind] = counts.get(job.kind, 0) + 1
        return counts

    async def oldest_finished(
        self, kind: str, limit: int, keyed_since: float
    ) -> list[tuple[str, float]]:
        parents = {job.parent_id for job in self._jobs.values()}
        found = sorted(
            (job.updated_at, job.id)
            for job in self._finished(kind)
            if (job.idempotency_key is None or job.created_at < keyed_since)
            and job.id not in parents
        )
        return [(job_id, at) for at, job_id in found[:limit]]

    async def prune(self, job_ids: Collection[str]) -> Pruned:
        gone = [
            job
            for job_id in dict.fromkeys(job_ids)
            if (job := self._jobs.get(job_id)) is not None and job.state in TERMINAL_STATES
        ]
        states: dict[str, int] = {}
        events = 0
        users: set[str] = set()
        for job in gone:
            states[job.state.value] = states.get(job.state.value, 0) + 1
            for event in self._events.pop(job.id, []):
                events += 1
                users.add(event.user_id)
                self._horizons[event.user_id] = max(
                    self._horizons.get(event.user_id, 0), event.user_seq
                )
            del self._jobs[job.id]
        removed = {job.id for job in gone}
        for user_id in users:
            log = self._user_events[user_id]
            self._heads[user_id] = max(self._heads.get(user_id, 0), log[-1].user_seq)
            self._user_events[user_id] = [e for e in log if e.job_id not in removed]
        return Pruned(tuple(job.id for job in gone), states, events)

    async def count_by_state(self, user_id: str | None) -> dict[str, int]:
        counts: dict[str, int] = {}
        for job in self._jobs.values():
            if user_id is None or job.user_id == user_id:
                counts[job.state.value] = counts.get(job.state.value, 0) + 1
        return counts

    def _waiting(self) -> list[Job]:
        return [job for job in self._jobs.values() if job.state is JobState.CREATED]

    async def claim(self, request: ClaimRequest) -> ClaimResult:
        now = request.now
        groups: dict[GroupKey, list[Candidate]] = {}
        later: list[float] = []
        for job in self._waiting():
            if job.owner not in (None, request.owner) and (job.lease_expires_at or 0) >= now:
                continue
            at = ready_at(job.created_at, job.run_at)
            if job.run_at is not None and job.run_at > now:
                later.append(job.run_at)
                continue
            candidate = Candidate(job.id, job.priority, job.user_id, job.kind, at)
            groups.setdefault(candidate.group, []).append(candidate)
        planner = request.planner()
        picked = planner.plan(c for members in groups.values() for c in members)
        claimed: list[Job] = []
        for candidate in picked:
            job = attrs.evolve(
                self._jobs[candidate.id],
                owner=request.owner,
                lease_expires_at=request.lease_expires_at,
            )
            self._jobs[job.id] = job
            claimed.append(job)
        return ClaimResult(claimed, min(later) if later else None)

    async def renew_leases(self, owner: str, lease_expires_at: float) -> int:
        renewed = 0
        for job in list(self._jobs.values()):
            if job.owner == owner and job.state in (JobState.CREATED, JobState.RUNNING):
                self._jobs[job.id] = attrs.evolve(job, lease_expires_at=lease_expires_at)
                renewed += 1
        return renewed

    async def queue_stats(self, now: float, user_id: str | None = None) -> QueueStats:
        waiting = ready = running = 0
        by_kind: dict[str, int] = {}
        by_user: dict[str, int] = {}
        for job in self._jobs.values():
            if user_id is not None and job.user_id != user_id:
                continue
            if job.state is JobState.RUNNING:
                running += 1
            elif job.state is JobState.CREATED:
                waiting += 1
                ready += job.run_at is None or job.run_at <= now
                by_kind[job.kind] = by_kind.get(job.kind, 0) + 1
                by_user[job.user_id] = by_user.get(job.user_id, 0) + 1
        return QueueStats(waiting, ready, waiting - ready, running, by_kind, by_user)

    async def find_by_key(self, user_id: str, key: str, since: float) -> Job | None:
        found = [
            job
            for job in self._jobs.values()
            if job.user_id == user_id and job.idempotency_key == key and job.created_at >= since
        ]
        return max(found, key=lambda job: job.id) if found else None

    async def find_by_keys(self, keys: Collection[tuple[str, str]]) -> dict[tuple[str, str], Job]:
        wanted = set(keys)
        newest: dict[tuple[str, str], Job] = {}
        for job in self._jobs.values():
            if job.idempotency_key is None:
                continue
            key = (job.user_id, job.idempotency_key)
            if key in wanted and (key not in newest or newest[key].id < job.id):
                newest[key] = job
        return newest

    async def held_until(self, owner: str, now: float) -> float | None:
        held = [
            job.lease_expires_at
            for job in self._waiting()
            if job.owner not in (None, owner)
            and job.lease_expires_at is not None
            and job.lease_expires_at >= now
        ]
        return min(held) if held else None

    async def keys_since(self, user_id: str, since: float, limit: int) -> list[str]:
        return [
            job.idempotency_key
            for job in self._jobs.values()
            if job.user_id == user_id
            and job.idempotency_key is not None
            and job.created_at >= since
        ][:limit]

    # -- nodes ------------------------------------------------------------------------------------

    def _alive_of(self, node_id: str, now: float) -> list[NodeInfo]:
        return [
            n
            for n in self._nodes.values()
            if n.node_id == node_id and n.state == ALIVE and n.lease_expires_at >= now
        ]

    async def register_node(
        self,
        node_id: str,
        incarnation: str,
        ttl: float,
        host: str,
        pid: int,
        replacing: str | None = None,
    ) -> NodeLease:
        now = self._clock()
        for other in self._alive_of(node_id, now):
            if other.incarnation != replacing:
                raise NodeIdInUseError(
                    node_id, other.incarnation, other.host, other.pid, other.lease_expires_at - now
                )
            self._nodes[node_id, replacing] = attrs.evolve(other, lease_expires_at=now - 0.001)
        self._nodes[node_id, incarnation] = NodeInfo(
            node_id, incarnation, host, pid, now, now, now + ttl, ALIVE
        )
        return NodeLease(node_id, incarnation, now + ttl)

    async def renew_node(self, lease: NodeLease, ttl: float, running: int) -> NodeLease:
        now = self._clock()
        row = self._nodes.get((lease.node_id, lease.incarnation))
        if row is None or row.state != ALIVE:
            raise NodeFencedError(f"node {lease.owner} is no longer alive in the database")
        if any(
            n.node_id == lease.node_id and n.started_at > row.started_at
            for n in self._nodes.values()
        ):
            raise NodeFencedError(f"a newer incarnation of node {lease.node_id} registered")
        self._nodes[lease.node_id, lease.incarnation] = attrs.evolve(
            row, renewed_at=now, lease_expires_at=now + ttl, running=running
        )
        return attrs.evolve(lease, expires_at=now + ttl)

    async def leave_node(self, lease: NodeLease) -> None:
        row = self._nodes.get((lease.node_id, lease.incarnation))
        if row is not None and row.state == ALIVE:
            self._nodes[lease.node_id, lease.incarnation] = attrs.evolve(
                row, state=LEFT, lease_expires_at=self._clock(), running=0
            )

    async def expired_nodes(self) -> list[NodeInfo]:
        now = self._clock()
        found = [n for n in self._nodes.values() if n.state == ALIVE and n.lease_expires_at < now]
        return sorted(found, key=lambda n: n.lease_expires_at)

    async def take_over(self, node: NodeInfo, by: str) -> bool:
        row = self._nodes.get((node.node_id, node.incarnation))
        if row is None or row.state != ALIVE or row.lease_expires_at >= self._clock():
            return False
        self._nodes[node.node_id, node.incarnation] = attrs.evolve(
            row, state=DEAD, taken_over_by=by
        )
        for job in self._waiting():
            if job.owner == node.owner:
                self._jobs[job.id] = attrs.evolve(job, owner=None, lease_expires_at=None)
        return True

    async def list_nodes(self) -> list[NodeInfo]:
        return sorted(self._nodes.values(), key=lambda n: (n.node_id, n.started_at))

    async def node_alive(self, owner: str) -> bool:
        node_id, _, incarnation = owner.rpartition("#")
        row = self._nodes.get((node_id, incarnation))
        return row is not None and row.state == ALIVE and row.lease_expires_at >= self._clock()

    async def running_jobs_of(self, owner: str) -> list[Job]:
        return sorted(
            (j for j in self._jobs.values() if j.state is JobState.RUNNING and j.owner == owner),
            key=lambda j: j.id,
        )

    async def orphaned_owners(self) -> list[tuple[str, str | None]]:
        found: dict[str, str | None] = {}
        for job in self._jobs.values():
            if job.state is not JobState.RUNNING or job.owner is None:
                continue
            node_id, _, incarnation = job.owner.rpartition("#")
            row = self._nodes.get((node_id, incarnation))
            if row is None or row.state != ALIVE:
                found[job.owner] = None if row is None else row.taken_over_by
        return sorted(found.items())
