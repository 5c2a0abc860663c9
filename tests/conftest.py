from __future__ import annotations

import itertools
import os
import secrets
import signal
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio
from psycopg import sql

from actors import (
    DEMO_HANDLERS,
    TERMINAL_STATES,
    Backend,
    Handler,
    Job,
    JobState,
    MemoryBackend,
    PostgresBackend,
    Runtime,
    RuntimeConfig,
    SqliteBackend,
    open_runtime,
)

pytest_plugins = ["actors.testing"]


def pytest_configure(config: pytest.Config) -> None:
    """Ctrl-C as an operator's terminal sends it: a suite started in the background by a
    shell without job control (``.ci/run &``, ``nohup … &``) inherits SIGINT ignored, and so
    does every process a test starts, so the tests that interrupt a server or a client with
    SIGINT waited for an exit that never came. Python's own handler here gives the children
    the default disposition back (a handler is reset at ``exec``, an ignored signal is not)."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


#: The real local PostgreSQL server (trust auth); every test database is created and dropped
#: through it, named ``<PG_PREFIX><n>``: unique to this test session.
PG_SERVER = os.environ.get("JOBSPINE_TEST_PG", "postgresql://postgres@127.0.0.1:5432")
PG_PREFIX = f"jobspine_test_{os.getpid()}_{secrets.token_hex(3)}_"
_pg_numbers = itertools.count()


def pg_admin() -> psycopg.Connection[Any]:
    return psycopg.connect(f"{PG_SERVER}/postgres", autocommit=True)


def drop_pg_database(name: str) -> None:
    with pg_admin() as admin:
        admin.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@pytest.fixture
def pg_url() -> Iterator[str]:
    """The URL of a new, empty PostgreSQL database of its own, dropped after the test."""
    name = f"{PG_PREFIX}{next(_pg_numbers)}"
    with pg_admin() as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield f"{PG_SERVER}/{name}"
    finally:
        drop_pg_database(name)


@pytest.fixture(params=["memory", "sqlite", "postgresql"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    """An opened backend of each kind, on an empty database of its own: the backend contract
    tests run against all three."""
    found: Backend = (
        MemoryBackend()
        if request.param == "memory"
        else PostgresBackend(request.getfixturevalue("pg_url"))
        if request.param == "postgresql"
        else SqliteBackend(tmp_path / "jobs.db")
    )
    async with found.opened():
        yield found


@pytest.fixture(scope="session", autouse=True)
def _drop_leftover_pg_databases() -> Iterator[None]:
    """At the end of the session, drop every database this session created and left (a test
    killed midway): none outlives the session."""
    yield
    try:
        with pg_admin() as admin:
            names = admin.execute(
                "SELECT datname FROM pg_database WHERE starts_with(datname, %s)", (PG_PREFIX,)
            ).fetchall()
    except psycopg.OperationalError:
        return  # no server: no database of ours either
    for (name,) in names:
        drop_pg_database(name)


@asynccontextmanager
async def memory_runtime(
    handlers: Mapping[str, Handler] | None = None,
    backend: MemoryBackend | None = None,
    **config: Any,
) -> AsyncIterator[Runtime]:
    """A runtime on the in-memory store: no threads, so safe under autojump_clock."""
    async with open_runtime(
        backend=backend or MemoryBackend(),
        handlers=DEMO_HANDLERS if handlers is None else handlers,
        config=RuntimeConfig(**config),
    ) as runtime:
        yield runtime


async def wait_for_state(
    rt: Runtime,
    job_id: str,
    states: set[JobState] | frozenset[JobState] = TERMINAL_STATES,
    timeout: float = 30,  # noqa: ASYNC109 - a test helper's bound, not an API
) -> Job:
    """Wait until the job is in one of ``states`` (read from the store, woken by its events)."""
    with trio.fail_after(timeout):
        async with rt.events() as stream:
            job = await rt.get_job(job_id)
            if job.state in states:
                return job
            async for event in stream:
                if event.job_id == job_id and event.state in states:
                    return await rt.get_job(job_id)
    raise AssertionError("event stream ended")
