"""A PostgreSQL database on a full disk is reported unavailable for as long as the disk is
full, and available again only once a write can be made (as ``test_sqlite_full.py`` for
SQLite).

The disk is real: a tmpfs of a few MiB mounted for the test (it needs root, as CI runs, and
the PostgreSQL server of ``JOBSPINE_TEST_PG`` on this machine, running as the ``postgres``
user), given to the server as a tablespace, the test's database created in it, filled by a
file of zeros and freed by removing that file. The tablespace and the database are the
test's own (``hpg_...``), dropped, and the tmpfs unmounted, however the test ends. Before
this was fixed, the store's probe of an unavailable database ran ``SELECT 1``, which a full
disk allows: after every failed commit the store reported the database back (``/readyz``
ready, "database available again" in the log) and the next write that needed a new page
found the disk as full as before, over and over, for as long as the disk stayed full."""

from __future__ import annotations

import logging
import os
import pwd
import secrets
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import attrs
import psycopg
import pytest
import trio
from psycopg import sql

from actors import PostgresBackend, RuntimeConfig, StoreError, open_runtime

from .conftest import PG_SERVER, pg_admin
from .serving import eventually
from .test_postgres import probe_table
from .test_sqlite_full import fill, small_disk


@contextmanager
def full_disk_database(size: str = "8m") -> Iterator[tuple[str, Path]]:
    """A database of its own in a tablespace on a tmpfs of ``size``: its URL and the tmpfs'
    mount point (the server writes under it; the test's filler goes beside)."""
    try:
        owner = pwd.getpwnam("postgres")
    except KeyError:
        pytest.fail("this test needs the PostgreSQL server on this machine, as user postgres")
    name = f"hpg_full_{os.getpid()}_{secrets.token_hex(3)}"
    disk = Path("/mnt") / name
    try:
        with small_disk(disk, size):
            os.chown(disk, owner.pw_uid, owner.pw_gid)  # the server's own, as it requires
            with pg_admin() as admin:
                admin.execute(
                    sql.SQL("CREATE TABLESPACE {} LOCATION {}").format(
                        sql.Identifier(name), sql.Literal(str(disk))
                    )
                )
            try:
                with pg_admin() as admin:
                    admin.execute(
                        sql.SQL("CREATE DATABASE {} TABLESPACE {}").format(
                            sql.Identifier(name), sql.Identifier(name)
                        )
                    )
                try:
                    yield f"{PG_SERVER}/{name}", disk
                finally:
                    with pg_admin() as admin:
                        admin.execute(
                            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                                sql.Identifier(name)
                            )
                        )
            finally:
                with pg_admin() as admin:
                    admin.execute(
                        sql.SQL("DROP TABLESPACE IF EXISTS {}").format(sql.Identifier(name))
                    )
    finally:
        if disk.exists():
            disk.rmdir()


@attrs.frozen
class Probes:
    """Another node's backend on the database, and a session of its own (autocommit)."""

    backend: PostgresBackend
    raw: psycopg.Connection[Any]


@asynccontextmanager
async def open_probes(url: str) -> AsyncIterator[Probes]:
    backend = PostgresBackend(url)
    async with backend.opened():
        raw = await trio.to_thread.run_sync(lambda: psycopg.connect(url, autocommit=True))
        try:
            yield Probes(backend, raw)
        finally:
            await trio.to_thread.run_sync(raw.close)


async def free_probe_pages(url: str, raw: psycopg.Connection[Any]) -> int:
    """Leave pages of the probe table empty (four probes' dead rows, vacuumed) behind a row
    that ``raw`` inserts and keeps, uncommitted (a probe in progress), which keeps VACUUM from
    cutting them off; returns the table's pages."""
    backend = PostgresBackend(url)
    async with backend.opened():
        for _ in range(4):
            await backend.ping()

    def hold() -> None:
        raw.execute("BEGIN")
        raw.execute("INSERT INTO probes (pad) VALUES (convert_to(repeat(' ', 7680), 'SQL_ASCII'))")
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("VACUUM probes")

    await trio.to_thread.run_sync(hold)
    rows, pages = await trio.to_thread.run_sync(probe_table, url)
    assert rows == 0
    return pages


async def test_a_full_disk_stays_unavailable_until_a_write_can_be_made(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="jobspine.store")

    async def idle(ctx: Any, input: Any) -> Any:  # pragma: no cover - never due in the test
        return None

    config = RuntimeConfig(
        store_retry_timeout=0.5,
        heartbeat_flush_interval=0.05,  # the store probes an unavailable database this often
    )
    with full_disk_database() as (url, disk):
        filler = disk / "filler"
        async with (
            open_runtime(url, handlers={"idle": idle}, config=config) as rt,
            open_probes(url) as other,
        ):
            # Jobs that wait (an hour's delay): nothing runs, so while the database is
            # unavailable only the store's probe writes.
            pad = secrets.token_hex(1500)  # incompressible: the rows take their space
            for _ in range(5):
                await rt.create_job("idle", "alice", {"pad": pad}, delay=3600)
            # The probe table has pages that need no new space (emptied by VACUUM, kept by
            # another node's probe in progress after them): a probe that wrote there would
            # succeed on the full disk.
            pages = await free_probe_pages(url, other.raw)
            assert pages >= 4
            await trio.to_thread.run_sync(fill, filler)
            # Creates go on while the pages the tables have take them; the first that needs
            # a new one fails, once its retries gave up (store_retry_timeout).
            with pytest.raises(StoreError, match="No space left on device"):
                for _ in range(200):
                    await rt.create_job("idle", "alice", {"pad": pad}, delay=3600)
            assert not rt.store_health.ok
            # The store is idle and probes, 40 times in 2 s. The disk is as full as before:
            # no probe may call the database back.
            await trio.sleep(2)
            assert not rt.store_health.ok, "reported available while no write can be made"
            reason = rt.store_health.reason or ""
            # One line (psycopg's message has its HINT on a second line), as /readyz gives it.
            assert reason.startswith("database unavailable: could not extend file"), reason
            assert reason.endswith("No space left on device HINT: Check free disk space."), reason
            assert rt.store_health.outages == 1
            warnings = [r.getMessage() for r in caplog.records]
            assert not [m for m in warnings if "available again" in m], warnings
            assert [m for m in warnings if "database unavailable" in m and "\n" not in m]
            assert not [m for m in warnings if "\n" in m], warnings
            # Another node's probe fails the same way, and leaves no row behind.
            with pytest.raises(psycopg.errors.DiskFull):
                await other.backend.ping()
            assert await trio.to_thread.run_sync(probe_table, url) == (0, pages)
            # Space returns: the store notices by itself, says so once, and takes writes.
            filler.unlink()
            await other.backend.ping()
            await eventually(lambda: rt.store_health.ok)
            back = [r.getMessage() for r in caplog.records if "available again" in r.getMessage()]
            assert len(back) == 1, back
            created = await rt.create_job("idle", "bob", {"pad": pad}, delay=3600)
            assert (await rt.get_job(created.id)).user_id == "bob"
            assert (await trio.to_thread.run_sync(probe_table, url))[0] == 0
