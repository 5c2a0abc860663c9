"""Hostile values and foreign messages through the PostgreSQL backend and the Redis fan-out,
compared with SQLite: each fault found stays with its cause, alike on every backend.

* Two nodes on one PostgreSQL database took the same idempotency key twice: a create retried
  through another node (as a client does that moved after a lost reply) made a second job,
  whether the first had committed long before (each store's filter of keys knew only its own)
  or was committing at the same moment (no check across writers).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import psycopg
import pytest
import trio

from actors import IdempotencyConflictError, JobContext, Runtime, RuntimeConfig, open_runtime
from actors._postgres import PostgresBackend


async def echo(ctx: JobContext, input: Any) -> Any:
    return input


@asynccontextmanager
async def pg_node(pg_url: str) -> AsyncIterator[Runtime]:
    async with open_runtime(
        backend=PostgresBackend(pg_url),
        handlers={"echo": echo},
        config=RuntimeConfig(resume_on_start=False),
    ) as rt:
        yield rt


def keyed_jobs(pg_url: str) -> list[tuple[str, str, int]]:
    """``(user_id, key, jobs)`` per key stored, from the database itself."""
    with psycopg.connect(pg_url) as conn:
        rows = conn.execute(
            "SELECT user_id, idempotency_key, count(*) FROM jobs"
            " WHERE idempotency_key IS NOT NULL GROUP BY 1, 2 ORDER BY 1, 2"
        ).fetchall()
    return [(user, key, count) for user, key, count in rows]


async def test_an_idempotency_key_is_taken_once_across_nodes(pg_url: str) -> None:
    async with pg_node(pg_url) as a, pg_node(pg_url) as b:
        # Node a knows alice's keys (its store loaded them), then b takes a new one.
        await a.create_job("echo", "alice", {}, idempotency_key="warm")
        first = await b.create_job("echo", "alice", {"n": 1}, idempotency_key="k")
        again = await a.create_job("echo", "alice", {"n": 1}, idempotency_key="k")
        assert again.id == first.id
        with pytest.raises(IdempotencyConflictError) as refused:
            await a.create_job("echo", "alice", {"n": 2}, idempotency_key="k")
        assert refused.value.job_id == first.id

        # Both nodes at once, many keys of many users: each key names one job.
        got: dict[tuple[int, int], set[str]] = {}

        async def create(rt: Runtime, user: int, key: int) -> None:
            job = await rt.create_job("echo", f"u{user}", {"key": key}, idempotency_key=f"k{key}")
            got.setdefault((user, key), set()).add(job.id)

        async with trio.open_nursery() as nursery:
            for user in range(10):
                for key in range(8):
                    nursery.start_soon(create, a, user, key)
                    nursery.start_soon(create, b, user, key)
        assert all(len(ids) == 1 for ids in got.values()), got
    assert all(count == 1 for _, _, count in keyed_jobs(pg_url)), keyed_jobs(pg_url)
