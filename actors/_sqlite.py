"""The SQLite backend (the embedded default), through aiosqlite.

aiosqlite speaks asyncio only, so this backend owns a trio-asyncio loop for as long as it is
open and opens and closes the connection through ``aio_as_trio``; nothing else in the runtime
touches asyncio. Only the store actor calls it, one call at a time. Every other call is one
function run in aiosqlite's thread, queued behind the calls before it (:func:`_in_thread`): a
commit, a claim's walk or a query with its rows is one crossing, not one per statement, and
the answer comes straight back to the Trio task (not through an asyncio future and the
trio-asyncio loop: that measured 482 against 204 µs per crossing on an idle loop, and twice
the wait on a busy one).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import secrets
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Collection, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import aiosqlite
import attrs
import orjson
import outcome
import trio
import trio_asyncio
from trio_asyncio import aio_as_trio

from ._backend import ClaimRequest, ClaimResult, JobQuery, Pruned, QueueStats
from ._codec import converter
from ._errors import StoreError, shown
from ._events import EventType, JobEvent, StoredEvent, encode_event
from ._ids import new_id
from ._job import Job, migrate_job_record
from ._nodes import (
    ALIVE,
    DEAD,
    LEFT,
    ORPHANED_OWNERS_SQL,
    NodeFencedError,
    NodeIdInUseError,
    NodeInfo,
    NodeLease,
)
from ._owner import database_owner_lock
from ._queue_sql import claim_sync
from ._scheduling import ready_at
from ._states import TERMINAL_STATES, JobState

__all__ = ["SqliteBackend"]

log = logging.getLogger("jobspine.sqlite")
T = TypeVar("T")

#: Bound on closing the connection (it waits for the statement in progress).
CLOSE_TIMEOUT = 10.0

SCHEMA_VERSION = 5

# Ordered migrations: MIGRATIONS[n] brings the database from version n to n + 1.
MIGRATIONS: list[list[str]] = [
    [
        """CREATE TABLE jobs (
            id TEXT PRIMARY KEY,
            user_id TEXT NOT NULL,
            kind TEXT NOT NULL,
            state TEXT NOT NULL,
            attempt INTEGER NOT NULL,
            last_heartbeat_at REAL,
            record TEXT NOT NULL
        )""",
        "CREATE INDEX jobs_by_user ON jobs (user_id, id)",
        "CREATE INDEX jobs_by_state ON jobs (state)",
        """CREATE TABLE events (
            job_id TEXT NOT NULL,
            seq INTEGER NOT NULL,
            user_id TEXT NOT NULL,
            user_seq INTEGER NOT NULL,
            type TEXT NOT NULL,
            record TEXT NOT NULL,
            PRIMARY KEY (job_id, seq)
        ) WITHOUT ROWID""",
        "CREATE UNIQUE INDEX events_by_user ON events (user_id, user_seq)",
    ],
    # v2, retention: when a finished job finished (indexed per kind), and per user the head
    # and horizon that outlive pruned events (a user_seq is never reused).
    [
        "ALTER TABLE jobs ADD COLUMN finished_at REAL",
        "UPDATE jobs SET finished_at = json_extract(record, '$.updated_at')"
        " WHERE state IN ('completed', 'failed', 'cancelled')",
        "CREATE INDEX jobs_finished ON jobs (kind, finished_at, id) WHERE finished_at IS NOT NULL",
        """CREATE TABLE user_heads (
            user_id TEXT PRIMARY KEY,
            head INTEGER NOT NULL,
            horizon INTEGER NOT NULL
        ) WITHOUT ROWID""",
    ],
    # v3, the queue: what a claim orders and filters by, as columns (ready_at: run_at, else
    # created_at, set only while waiting); a partial index over waiting jobs only, walked
    # group by group, so a claim's cost does not grow with the number waiting; the claim's
    # owner and lease; parents, idempotency keys and tags for their look-ups.
    [
        "ALTER TABLE jobs ADD COLUMN priority INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE jobs ADD COLUMN created_at REAL",
        "ALTER TABLE jobs ADD COLUMN ready_at REAL",
        "ALTER TABLE jobs ADD COLUMN parent_id TEXT",
        "ALTER TABLE jobs ADD COLUMN idempotency_key TEXT",
        "ALTER TABLE jobs ADD COLUMN owner TEXT",
        "ALTER TABLE jobs ADD COLUMN lease_expires_at REAL",
        "UPDATE jobs SET created_at = json_extract(record, '$.created_at')",
        "UPDATE jobs SET ready_at = created_at WHERE state = 'created'",
        "CREATE INDEX jobs_waiting ON jobs (priority, user_id, kind, ready_at, id)"
        " WHERE state = 'created'",
        "CREATE INDEX jobs_scheduled ON jobs (ready_at) WHERE state = 'created'",
        "CREATE INDEX jobs_children ON jobs (parent_id, id) WHERE parent_id IS NOT NULL",
        "CREATE INDEX jobs_keys ON jobs (user_id, idempotency_key, created_at)"
        " WHERE idempotency_key IS NOT NULL",
        "CREATE INDEX jobs_owned ON jobs (owner) WHERE owner IS NOT NULL",
        """CREATE TABLE job_tags (
            tag TEXT NOT NULL,
            job_id TEXT NOT NULL,
            PRIMARY KEY (tag, job_id)
        ) WITHOUT ROWID""",
    ],
    # v4, nodes (:mod:`._nodes`): one row per incarnation of a node, its lease and state.
    # A SQLite file has one node at a time (the owner lock), but the table is the same as
    # PostgreSQL's so that ``jobspine nodes`` and start-up recovery read both alike.
    [
        """CREATE TABLE nodes (
            node_id TEXT NOT NULL,
            incarnation TEXT NOT NULL,
            host TEXT NOT NULL,
            pid INTEGER NOT NULL,
            started_at REAL NOT NULL,
            renewed_at REAL NOT NULL,
            lease_expires_at REAL NOT NULL,
            state TEXT NOT NULL,
            taken_over_by TEXT,
            running INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (node_id, incarnation)
        )""",
    ],
    # v5, events in a table of their own rowids (appended in commit order), found by job
    # through an index: a commit's events fill the table's last pages, where the WITHOUT ROWID
    # table kept each job's rows (about 450 bytes each) together, so a commit of 62 jobs'
    # events rewrote 62 leaf pages (`bench/sqlite_events.py`: 5.8 against 3.1 ms per commit).
    [
        """CREATE TABLE events_v5 (
            job_id TEXT NOT NULL,
            seq INTEGER NOT NULL,
            user_id TEXT NOT NULL,
            user_seq INTEGER NOT NULL,
            type TEXT NOT NULL,
            record TEXT NOT NULL
        )""",
        "INSERT INTO events_v5 (job_id, seq, user_id, user_seq, type, record)"
        " SELECT job_id, seq, user_id, user_seq, type, record FROM events ORDER BY job_id, seq",
        "DROP TABLE events",
        "ALTER TABLE events_v5 RENAME TO events",
        "CREATE UNIQUE INDEX events_by_job ON events (job_id, seq)",
        "CREATE UNIQUE INDEX events_by_user ON events (user_id, user_seq)",
    ],
]

#: Bytes the WAL file is cut back to after a checkpoint (``PRAGMA journal_size_limit``).
WAL_SIZE_LIMIT = 64 * 1024 * 1024

#: Ids per statement when a list of them is bound (well under SQLite's variable limit).
_CHUNK = 500

_JOB_COLUMNS = "record, last_heartbeat_at, owner, lease_expires_at"


class _Reply:
    """Stands in for the asyncio future aiosqlite's thread answers, for a Trio task.

    For each ``(future, function)`` taken from its queue, aiosqlite's thread (0.20 to 0.22.1)
    runs ``function()`` and calls ``future.get_loop().call_soon_threadsafe(set_result,
    future, value)`` (``set_exception`` if it raised), where ``set_result`` sets the value
    unless ``future.done()``. Here the "loop" is the Trio run (through its token) and setting
    the value reschedules the waiting task, unless it abandoned the call."""

    __slots__ = ("_done", "_task", "_token")

    def __init__(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._task = trio.lowlevel.current_task()
        self._done = False

    def get_loop(self) -> _Reply:
        return self

    def call_soon_threadsafe(self, callback: Callable[..., object], *args: object) -> None:
        # The run may have ended meanwhile (its caller abandoned the call): nobody waits.
        with contextlib.suppress(trio.RunFinishedError):
            self._token.run_sync_soon(callback, *args)

    def done(self) -> bool:
        return self._done

    def set_result(self, value: object) -> None:
        self._done = True
        trio.lowlevel.reschedule(self._task, outcome.Value(value))

    def set_exception(self, error: BaseException) -> None:
        self._done = True
        trio.lowlevel.reschedule(self._task, outcome.Error(error))

    def abandon(self, _: object) -> trio.lowlevel.Abort:
        self._done = True
        return trio.lowlevel.Abort.SUCCEEDED


async def _in_thread(db: aiosqlite.Connection, fn: Callable[..., T], *args: Any) -> T:
    """``fn(connection, *args)`` in ``db``'s thread, after every call queued before it.

    Queued as aiosqlite's own calls are (``Connection._tx``, private: aiosqlite has no public
    way to run a function in its thread), with a :class:`_Reply` for the future. A cancelled
    caller abandons the call, as it would an asyncio future: the thread still runs it, and
    later calls queue behind it."""
    connection = db._connection
    if not db._running or connection is None:
        raise StoreError("the SQLite database is not open")
    reply = _Reply()
    future: Any = reply  # duck-typed: the methods of a future the thread calls
    try:
        db._tx.put_nowait((future, functools.partial(fn, connection, *args)))
        value: T = await trio.lowlevel.wait_task_rescheduled(reply.abandon)
    finally:
        # Left before the wait began (a KeyboardInterrupt in between): the answer must not
        # reschedule this task while it waits for something else.
        reply._done = True
    return value


def _fetch_all(db: sqlite3.Connection, sql: str, params: Sequence[Any]) -> list[Any]:
    cursor = db.execute(sql, params)
    try:
        return cursor.fetchall()
    finally:
        cursor.close()


def _row_count(db: sqlite3.Connection, sql: str, params: Sequence[Any]) -> int:
    cursor = db.execute(sql, params)
    try:
        return int(cursor.rowcount)
    finally:
        cursor.close()


def _commit(db: sqlite3.Connection) -> None:
    db.commit()


def _rollback(db: sqlite3.Connection) -> None:
    db.rollback()


async def _close(db: aiosqlite.Connection) -> None:
    """Close ``db`` and end its thread, even when the caller is cancelled."""
    with trio.move_on_after(CLOSE_TIMEOUT, shield=True):
        try:
            await aio_as_trio(db.close)()
            # The worker thread answers the close, then returns: wait for that last step so
            # no thread outlives the block (aiosqlite has no public handle on its thread).
            db._thread.join(timeout=1.0)
            return
        except Exception:
            log.exception("closing the SQLite connection failed")
    # A close that failed or timed out still stops the thread after its current statement.
    db.stop()


_WRITE_JOB = (
    "INSERT INTO jobs (id, user_id, kind, state, attempt, last_heartbeat_at,"
    " record, finished_at, priority, created_at, ready_at, parent_id,"
    " idempotency_key, owner, lease_expires_at)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (id) DO UPDATE SET"
    " state = excluded.state, attempt = excluded.attempt,"
    " last_heartbeat_at = excluded.last_heartbeat_at, record = excluded.record,"
    " finished_at = excluded.finished_at, priority = excluded.priority,"
    " ready_at = excluded.ready_at,"
    # A lease renewed meanwhile (renew_leases) is not moved back by a write of the same claim
    # that carries the older expiry.
    " lease_expires_at = CASE WHEN excluded.owner IS NOT NULL"
    " AND excluded.owner IS jobs.owner"
    " THEN max(excluded.lease_expires_at, coalesce(jobs.lease_expires_at, 0))"
    " ELSE excluded.lease_expires_at END,"
    " owner = excluded.owner"
)


#: A progress report's write (``Backend.commit``'s ``progress_only``): its five fields set in
#: the stored record by SQLite's ``json_set``, outside the GIL, instead of the whole job
#: encoded again in Python; no indexed column changes, so no index is touched. Each value
#: goes in as orjson's JSON text through ``json()``: SQLite keeps a number's text as given,
#: so the record is the bytes a whole write would have stored (``tests/test_sqlite_progress``).
#: A running job's record has the current shape: its start was a whole write by this runtime.
_WRITE_PROGRESS = (
    "UPDATE jobs SET last_heartbeat_at = ?, record = json_set(record,"
    " '$.progress', json(?), '$.step', json(?), '$.updated_at', json(?),"
    " '$.last_heartbeat_at', json(?), '$.seq', ?) WHERE id = ?"
)


def _commit_sync(
    db: sqlite3.Connection,
    jobs: list[Job],
    events: Sequence[JobEvent],
    deleted: list[str],
    heartbeats: dict[str, tuple[int, float]],
    progress_only: Collection[str],
) -> None:
    """:meth:`SqliteBackend.commit`, in aiosqlite's thread (the only one that touches ``db``;
    the store actor waits for it, so nothing else runs on the connection meanwhile). Jobs and
    events are immutable: reading them from this thread is safe."""
    dumps = orjson.dumps
    try:
        if progress_only:
            db.executemany(
                _WRITE_PROGRESS,
                [
                    (
                        j.last_heartbeat_at,
                        dumps(j.progress).decode(),
                        dumps(j.step).decode(),
                        dumps(j.updated_at).decode(),
                        dumps(j.last_heartbeat_at).decode(),
                        j.seq,
                        j.id,
                    )
                    for j in jobs
                    if j.id in progress_only
                ],
            )
            jobs = [j for j in jobs if j.id not in progress_only]
        if jobs:
            db.executemany(
                _WRITE_JOB,
                [
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
                        _ready_at(j),
                        j.parent_id,
                        j.idempotency_key,
                        j.owner,
                        j.lease_expires_at,
                    )
                    for j in jobs
                ],
            )
            tagged = [(tag, j.id) for j in jobs for tag in j.tags]
            if tagged:
                db.executemany("INSERT OR IGNORE INTO job_tags (tag, job_id) VALUES (?, ?)", tagged)
        if events:
            db.executemany(
                "INSERT INTO events (job_id, seq, user_id, user_seq, type, record)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (
                        e.job_id,
                        e.seq,
                        e.user_id,
                        e.user_seq,
                        e.type.value,
                        encode_event(e).decode(),
                    )
                    for e in events
                ],
            )
        if heartbeats:
            db.executemany(
                "UPDATE jobs SET last_heartbeat_at = ?"
                " WHERE id = ? AND state = 'running' AND attempt = ?",
                [(at, job_id, attempt) for job_id, (attempt, at) in heartbeats.items()],
            )
        if deleted:
            ids = [(job_id,) for job_id in deleted]
            db.executemany("DELETE FROM jobs WHERE id = ?", ids)
            db.executemany("DELETE FROM job_tags WHERE job_id = ?", ids)
        db.commit()
    except Exception:
        db.rollback()
        raise


def _ping_sync(db: sqlite3.Connection) -> None:
    """:meth:`SqliteBackend.ping`, in the database's thread: a write committed, as every
    commit is. Taking the write lock and giving it back is not enough: that succeeds on a
    full disk (or at ``max_page_count``), where every commit fails, and the store would
    report the database back while no write can be made (``/readyz`` ready, then unavailable
    again at the next write, over and over). So the probe takes the lock, allocates a page
    (a row of one page's size in ``meta``, deleted in the same transaction: nothing is left)
    and commits, which appends to the WAL: it fails as busy while another program holds the
    lock, and as full while the file or its WAL cannot grow."""
    try:
        (size,) = db.execute("PRAGMA page_size").fetchone()
        db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('ping', zeroblob(?))", (size,))
        db.execute("DELETE FROM meta WHERE key = 'ping'")
        db.commit()
    except Exception:
        db.rollback()
        raise


def _job_from_row(
    record: str, heartbeat: float | None, owner: str | None, lease: float | None
) -> Job:
    # Heartbeats and lease renewals update their columns only: the columns are authoritative.
    data: dict[str, Any] = migrate_job_record(orjson.loads(record))
    data["last_heartbeat_at"] = heartbeat
    data["owner"] = owner
    data["lease_expires_at"] = lease
    return converter.structure(data, Job)


def _ready_at(job: Job) -> float | None:
    if job.state is not JobState.CREATED:
        return None
    return ready_at(job.created_at, job.run_at)


class SqliteBackend:
    #: The store numbers events (one writer: it knows every head).
    assigns_user_seq = False
    shared = False

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        synchronous: str = "FULL",
        busy_timeout: float = 0.2,
    ) -> None:
        """``busy_timeout``: seconds one statement waits for a lock another program holds
        before it fails as busy (the store then retries it, see ``store_retry_timeout``)."""
        if synchronous.upper() not in ("OFF", "NORMAL", "FULL", "EXTRA"):
            raise ValueError(
                f"synchronous must be OFF, NORMAL, FULL or EXTRA, not {shown(synchronous)}"
            )
        if not busy_timeout >= 0:
            raise ValueError(f"busy_timeout must be >= 0 seconds, not {shown(busy_timeout)}")
        self._busy_timeout_ms = int(busy_timeout * 1000)
        self.path = os.fspath(path)
        self._synchronous = synchronous.upper()
        self._db: aiosqlite.Connection | None = None
        self._epoch = ""
        self._fanout_key = b""
        # Incarnations registered through this opening: the only ones that can be alive,
        # since one process owns the file (its lock). Any other is a process that ended,
        # whatever its lease says: the wall clock set back since would make it read ahead.
        self._registered: set[tuple[str, str]] = set()

    @property
    def epoch(self) -> str:
        return self._epoch

    @property
    def fanout_key(self) -> bytes:
        """New at every opening, never stored: one process owns the file at a time (its lock),
        so no other node publishes on its fan-out channel meanwhile (the epoch is stored, as
        cursors outlive a process; a message does not)."""
        return self._fanout_key

    @property
    def _conn(self) -> aiosqlite.Connection:
        if self._db is None:
            raise StoreError("the SQLite database is not open")
        return self._db

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(connection, *args)`` in the database's thread (see :func:`_in_thread`)."""
        return await _in_thread(self._conn, fn, *args)

    async def _execute(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        return await self._call(_fetch_all, sql, params)

    @asynccontextmanager
    async def opened(self) -> AsyncIterator[None]:
        """Own and open the database for the block.

        The owner lock comes first: a process refused with :class:`DatabaseLockedError` has
        not opened, migrated or written anything. A database that cannot be opened (a
        directory, not a database, corrupt, a newer schema) raises :class:`StoreError`. Every
        way out closes the connection under a shield, so its thread never outlives the block.
        """
        with database_owner_lock(self.path):
            async with trio_asyncio.open_loop():
                try:
                    # Shielded: a connect cancelled midway has started the connection's
                    # thread but handed back no connection to close, and that thread would
                    # hold the database after the owner lock is gone. Opening is quick.
                    with trio.CancelScope(shield=True):
                        db = await aio_as_trio(aiosqlite.connect)(self.path)
                except sqlite3.Error as exc:
                    raise StoreError(f"database {self.path}: cannot open: {exc}") from None
                self._db = db
                try:
                    try:
                        await self._migrate()
                    except sqlite3.Error as exc:
                        raise StoreError(f"database {self.path}: cannot open: {exc}") from None
                    yield
                finally:
                    self._db = None
                    await _close(db)

    async def _migrate(self) -> None:
        await self._execute(f"PRAGMA busy_timeout={self._busy_timeout_ms}")
        # The version is read before anything is written: a database this runtime cannot use
        # is left byte for byte as it was (even its journal mode).
        found = await self._execute("SELECT 1 FROM sqlite_master WHERE name = 'meta'")
        meta = dict(await self._execute("SELECT key, value FROM meta")) if found else {}
        stored = meta.get("schema_version", "0")
        version = int(stored) if stored.isdigit() else -1
        if version < 0 or version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path}: database schema v{stored} is newer than this runtime's "
                f"v{SCHEMA_VERSION}; upgrade jobspine"
                if version > SCHEMA_VERSION
                else f"{self.path}: database schema version {shown(stored)} is not one jobspine"
                " wrote"
            )
        await self._execute("PRAGMA journal_mode=WAL")
        await self._execute(f"PRAGMA synchronous={self._synchronous}")
        # After a checkpoint the WAL file is cut back to this size: a large transaction (a
        # migration, a big prune) does not leave its size on disk for as long as it is open.
        await self._execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
        await self._execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
        # One transaction from the first migration to the version written: a migration that
        # fails or is cut short (a crash, a full disk) leaves the file at its version.
        await self._execute("BEGIN IMMEDIATE")
        if 0 < version < SCHEMA_VERSION:
            # v5 copies every event into a new table: 4 s for 340,000 on a 2-core machine.
            log.warning(
                "%s: migrating the database from schema v%d to v%d", self.path, version,
                SCHEMA_VERSION,
            )  # fmt: skip
        for step in range(version, SCHEMA_VERSION):
            for statement in MIGRATIONS[step]:
                await self._execute(statement)
        epoch = meta.get("epoch") or new_id()
        await self._execute(
            "INSERT OR REPLACE INTO meta VALUES ('schema_version', ?), ('epoch', ?)",
            (str(SCHEMA_VERSION), epoch),
        )
        await self._call(_commit)
        self._epoch = epoch
        self._fanout_key = secrets.token_bytes(32)
        self._registered = set()
        await self._truncate_wal()

    async def _truncate_wal(self) -> None:
        """Checkpoint the whole WAL into the database and empty the WAL file: what a
        migration wrote, or a process killed before its last checkpoint left (the next
        checkpoints would only cut it back to ``journal_size_limit`` once they reach its end).
        Not a reason to stop: the migration, if any, has committed; a failure (a full disk)
        or a reader holding it back (another program) leaves the WAL to later checkpoints."""
        try:
            ((busy, _, _),) = await self._execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:
            log.warning("%s: the WAL file was not emptied at start: %s", self.path, exc)
            return
        if busy:
            log.info("%s: the WAL file was not emptied at start: a reader holds it", self.path)

    async def load(self, job_id: str) -> Job | None:
        rows = await self._execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,))
        return _job_from_row(*rows[0]) if rows else None

    async def ping(self) -> None:
        await self._call(_ping_sync)

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
        """One transaction, run as one call in the database's thread (see
        :func:`_commit_sync`): one crossing of the loop instead of one per statement, and the
        records encoded there rather than on the event loop. The jobs of ``progress_only``
        get their progress fields written into their stored record (:data:`_WRITE_PROGRESS`)."""
        await self._call(
            _commit_sync,
            list(jobs),
            events,
            list(deleted),
            dict(heartbeats),
            frozenset(progress_only),
        )
        return events  # the only writer: numbered as staged

    async def query(self, query: JobQuery) -> list[Job]:
        where: list[str] = []
        params: list[Any] = []
        if query.user_id is not None:
            where.append("user_id = ?")
            params.append(query.user_id)
        if query.states is not None:
            where.append(f"state IN ({', '.join('?' * len(query.states))})")
            params.extend(sorted(s.value for s in query.states))
        if query.kind is not None:
            where.append("kind = ?")
            params.append(query.kind)
        if query.heartbeat_before is not None:
            where.append("last_heartbeat_at < ?")
            params.append(query.heartbeat_before)
        if query.parent_id is not None:
            where.append("parent_id = ?")
            params.append(query.parent_id)
        if query.parent_ids is not None:
            where.append(f"parent_id IN ({', '.join('?' * len(query.parent_ids))})")
            params.extend(sorted(query.parent_ids))
        if query.tag is not None:
            where.append("id IN (SELECT job_id FROM job_tags WHERE tag = ?)")
            params.append(query.tag)
        sql = f"SELECT {_JOB_COLUMNS} FROM jobs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY id DESC"
        if query.limit is not None:
            sql += " LIMIT ?"
            params.append(query.limit)
        return [_job_from_row(*row) for row in await self._execute(sql, params)]

    async def read_events(
        self,
        job_id: str,
        after_seq: int,
        limit: int,
        types: frozenset[EventType] | None = None,
    ) -> list[JobEvent]:
        sql = "SELECT record FROM events WHERE job_id = ? AND seq > ?"
        params: list[Any] = [job_id, after_seq]
        if types is not None:
            sql += f" AND type IN ({', '.join('?' * len(types))})"
            params.extend(sorted(t.value for t in types))
        sql += " ORDER BY seq LIMIT ?"
        params.append(limit)
        rows = await self._execute(sql, params)
        return [converter.structure(orjson.loads(row[0]), JobEvent) for row in rows]

    async def read_user_events(self, user_id: str, after_seq: int, limit: int) -> list[JobEvent]:
        rows = await self._execute(
            "SELECT record FROM events WHERE user_id = ? AND user_seq > ?"
            " ORDER BY user_seq LIMIT ?",
            (user_id, after_seq, limit),
        )
        return [converter.structure(orjson.loads(row[0]), JobEvent) for row in rows]

    async def read_records(
        self, room_kind: str, ident: str, after_seq: int, limit: int
    ) -> list[StoredEvent]:
        # As a BLOB: the record's UTF-8 bytes, without a str made and encoded again.
        if room_kind == "job":
            sql = (
                "SELECT job_id, user_id, seq, user_seq, CAST(record AS BLOB) FROM events"
                " WHERE job_id = ? AND seq > ? ORDER BY seq LIMIT ?"
            )
        else:
            sql = (
                "SELECT job_id, user_id, seq, user_seq, CAST(record AS BLOB) FROM events"
                " WHERE user_id = ? AND user_seq > ? ORDER BY user_seq LIMIT ?"
            )
        rows = await self._execute(sql, (ident, after_seq, limit))
        return [StoredEvent(*row) for row in rows]

    async def read_users_events(
        self, heads: Mapping[str, int], limit: int
    ) -> dict[str, list[JobEvent]]:
        # One indexed range read per user: SQLite is in-process, a round trip costs nothing.
        found = {u: await self.read_user_events(u, h, limit) for u, h in heads.items()}
        return {u: events for u, events in found.items() if events}

    async def user_head(self, user_id: str) -> int:
        rows = await self._execute(
            "SELECT max(coalesce((SELECT max(user_seq) FROM events WHERE user_id = ?), 0),"
            " coalesce((SELECT head FROM user_heads WHERE user_id = ?), 0))",
            (user_id, user_id),
        )
        return int(rows[0][0])

    async def user_horizon(self, user_id: str) -> int:
        rows = await self._execute("SELECT horizon FROM user_heads WHERE user_id = ?", (user_id,))
        return int(rows[0][0]) if rows else 0

    async def finished_counts(self) -> dict[str, int]:
        rows = await self._execute(
            "SELECT kind, count(*) FROM jobs WHERE finished_at IS NOT NULL GROUP BY kind"
        )
        return {str(kind): int(count) for kind, count in rows}

    async def oldest_finished(
        self, kind: str, limit: int, keyed_since: float
    ) -> list[tuple[str, float]]:
        rows = await self._execute(
            "SELECT id, finished_at FROM jobs WHERE kind = ? AND finished_at IS NOT NULL"
            " AND (idempotency_key IS NULL OR created_at < ?)"
            " AND NOT EXISTS (SELECT 1 FROM jobs AS c WHERE c.parent_id = jobs.id)"
            " ORDER BY finished_at, id LIMIT ?",
            (kind, keyed_since, limit),
        )
        return [(job_id, float(at)) for job_id, at in rows]

    async def prune(self, job_ids: Collection[str]) -> Pruned:
        ids = list(dict.fromkeys(job_ids))
        try:
            # One write transaction from the first read: nothing changes in between.
            await self._execute("BEGIN IMMEDIATE")
            gone: list[tuple[str, str]] = []
            users: dict[str, int] = {}
            events = 0
            for start in range(0, len(ids), _CHUNK):
                chunk = ids[start : start + _CHUNK]
                marks = ", ".join("?" * len(chunk))
                gone += await self._execute(
                    f"SELECT id, state FROM jobs WHERE id IN ({marks}) AND finished_at IS NOT NULL",
                    chunk,
                )
            found = [job_id for job_id, _ in gone]
            for start in range(0, len(found), _CHUNK):
                chunk = found[start : start + _CHUNK]
                marks = ", ".join("?" * len(chunk))
                for user_id, highest, count in await self._execute(
                    "SELECT user_id, max(user_seq), count(*) FROM events"
                    f" WHERE job_id IN ({marks}) GROUP BY user_id",
                    chunk,
                ):
                    users[user_id] = max(users.get(user_id, 0), highest)
                    events += count
            for user_id, horizon in users.items():
                # The head is recorded before the user's events go: it never moves back.
                await self._execute(
                    "INSERT INTO user_heads (user_id, head, horizon) VALUES (?,"
                    " (SELECT max(user_seq) FROM events WHERE user_id = ?), ?)"
                    " ON CONFLICT (user_id) DO UPDATE SET"
                    " head = max(head, excluded.head), horizon = max(horizon, excluded.horizon)",
                    (user_id, user_id, horizon),
                )
            for start in range(0, len(found), _CHUNK):
                chunk = found[start : start + _CHUNK]
                marks = ", ".join("?" * len(chunk))
                await self._execute(f"DELETE FROM events WHERE job_id IN ({marks})", chunk)
                await self._execute(f"DELETE FROM jobs WHERE id IN ({marks})", chunk)
                await self._execute(f"DELETE FROM job_tags WHERE job_id IN ({marks})", chunk)
            await self._call(_commit)
        except Exception:
            await self._call(_rollback)
            raise
        states: dict[str, int] = {}
        for _, state in gone:
            states[state] = states.get(state, 0) + 1
        return Pruned(tuple(found), states, events)

    async def count_by_state(self, user_id: str | None) -> dict[str, int]:
        if user_id is None:
            rows = await self._execute("SELECT state, count(*) FROM jobs GROUP BY state")
        else:
            rows = await self._execute(
                "SELECT state, count(*) FROM jobs WHERE user_id = ? GROUP BY state", (user_id,)
            )
        return {JobState(state).value: count for state, count in rows}

    async def claim(self, request: ClaimRequest) -> ClaimResult:
        # The whole walk runs in the connection's thread: many index seeks, one thread hop.
        try:
            picked, next_run_at = await self._call(claim_sync, request)
        except Exception:
            await self._call(_rollback)
            raise
        jobs: dict[str, Job] = {}
        for start in range(0, len(picked), _CHUNK):
            chunk = picked[start : start + _CHUNK]
            marks = ", ".join("?" * len(chunk))
            for row in await self._execute(
                f"SELECT id, {_JOB_COLUMNS} FROM jobs WHERE id IN ({marks})", chunk
            ):
                jobs[row[0]] = _job_from_row(*row[1:])
        return ClaimResult([jobs[job_id] for job_id in picked], next_run_at)

    async def renew_leases(self, owner: str, lease_expires_at: float) -> int:
        renewed = await self._write(
            "UPDATE jobs SET lease_expires_at = ? WHERE owner = ?"
            " AND state IN ('created', 'running')",
            (lease_expires_at, owner),
        )
        await self._call(_commit)
        return renewed

    async def queue_stats(self, now: float, user_id: str | None = None) -> QueueStats:
        where, params = ("", []) if user_id is None else (" AND user_id = ?", [user_id])
        rows = await self._execute(waiting_counts_sql(user_id is not None), [now, *params])
        by_kind: dict[str, int] = {}
        by_user: dict[str, int] = {}
        ready = 0
        for kind, user, count, ready_count in rows:
            by_kind[kind] = by_kind.get(kind, 0) + count
            by_user[user] = by_user.get(user, 0) + count
            ready += ready_count
        running = await self._execute(
            f"SELECT count(*) FROM jobs WHERE state = 'running'{where}", params
        )
        waiting = sum(by_kind.values())
        return QueueStats(waiting, ready, waiting - ready, int(running[0][0]), by_kind, by_user)

    async def find_by_key(self, user_id: str, key: str, since: float) -> Job | None:
        rows = await self._execute(
            f"SELECT {_JOB_COLUMNS} FROM jobs WHERE user_id = ? AND idempotency_key = ?"
            " AND created_at >= ? ORDER BY id DESC LIMIT 1",
            (user_id, key, since),
        )
        return _job_from_row(*rows[0]) if rows else None

    async def find_by_keys(self, keys: Collection[tuple[str, str]]) -> dict[tuple[str, str], Job]:
        by_user: dict[str, list[str]] = {}
        for user_id, key in keys:
            by_user.setdefault(user_id, []).append(key)
        newest: dict[tuple[str, str], tuple[str, Job]] = {}
        for user_id, user_keys in by_user.items():
            for start in range(0, len(user_keys), _CHUNK):
                chunk = user_keys[start : start + _CHUNK]
                marks = ", ".join("?" * len(chunk))
                for job_id, key, *row in await self._execute(
                    f"SELECT id, idempotency_key, {_JOB_COLUMNS} FROM jobs INDEXED BY jobs_keys"
                    f" WHERE user_id = ? AND idempotency_key IN ({marks})",
                    (user_id, *chunk),
                ):
                    found = newest.get((user_id, key))
                    if found is None or found[0] < job_id:
                        newest[(user_id, key)] = (job_id, _job_from_row(*row))
        return {key: job for key, (_, job) in newest.items()}

    async def keys_since(self, user_id: str, since: float, limit: int) -> list[str]:
        rows = await self._execute(
            "SELECT idempotency_key FROM jobs INDEXED BY jobs_keys"
            " WHERE user_id = ? AND idempotency_key IS NOT NULL AND created_at >= ? LIMIT ?",
            (user_id, since, limit),
        )
        return [key for (key,) in rows]

    async def held_until(self, owner: str, now: float) -> float | None:
        rows = await self._execute(
            "SELECT min(lease_expires_at) FROM jobs INDEXED BY jobs_owned"
            " WHERE owner IS NOT NULL AND owner != ? AND state = 'created'"
            " AND lease_expires_at >= ?",
            (owner, now),
        )
        return rows[0][0] if rows else None

    # -- nodes ------------------------------------------------------------------------------------

    async def _write(self, sql: str, params: Sequence[Any]) -> int:
        return await self._call(_row_count, sql, params)

    async def register_node(
        self,
        node_id: str,
        incarnation: str,
        ttl: float,
        host: str,
        pid: int,
        replacing: str | None = None,
    ) -> NodeLease:
        now = time.time()
        rows = await self._execute(
            "SELECT incarnation, host, pid, lease_expires_at FROM nodes WHERE node_id = ?"
            " AND state = ? AND lease_expires_at >= ? AND incarnation IS NOT ?",
            (node_id, ALIVE, now, replacing),
        )
        rows = [row for row in rows if (node_id, row[0]) in self._registered]
        if rows:
            other, host_, pid_, expires = rows[0]
            raise NodeIdInUseError(node_id, other, host_, pid_, expires - now)
        await self._write(
            "UPDATE nodes SET lease_expires_at = ? WHERE node_id = ? AND incarnation = ?"
            " AND state = ?",
            (now - 0.001, node_id, replacing, ALIVE),
        )
        await self._write(
            "INSERT INTO nodes (node_id, incarnation, host, pid, started_at, renewed_at,"
            " lease_expires_at, state) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (node_id, incarnation, host, pid, now, now, now + ttl, ALIVE),
        )
        await self._call(_commit)
        self._registered.add((node_id, incarnation))
        return NodeLease(node_id, incarnation, now + ttl)

    async def renew_node(self, lease: NodeLease, ttl: float, running: int) -> NodeLease:
        now = time.time()
        renewed = await self._write(
            "UPDATE nodes SET renewed_at = ?, lease_expires_at = ?, running = ?"
            " WHERE node_id = ? AND incarnation = ? AND state = ? AND NOT EXISTS"
            " (SELECT 1 FROM nodes AS newer WHERE newer.node_id = nodes.node_id"
            " AND newer.started_at > nodes.started_at)",
            (now, now + ttl, running, lease.node_id, lease.incarnation, ALIVE),
        )
        await self._call(_commit)
        if not renewed:
            raise NodeFencedError(
                f"node {lease.owner} is no longer alive in the database (taken over, left, or"
                " a newer incarnation registered)"
            )
        return attrs.evolve(lease, expires_at=now + ttl)

    async def leave_node(self, lease: NodeLease) -> None:
        await self._write(
            "UPDATE nodes SET state = ?, lease_expires_at = ?, running = 0"
            " WHERE node_id = ? AND incarnation = ? AND state = ?",
            (LEFT, time.time(), lease.node_id, lease.incarnation, ALIVE),
        )
        await self._call(_commit)

    async def _nodes(self, where: str, params: Sequence[Any], order: str) -> list[NodeInfo]:
        rows = await self._execute(
            "SELECT node_id, incarnation, host, pid, started_at, renewed_at, lease_expires_at,"
            f" state, running, taken_over_by FROM nodes {where} ORDER BY {order}",
            params,
        )
        return [NodeInfo(*row) for row in rows]

    def _ended(self, node_id: str, incarnation: str) -> bool:
        """Whether the incarnation is of a process that no longer owns the file."""
        return (node_id, incarnation) not in self._registered

    async def expired_nodes(self) -> list[NodeInfo]:
        now = time.time()
        alive = await self._nodes("WHERE state = ?", (ALIVE,), "lease_expires_at")
        return [
            node
            for node in alive
            if node.lease_expires_at < now or self._ended(node.node_id, node.incarnation)
        ]

    async def take_over(self, node: NodeInfo, by: str) -> bool:
        ended = self._ended(node.node_id, node.incarnation)
        won = await self._write(
            "UPDATE nodes SET state = ?, taken_over_by = ? WHERE node_id = ?"
            " AND incarnation = ? AND state = ? AND lease_expires_at < ?",
            (DEAD, by, node.node_id, node.incarnation, ALIVE, math.inf if ended else time.time()),
        )
        if won:
            await self._write(
                "UPDATE jobs SET owner = NULL, lease_expires_at = NULL"
                " WHERE owner = ? AND state = 'created'",
                (node.owner,),
            )
        await self._call(_commit)
        return bool(won)

    async def list_nodes(self) -> list[NodeInfo]:
        return await self._nodes("", (), "node_id, started_at")

    async def node_alive(self, owner: str) -> bool:
        node_id, _, incarnation = owner.rpartition("#")
        if self._ended(node_id, incarnation):
            return False
        rows = await self._execute(
            "SELECT 1 FROM nodes WHERE node_id = ? AND incarnation = ? AND state = ?"
            " AND lease_expires_at >= ?",
            (node_id, incarnation, ALIVE, time.time()),
        )
        return bool(rows)

    async def running_jobs_of(self, owner: str) -> list[Job]:
        rows = await self._execute(
            f"SELECT {_JOB_COLUMNS} FROM jobs WHERE owner = ? AND state = 'running' ORDER BY id",
            (owner,),
        )
        return [_job_from_row(*row) for row in rows]

    async def orphaned_owners(self) -> list[tuple[str, str | None]]:
        return [(owner, by) for owner, by in await self._execute(ORPHANED_OWNERS_SQL)]


def waiting_counts_sql(one_user: bool) -> str:
    """The waiting jobs per kind and user, and how many are ready at the first parameter
    (of the user in the second with ``one_user``). One user's are read through
    ``jobs_by_user``: by ``jobs_by_state`` (``+state`` keeps SQLite off it) a user's stats
    scanned every waiting job of every user (100,000: a third of a second per ``my_stats``,
    with the store waiting behind it)."""
    if one_user:
        return (
            "SELECT kind, user_id, count(*), sum(ready_at <= ?) FROM jobs"
            " WHERE user_id = ? AND +state = 'created' GROUP BY kind, user_id"
        )
    return (
        "SELECT kind, user_id, count(*), sum(ready_at <= ?) FROM jobs"
        " WHERE state = 'created' GROUP BY kind, user_id"
    )
