"""The PostgreSQL backend, through psycopg 3 sync connections on ``trio.to_thread``.

**Driving psycopg from Trio.** psycopg's async API is asyncio-only, so there are two ways:
its ``AsyncConnection`` inside a trio-asyncio loop (as :mod:`._sqlite` runs aiosqlite), or
its sync ``Connection`` in a worker thread. ``bench/pg_modes.py`` runs the same statements
(:func:`commit_plan`) both ways, one loop crossing per commit in each. The thread is used
here: on this 2-core machine its commits took 0.78 ms p50 / 1.55 ms p99 for 1 event (1,141
commits/s) against 1.16 / 2.08 ms (796/s) through asyncio, and 4.2 / 11.7 ms for 100 events
(18,800 events/s) against 5.0 / 12.1 ms (15,600/s). A thread blocks in libpq and crosses into
Trio once per call, where the async API waits for every round trip through an asyncio loop
that itself runs on Trio's. It also needs no asyncio loop, and no care for import order
(psycopg binds ``asyncio.get_running_loop`` at import, so under trio-asyncio its async API
works only if trio_asyncio was imported first). A worker thread cannot be abandoned midway:
a cancelled call waits for its statement, so a transaction is never left half-sent;
``connect_timeout`` and TCP keepalives bound how long a dead server can hold it.

**One owner.** Until nodes and leases exist (issue 11: they replace this), a database has one
owner at a time, as a SQLite file does (:mod:`._owner`): the owner holds a session-level
advisory lock (``pg_try_advisory_lock``) for the runtime's life, on the very connection every
statement goes through, and records itself (pid, host, start time) in the ``owners`` table
for the message a refused process prints (:class:`DatabaseLockedError`, ``database_in_use``).
The server drops the lock when the session ends in any way, SIGKILL of the owner included.
Only a test may open a backend without the lock (``_shared``), to claim from one database
with several backends at once.

**Outages.** A connection the server dropped (restart, ``pg_terminate_backend``, network) is
an outage (:func:`is_postgres_outage`): the store retries; the next call connects again and
takes the lock again before it runs anything. If another process owns the database by then,
that call fails as an outage too and nothing is written; if another process owned it in
between (the ``owners`` row is no longer this one's), this backend's caller may hold stale
state, so it never writes again (every call fails as an outage saying so; restart it).

**The queue** (schema v3, as SQLite's): the claim columns and a partial index over waiting
jobs, walked group by group in one transaction with ``FOR UPDATE SKIP LOCKED``
(:mod:`._postgres_queue`, which gives the SQL and the measured cost); lease renewal, queue
counts, idempotency keys, children and tags (a ``text[]`` under a GIN index).

**Sequences.** ``seq`` and ``user_seq`` come from the store actor, which as the only owner
knows every head; the primary key ``(job_id, seq)`` and the unique ``(user_id, user_seq)``
refuse a duplicate, and a commit is one transaction, so a group's numbers are stored with no
gap or not at all.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
from collections.abc import AsyncIterator, Callable, Collection, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import orjson
import psycopg
import trio
from psycopg import conninfo

from ._backend import ClaimRequest, ClaimResult, JobQuery, Pruned, QueueStats
from ._codec import converter
from ._errors import StoreError, StoreUnavailableError
from ._events import EventType, JobEvent
from ._ids import new_id
from ._job import Job, migrate_job_record
from ._owner import DatabaseLockedError
from ._postgres_queue import claim_sync
from ._scheduling import ready_at
from ._states import TERMINAL_STATES, JobState

__all__ = ["PostgresBackend", "is_postgres_outage", "redact_url"]

log = logging.getLogger("jobspine.postgres")
T = TypeVar("T")

#: The advisory lock key of the database's owner (``pg_try_advisory_lock(bigint)``).
OWNER_LOCK = 0x6A6F6273  # "jobs"
#: The advisory lock key held while the schema is created or migrated (transaction-level).
MIGRATE_LOCK = 0x6A6F6275

#: Bound on closing the connection (it waits for the statement in progress).
CLOSE_TIMEOUT = 10.0

SCHEMA_VERSION = 3

# Ordered migrations: MIGRATIONS[n] brings the database from version n to n + 1. The versions
# follow the SQLite backend's. Text that is compared or sorted is COLLATE "C": ids sort by
# creation bytewise, as in SQLite, whatever the database's locale.
MIGRATIONS: list[list[str]] = [
    [
        """CREATE TABLE jobs (
            id text COLLATE "C" PRIMARY KEY,
            user_id text COLLATE "C" NOT NULL,
            kind text COLLATE "C" NOT NULL,
            state text NOT NULL,
            attempt integer NOT NULL,
            last_heartbeat_at double precision,
            record text NOT NULL
        )""",
        "CREATE INDEX jobs_by_user ON jobs (user_id, id)",
        "CREATE INDEX jobs_by_state ON jobs (state)",
        """CREATE TABLE events (
            job_id text COLLATE "C" NOT NULL,
            seq integer NOT NULL,
            user_id text COLLATE "C" NOT NULL,
            user_seq bigint NOT NULL,
            type text NOT NULL,
            record text NOT NULL,
            PRIMARY KEY (job_id, seq)
        )""",
        "CREATE UNIQUE INDEX events_by_user ON events (user_id, user_seq)",
    ],
    # v2, retention: when a finished job finished (indexed per kind), and per user the head
    # and horizon that outlive pruned events (a user_seq is never reused).
    [
        "ALTER TABLE jobs ADD COLUMN finished_at double precision",
        "UPDATE jobs SET finished_at = (record::json ->> 'updated_at')::double precision"
        " WHERE state IN ('completed', 'failed', 'cancelled')",
        "CREATE INDEX jobs_finished ON jobs (kind, finished_at, id) WHERE finished_at IS NOT NULL",
        """CREATE TABLE user_heads (
            user_id text COLLATE "C" PRIMARY KEY,
            head bigint NOT NULL,
            horizon bigint NOT NULL
        )""",
    ],
    # v3, the queue (as SQLite's v3): what a claim orders and filters by, as columns
    # (ready_at: run_at, else created_at, set only while waiting); a partial index over waiting
    # jobs only, walked group by group (:mod:`._postgres_queue`), so a claim's cost does not
    # grow with the number waiting; delayed jobs by run_at, for the next one due (an index the
    # claim cannot use: on ready_at, PostgreSQL chose it for the claim's windows and filtered
    # every waiting job); the claim's owner and lease, indexed for renewals and for finding a
    # dead owner's running jobs; parents, idempotency keys and tags (an array under a GIN
    # index) for their look-ups.
    [
        "ALTER TABLE jobs ADD COLUMN priority integer NOT NULL DEFAULT 0,"
        " ADD COLUMN created_at double precision, ADD COLUMN ready_at double precision,"
        " ADD COLUMN run_at double precision,"
        ' ADD COLUMN parent_id text COLLATE "C", ADD COLUMN idempotency_key text COLLATE "C",'
        ' ADD COLUMN owner text COLLATE "C", ADD COLUMN lease_expires_at double precision,'
        " ADD COLUMN tags text[] NOT NULL DEFAULT '{}'",
        "UPDATE jobs SET created_at = (record::json ->> 'created_at')::double precision,"
        " ready_at = CASE WHEN state = 'created'"
        " THEN (record::json ->> 'created_at')::double precision END",
        "ALTER TABLE jobs ALTER COLUMN created_at SET NOT NULL",
        "CREATE INDEX jobs_waiting ON jobs (priority, user_id, kind, ready_at, id)"
        " WHERE state = 'created'",
        "CREATE INDEX jobs_scheduled ON jobs (run_at) WHERE state = 'created'"
        " AND run_at IS NOT NULL",
        "CREATE INDEX jobs_children ON jobs (parent_id, id) WHERE parent_id IS NOT NULL",
        "CREATE INDEX jobs_keys ON jobs (user_id, idempotency_key, created_at)"
        " WHERE idempotency_key IS NOT NULL",
        # Untagged jobs (most) stay out of it: no GIN entry to write at every update.
        "CREATE INDEX jobs_tags ON jobs USING gin (tags) WHERE tags <> '{}'",
        "CREATE INDEX jobs_leases ON jobs (owner, lease_expires_at) WHERE state = 'running'",
        "CREATE INDEX jobs_claimed ON jobs (owner) WHERE state = 'created' AND owner IS NOT NULL",
    ],
]

_JOB_COLUMNS = "record, last_heartbeat_at, owner, lease_expires_at"

# A lease renewed meanwhile (renew_leases) is not moved back by a write of the same claim
# that carries the older expiry.
_UPSERT_JOB = (
    "INSERT INTO jobs (id, user_id, kind, state, attempt, last_heartbeat_at, record, finished_at,"
    " priority, created_at, ready_at, run_at, parent_id, idempotency_key, owner,"
    " lease_expires_at, tags)"
    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
    " ON CONFLICT (id) DO UPDATE SET"
    " state = excluded.state, attempt = excluded.attempt,"
    " last_heartbeat_at = excluded.last_heartbeat_at, record = excluded.record,"
    " finished_at = excluded.finished_at, priority = excluded.priority,"
    " ready_at = excluded.ready_at, run_at = excluded.run_at, tags = excluded.tags,"
    " lease_expires_at = CASE WHEN excluded.owner IS NOT NULL AND excluded.owner = jobs.owner"
    " THEN greatest(excluded.lease_expires_at, jobs.lease_expires_at)"
    " ELSE excluded.lease_expires_at END,"
    " owner = excluded.owner"
)
_INSERT_EVENT = (
    "INSERT INTO events (job_id, seq, user_id, user_seq, type, record)"
    " VALUES (%s, %s, %s, %s, %s, %s)"
)
_HEARTBEAT = (
    "UPDATE jobs SET last_heartbeat_at = %s WHERE id = %s AND state = 'running' AND attempt = %s"
)
_DELETE_JOB = "DELETE FROM jobs WHERE id = %s"

# SQLSTATE classes and codes that say "the database is unavailable now": connection
# exceptions (08), transaction rollbacks such as serialization failures and deadlocks (40),
# insufficient resources (53: disk full, too many connections), operator intervention (57:
# admin shutdown, crash shutdown, cannot connect now, query canceled), system errors (58:
# I/O), a lock not available (55P03) and a read-only transaction (25006: a standby).
_OUTAGE_CLASSES = frozenset({"08", "40", "53", "57", "58"})
_OUTAGE_CODES = frozenset({"55P03", "25006"})


def is_postgres_outage(error: BaseException) -> bool:
    """True for a psycopg error that says the database is unavailable (see
    :func:`~._backend.is_outage`); False for one tied to the statement (a constraint, bad
    data, a missing table)."""
    if isinstance(error, psycopg.InterfaceError):
        return True  # the connection is closed or broken
    if not isinstance(error, psycopg.Error):
        return False
    state = error.sqlstate
    if state is None:
        # No answer from the server at all: the connection failed or was lost.
        return isinstance(error, psycopg.OperationalError)
    return state[:2] in _OUTAGE_CLASSES or state in _OUTAGE_CODES


def redact_url(url: str) -> str:
    """``url`` with its password replaced by ``***`` (for messages and logs)."""
    try:
        params = conninfo.conninfo_to_dict(url)
    except psycopg.Error:
        return "<an invalid PostgreSQL URL>"
    if "password" not in params:
        return url
    params["password"] = "***"
    host = params.get("host", "")
    port = f":{params['port']}" if "port" in params else ""
    user = f"{params['user']}:***@" if "user" in params else ""
    return f"postgresql://{user}{host}{port}/{params.get('dbname', '')}"


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def _job_from_row(
    record: str, heartbeat: float | None, owner: str | None, lease: float | None
) -> Job:
    # Heartbeats and lease renewals update their columns only: the columns are authoritative.
    data: dict[str, Any] = migrate_job_record(orjson.loads(record))
    data["last_heartbeat_at"] = heartbeat
    data["owner"] = owner
    data["lease_expires_at"] = lease
    return converter.structure(data, Job)


def _event(record: str) -> JobEvent:
    return converter.structure(orjson.loads(record), JobEvent)


class PostgresBackend:
    """Jobs and their event log in a PostgreSQL database (schema created or migrated on
    open). ``url``: a libpq connection URL, ``postgresql://user@host:port/dbname``.

    Raises :class:`ValueError` at once for a URL libpq cannot parse. On open:
    :class:`DatabaseLockedError` if another process owns the database (nothing was written),
    :class:`StoreError` if the server cannot be reached or the database cannot be used (a
    newer schema)."""

    def __init__(self, url: str, *, connect_timeout: float = 5.0, _shared: bool = False) -> None:
        """``_shared`` is for tests only: no owner lock and no ``owners`` row, so that
        several backends use one database at once (the concurrent-claim test). Nothing else
        may set it until nodes and leases (issue 11) replace the single owner: the store
        actor assumes it alone writes the database."""
        try:
            conninfo.conninfo_to_dict(url)
        except psycopg.Error as exc:
            raise ValueError(f"not a PostgreSQL URL: {_one_line(exc)}") from None
        if not connect_timeout > 0:
            raise ValueError(f"connect_timeout must be > 0 seconds, not {connect_timeout!r}")
        self.url = url
        self._connect_timeout = max(1, round(connect_timeout))
        self._conn: psycopg.Connection[Any] | None = None
        self._open = False
        self._epoch = ""
        self._since = ""
        #: Why this backend no longer writes (another owner came in between), if it does not.
        self._superseded: str | None = None
        #: Identifies this opening in the ``owners`` row (pid, host and second may repeat).
        self._instance = ""
        self._shared = _shared
        # One call at a time on the connection: a read never slips into a commit's transaction.
        self._lock = trio.Lock()

    @property
    def epoch(self) -> str:
        return self._epoch

    def __repr__(self) -> str:
        return f"PostgresBackend({redact_url(self.url)!r})"

    # -- connection and ownership (each runs in a worker thread) -------------------------------

    def _connect(self) -> psycopg.Connection[Any]:
        """A new connection holding the owner lock; :class:`DatabaseLockedError` if another
        session holds it (the connection is closed again, nothing was written)."""
        conn = psycopg.connect(
            self.url,
            autocommit=True,
            connect_timeout=self._connect_timeout,
            application_name="jobspine",
            keepalives=1,
            keepalives_idle=10,
            keepalives_interval=5,
            keepalives_count=3,
        )
        if self._shared:
            return conn
        try:
            row = conn.execute("SELECT pg_try_advisory_lock(%s)", (OWNER_LOCK,)).fetchone()
            if row is None or not row[0]:
                raise DatabaseLockedError(
                    redact_url(self.url), f"pg_advisory_lock {OWNER_LOCK}", *self._owner(conn)
                )
        except BaseException:
            conn.close()
            raise
        return conn

    @staticmethod
    def _owner(conn: psycopg.Connection[Any]) -> tuple[int | None, str | None, str | None]:
        """The owner as it recorded itself; Nones while it has not (it is starting)."""
        if conn.execute("SELECT to_regclass('owners')").fetchone() in (None, (None,)):
            return None, None, None
        row = conn.execute("SELECT pid, host, since FROM owners WHERE lock = %s", (OWNER_LOCK,))
        found = row.fetchone()
        return (found[0], found[1], found[2]) if found else (None, None, None)

    def _record_owner(self, conn: psycopg.Connection[Any]) -> None:
        conn.execute(
            "INSERT INTO owners (lock, pid, host, since, session, instance) VALUES (%s, %s,"
            " %s, %s, pg_backend_pid(), %s) ON CONFLICT (lock) DO UPDATE SET pid = excluded.pid,"
            " host = excluded.host, since = excluded.since, session = excluded.session,"
            " instance = excluded.instance",
            (OWNER_LOCK, os.getpid(), socket.gethostname(), self._since, self._instance),
        )

    def _migrate(self, conn: psycopg.Connection[Any]) -> str:
        """Create or upgrade the schema in one transaction; returns the epoch."""
        with conn.transaction():
            # Openings that do not hold the owner lock (shared, tests only) migrate in turn.
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATE_LOCK,))
            conn.execute("CREATE TABLE IF NOT EXISTS meta (key text PRIMARY KEY, value text)")
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            stored = meta.get("schema_version", "0")
            version = int(stored) if stored.isdigit() else -1
            if version < 0 or version > SCHEMA_VERSION:
                raise StoreError(
                    f"{redact_url(self.url)}: database schema v{stored} is newer than this"
                    f" runtime's v{SCHEMA_VERSION}; upgrade jobspine"
                    if version > SCHEMA_VERSION
                    else f"{redact_url(self.url)}: database schema version {stored!r} is not"
                    " one jobspine wrote"
                )
            conn.execute(
                "CREATE TABLE IF NOT EXISTS owners (lock bigint PRIMARY KEY, pid integer,"
                " host text, since text, session integer, instance text)"
            )
            for step in range(version, SCHEMA_VERSION):
                for statement in MIGRATIONS[step]:
                    conn.execute(statement)
            epoch = meta.get("epoch") or new_id()
            conn.execute(
                "INSERT INTO meta VALUES ('schema_version', %s), ('epoch', %s)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (str(SCHEMA_VERSION), epoch),
            )
            if not self._shared:
                self._record_owner(conn)
        return epoch

    def _live(self) -> psycopg.Connection[Any]:
        """The connection, connected again (lock first) if the server dropped it."""
        conn = self._conn
        if conn is not None and not conn.closed:
            return conn
        if not self._open:
            raise StoreError("the PostgreSQL database is not open")
        self._conn = None
        if self._superseded is not None:
            raise StoreUnavailableError(self._superseded)
        if conn is not None:
            log.warning("connection to %s lost; connecting again", redact_url(self.url))
        try:
            conn = self._connect()
        except DatabaseLockedError as exc:
            # Someone else owns the database now: writing would make two owners.
            raise StoreUnavailableError(str(exc)) from None
        if self._shared:
            self._conn = conn
            return conn
        try:
            row = conn.execute("SELECT instance FROM owners WHERE lock = %s", (OWNER_LOCK,))
            if row.fetchone() != (self._instance,):
                # Another owner came while this one was disconnected: what this one caches
                # may be stale, so it writes nothing more, ever.
                pid, host, since = self._owner(conn)
                self._superseded = (
                    f"process {pid} on {host} since {since} owned the database"
                    f" {redact_url(self.url)} while this one was disconnected; nothing more is"
                    " written here: restart this runtime"
                )
                log.error("%s", self._superseded)
                raise StoreUnavailableError(self._superseded)
            self._record_owner(conn)
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        return conn

    async def _run(self, fn: Callable[[psycopg.Connection[Any]], T], *, read: bool = False) -> T:
        """Run ``fn`` on the live connection in a worker thread, one call at a time. ``read``:
        ``fn`` changes nothing, so it is run once more on a new connection if the server had
        dropped this one (which shows only when it is used); a write is never repeated here
        (the store decides, see :func:`is_postgres_outage`)."""

        def call() -> T:
            conn = self._live()
            try:
                return fn(conn)
            except psycopg.Error:
                if not (read and conn.broken):
                    raise
            return fn(self._live())

        async with self._lock:
            return await trio.to_thread.run_sync(call)

    async def _read(self, fn: Callable[[psycopg.Connection[Any]], T]) -> T:
        return await self._run(fn, read=True)

    @asynccontextmanager
    async def opened(self) -> AsyncIterator[None]:
        """Own and open the database for the block: connect, take the owner lock, migrate.

        A process refused with :class:`DatabaseLockedError` has written nothing; a server
        that cannot be reached or a database that cannot be used raises :class:`StoreError`
        (one line, the password left out). Every way out closes the connection, which gives
        the lock back."""
        self._since = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        self._superseded = None
        self._instance = new_id()
        where = redact_url(self.url)

        def open_() -> tuple[psycopg.Connection[Any], str]:
            conn = self._connect()
            try:
                return conn, self._migrate(conn)
            except BaseException:
                conn.close()
                raise

        try:
            # Shielded: a connection opened by a thread the caller stopped waiting for would
            # hold the lock with nobody to close it. Opening is bounded by connect_timeout.
            with trio.CancelScope(shield=True):
                conn, epoch = await trio.to_thread.run_sync(open_)
        except psycopg.Error as exc:
            raise StoreError(f"database {where}: cannot open: {_one_line(exc)}") from None
        self._conn, self._epoch, self._open = conn, epoch, True
        try:
            yield
        finally:
            self._open = False
            with trio.move_on_after(CLOSE_TIMEOUT, shield=True):
                async with self._lock:
                    last, self._conn = self._conn, None
                    if last is not None:
                        await trio.to_thread.run_sync(last.close)

    # -- the Backend protocol ------------------------------------------------------------------

    async def load(self, job_id: str) -> Job | None:
        def fn(conn: psycopg.Connection[Any]) -> Job | None:
            row = conn.execute(
                f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = %s", (job_id,)
            ).fetchone()
            return _job_from_row(*row) if row else None

        return await self._read(fn)

    async def ping(self) -> None:
        # Connects again (taking the owner lock) if the connection was lost.
        await self._run(lambda conn: conn.execute("SELECT 1").fetchall())

    async def commit(
        self,
        jobs: Collection[Job],
        events: Sequence[JobEvent],
        deleted: Collection[str],
        heartbeats: Mapping[str, tuple[int, float]],
    ) -> None:
        plan = commit_plan(jobs, events, deleted, heartbeats)

        def fn(conn: psycopg.Connection[Any]) -> None:
            with conn.transaction(), conn.cursor() as cursor:
                for sql, rows in plan:
                    cursor.executemany(sql, rows)

        await self._run(fn)

    async def query(self, query: JobQuery) -> list[Job]:
        where: list[str] = []
        params: list[Any] = []
        if query.user_id is not None:
            where.append("user_id = %s")
            params.append(query.user_id)
        if query.states is not None:
            where.append("state = ANY(%s)")
            params.append(sorted(s.value for s in query.states))
        if query.kind is not None:
            where.append("kind = %s")
            params.append(query.kind)
        if query.heartbeat_before is not None:
            where.append("last_heartbeat_at < %s")
            params.append(query.heartbeat_before)
        if query.parent_id is not None:
            where.append("parent_id = %s")
            params.append(query.parent_id)
        if query.tag is not None:
            # The second condition lets the partial index jobs_tags serve it.
            where.append("tags @> ARRAY[%s]::text[] AND tags <> '{}'")
            params.append(query.tag)
        sql = f"SELECT {_JOB_COLUMNS} FROM jobs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY id DESC"
        if query.limit is not None:
            sql += " LIMIT %s"
            params.append(query.limit)
        rows = await self._read(lambda conn: conn.execute(sql, params).fetchall())
        return [_job_from_row(*row) for row in rows]

    async def read_events(
        self,
        job_id: str,
        after_seq: int,
        limit: int,
        types: frozenset[EventType] | None = None,
    ) -> list[JobEvent]:
        sql = "SELECT record FROM events WHERE job_id = %s AND seq > %s"
        params: list[Any] = [job_id, after_seq]
        if types is not None:
            sql += " AND type = ANY(%s)"
            params.append(sorted(t.value for t in types))
        sql += " ORDER BY seq LIMIT %s"
        params.append(limit)
        rows = await self._read(lambda conn: conn.execute(sql, params).fetchall())
        return [_event(row[0]) for row in rows]

    async def read_user_events(self, user_id: str, after_seq: int, limit: int) -> list[JobEvent]:
        rows = await self._read(
            lambda conn: conn.execute(
                "SELECT record FROM events WHERE user_id = %s AND user_seq > %s"
                " ORDER BY user_seq LIMIT %s",
                (user_id, after_seq, limit),
            ).fetchall()
        )
        return [_event(row[0]) for row in rows]

    async def read_users_events(
        self, heads: Mapping[str, int], limit: int
    ) -> dict[str, list[JobEvent]]:
        if not heads:
            return {}
        users, after = list(heads), [heads[u] for u in heads]
        # One statement for every user: an index range scan per user (events_by_user).
        rows = await self._read(
            lambda conn: conn.execute(
                "SELECT h.user_id, e.record FROM unnest(%s::text[], %s::bigint[])"
                " AS h(user_id, after_seq) CROSS JOIN LATERAL (SELECT record, user_seq"
                " FROM events WHERE events.user_id = h.user_id AND user_seq > h.after_seq"
                " ORDER BY user_seq LIMIT %s) e ORDER BY h.user_id, e.user_seq",
                (users, after, limit),
            ).fetchall()
        )
        found: dict[str, list[JobEvent]] = {}
        for user_id, record in rows:
            found.setdefault(user_id, []).append(_event(record))
        return found

    async def user_head(self, user_id: str) -> int:
        rows = await self._read(
            lambda conn: conn.execute(
                "SELECT greatest(coalesce((SELECT max(user_seq) FROM events WHERE user_id = %s),"
                " 0), coalesce((SELECT head FROM user_heads WHERE user_id = %s), 0))",
                (user_id, user_id),
            ).fetchall()
        )
        return int(rows[0][0])

    async def user_horizon(self, user_id: str) -> int:
        rows = await self._read(
            lambda conn: conn.execute(
                "SELECT horizon FROM user_heads WHERE user_id = %s", (user_id,)
            ).fetchall()
        )
        return int(rows[0][0]) if rows else 0

    async def finished_counts(self) -> dict[str, int]:
        rows = await self._read(
            lambda conn: conn.execute(
                "SELECT kind, count(*) FROM jobs WHERE finished_at IS NOT NULL GROUP BY kind"
            ).fetchall()
        )
        return {str(kind): int(count) for kind, count in rows}

    async def oldest_finished(self, kind: str, limit: int) -> list[tuple[str, float]]:
        rows = await self._read(
            lambda conn: conn.execute(
                "SELECT id, finished_at FROM jobs WHERE kind = %s AND finished_at IS NOT NULL"
                " ORDER BY finished_at, id LIMIT %s",
                (kind, limit),
            ).fetchall()
        )
        return [(str(job_id), float(at)) for job_id, at in rows]

    async def prune(self, job_ids: Collection[str]) -> Pruned:
        ids = list(dict.fromkeys(job_ids))

        def fn(conn: psycopg.Connection[Any]) -> tuple[list[tuple[str, str]], int]:
            with conn.transaction():
                # Locked from the first read: nothing changes them before they go.
                gone: list[tuple[str, str]] = conn.execute(
                    "SELECT id, state FROM jobs WHERE id = ANY(%s) AND finished_at IS NOT NULL"
                    " ORDER BY id FOR UPDATE",
                    (ids,),
                ).fetchall()
                found = [job_id for job_id, _ in gone]
                users = conn.execute(
                    "SELECT user_id, max(user_seq), count(*) FROM events"
                    " WHERE job_id = ANY(%s) GROUP BY user_id",
                    (found,),
                ).fetchall()
                # The head is recorded before the user's events go: it never moves back.
                with conn.cursor() as cursor:
                    cursor.executemany(
                        "INSERT INTO user_heads (user_id, head, horizon) VALUES (%s,"
                        " (SELECT max(user_seq) FROM events WHERE user_id = %s), %s)"
                        " ON CONFLICT (user_id) DO UPDATE SET"
                        " head = greatest(user_heads.head, excluded.head),"
                        " horizon = greatest(user_heads.horizon, excluded.horizon)",
                        [(user_id, user_id, horizon) for user_id, horizon, _ in users],
                    )
                conn.execute("DELETE FROM events WHERE job_id = ANY(%s)", (found,))
                conn.execute("DELETE FROM jobs WHERE id = ANY(%s)", (found,))
            return gone, sum(int(count) for _, _, count in users)

        gone, events = await self._run(fn)
        states: dict[str, int] = {}
        for _, state in gone:
            states[state] = states.get(state, 0) + 1
        return Pruned(tuple(job_id for job_id, _ in gone), states, events)

    async def count_by_state(self, user_id: str | None) -> dict[str, int]:
        sql = "SELECT state, count(*) FROM jobs"
        params: list[str] = []
        if user_id is not None:
            sql += " WHERE user_id = %s"
            params.append(user_id)
        sql += " GROUP BY state"
        rows = await self._read(lambda conn: conn.execute(sql, params).fetchall())
        return {JobState(state).value: int(count) for state, count in rows}

    async def claim(self, request: ClaimRequest) -> ClaimResult:
        rows, next_run_at = await self._run(lambda conn: claim_sync(conn, request))
        return ClaimResult([_job_from_row(*row) for row in rows], next_run_at)

    async def renew_leases(self, owner: str, lease_expires_at: float) -> int:
        def fn(conn: psycopg.Connection[Any]) -> int:
            renewed = 0
            with conn.transaction():
                # Two statements, each served by its partial index (running, claimed).
                for state in ("running", "created"):
                    cursor = conn.execute(
                        "UPDATE jobs SET lease_expires_at = %s"
                        f" WHERE owner = %s AND state = '{state}'",
                        (lease_expires_at, owner),
                    )
                    renewed += cursor.rowcount
            return renewed

        return await self._run(fn)

    async def queue_stats(self, now: float, user_id: str | None = None) -> QueueStats:
        where, params = ("", []) if user_id is None else (" AND user_id = %s", [user_id])

        def fn(conn: psycopg.Connection[Any]) -> tuple[list[Any], int]:
            with conn.transaction():  # one snapshot for both counts
                waiting = conn.execute(
                    "SELECT kind, user_id, count(*), count(*) FILTER (WHERE ready_at <= %s)"
                    f" FROM jobs WHERE state = 'created'{where} GROUP BY kind, user_id",
                    [now, *params],
                ).fetchall()
                row = conn.execute(
                    f"SELECT count(*) FROM jobs WHERE state = 'running'{where}", params
                ).fetchone()
            return waiting, int(row[0]) if row else 0

        rows, running = await self._read(fn)
        by_kind: dict[str, int] = {}
        by_user: dict[str, int] = {}
        ready = 0
        for kind, user, count, ready_count in rows:
            by_kind[kind] = by_kind.get(kind, 0) + int(count)
            by_user[user] = by_user.get(user, 0) + int(count)
            ready += int(ready_count)
        waiting = sum(by_kind.values())
        return QueueStats(waiting, ready, waiting - ready, running, by_kind, by_user)

    async def find_by_key(self, user_id: str, key: str, since: float) -> Job | None:
        rows = await self._read(
            lambda conn: conn.execute(
                f"SELECT {_JOB_COLUMNS} FROM jobs WHERE user_id = %s AND idempotency_key = %s"
                " AND created_at >= %s ORDER BY id DESC LIMIT 1",
                (user_id, key, since),
            ).fetchall()
        )
        return _job_from_row(*rows[0]) if rows else None

    async def find_by_keys(self, keys: Collection[tuple[str, str]]) -> dict[tuple[str, str], Job]:
        users = [user_id for user_id, _ in keys]
        names = [key for _, key in keys]
        if not users:
            return {}
        rows = await self._read(
            lambda conn: conn.execute(
                f"SELECT DISTINCT ON (j.user_id, j.idempotency_key) j.user_id,"
                f" j.idempotency_key, {_JOB_COLUMNS} FROM jobs j"
                " JOIN unnest(%s::text[], %s::text[]) AS k(user_id, key)"
                ' ON j.user_id = k.user_id COLLATE "C" AND j.idempotency_key = k.key COLLATE "C"'
                " ORDER BY j.user_id, j.idempotency_key, j.id DESC",
                (users, names),
            ).fetchall()
        )
        return {(user_id, key): _job_from_row(*row) for user_id, key, *row in rows}

    async def keys_since(self, user_id: str, since: float) -> list[str]:
        rows = await self._read(
            lambda conn: conn.execute(
                "SELECT idempotency_key FROM jobs WHERE user_id = %s"
                " AND idempotency_key IS NOT NULL AND created_at >= %s",
                (user_id, since),
            ).fetchall()
        )
        return [key for (key,) in rows]

    async def held_until(self, owner: str, now: float) -> float | None:
        rows = await self._read(
            lambda conn: conn.execute(
                "SELECT min(lease_expires_at) FROM jobs WHERE state = 'created'"
                " AND owner IS NOT NULL AND owner <> %s AND lease_expires_at >= %s",
                (owner, now),
            ).fetchall()
        )
        return rows[0][0] if rows else None


def commit_plan(
    jobs: Collection[Job],
    events: Sequence[JobEvent],
    deleted: Collection[str],
    heartbeats: Mapping[str, tuple[int, float]],
) -> list[tuple[str, list[tuple[Any, ...]]]]:
    """The statements of one commit, each with its rows (``executemany``), in order; sans-I/O,
    so that ``bench/pg_modes.py`` runs exactly these through either driver."""
    plan: list[tuple[str, list[tuple[Any, ...]]]] = []
    if jobs:
        rows: list[tuple[Any, ...]] = [
            (
                j.id,
                j.user_id,
                j.kind,
                j.state.value,
                j.attempt,
                j.last_heartbeat_at,
                orjson.dumps(converter.unstructure(j)).decode(),
                j.updated_at if j.state in TERMINAL_STATES else None,
                j.priority,
                j.created_at,
                ready_at(j.created_at, j.run_at) if j.state is JobState.CREATED else None,
                j.run_at,
                j.parent_id,
                j.idempotency_key,
                j.owner,
                j.lease_expires_at,
                list(j.tags),
            )
            for j in jobs
        ]
        plan.append((_UPSERT_JOB, rows))
    if events:
        plan.append(
            (
                _INSERT_EVENT,
                [
                    (
                        e.job_id,
                        e.seq,
                        e.user_id,
                        e.user_seq,
                        e.type.value,
                        orjson.dumps(converter.unstructure(e)).decode(),
                    )
                    for e in events
                ],
            )
        )
    if heartbeats:
        plan.append(
            (_HEARTBEAT, [(at, job_id, attempt) for job_id, (attempt, at) in heartbeats.items()])
        )
    if deleted:
        plan.append((_DELETE_JOB, [(job_id,) for job_id in deleted]))
    return plan
