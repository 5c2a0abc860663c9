"""The PostgreSQL backend against the real local server: schema, ownership, outages, and
``jobspine serve --store postgresql://...`` end to end (the backend contract itself runs in
``test_store.py`` and ``test_retention.py`` on every backend)."""

from __future__ import annotations

import os
import secrets
import socket
import threading
from contextlib import AsyncExitStack
from typing import Any

import attrs
import orjson
import psycopg
import pytest
import trio
from psycopg import errors, sql

from actors import (
    EventHub,
    JobError,
    JobState,
    NodeIdInUseError,
    PostgresBackend,
    RuntimeConfig,
    StoreActor,
    StoreConfig,
    StoreError,
    open_runtime,
)
from actors._backend import is_outage
from actors._ids import new_id
from actors._postgres import PROBE_LOCK_TIMEOUT_MS, PROBE_VACUUM_PAGES
from transport import open_client

from .serving import free_port
from .test_cli import COMMAND, serve_process
from .test_store import open_store


def pg_sessions(url: str) -> list[int]:
    """Backend pids of jobspine's sessions on the database of ``url``."""
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
            " AND application_name = 'jobspine'"
        ).fetchall()
    return [pid for (pid,) in rows]


def terminate_sessions(url: str) -> int:
    """Drop jobspine's connections to the database, as a server restart would."""
    pids = pg_sessions(url)
    with psycopg.connect(url, autocommit=True) as conn:
        for pid in pids:
            # Waits (up to 5 s) until the session has ended and given its locks back.
            conn.execute("SELECT pg_terminate_backend(%s, 5000)", (pid,))
    return len(pids)


async def test_epoch_persists_and_a_newer_schema_is_refused(pg_url: str) -> None:
    backend = PostgresBackend(pg_url)
    async with backend.opened():
        epoch, key = backend.epoch, backend.fanout_key
        assert epoch and len(key) == 32
    async with backend.opened():
        assert (backend.epoch, backend.fanout_key) == (epoch, key)
    with psycopg.connect(pg_url, autocommit=True) as conn:
        meta: dict[str, str] = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        # And the fan-out key (test_fanout_signing), made once: the same at every opening.
        assert meta == {"schema_version": "5", "epoch": epoch, "fanout_key": key.hex()}
        conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(StoreError, match="schema v99 is newer than this runtime's v5"):
        async with backend.opened():
            pass  # pragma: no cover


async def test_nodes_share_a_database_and_a_live_node_id_is_refused(pg_url: str) -> None:
    """Two runtimes with their own node ids run on one database at once (the single owner's
    lock is gone); a third with a node id that is alive (here in this very process) is
    refused with ``node_id_in_use`` naming the holder, having written nothing."""
    one = RuntimeConfig(node_id="n1", lease_ttl=2, lease_renew_interval=0.2)
    async with open_runtime(pg_url, config=one) as first:
        async with open_runtime(pg_url, config=attrs.evolve(one, node_id="n2")) as second:
            assert second.epoch == first.epoch
            nodes = await first.store_actor.backend.list_nodes()
            assert {(n.node_id, n.state) for n in nodes} == {("n1", "alive"), ("n2", "alive")}
        with pytest.raises(NodeIdInUseError) as info:
            async with open_runtime(pg_url, config=one):
                pass  # pragma: no cover
        assert info.value.code == "node_id_in_use"
        assert (info.value.host, info.value.pid) == (socket.gethostname(), os.getpid())
        assert "node id 'n1' is alive (process" in str(info.value)
        nodes = await first.store_actor.backend.list_nodes()
        assert {(n.node_id, n.state) for n in nodes} == {("n1", "alive"), ("n2", "left")}


def test_bad_urls_are_refused_at_once() -> None:
    with pytest.raises(ValueError, match="not a PostgreSQL URL"):
        PostgresBackend("postgresql://host:notaport:/x?bad=1=2")


async def test_an_unreachable_server_is_a_one_line_store_error() -> None:
    url = f"postgresql://postgres:hunter2@127.0.0.1:{free_port()}/nowhere"
    with pytest.raises(StoreError) as info:
        async with open_runtime(url):
            pass  # pragma: no cover
    message = str(info.value)
    assert "cannot open" in message and "\n" not in message
    assert "hunter2" not in message


async def test_postgres_errors_are_told_outage_or_tied_to_the_write(pg_url: str) -> None:
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id integer PRIMARY KEY, name text)")
        conn.execute("INSERT INTO t VALUES (1, 'a')")
        tied: list[Exception] = []
        for statement, params in [
            ("INSERT INTO t VALUES (1, 'b')", ()),  # unique violation
            ("INSERT INTO t VALUES (%s, %s)", (2, "nul\x00")),  # text cannot hold NUL
            ("SELECT * FROM missing", ()),  # undefined table
            ("INSERT INTO t VALUES (%s, 'x')", ("not a number",)),  # bad data
        ]:
            try:
                conn.execute(statement, params)
            except psycopg.Error as exc:
                tied.append(exc)
        assert len(tied) == 4
        assert not any(is_outage(exc) for exc in tied), tied
        pid = conn.info.backend_pid
        with psycopg.connect(pg_url, autocommit=True) as other:
            other.execute("SELECT pg_terminate_backend(%s)", (pid,))
        outages: list[Exception] = []
        for _ in range(2):  # the termination, then the use of the closed connection
            try:
                conn.execute("SELECT 1")
            except psycopg.Error as exc:
                outages.append(exc)
        assert len(outages) == 2 and all(is_outage(exc) for exc in outages), outages
    assert is_outage(errors.SerializationFailure("could not serialize access"))
    assert is_outage(errors.DeadlockDetected("deadlock detected"))
    assert is_outage(errors.AdminShutdown("terminating connection"))
    assert not is_outage(errors.CheckViolation("violates check constraint"))


def probe_table(url: str) -> tuple[int, int]:
    """The ``probes`` table's rows and pages (blocks of its file)."""
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*), pg_relation_size('probes') / current_setting('block_size')::int"
            " FROM probes"
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def vacuum_probes(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM probes")


async def test_the_probe_makes_the_table_grow_and_leaves_nothing(pg_url: str) -> None:
    """The outage probe (``ping``) commits a row that needs a new page: one page past the
    table's end per probe, whatever pages VACUUM emptied (filled first, as no proof), no row
    left; VACUUM gives every page back, and the probe runs it past PROBE_VACUUM_PAGES. A
    probe of another node, its row not committed yet, holds no lock this one waits for."""
    backend = PostgresBackend(pg_url)
    async with backend.opened():
        assert await trio.to_thread.run_sync(probe_table, pg_url) == (0, 0)
        for _ in range(200):
            await backend.ping()
        # No row left, a page of a dead row per probe, and never more than the probe's own
        # VACUUM allows, whether autovacuum runs or not (the test server's is off).
        rows, pages = await trio.to_thread.run_sync(probe_table, pg_url)
        assert rows == 0 and 1 <= pages <= PROBE_VACUUM_PAGES + 1
        await trio.to_thread.run_sync(vacuum_probes, pg_url)
        assert await trio.to_thread.run_sync(probe_table, pg_url) == (0, 0)
        for _ in range(5):
            await backend.ping()
        assert await trio.to_thread.run_sync(probe_table, pg_url) == (0, 5)
        # Another node's probe in progress, its row not committed, on the last page: VACUUM
        # empties the others but cannot cut them off. A row there would need no new space:
        # the probe fills them all, then makes the table grow by one page, without waiting
        # for the other's row or its lock.
        with psycopg.connect(pg_url, autocommit=True) as other, other.transaction():
            other.execute(
                "INSERT INTO probes (pad) VALUES (convert_to(repeat(' ', 7680), 'SQL_ASCII'))"
            )
            await trio.to_thread.run_sync(vacuum_probes, pg_url)
            rows, pages = await trio.to_thread.run_sync(probe_table, pg_url)
            assert rows == 0 and pages >= 5
            with trio.fail_after(2):
                await backend.ping()
            assert await trio.to_thread.run_sync(probe_table, pg_url) == (0, pages + 1)
            other.execute("DELETE FROM probes")
        await trio.to_thread.run_sync(vacuum_probes, pg_url)
        assert await trio.to_thread.run_sync(probe_table, pg_url) == (0, 0)


async def test_a_reader_of_the_probes_table_does_not_slow_the_probe(pg_url: str) -> None:
    """Another session reads ``probes`` in an open transaction (pg_dump holds such a lock on
    every table for the whole dump) while the table is past PROBE_VACUUM_PAGES: each probe
    still takes milliseconds, and the next one after the reader goes vacuums the table.
    Failed before: each probe took 5 s (its VACUUM waiting to cut the table's end, which
    the reader's lock forbids), holding the store's commit lock, and cut nothing."""
    backend = PostgresBackend(pg_url)
    async with backend.opened():
        for _ in range(PROBE_VACUUM_PAGES):
            await backend.ping()
        with psycopg.connect(pg_url, autocommit=True) as reader:
            reader.execute("BEGIN")
            reader.execute("SELECT count(*) FROM probes")
            for _ in range(3):
                began = trio.current_time()
                await backend.ping()
                assert trio.current_time() - began < 2
            reader.execute("ROLLBACK")
        rows, pages = await trio.to_thread.run_sync(probe_table, pg_url)
        assert rows == 0 and pages == PROBE_VACUUM_PAGES + 3
        await backend.ping()
        rows, pages = await trio.to_thread.run_sync(probe_table, pg_url)
        assert rows == 0 and pages <= 1


async def test_nodes_probing_at_once_do_not_wait_for_each_other(pg_url: str) -> None:
    """Several nodes on one database probe it at once (an outage seen by all): each probe
    inserts and deletes rows of its own, no key, so none waits for another's row; every one
    succeeds within a short lock timeout and none leaves a row."""
    with psycopg.connect(pg_url, autocommit=True) as conn:
        # The nodes' sessions wait at most this long for a lock: a wait fails the probe.
        conn.execute(
            sql.SQL("ALTER DATABASE {} SET lock_timeout = '200ms'").format(
                sql.Identifier(conn.info.dbname)
            )
        )
    backends = [PostgresBackend(pg_url) for _ in range(4)]
    async with AsyncExitStack() as stack:
        for backend in backends:
            await stack.enter_async_context(backend.opened())

        async def probe(backend: PostgresBackend) -> None:
            for _ in range(25):
                await backend.ping()

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for backend in backends:
                    nursery.start_soon(probe, backend)
    # No row left; the pages (several at a time while they contended for the extension
    # lock) all given back by VACUUM.
    rows, pages = await trio.to_thread.run_sync(probe_table, pg_url)
    assert rows == 0 and pages >= 1
    await trio.to_thread.run_sync(vacuum_probes, pg_url)
    assert await trio.to_thread.run_sync(probe_table, pg_url) == (0, 0)


async def test_a_probe_waits_for_a_held_probes_table_a_bounded_time(pg_url: str) -> None:
    """Another session holds the probes table (LOCK TABLE ... ACCESS EXCLUSIVE, as VACUUM
    FULL or ALTER TABLE do): the probe fails as an outage within PROBE_LOCK_TIMEOUT_MS, and
    succeeds once the table is free. Failed before: it waited for as long as the lock was
    held, holding the store's commit lock meanwhile, so every write waited too, past
    store_retry_timeout (here the lock is let go after 10 s, so that it ends)."""
    backend = PostgresBackend(pg_url)
    async with backend.opened():
        with psycopg.connect(pg_url, autocommit=True) as holder:
            holder.execute("BEGIN")
            holder.execute("LOCK TABLE probes IN ACCESS EXCLUSIVE MODE")

            answered = threading.Event()

            def let_go() -> None:
                answered.wait(10)
                holder.execute("ROLLBACK")

            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.to_thread.run_sync, let_go)
                began = trio.current_time()
                try:
                    with pytest.raises(errors.LockNotAvailable) as raised:
                        await backend.ping()
                finally:
                    answered.set()
                assert is_outage(raised.value)
                assert trio.current_time() - began < PROBE_LOCK_TIMEOUT_MS / 1000 + 2
        with trio.fail_after(5):
            await backend.ping()


async def test_a_probes_table_the_role_cannot_use_is_an_outage_not_a_crash(
    pg_url: str,
) -> None:
    """The nodes run as a role granted the tables but not ``probes`` (created by the owner's
    v4 to v5 migration after the grants), and the database turns read-only: the write fails
    (an outage), the idle store probes, and the probe is refused (42501). The store stays
    unavailable, its reason one line naming the table and the SQLSTATE, and runs on. Failed
    before: the refusal, not an outage, ended the store and the runtime with it
    (InsufficientPrivilege: permission denied for table probes)."""
    role = f"hpa_probe_{secrets.token_hex(3)}"
    async with PostgresBackend(pg_url).opened():
        pass  # the owner creates the schema, v5
    with psycopg.connect(pg_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
    try:
        with psycopg.connect(pg_url, autocommit=True) as admin:
            for grant in (
                # CREATE: opening runs CREATE TABLE IF NOT EXISTS meta, which asks for it.
                "GRANT CREATE ON SCHEMA public TO {}",
                "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {}",
                "REVOKE ALL ON probes FROM {}",
            ):
                admin.execute(sql.SQL(grant).format(sql.Identifier(role)))
        url = pg_url.replace("postgresql://postgres@", f"postgresql://{role}@")
        actor = StoreActor(
            PostgresBackend(url),
            EventHub(),
            StoreConfig(retry_backoff=0.02, store_retry_timeout=1, heartbeat_flush_interval=0.05),
        )
        store = actor.client()
        async with trio.open_nursery() as nursery:
            await nursery.start(actor.run)
            async with store:
                job = await store.create("alice", "research", {})
                with psycopg.connect(pg_url, autocommit=True) as admin:
                    admin.execute(
                        sql.SQL("ALTER ROLE {} SET default_transaction_read_only = on").format(
                            sql.Identifier(role)
                        )
                    )
                await trio.to_thread.run_sync(terminate_sessions, pg_url)
                with pytest.raises(StoreError, match="read-only transaction"):
                    await store.start(job.id)
                with trio.fail_after(5):
                    while "probes" not in (actor.health.reason or ""):  # noqa: ASYNC110
                        await trio.sleep(0.02)
                reason = actor.health.reason or ""
                assert not actor.health.ok and "\n" not in reason
                assert "permission denied for table probes" in reason
                assert "SQLSTATE 42501" in reason
                await trio.sleep(0.3)  # more probes: still running, still unavailable
                assert not actor.health.ok
                assert (await store.get(job.id)).state is JobState.CREATED
    finally:
        with psycopg.connect(pg_url, autocommit=True) as admin:
            admin.execute(sql.SQL("ALTER ROLE {} RESET ALL").format(sql.Identifier(role)))
            admin.execute(
                "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity WHERE usename = %s",
                (role,),
            )
            admin.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


async def test_a_database_read_only_for_a_while_is_an_outage_that_ends(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """ALTER DATABASE ... SET default_transaction_read_only = on (as one makes a database
    read-only for maintenance, or a hot standby is) and new sessions: writes fail, an outage;
    then RESET, which a session never rereads. The store is back by itself, its probe
    succeeds and writes go through, with no "connection lost" warning. Failed before: its
    session kept refusing every write, unavailable for good (a restart was needed)."""
    server, dbname = pg_url.rsplit("/", 1)

    def set_read_only(on: bool) -> None:
        # From another database: a session on this one is read-only, ALTER DATABASE too.
        with psycopg.connect(f"{server}/postgres", autocommit=True) as admin:
            setting = "SET default_transaction_read_only = on" if on else "RESET ALL"
            admin.execute(sql.SQL("ALTER DATABASE {} " + setting).format(sql.Identifier(dbname)))

    actor = StoreActor(
        PostgresBackend(pg_url),
        EventHub(),
        StoreConfig(retry_backoff=0.02, store_retry_timeout=1, heartbeat_flush_interval=0.05),
    )
    store = actor.client()
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(actor.run)
            async with store:
                job = await store.create("alice", "research", {})
                await trio.to_thread.run_sync(set_read_only, True)
                await trio.to_thread.run_sync(terminate_sessions, pg_url)
                with pytest.raises(StoreError, match="read-only transaction"):
                    await store.start(job.id)
                await trio.sleep(0.3)  # probes meanwhile: still read-only
                assert not actor.health.ok
                assert "read-only" in (actor.health.reason or "")
                await trio.to_thread.run_sync(set_read_only, False)
                with trio.fail_after(5):
                    while not actor.health.ok:  # noqa: ASYNC110
                        await trio.sleep(0.02)
                await store.start(job.id)
                assert (await store.get(job.id)).state is JobState.RUNNING
                assert actor.health.outages == 1
    finally:
        await trio.to_thread.run_sync(set_read_only, False)
    assert "lost; connecting again" not in caplog.text.split("read-only", 1)[-1]


def terminate_all_sessions(url: str) -> None:
    """Drop every other session on the database of ``url`` (both of a node's lanes)."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )


async def test_a_dropped_connection_costs_no_lease_renewal(pg_url: str) -> None:
    """The server drops the node's connections before each renewal (as a restart, a pooler or
    an administrator does): each renewal still goes through, on a new connection. Failed, the
    next came a whole renewal interval later, and a drop about once an interval fenced every
    node at once."""
    backend = PostgresBackend(pg_url)
    async with backend.opened():
        lease = await backend.register_node("n1", new_id(), 30, "host", 1)
        for _ in range(3):
            await trio.to_thread.run_sync(terminate_all_sessions, pg_url)
            renewed = await backend.renew_node(lease, 30, 0)
            assert renewed.expires_at >= lease.expires_at
            lease = renewed
        await trio.to_thread.run_sync(terminate_all_sessions, pg_url)
        await backend.leave_node(lease)
        (node,) = await backend.list_nodes()
        assert node.state == "left"


async def test_dropped_connections_are_waited_out_with_nothing_lost(pg_url: str) -> None:
    """The server drops the store's connection again and again while jobs write: every write
    is acknowledged (it waits and is retried), the store reconnects by itself, and the log
    has every event once, gapless."""
    actor = StoreActor(PostgresBackend(pg_url), EventHub(), StoreConfig(retry_backoff=0.02))
    store = actor.client()
    async with trio.open_nursery() as nursery:
        await nursery.start(actor.run)
        async with store:
            ids = []
            for _ in range(5):
                job = await store.create("alice", "research", {})
                await store.start(job.id)
                ids.append(job.id)

            async def writer(job_id: str) -> None:
                for n in range(60):
                    await store.set_progress(job_id, 1, n, f"step {n}")
                    await trio.sleep(0.005)

            dropped = 0
            async with trio.open_nursery() as writers:
                for job_id in ids:
                    writers.start_soon(writer, job_id)
                for _ in range(3):
                    await trio.sleep(0.1)
                    dropped += await trio.to_thread.run_sync(terminate_sessions, pg_url)
            assert dropped >= 3
            assert actor.health.outages >= 1
            await store.set_progress(ids[0], 1, 99, "after")  # the store is back by itself
            assert actor.health.ok
            for job_id in ids:
                events = await store.read_events(job_id)
                assert [e.seq for e in events] == list(range(1, len(events) + 1))
                assert len(events) == 2 + 60 + (job_id == ids[0])
            user_events = await store.read_user_events("alice", limit=10_000)
            assert [e.user_seq for e in user_events] == list(range(1, len(user_events) + 1))
    with trio.fail_after(5):  # closed: the owner lock is free
        while await trio.to_thread.run_sync(pg_sessions, pg_url):  # noqa: ASYNC110
            await trio.sleep(0.01)


async def test_a_refused_write_fails_only_its_culprit(pg_url: str) -> None:
    """A statement the database refuses (here a trigger, as a constraint would) fails only
    the request that brought it; the rest of its group is committed again without it."""
    actor = StoreActor(PostgresBackend(pg_url), EventHub())
    store = actor.client()
    async with trio.open_nursery() as nursery:
        await nursery.start(actor.run)
        async with store, actor.hub.subscribe() as stream:
            job_id = (await store.create("alice", "research", {})).id
            await store.start(job_id)
            await store.checkpoint(job_id, 1, {"v": 1})
            other = (await store.create("alice", "research", {})).id
            await store.start(other)
            with psycopg.connect(pg_url, autocommit=True) as conn:
                conn.execute(
                    "CREATE FUNCTION fault() RETURNS trigger LANGUAGE plpgsql AS"
                    " $$ BEGIN RAISE EXCEPTION 'simulated fault'; END $$"
                )
                conn.execute(
                    "CREATE TRIGGER fault BEFORE INSERT ON events FOR EACH ROW"
                    " WHEN (NEW.type = 'checkpoint') EXECUTE FUNCTION fault()"
                )
            while True:  # what the set-up published
                try:
                    stream.receive_nowait()
                except trio.WouldBlock:
                    break
            results: dict[str, Exception | None] = {}

            async def attempt(name: str, fn: Any) -> None:
                try:
                    await fn()
                    results[name] = None
                except StoreError as exc:
                    results[name] = exc

            async with trio.open_nursery() as both:
                both.start_soon(
                    attempt, "checkpoint", lambda: store.checkpoint(job_id, 1, {"v": 2})
                )
                both.start_soon(attempt, "progress", lambda: store.set_progress(other, 1, 50, "x"))
            assert "simulated fault" in str(results["checkpoint"])
            assert results["progress"] is None
            published = stream.receive_nowait()
            assert (published.job_id, published.type.value) == (other, "progress")
            with pytest.raises(trio.WouldBlock):
                stream.receive_nowait()
            assert (await store.get(job_id)).checkpoint == {"v": 1}
            assert actor.health.ok  # tied to the write: not an outage
            events = await store.read_user_events("alice")
            assert [e.user_seq for e in events] == list(range(1, len(events) + 1))


async def test_serve_on_postgresql_end_to_end_with_sigkill_recovery(
    pg_url: str, tmp_path: Any
) -> None:
    data = tmp_path / "data"
    port = free_port()
    store = ("--store", pg_url, "--node-id", "a")
    async with serve_process(data, port, store) as served:
        assert not (data / "jobspine.db").exists()  # the jobs are in PostgreSQL
        async with open_client(served.url, served.token("alice")) as client:
            quick = [
                await client.create("research", {"query": f"q{i}", "depth": 3}) for i in range(3)
            ]
            with trio.fail_after(30):
                for job in quick:
                    while (found := await client.get(job["id"]))["state"] != "completed":  # noqa: ASYNC110
                        await trio.sleep(0.1)
                    assert found["result"]["sources"] == 3
            slow = await client.create("research", {"query": "long", "depth": 200, "delay": 0.1})
            with trio.fail_after(30):
                while (await client.get(slow["id"]))["checkpoint_version"] == 0:  # noqa: ASYNC110
                    await trio.sleep(0.1)
        # A second server with the same node id is refused, naming the first.
        second = await trio.run_process(
            [*COMMAND, "serve", *store, "--port", "0", "--health-port", "0"],
            env={**served.env(), "JOBSPINE_DATA": str(tmp_path / "other")},
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        assert second.returncode == 7, second
        assert f"is alive (process {served.process.pid} on" in second.stderr.decode()
        served.process.kill()
        await served.process.wait()
    # Restarted at once with its node id: the killed incarnation (its process gone) is
    # replaced and taken over by the new one before it serves.
    async with serve_process(data, port, store) as served:
        assert "replacing incarnation" in (data / "serve.log").read_text()
        assert "takes over a#" in (data / "serve.log").read_text()
        async with open_client(served.url, served.token("alice")) as client:
            job = await client.get(slow["id"])
            assert (job["state"], job["pause_reason"]) == (JobState.PAUSED.value, "recovery")
            await client.resume(slow["id"])
            with trio.fail_after(60):
                while (found := await client.get(slow["id"]))["state"] != "completed":  # noqa: ASYNC110
                    await trio.sleep(0.2)
            assert found["attempt"] == 2 and found["result"]["sources"] == 200
            for job in quick:
                assert (await client.get(job["id"]))["state"] == "completed"


async def test_serve_refuses_a_bad_store_in_one_line(tmp_path: Any) -> None:
    env = {**os.environ, "JOBSPINE_DATA": str(tmp_path)}
    shown = await trio.run_process(
        [*COMMAND, "config", "--json"],
        env={**env, "JOBSPINE_STORE": "postgresql://bob:secret@db.example:5433/jobs"},
        capture_stdout=True,
        check=True,
    )
    store = orjson.loads(shown.stdout)["server.store"]
    assert store["value"] == "postgresql://bob:***@db.example:5433/jobs"
    assert store["source"] == "env JOBSPINE_STORE"
    cases = [
        (["--store", "mysql://x"], 2, "expected a postgresql:// URL"),
        (["--store", f"postgresql://postgres:pw@127.0.0.1:{free_port()}/x"], 9, "cannot open"),
    ]
    for flags, status, text in cases:
        result = await trio.run_process(
            [*COMMAND, "serve", *flags, "--port", "0", "--health-port", "0"],
            env=env,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        stderr = result.stderr.decode()
        assert result.returncode == status, stderr
        assert text in stderr and stderr.count("\n") == 1 and ":pw@" not in stderr, stderr


#: Values holding NUL, which records keep escaped (``\u0000``): in a string, in a key, after a
#: backslash, and the escape's own text (``\\u0000`` in the record).
NUL_VALUES = {"s": "nul \x00 inside", "\x00key": "\\u0000 as text", "b": "\\\x00", "n": 1}

#: What each schema version added to the one before, taken back down to it (tests build an old
#: database this way: written by the current code, then stripped).
DOWNGRADES = {
    5: ["DROP TABLE probes"],
    4: [
        "ALTER TABLE jobs DROP COLUMN seq",
        "DELETE FROM user_heads",  # v3 kept heads only where retention wrote them
        "DROP TABLE nodes",
    ],
    3: [
        "ALTER TABLE jobs DROP COLUMN priority, DROP COLUMN created_at, DROP COLUMN ready_at,"
        " DROP COLUMN run_at, DROP COLUMN parent_id, DROP COLUMN idempotency_key,"
        " DROP COLUMN owner, DROP COLUMN lease_expires_at, DROP COLUMN tags"
    ],
    2: ["ALTER TABLE jobs DROP COLUMN finished_at", "DROP TABLE user_heads"],
}


def stored_rows(url: str) -> tuple[list[dict[str, Any]], list[tuple[Any, ...]]]:
    """Every job row (column name -> value) and user head, in id order."""
    with psycopg.connect(url, autocommit=True) as conn:
        cursor = conn.execute("SELECT * FROM jobs ORDER BY id")
        names = [column.name for column in cursor.description or ()]
        jobs = [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
        heads = conn.execute("SELECT * FROM user_heads ORDER BY user_id").fetchall()
    return jobs, heads


@pytest.mark.parametrize("version", [1, 2, 3, 4])
async def test_records_holding_nul_migrate_from_every_older_schema(
    pg_url: str, version: int
) -> None:
    """A job's record may hold NUL, escaped in its JSON (an input, a step label, a result, an
    error), and PostgreSQL's json operators refuse such a document: the migrations that read
    fields of records (v2 ``finished_at``, v3 ``created_at`` and ``ready_at``, v4 ``seq``)
    failed on it for good. Jobs of every state with such records, written by this code, the
    schema taken back to ``version``: opened again, it migrates to v5, every column read back
    exactly as this code wrote it (v5 adds only the probe's table)."""
    async with open_store(PostgresBackend(pg_url)) as (store, _, _):
        done = await store.create("alice", "research", NUL_VALUES)
        await store.start(done.id)
        await store.set_progress(done.id, 1, 50, "step \x00")
        await store.complete(done.id, 1, NUL_VALUES)
        failed = await store.create("alice", "research", NUL_VALUES)
        await store.start(failed.id)
        await store.fail(failed.id, 1, JobError("Boom", "nul \x00 in the message"))
        running = await store.create("bob", "research", NUL_VALUES)
        await store.start(running.id)
        await store.set_progress(running.id, 1, 5, "\x00")
        waiting = await store.create("bob", "research", NUL_VALUES)
    before = stored_rows(pg_url)
    with psycopg.connect(pg_url, autocommit=True) as conn:
        for step in range(5, version, -1):
            for statement in DOWNGRADES[step]:
                conn.execute(statement)
        conn.execute("UPDATE meta SET value = %s WHERE key = 'schema_version'", (str(version),))
    backend = PostgresBackend(pg_url)
    async with backend.opened():
        for job_id in (done.id, failed.id, running.id, waiting.id):
            job = await backend.load(job_id)
            assert job is not None and job.input == NUL_VALUES
    assert stored_rows(pg_url) == before
    with psycopg.connect(pg_url, autocommit=True) as conn:
        meta = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    assert meta == ("5",)
    async with open_store(PostgresBackend(pg_url)) as (store, _, _):
        # Numbered on from the migrated seq and head.
        assert (await store.set_progress(running.id, 1, 60, None)).seq == 4
        assert await store.user_head("bob") == 5
