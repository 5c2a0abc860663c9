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

**Many nodes.** Several runtimes (nodes, :mod:`._nodes`) share one database: each registers
an incarnation in the ``nodes`` table (schema v4) and renews its lease there; leases are
compared with the database's clock (``extract(epoch FROM clock_timestamp())``), so the nodes'
clock skew does not matter. A node that stops renewing is taken over by one survivor, with one
conditional ``UPDATE ... WHERE state = 'alive' AND lease_expires_at < now`` (the row lock
makes exactly one winner). This replaced the single owner's session advisory lock (v3's
``owners`` table is dropped by v4).

**Outages.** A connection the server dropped (restart, ``pg_terminate_backend``, network) is
an outage (:func:`is_postgres_outage`): the store retries; the next call connects again. A node
that stays disconnected past its lease is fenced by its node actor (its jobs abandoned, a new
incarnation registered), since another node may have taken its jobs over meanwhile.

**Frozen writers.** A commit takes row locks (each user's head, the fenced job rows) and makes
several round trips before it ends; a claim holds its node's row ``FOR SHARE``. A process
frozen in between (SIGSTOP, a paused VM) would hold them for as long as it is frozen: every
other node's commits for those users, and the takeover of the frozen node itself, would wait
for it. Two answers. Every connection sets ``idle_in_transaction_session_timeout``
(``idle_timeout``, a runtime's lease TTL): the server ends a session frozen between two
statements. A session frozen in the middle of a pipeline stays *active* (no timeout applies):
each session is named after its node's incarnation (``application_name``), and the node that
takes a dead incarnation over ends its sessions first (``pg_terminate_backend``). The frozen
node finds its connection closed when it runs again (an outage, SQLSTATE 25P03 or 57P01: the
store retries on a new connection, where its stale writes are fenced). The lease is renewed
on a connection of its own (:data:`NODES`), so that a commit waiting on such locks never
delays a renewal.

**The queue** (schema v3, as SQLite's): the claim columns and a partial index over waiting
jobs, walked group by group in one transaction with ``FOR UPDATE SKIP LOCKED``
(:mod:`._postgres_queue`, which gives the SQL and the measured cost); lease renewal, queue
counts, idempotency keys, children and tags (a ``text[]`` under a GIN index).

**Sequences and fenced writes** (schema v4; issue 11: several runtimes on one database). A
commit numbers its events itself: for each user of the group, in user order (so concurrent
commits lock in one order and never deadlock on heads), ``user_heads.head`` is advanced by the
user's event count under its row lock, and the events get the numbers below the new head. The
lock serializes a user's commits, so ``user_seq`` order is commit order, with no gap (a
rolled-back commit gives its numbers back). :meth:`PostgresBackend.commit` returns the events
so numbered; the store publishes those. Each job written or deleted with an event is fenced:
the row changes only if its ``seq`` column is still the one the group's first change of it was
based on (:func:`fence_bases`); else the transaction is rolled back and
:class:`StaleWriteError` names the jobs lost, so that the store reloads and re-applies. A
commit that leaves a job waiting notifies the queue channel (:mod:`._pg_notify`).
``seq`` per job still comes from the store, as the primary key ``(job_id, seq)`` checks.

**The outage probe** (schema v5). The store finds the database back with :meth:`ping`, a
committed write that makes the ``probes`` table grow by a page (:func:`_ping_sync`): a full
disk or tablespace, where ``SELECT 1`` still succeeds, stays unavailable until space returns.

**The fan-out key.** ``meta`` keeps, beside the epoch, 32 random bytes made by the first node
to open the database (:attr:`PostgresBackend.fanout_key`): the nodes given no secret sign
their Redis fan-out messages with it (:mod:`._fanout`), so that they agree on a key without
being configured with one, and a publisher that is not one of them cannot be verified.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import AsyncIterator, Callable, Collection, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import attrs
import orjson
import psycopg
import trio
from psycopg import conninfo
from psycopg.pq import TransactionStatus

from ._backend import ClaimRequest, ClaimResult, JobQuery, Pruned, QueueStats
from ._codec import converter
from ._errors import StaleWriteError, StoreError, StoreUnavailableError, one_line, shown
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
from ._postgres_queue import claim_sync
from ._routing import QUEUE_CHANNEL
from ._scheduling import ready_at
from ._states import TERMINAL_STATES, JobState

__all__ = ["PostgresBackend", "is_postgres_outage", "redact_url"]

log = logging.getLogger("jobspine.postgres")
T = TypeVar("T")

#: The advisory lock key held while the schema is created or migrated (transaction-level).
MIGRATE_LOCK = 0x6A6F6275

#: Bound on closing the connection (it waits for the statement in progress).
CLOSE_TIMEOUT = 10.0
#: Seconds a session may idle inside a transaction before the server ends it (a frozen
#: process's locks released; see "Frozen writers"). A runtime passes its own, shorter than
#: the time from a node's last renewal to its takeover.
IDLE_TIMEOUT = 5.0
#: Seconds a takeover waits for a row lock before it gives up (tried again at the next scan):
#: a lock of a frozen node whose lease has not expired yet, or of one whose sessions this role
#: may not end, never holds the lease's connection long enough to delay a renewal. A runtime
#: passes its own, half its lease's margin.
TAKEOVER_LOCK_TIMEOUT = 1.0
#: The longest timeout PostgreSQL takes, in milliseconds (a 32-bit integer setting).
PG_MAX_TIMEOUT_MS = 2**31 - 1
#: The connections of a backend: the store's, and the lease's (see :meth:`PostgresBackend._run`).
STORE, NODES = "store", "nodes"

SCHEMA_VERSION = 5

#: A job's stored record as ``json``, for reading its top-level scalar fields in SQL.
#: PostgreSQL's json operators refuse a document holding the escape ``\u0000`` (text cannot
#: hold NUL), which a record holds for a NUL in any of its strings (an input, a step label, a
#: result). Each such escape is read as ``\u0001``: still valid JSON (a backslash that began
#: an escape begins one again; one that was escaped itself is followed by the text ``u0001``
#: instead of ``u0000``), only the content of strings changes, and no string is read through
#: it. ``E''`` strings: backslashes mean the same whatever ``standard_conforming_strings``.
_RECORD_JSON = "replace(record, E'\\\\u0000', E'\\\\u0001')::json"

# Ordered migrations: MIGRATIONS[n] brings the database from version n to n + 1. The versions
# follow the SQLite backend's up to v4; each backend's v5 is its own. Text that is compared or
# sorted is COLLATE "C": ids sort by creation bytewise, as in SQLite, whatever the database's
# locale.
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
        f"UPDATE jobs SET finished_at = ({_RECORD_JSON} ->> 'updated_at')::double precision"
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
        f"UPDATE jobs SET created_at = ({_RECORD_JSON} ->> 'created_at')::double precision,"
        " ready_at = CASE WHEN state = 'created'"
        f" THEN ({_RECORD_JSON} ->> 'created_at')::double precision END",
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
    # v4, several writers (issue 11): the job's last event number as a column, which a fenced
    # write compares with the one its change was based on; and every user's head in
    # user_heads, which a commit now advances under its row lock (see commit()).
    [
        "ALTER TABLE jobs ADD COLUMN seq integer NOT NULL DEFAULT 0",
        f"UPDATE jobs SET seq = ({_RECORD_JSON} ->> 'seq')::integer",
        "INSERT INTO user_heads (user_id, head, horizon)"
        " SELECT user_id, max(user_seq), 0 FROM events GROUP BY user_id"
        " ON CONFLICT (user_id) DO UPDATE SET head = greatest(user_heads.head, excluded.head)",
        # Nodes (:mod:`._nodes`): one row per incarnation of a node, its lease (the database's
        # clock, Unix seconds) and state; expired live rows found by the partial index. The
        # single owner's table goes.
        """CREATE TABLE nodes (
            node_id text COLLATE "C" NOT NULL,
            incarnation text COLLATE "C" NOT NULL,
            host text NOT NULL,
            pid integer NOT NULL,
            started_at double precision NOT NULL,
            renewed_at double precision NOT NULL,
            lease_expires_at double precision NOT NULL,
            state text NOT NULL,
            taken_over_by text,
            running integer NOT NULL DEFAULT 0,
            PRIMARY KEY (node_id, incarnation)
        )""",
        "CREATE INDEX nodes_alive ON nodes (lease_expires_at) WHERE state = 'alive'",
        "DROP TABLE IF EXISTS owners",
    ],
    # v5, the outage probe's table (:func:`_ping_sync`): empty between probes; no index and
    # no key, so nodes probing at once never wait for each other's rows. PLAIN storage: a
    # row's pad is kept in its page, uncompressed, never moved to a TOAST table, so that a
    # row takes most of a page and no page holds two.
    [
        "CREATE TABLE probes (pad bytea NOT NULL)",
        "ALTER TABLE probes ALTER COLUMN pad SET STORAGE PLAIN",
    ],
]

#: The database's clock in Unix seconds (leases never depend on a node's clock).
_NOW = "extract(epoch FROM clock_timestamp())::double precision"
_NODE_COLUMNS = (
    "node_id, incarnation, host, pid, started_at, renewed_at, lease_expires_at, state,"
    " running, taken_over_by"
)

_JOB_COLUMNS = "record, last_heartbeat_at, owner, lease_expires_at"

# A lease renewed meanwhile (renew_leases) is not moved back by a write of the same claim
# that carries the older expiry.
_UPSERT_JOB = (
    "INSERT INTO jobs (id, user_id, kind, state, attempt, last_heartbeat_at, record, finished_at,"
    " priority, created_at, ready_at, run_at, parent_id, idempotency_key, owner,"
    " lease_expires_at, tags, seq)"
    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
    " ON CONFLICT (id) DO UPDATE SET"
    " state = excluded.state, attempt = excluded.attempt,"
    " last_heartbeat_at = excluded.last_heartbeat_at, record = excluded.record,"
    " finished_at = excluded.finished_at, priority = excluded.priority,"
    " ready_at = excluded.ready_at, run_at = excluded.run_at, tags = excluded.tags,"
    " lease_expires_at = CASE WHEN excluded.owner IS NOT NULL AND excluded.owner = jobs.owner"
    " THEN greatest(excluded.lease_expires_at, jobs.lease_expires_at)"
    " ELSE excluded.lease_expires_at END,"
    " owner = excluded.owner, seq = excluded.seq"
)
#: The fenced write: the row is changed only if it is still the one the change was based on
#: (its ``seq``, the last parameter; 0 for a new job, whose id then must be free). Every change
#: of a job's state, attempt or owner while running is an event, so an equal ``seq`` also
#: means the same state, attempt and running owner; only a claim's mark on a waiting job, its
#: lease and heartbeats change a row without one. A row that lost is not returned.
#: A write that leaves the job running must also find it claimed by the writer: the claim's
#: mark (owner, no event) is the writer's until its start, and a takeover releasing that mark
#: (:meth:`PostgresBackend.take_over`) fences the start.
_WRITE_JOB = (
    _UPSERT_JOB + " WHERE jobs.seq = %s AND (excluded.state <> 'running'"
    " OR jobs.owner IS NOT DISTINCT FROM excluded.owner) RETURNING id"
)
_INSERT_EVENT = (
    "INSERT INTO events (job_id, seq, user_id, user_seq, type, record)"
    " VALUES (%s, %s, %s, %s, %s, %s)"
)
# Fenced by the attempt of a running job: every start (claimed or not) gives a new attempt,
# so (running, attempt) names one claim, hence one owner.
_HEARTBEAT = (
    "UPDATE jobs SET last_heartbeat_at = %s WHERE id = %s AND state = 'running' AND attempt = %s"
)
_DELETE_JOB = "DELETE FROM jobs WHERE id = %s"
_DELETE_FENCED = "DELETE FROM jobs WHERE id = %s AND seq = %s RETURNING id"
#: The transaction locks of the idempotency keys of a commit's keyed creates, one per
#: ``(user_id, key)`` (by hash: two keys that share one only wait for each other), taken in one
#: order by every commit so that two never wait on each other in a cycle. Two nodes creating
#: with one key at once commit in turn: the second then finds the first's job.
_LOCK_KEYS = (
    "SELECT count(pg_advisory_xact_lock(h.u, h.k)) FROM (SELECT DISTINCT hashtext(u) AS u,"
    " hashtext(k) AS k FROM unnest(%s::text[], %s::text[]) AS t(u, k) ORDER BY 1, 2) AS h"
)
#: The keyed creates whose key another job of their user already has within their window
#: (the parameters of :func:`key_checks`): each such create is another node's duplicate.
_KEY_TAKEN = (
    "SELECT c.id FROM unnest(%s::text[], %s::text[], %s::text[], %s::float8[])"
    " AS c(id, user_id, key, since) WHERE EXISTS (SELECT 1 FROM jobs j"
    ' WHERE j.user_id = c.user_id COLLATE "C" AND j.idempotency_key = c.key COLLATE "C"'
    " AND j.created_at >= c.since AND j.id <> c.id)"
)
#: A user's head advanced by the number of its events in a commit; returns the new head. The
#: row lock it takes serializes the user's commits, so user_seq order is commit order.
_ADVANCE_HEAD = (
    "INSERT INTO user_heads (user_id, head, horizon) VALUES (%s, %s, 0)"
    " ON CONFLICT (user_id) DO UPDATE SET head = user_heads.head + excluded.head RETURNING head"
)

# SQLSTATE classes and codes that say "the database is unavailable now": connection
# exceptions (08), transaction rollbacks such as serialization failures and deadlocks (40),
# insufficient resources (53: disk full, too many connections), operator intervention (57:
# admin shutdown, crash shutdown, cannot connect now, query canceled), system errors (58:
# I/O), a lock not available (55P03), a read-only transaction (25006: a standby) and a
# session the server ended for idling inside a transaction (25P03: the process was frozen).
_OUTAGE_CLASSES = frozenset({"08", "40", "53", "57", "58"})
#: A write in a read-only transaction (a standby, or default_transaction_read_only).
READ_ONLY_SQL_TRANSACTION = "25006"
_OUTAGE_CODES = frozenset({"55P03", READ_ONLY_SQL_TRANSACTION, "25P03"})


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


#: The probe table's pages (its size in blocks), read once the probe holds its lock.
_PROBE_BLOCKS = "SELECT pg_relation_size('probes') / current_setting('block_size')::bigint"
#: A probe row: a pad of a page less 512 bytes (7,680 of 8,192; a heap row holds at most
#: 8,160), more than half a page, so no page holds two of them. Returns the row's ctid and
#: the block it went to.
_PROBE_INSERT = (
    "INSERT INTO probes (pad) VALUES"
    " (convert_to(repeat(' ', current_setting('block_size')::int - 512), 'SQL_ASCII'))"
    " RETURNING ctid::text, (ctid::text::point)[0]::bigint"
)
#: Whether a session other than this one holds (or waits for) a lock on the probe table.
_PROBES_HELD = (
    "SELECT EXISTS (SELECT FROM pg_locks WHERE locktype = 'relation'"
    " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    " AND relation = 'probes'::regclass AND pid <> pg_backend_pid())"
)
#: Pages of the probe table past which a successful probe vacuums it (256 KiB of 8 KiB
#: pages): the table stays about this small even where autovacuum is off.
PROBE_VACUUM_PAGES = 32
#: Milliseconds a probe waits for a lock on ``probes`` (or a row's) before it fails, as an
#: outage (55P03): a session holding the table (``LOCK TABLE``, ``VACUUM FULL``, an
#: ``ALTER TABLE`` queued behind a reader) must not stop the store, which probes holding
#: its commit lock, in a wait without end. A lower ``lock_timeout`` of the session is kept.
PROBE_LOCK_TIMEOUT_MS = 1000
_PROBE_LOCK_TIMEOUT = (
    "SELECT set_config('lock_timeout', CASE WHEN current_setting('lock_timeout')::interval"
    " BETWEEN interval '1 ms' AND %(limit)s * interval '1 ms'"
    " THEN current_setting('lock_timeout') ELSE %(limit)s::text END, true)"
)


def _ping_sync(conn: psycopg.Connection[Any]) -> None:
    """:meth:`PostgresBackend.ping` on its connection: a write that needs new space in the
    database, committed, as a commit that adds an event often does. ``SELECT 1`` is not
    enough: it succeeds while the disk of the database (or of its tablespace) is full, where
    every commit that must extend a table fails (53100, "could not extend file"), and the
    store would report the database back while no such write can be made (``/readyz``
    ready, then unavailable again at the next write, over and over).

    So the probe inserts a row of most of a page into ``probes`` until one lands in a block
    past the table's end as it was when the probe began: the table grew, so a page was
    allocated on disk (PostgreSQL writes a new page at once). A row that landed in a page
    the table had (emptied by VACUUM, or by pruning, and not cut off) proves nothing:
    another goes, at most one per page the table had, as no page holds two rows. Then it
    deletes its rows and commits (which flushes the WAL). It fails with the disk full, and
    succeeds once the table can grow.

    What it leaves: no row, but a page of a dead row per successful probe (a failed one
    extends nothing, or leaves an aborted row, as dead). The store probes only while the
    database is unavailable and stops at the first success, so that is about a page per
    outage; autovacuum empties them past 50 dead rows and cuts them off the table's end.
    Where it does not (it is off, or behind), a successful probe that finds the table over
    :data:`PROBE_VACUUM_PAGES` pages vacuums it (unless another session holds a lock on
    the table, which would keep it 5 s from cutting the end): the pages go back to the file
    system, and the next probe needs new space again. Pages emptied but not cut off (a row
    in use after them) are filled at the next probe, a row each, then hold dead rows until
    the next VACUUM: once per VACUUM at most.

    Several nodes probing at once take no lock another waits for but the table's extension
    lock, for the instant of writing a page (and, while such a VACUUM cuts the table's end,
    its lock, which it gives up as soon as a probe waits): each inserts and deletes rows of
    its own, and there is no key. Contending for the extension lock, PostgreSQL extends by
    up to 20 pages per waiter at once, which the next probes fill (4 nodes probing 25 times
    each back to back: 150 to 300 pages without the probes' VACUUM, 0 to 20 with it).

    Cost (the 2-core test machine, PostgreSQL 15 on localhost, 500 probes back to back):
    1.1 to 1.3 ms a probe (median), 1.3 to 1.7 ms on average with a VACUUM every 32nd
    (``SELECT 1``: 0.15 ms). The store runs it once per ``heartbeat_flush_interval`` while
    the database is unavailable, never while it is available."""
    with conn.transaction():
        # For this transaction only: every wait for a lock below ends within the limit.
        conn.execute(_PROBE_LOCK_TIMEOUT, {"limit": PROBE_LOCK_TIMEOUT_MS})
        # Held to the end, and taken by every probe (no probe waits for another's): VACUUM
        # cannot cut the table's end meanwhile, so its count of pages read next stays a floor.
        conn.execute("LOCK TABLE probes IN ROW EXCLUSIVE MODE")
        row = conn.execute(_PROBE_BLOCKS).fetchone()
        blocks = int(row[0]) if row else 0
        placed: list[str] = []
        # Bounded: each row fills a page the table had, or lands past its end.
        for _ in range(blocks + 1):
            inserted = conn.execute(_PROBE_INSERT).fetchone()
            if inserted is None:  # pragma: no cover - an INSERT ... RETURNING returns its row
                break
            ctid, block = inserted
            placed.append(ctid)
            if block >= blocks:
                break
        conn.execute("DELETE FROM probes WHERE ctid = ANY(%s::tid[])", (placed,))
    if blocks + 1 > PROBE_VACUUM_PAGES:
        # Housekeeping, after the answer was made: its failure never fails the probe (the
        # database took the write), nor is it waited for behind another node's VACUUM.
        # Nor while another session holds a lock on the table (a reader's open transaction,
        # pg_dump's for the whole dump): VACUUM would then try for 5 s to take the lock that
        # cuts the table's end (PostgreSQL's VACUUM_TRUNCATE_LOCK_TIMEOUT, not settable), the
        # store's commit lock held meanwhile, and cut nothing. A later successful probe
        # vacuums instead; a probe's lock taken after this look is held for milliseconds.
        try:
            if conn.execute(_PROBES_HELD).fetchone() == (False,):
                conn.execute("VACUUM (SKIP_LOCKED) probes")
        except psycopg.Error as exc:
            log.warning("could not vacuum the probes table: %s", one_line(exc))


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
    open). ``url``: a libpq connection URL, ``postgresql://user@host:port/dbname``;
    ``connect_timeout``: seconds to connect; ``idle_timeout``: seconds a session may idle
    inside a transaction before the server ends it (a frozen process's locks released);
    ``takeover_lock_timeout``: seconds a takeover waits for a row lock before it gives up.

    Raises :class:`ValueError` at once for a URL libpq cannot parse or a bad timeout. On open:
    :class:`StoreError` if the server cannot be reached or the database cannot be used (a
    newer schema). Several backends (nodes) may have one database open at once."""

    #: Each commit numbers its events from the user's head, under the head's row lock.
    assigns_user_seq = True
    shared = True

    def __init__(
        self,
        url: str,
        *,
        connect_timeout: float = 5.0,
        idle_timeout: float = IDLE_TIMEOUT,
        takeover_lock_timeout: float = TAKEOVER_LOCK_TIMEOUT,
    ) -> None:
        try:
            conninfo.conninfo_to_dict(url)
        except psycopg.Error as exc:
            raise ValueError(f"not a PostgreSQL URL: {one_line(exc)}") from None
        if not connect_timeout > 0:
            raise ValueError(f"connect_timeout must be > 0 seconds, not {shown(connect_timeout)}")
        self.url = url
        self._connect_timeout = max(1, round(connect_timeout))
        for name, seconds in (
            ("idle_timeout", idle_timeout),
            ("takeover_lock_timeout", takeover_lock_timeout),
        ):
            if not 0.001 <= seconds < math.inf:
                raise ValueError(f"{name} must be >= 0.001 seconds, not {shown(seconds)}")
        # PostgreSQL takes this timeout in whole milliseconds up to INT_MAX (24.8 days): a
        # longer one (a runtime's lease TTL of a month) is that, which still ends a frozen
        # session within the lease; set as given, no connection opened ("Value exceeds
        # integer range") and the node could not start.
        self._idle_timeout_ms = min(round(idle_timeout * 1000), PG_MAX_TIMEOUT_MS)
        self._takeover_lock_ms = round(takeover_lock_timeout * 1000)
        # Two connections ("lanes"): the store's, and one for the node's lease and takeovers,
        # so that a commit waiting on another node's row locks never delays a renewal.
        self._conns: dict[str, psycopg.Connection[Any] | None] = {STORE: None, NODES: None}
        #: The events of the last commit that failed as an outage, whose transaction may have
        #: committed all the same (see :meth:`commit`); None after any other outcome.
        self._doubtful: list[JobEvent] | None = None
        #: The session's application_name: names this node's incarnation once it registered,
        #: so that the node taking it over can end its sessions (see "Frozen writers").
        self._application = "jobspine"
        self._applied: dict[str, str] = {}  # application_name each lane's session has
        self._open = False
        self._epoch = ""
        self._fanout_key = b""
        self._instance = ""  # new at every opening, see :attr:`instance`
        # One call at a time on a connection: a read never slips into a commit's transaction.
        self._locks = {STORE: trio.Lock(), NODES: trio.Lock()}

    @property
    def epoch(self) -> str:
        return self._epoch

    @property
    def fanout_key(self) -> bytes:
        """The database's 32 random bytes (``meta``, row ``fanout_key``, in hex), made once
        by the first node to open it: every node on the database signs its fan-out messages
        with it when it is given no secret (see :attr:`~._fanout.FanoutConfig.secret`).
        Whoever may read ``meta`` may sign such messages too: a role that should not (one
        given read access for reports, say) is kept from that table, or the nodes are given a
        secret. Set by :meth:`opened`."""
        return self._fanout_key

    @property
    def instance(self) -> str:
        """Identifies this opening (new at every :meth:`opened`): the payload of its queue
        notifications."""
        return self._instance

    def __repr__(self) -> str:
        return f"PostgresBackend({redact_url(self.url)!r})"

    # -- connection (each runs in a worker thread) ---------------------------------------------

    def _connect(self) -> psycopg.Connection[Any]:
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
        try:
            # Set here rather than as a connection option, which would replace the URL's own.
            conn.execute(
                "SELECT set_config('idle_in_transaction_session_timeout', %s, false)",
                (str(self._idle_timeout_ms),),
            )
        except Exception:
            conn.close()
            raise
        return conn

    def _migrate(self, conn: psycopg.Connection[Any]) -> tuple[str, bytes]:
        """Create or upgrade the schema in one transaction; returns the epoch and the fan-out
        key (see :attr:`fanout_key`). Raises :class:`StoreError` for a newer schema, or a
        stored key that is not 32 bytes in hex."""
        with conn.transaction():
            # Nodes opening the database at once migrate in turn.
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
                    else f"{redact_url(self.url)}: database schema version {shown(stored)} is not"
                    " one jobspine wrote"
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
            # The fan-out key: made by the first node to open the database, kept as the
            # epoch is (a row of meta, no schema change: a runtime of before ignores it). The
            # migration lock already serializes nodes opening at once; the insert that keeps
            # a key already there, then the read, make every node read the one stored even
            # without it. Never replaced: nodes running on it would stop verifying each other.
            conn.execute(
                "INSERT INTO meta VALUES ('fanout_key', %s) ON CONFLICT (key) DO NOTHING",
                (secrets.token_bytes(32).hex(),),
            )
            row = conn.execute("SELECT value FROM meta WHERE key = 'fanout_key'").fetchone()
            stored_key = row[0] if row else None
        try:
            key = bytes.fromhex(stored_key or "")
        except ValueError:
            key = b""
        if len(key) != 32:
            raise StoreError(
                f"{redact_url(self.url)}: the fan-out key in meta is not one jobspine wrote"
                " (32 bytes in hex); delete its row (key 'fanout_key') and restart every node:"
                " the first to open the database makes a new one"
            )
        return epoch, key

    def _live(self, lane: str) -> psycopg.Connection[Any]:
        """The lane's connection, connected again if the server dropped it (or on first use)."""
        conn = self._conns[lane]
        if conn is None or conn.closed:
            if not self._open:
                raise StoreError("the PostgreSQL database is not open")
            self._conns[lane] = None
            if conn is not None:
                log.warning("connection to %s lost; connecting again", redact_url(self.url))
            self._conns[lane] = conn = self._connect()
            self._applied[lane] = "jobspine"
        return conn

    def _name(self, conn: psycopg.Connection[Any], lane: str) -> None:
        """Name the lane's session after this node's current incarnation (once per change)."""
        if self._applied.get(lane) != self._application:
            conn.execute("SELECT set_config('application_name', %s, false)", (self._application,))
            self._applied[lane] = self._application

    async def _run(
        self,
        fn: Callable[[psycopg.Connection[Any]], T],
        *,
        repeatable: bool = False,
        lane: str = STORE,
    ) -> T:
        """Run ``fn`` on the ``lane``'s live connection in a worker thread, one call at a time.
        ``repeatable``: running ``fn`` twice leaves what running it once does (a read, a lease
        renewal), so it is run once more on a new connection if the server had dropped this one
        (which shows only when it is used); any other write is never repeated here (the store
        decides, see :func:`is_postgres_outage`)."""

        def call() -> T:
            conn = self._live(lane)
            try:
                self._name(conn, lane)
                return fn(conn)
            except psycopg.Error as exc:
                if exc.sqlstate == READ_ONLY_SQL_TRANSACTION:
                    # A write refused as read-only: the session's default_transaction_read_only
                    # was read when it connected (ALTER DATABASE or ROLE ... SET), and a reset
                    # since reaches new sessions only; kept, it would refuse every write for
                    # good. Closed and forgotten (it was not lost: no warning), so that the
                    # next call connects again and is read-only only while the server says so.
                    conn.close()
                    self._conns[lane] = None
                    raise
                # A connection the server dropped in the middle of a batch (executemany runs
                # in pipeline mode) may not say it is broken, only be left mid-transaction
                # (its pipeline aborted) where an autocommit connection is idle after any
                # error: it is closed here, so that the next call connects again.
                broken = conn.broken or conn.info.transaction_status is not TransactionStatus.IDLE
                if broken and not conn.closed:
                    conn.close()
                if not (repeatable and broken):
                    raise
            conn = self._live(lane)
            self._name(conn, lane)
            return fn(conn)

        async with self._locks[lane]:
            return await trio.to_thread.run_sync(call)

    async def _read(self, fn: Callable[[psycopg.Connection[Any]], T]) -> T:
        return await self._run(fn, repeatable=True)

    @asynccontextmanager
    async def opened(self) -> AsyncIterator[None]:
        """Open the database for the block: connect, migrate.

        A server that cannot be reached or a database that cannot be used raises
        :class:`StoreError` (one line, the password left out). Every way out closes the
        connection."""
        where = redact_url(self.url)
        self._instance = new_id()

        def open_() -> tuple[psycopg.Connection[Any], tuple[str, bytes]]:
            conn = self._connect()
            try:
                return conn, self._migrate(conn)
            except BaseException:
                conn.close()
                raise

        try:
            # Shielded: a connection opened by a thread the caller stopped waiting for would
            # stay open with nobody to close it. Opening is bounded by connect_timeout.
            with trio.CancelScope(shield=True):
                conn, (epoch, key) = await trio.to_thread.run_sync(open_)
        except psycopg.Error as exc:
            raise StoreError(f"database {where}: cannot open: {one_line(exc)}") from None
        self._conns[STORE], self._epoch, self._open = conn, epoch, True
        self._fanout_key = key
        self._applied[STORE], self._application = "jobspine", "jobspine"
        try:
            yield
        finally:
            self._open = False
            with trio.move_on_after(CLOSE_TIMEOUT, shield=True):
                for lane, lock in self._locks.items():
                    async with lock:
                        last, self._conns[lane] = self._conns[lane], None
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
        """Raise unless a write that needs new space can be committed now (see
        :func:`_ping_sync`); connects again if the connection was lost. Repeatable: a probe
        leaves nothing, so one cut short by a dropped connection is run again on a new one.

        A ``probes`` table this session cannot use (dropped, or a role not granted it: class
        42, as 42P01 or 42501) raises :class:`StoreUnavailableError` naming it, an outage: the
        probe cannot tell that the database is back, and the store, which stops at an error
        it does not take for an outage, must not stop the runtime for it (a write that
        succeeds still ends the outage)."""
        try:
            await self._run(_ping_sync, repeatable=True)
        except psycopg.Error as exc:
            if exc.sqlstate is None or exc.sqlstate[:2] != "42":
                raise
            raise StoreUnavailableError(
                f"the outage probe cannot use the table probes ({one_line(exc)};"
                f" SQLSTATE {exc.sqlstate}): grant this role SELECT, INSERT and DELETE on it;"
                " dropped, create it again as schema v5 did: CREATE TABLE probes (pad bytea"
                " NOT NULL); ALTER TABLE probes ALTER COLUMN pad SET STORAGE PLAIN"
            ) from exc

    async def commit(
        self,
        jobs: Collection[Job],
        events: Sequence[JobEvent],
        deleted: Collection[str],
        heartbeats: Mapping[str, tuple[int, float]],
        *,
        progress_only: Collection[str] = (),
        keyed: Mapping[str, float] | None = None,
    ) -> list[JobEvent]:
        """One transaction: each user's head advanced (users in order, so that concurrent
        commits lock them in one order) and the events numbered from it, whatever
        ``user_seq`` they were staged with; then the fenced job writes and deletes (see
        :func:`commit_plan`). Returns the events as stored. Raises :class:`StaleWriteError`
        (nothing written) if a job is no longer what its change was based on. Every job is
        written whole (its fence compares the whole row): ``progress_only`` is not used.
        The keys of ``keyed`` creates are locked first (before any head, so that commits
        never wait on each other in a cycle) and checked free (:data:`_KEY_TAKEN`): another
        node's create of the same key, committed since the store looked it up, makes this
        commit a :class:`StaleWriteError` naming the new job, nothing written."""
        counts = user_counts(events)
        keys = key_checks(jobs, keyed or {})
        # The same group again after its commit failed as an outage: the connection may have
        # been lost after the server committed it, before the answer came (see
        # :func:`landed_events`). Repeated blindly, its fenced writes found the rows it had
        # written and lost (StaleWriteError): a create the caller was told failed though its
        # job was there and ran, a checkpoint stored twice, and the events it had committed
        # never published, so this node's clients saw a gap.
        doubtful = self._doubtful is not None and self._doubtful == list(events)
        self._doubtful = None

        def fn(conn: psycopg.Connection[Any]) -> list[JobEvent]:
            with conn.transaction(), conn.cursor() as cursor:
                if doubtful:
                    stored = landed_events(cursor, events)
                    if stored is not None:
                        return stored
                if keys:
                    cursor.execute(_LOCK_KEYS, (keys[1], keys[2]))
                    taken = cursor.execute(_KEY_TAKEN, keys).fetchall()
                    if taken:
                        raise StaleWriteError(sorted(row[0] for row in taken))
                heads: dict[str, int] = {}
                if counts:
                    cursor.executemany(_ADVANCE_HEAD, counts, returning=True)
                    for user_id, _ in counts:
                        row = cursor.fetchone()
                        heads[user_id] = int(row[0]) if row else 0
                        cursor.nextset()
                numbered = number_events(events, heads)
                for sql, rows, fenced in commit_plan(jobs, numbered, deleted, heartbeats):
                    if not fenced:
                        cursor.executemany(sql, rows)
                        continue
                    cursor.executemany(sql, rows, returning=True)
                    written = set()
                    while True:
                        row = cursor.fetchone()
                        if row is not None:
                            written.add(row[0])
                        if not cursor.nextset():
                            break
                    lost = sorted(row[0] for row in rows if row[0] not in written)
                    if lost:  # before the events, whose keys it may hold
                        raise StaleWriteError(lost)  # rolls the transaction back
                if any(job.state is JobState.CREATED for job in jobs):
                    # Delivered at commit (once per transaction): other nodes claim now. The
                    # payload names this opening, so that its own listener ignores it.
                    cursor.execute("SELECT pg_notify(%s, %s)", (QUEUE_CHANNEL, self._instance))
                return numbered

        try:
            return await self._run(fn)
        except Exception as exc:
            if events and is_postgres_outage(exc):
                self._doubtful = list(events)
            raise

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
        if query.parent_ids is not None:
            where.append("parent_id = ANY(%s)")
            params.append(sorted(query.parent_ids))
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

    async def read_records(
        self, room_kind: str, ident: str, after_seq: int, limit: int
    ) -> list[StoredEvent]:
        if room_kind == "job":
            sql = (
                "SELECT job_id, user_id, seq, user_seq, record FROM events"
                " WHERE job_id = %s AND seq > %s ORDER BY seq LIMIT %s"
            )
        else:
            sql = (
                "SELECT job_id, user_id, seq, user_seq, record FROM events"
                " WHERE user_id = %s AND user_seq > %s ORDER BY user_seq LIMIT %s"
            )
        params = (ident, after_seq, limit)
        rows = await self._read(lambda conn: conn.execute(sql, params).fetchall())
        return [StoredEvent(j, u, s, us, r.encode()) for j, u, s, us, r in rows]

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

    async def oldest_finished(
        self, kind: str, limit: int, keyed_since: float
    ) -> list[tuple[str, float]]:
        rows = await self._read(
            lambda conn: conn.execute(
                "SELECT id, finished_at FROM jobs WHERE kind = %s AND finished_at IS NOT NULL"
                " AND (idempotency_key IS NULL OR created_at < %s)"
                " AND NOT EXISTS (SELECT 1 FROM jobs AS c WHERE c.parent_id = jobs.id)"
                " ORDER BY finished_at, id LIMIT %s",
                (kind, keyed_since, limit),
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

    async def keys_since(self, user_id: str, since: float, limit: int) -> list[str]:
        rows = await self._read(
            lambda conn: conn.execute(
                "SELECT idempotency_key FROM jobs WHERE user_id = %s"
                " AND idempotency_key IS NOT NULL AND created_at >= %s LIMIT %s",
                (user_id, since, limit),
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

    # -- nodes ------------------------------------------------------------------------------------

    async def register_node(
        self,
        node_id: str,
        incarnation: str,
        ttl: float,
        host: str,
        pid: int,
        replacing: str | None = None,
    ) -> NodeLease:
        def fn(conn: psycopg.Connection[Any]) -> NodeLease:
            with conn.transaction():
                # Serialises registrations of one node id: two starting at once cannot both
                # find no live incarnation.
                conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (node_id,))
                row = conn.execute(
                    f"SELECT incarnation, host, pid, lease_expires_at - {_NOW} FROM nodes"
                    f" WHERE node_id = %s AND state = %s AND lease_expires_at >= {_NOW}"
                    " AND incarnation IS DISTINCT FROM %s LIMIT 1",
                    (node_id, ALIVE, replacing),
                ).fetchone()
                if row is not None:
                    raise NodeIdInUseError(node_id, *row)
                conn.execute(
                    f"UPDATE nodes SET lease_expires_at = {_NOW} - 0.001 WHERE node_id = %s"
                    " AND incarnation = %s AND state = %s",
                    (node_id, replacing, ALIVE),
                )
                (expires,) = conn.execute(
                    "INSERT INTO nodes (node_id, incarnation, host, pid, started_at, renewed_at,"
                    f" lease_expires_at, state) VALUES (%s, %s, %s, %s, {_NOW}, {_NOW},"
                    f" {_NOW} + %s, %s) RETURNING lease_expires_at",
                    (node_id, incarnation, host, pid, ttl, ALIVE),
                ).fetchone() or (0.0,)
            return NodeLease(node_id, incarnation, expires)

        lease = await self._run(fn, lane=NODES)
        # Each lane names its session so at its next call: until then a takeover of this
        # incarnation finds that session under the previous name (it ends the others).
        self._application = application_name(incarnation)
        return lease

    async def renew_node(self, lease: NodeLease, ttl: float, running: int) -> NodeLease:
        def fn(conn: psycopg.Connection[Any]) -> float | None:
            row = conn.execute(
                f"UPDATE nodes SET renewed_at = {_NOW}, lease_expires_at = {_NOW} + %s,"
                " running = %s WHERE node_id = %s AND incarnation = %s AND state = %s"
                " AND NOT EXISTS (SELECT 1 FROM nodes AS newer WHERE newer.node_id ="
                " nodes.node_id AND newer.started_at > nodes.started_at)"
                " RETURNING lease_expires_at",
                (ttl, running, lease.node_id, lease.incarnation, ALIVE),
            ).fetchone()
            return None if row is None else float(row[0])

        # Repeatable: the lease's end is counted from the statement that ran. A connection
        # the server dropped between renewals (a restart, a pooler, an administrator) then
        # costs no renewal: failed, the next was a whole interval later, and drops about once
        # an interval fenced every node at once.
        expires = await self._run(fn, repeatable=True, lane=NODES)
        if expires is None:
            raise NodeFencedError(
                f"node {lease.owner} is no longer alive in the database (taken over, left, or"
                " a newer incarnation registered)"
            )
        return NodeLease(lease.node_id, lease.incarnation, expires)

    async def leave_node(self, lease: NodeLease) -> None:
        await self._run(
            lambda conn: conn.execute(
                f"UPDATE nodes SET state = %s, lease_expires_at = {_NOW}, running = 0"
                " WHERE node_id = %s AND incarnation = %s AND state = %s",
                (LEFT, lease.node_id, lease.incarnation, ALIVE),
            ),
            repeatable=True,
            lane=NODES,
        )

    async def _nodes(self, where: str, params: Sequence[Any], order: str) -> list[NodeInfo]:
        def fn(conn: psycopg.Connection[Any]) -> list[NodeInfo]:
            rows = conn.execute(
                f"SELECT {_NODE_COLUMNS} FROM nodes {where} ORDER BY {order}", params
            ).fetchall()
            return [NodeInfo(*row) for row in rows]

        return await self._run(fn, repeatable=True, lane=NODES)

    async def expired_nodes(self) -> list[NodeInfo]:
        return await self._nodes(
            f"WHERE state = %s AND lease_expires_at < {_NOW}", (ALIVE,), "lease_expires_at"
        )

    async def take_over(self, node: NodeInfo, by: str) -> bool:
        """Mark ``node`` dead (if its lease is still expired) and release its claims, after
        ending its database sessions: a frozen process may hold row locks (mid-commit, in a
        pipeline, where no idle timeout applies) that this update and the recovery of its
        jobs would wait on for as long as it stays frozen."""

        def fn(conn: psycopg.Connection[Any]) -> bool:
            try:
                conn.execute(
                    "SELECT pg_terminate_backend(a.pid) FROM pg_stat_activity a, nodes n"
                    " WHERE a.application_name = %s AND a.pid <> pg_backend_pid()"
                    f" AND n.node_id = %s AND n.incarnation = %s AND n.state = %s"
                    f" AND n.lease_expires_at < {_NOW}",
                    (application_name(node.incarnation), node.node_id, node.incarnation, ALIVE),
                )
            except psycopg.errors.InsufficientPrivilege as exc:
                log.warning(
                    "cannot end the sessions of node %s (its row locks are released when it"
                    " runs again or its connections drop): %s",
                    node.owner,
                    one_line(exc),
                )
            with conn.transaction():
                # A lock this waits on longer than the idle timeout is a live node's (frozen,
                # its lease not expired yet) or one this role may not free: given up (55P03,
                # an outage: tried again at the next scan) so that the renewals on this lane
                # never wait on it.
                conn.execute(
                    "SELECT set_config('lock_timeout', %s, true)", (str(self._takeover_lock_ms),)
                )
                # The row lock makes one winner: a second taker waits, then finds it dead.
                won = conn.execute(
                    "UPDATE nodes SET state = %s, taken_over_by = %s WHERE node_id = %s"
                    f" AND incarnation = %s AND state = %s AND lease_expires_at < {_NOW}",
                    (DEAD, by, node.node_id, node.incarnation, ALIVE),
                ).rowcount
                if won:
                    conn.execute(
                        "UPDATE jobs SET owner = NULL, lease_expires_at = NULL"
                        " WHERE owner = %s AND state = 'created'",
                        (node.owner,),
                    )
            return bool(won)

        return await self._run(fn, lane=NODES)

    async def list_nodes(self) -> list[NodeInfo]:
        return await self._nodes("", (), "node_id, started_at")

    async def node_alive(self, owner: str) -> bool:
        node_id, _, incarnation = owner.rpartition("#")

        def fn(conn: psycopg.Connection[Any]) -> bool:
            row = conn.execute(
                "SELECT 1 FROM nodes WHERE node_id = %s AND incarnation = %s AND state = %s"
                f" AND lease_expires_at >= {_NOW}",
                (node_id, incarnation, ALIVE),
            ).fetchone()
            return row is not None

        return await self._run(fn, repeatable=True, lane=NODES)

    async def orphaned_owners(self) -> list[tuple[str, str | None]]:
        rows = await self._read(lambda conn: conn.execute(ORPHANED_OWNERS_SQL).fetchall())
        return [(owner, by) for owner, by in rows]

    async def running_jobs_of(self, owner: str) -> list[Job]:
        def fn(conn: psycopg.Connection[Any]) -> list[Job]:
            rows = conn.execute(
                f"SELECT {_JOB_COLUMNS} FROM jobs WHERE owner = %s AND state = 'running'"
                " ORDER BY id",
                (owner,),
            ).fetchall()
            return [_job_from_row(*row) for row in rows]

        return await self._read(fn)


def application_name(incarnation: str) -> str:
    """The ``application_name`` of a node incarnation's sessions (at most 63 bytes: an
    incarnation is a 26-character id)."""
    return f"jobspine {incarnation}"


def user_counts(events: Sequence[JobEvent]) -> list[tuple[str, int]]:
    """``(user_id, events)`` per user of ``events``, in user order (the order of their locks)."""
    counts: dict[str, int] = {}
    for event in events:
        counts[event.user_id] = counts.get(event.user_id, 0) + 1
    return sorted(counts.items())


def key_checks(
    jobs: Collection[Job], keyed: Mapping[str, float]
) -> tuple[list[str], list[str], list[str], list[float]] | None:
    """The parameters of :data:`_KEY_TAKEN` for the ``keyed`` creates among ``jobs`` (ids,
    users, keys, window starts), None when there is none."""
    rows = sorted(
        (job.id, job.user_id, job.idempotency_key, keyed[job.id])
        for job in jobs
        if job.id in keyed and job.idempotency_key is not None
    )
    if not rows:
        return None
    ids, users, keys, since = (list(column) for column in zip(*rows, strict=True))
    return ids, users, keys, since


def landed_events(cursor: psycopg.Cursor[Any], events: Sequence[JobEvent]) -> list[JobEvent] | None:
    """``events`` as stored (numbered), if a commit of them landed; else None. Each event's
    ``(job_id, seq)`` is taken once (the commit that wrote it was fenced on ``seq - 1``), so
    its record, identical but for the ``user_seq`` the commit gave it, can only be this
    group's: one transaction wrote all of them or none."""
    rows = cursor.execute(
        "SELECT e.job_id, e.seq, e.user_seq, e.record FROM events e"
        " JOIN unnest(%s::text[], %s::integer[]) AS k(job_id, seq)"
        " ON e.job_id = k.job_id AND e.seq = k.seq",
        ([e.job_id for e in events], [e.seq for e in events]),
    ).fetchall()
    stored = {(job_id, seq): (user_seq, record) for job_id, seq, user_seq, record in rows}
    numbered = []
    for event in events:
        found = stored.get((event.job_id, event.seq))
        if found is None:
            return None
        event = attrs.evolve(event, user_seq=found[0])
        if encode_event(event).decode() != found[1]:
            return None
        numbered.append(event)
    return numbered


def number_events(events: Sequence[JobEvent], heads: Mapping[str, int]) -> list[JobEvent]:
    """``events`` with their final ``user_seq``: each user's, in order, end at its new head
    (``heads``, as advanced by their count)."""
    next_seq = {
        user_id: head - n + 1
        for user_id, n in user_counts(events)
        if (head := heads.get(user_id)) is not None
    }
    numbered = []
    for event in events:
        user_seq = next_seq.get(event.user_id)
        if user_seq is None:
            numbered.append(event)
            continue
        next_seq[event.user_id] = user_seq + 1
        numbered.append(attrs.evolve(event, user_seq=user_seq))
    return numbered


def fence_bases(events: Sequence[JobEvent]) -> dict[str, int]:
    """Per job of ``events``: the ``seq`` its first change in the group was based on (one
    less than its first event's), which the stored row must still have."""
    bases: dict[str, int] = {}
    for event in events:
        base = bases.get(event.job_id)
        if base is None or event.seq - 1 < base:
            bases[event.job_id] = event.seq - 1
    return bases


def commit_plan(
    jobs: Collection[Job],
    events: Sequence[JobEvent],
    deleted: Collection[str],
    heartbeats: Mapping[str, tuple[int, float]],
) -> list[tuple[str, list[tuple[Any, ...]], bool]]:
    """The statements of one commit after the heads (``events`` already numbered), each with
    its rows (``executemany``) and whether it is fenced (returns the id of each row written:
    a missing one lost), in order; sans-I/O, so that ``bench/pg_modes.py`` runs exactly these
    through either driver. Jobs and deletes with an event in the group are fenced by the
    ``seq`` it was based on (:func:`fence_bases`); others (a backend used directly, without the
    store) are written as given. Rows go in id order: concurrent commits lock them in one."""
    plan: list[tuple[str, list[tuple[Any, ...]], bool]] = []
    bases = fence_bases(events)
    fenced: list[tuple[Any, ...]] = []
    unfenced: list[tuple[Any, ...]] = []
    for j in sorted(jobs, key=lambda job: job.id):
        row = (
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
            j.seq,
        )
        base = bases.get(j.id)
        if base is None:
            unfenced.append(row)
        else:
            fenced.append((*row, base))
    if unfenced:
        plan.append((_UPSERT_JOB, unfenced, False))
    if fenced:
        plan.append((_WRITE_JOB, fenced, True))
    # Before the events: a write that lost is found before their keys clash.
    if deleted:
        gone = sorted(deleted)
        plain = [(job_id,) for job_id in gone if job_id not in bases]
        checked = [(job_id, bases[job_id]) for job_id in gone if job_id in bases]
        if plain:
            plan.append((_DELETE_JOB, plain, False))
        if checked:
            plan.append((_DELETE_FENCED, checked, True))
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
                        encode_event(e).decode(),
                    )
                    for e in events
                ],
                False,
            )
        )
    if heartbeats:
        plan.append(
            (
                _HEARTBEAT,
                [(at, job_id, attempt) for job_id, (attempt, at) in sorted(heartbeats.items())],
                False,
            )
        )
    return plan
