"""Idempotency keys looked up once per batch of creates (not once per create), on real SQLite
files and in memory: concurrent creates with one key make exactly one job, a different request
is refused, the window holds, and a barrier within a batch (a query) changes nothing."""

from __future__ import annotations

from collections.abc import AsyncIterator, Collection
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from actors import (
    IdempotencyConflictError,
    Job,
    JobContext,
    MemoryBackend,
    Runtime,
    RuntimeConfig,
    SqliteBackend,
    open_runtime,
)
from actors._keyfilter import KeyFilter
from transport.client import new_key


async def hold(ctx: JobContext, input: Any) -> Any:
    with ctx.keep_alive():
        await trio.sleep(3600)


class CountingMemory(MemoryBackend):
    """Counts the key look-ups (the real backend underneath)."""

    singles = batches = 0

    async def find_by_key(self, user_id: str, key: str, since: float) -> Job | None:
        self.singles += 1
        return await super().find_by_key(user_id, key, since)

    async def find_by_keys(self, keys: Collection[tuple[str, str]]) -> dict[tuple[str, str], Job]:
        self.batches += 1
        return await super().find_by_keys(keys)


class CountingSqlite(SqliteBackend):
    singles = batches = 0

    async def find_by_key(self, user_id: str, key: str, since: float) -> Job | None:
        self.singles += 1
        return await super().find_by_key(user_id, key, since)

    async def find_by_keys(self, keys: Collection[tuple[str, str]]) -> dict[tuple[str, str], Job]:
        self.batches += 1
        return await super().find_by_keys(keys)


Backend = CountingMemory | CountingSqlite


@pytest.fixture(params=["memory", "sqlite"])
def make_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    def make() -> Backend:
        if request.param == "memory":
            return CountingMemory()
        return CountingSqlite(tmp_path / "keys.db")

    return make


@asynccontextmanager
async def runtime(backend: Backend, **config: Any) -> AsyncIterator[Runtime]:
    async with open_runtime(
        backend=backend,
        handlers={"hold": hold},
        config=RuntimeConfig(max_running=4, stop_grace=0.1, **config),
    ) as rt:
        yield rt


async def create_all(rt: Runtime, requests: list[tuple[str, dict[str, Any], str]]) -> list[Any]:
    """Each ``(user, input, key)`` created concurrently; returns each job or error."""
    results: list[Any] = [None] * len(requests)

    async def one(i: int, user: str, input: dict[str, Any], key: str) -> None:
        try:
            results[i] = await rt.create_job("hold", user, input, idempotency_key=key)
        except IdempotencyConflictError as exc:
            results[i] = exc

    async with trio.open_nursery() as nursery:
        for i, (user, input, key) in enumerate(requests):
            nursery.start_soon(one, i, user, input, key)
    return results


async def test_one_key_from_many_tasks_makes_one_job(make_backend: Any) -> None:
    backend = make_backend()
    async with runtime(backend) as rt:
        results = await create_all(rt, [("alice", {"n": 1}, "k")] * 30)
        assert len({job.id for job in results}) == 1
        assert len(await rt.list_jobs("alice")) == 1
        # A different request with the key: refused, and nothing stored; other users' keys
        # are their own.
        mixed = await create_all(
            rt, [("alice", {"n": 2}, "k"), ("alice", {"n": 1}, "k"), ("bob", {"n": 2}, "k")]
        )
        assert isinstance(mixed[0], IdempotencyConflictError)
        assert mixed[1].id == results[0].id and mixed[2].user_id == "bob"
        assert len(await rt.list_jobs("alice")) == 1
        # Fresh keys, many at once: one job each, and no look-up at all (the user's keys were
        # read once); repeats of them are looked up in far fewer queries than creates.
        before = backend.batches
        distinct = await create_all(rt, [("carol", {}, f"c{n}") for n in range(40)])
        assert len({job.id for job in distinct}) == 40
        assert len(await rt.list_jobs("carol", limit=None)) == 40
        assert backend.batches == before and backend.singles == 0
        repeats = await create_all(rt, [("carol", {}, f"c{n}") for n in range(40)])
        assert [job.id for job in repeats] == [job.id for job in distinct]
        assert 0 < backend.batches - before < 40 and backend.singles == 0
        # A deleted job's key makes a new job (its hash stays: one look-up, nothing found).
        await rt.cancel(distinct[0].id)
        await rt.delete_job(distinct[0].id)
        again = await rt.create_job("hold", "carol", {}, idempotency_key="c0")
        assert again.id != distinct[0].id


async def test_a_query_within_a_batch_and_the_stored_key(make_backend: Any) -> None:
    backend = make_backend()
    async with runtime(backend) as rt:
        first = await rt.create_job("hold", "alice", {}, idempotency_key="k")
        counts: list[int] = []
        pairs: list[tuple[Job, Job]] = []

        async def query() -> None:
            counts.append(len(await rt.list_jobs("alice")))

        async def create() -> None:
            again = await rt.create_job("hold", "alice", {}, idempotency_key="k")
            pairs.append((again, await rt.create_job("hold", "alice", {}, idempotency_key="new")))

        async with trio.open_nursery() as nursery:
            for n in range(10):
                nursery.start_soon(create if n % 2 else query)
        assert {again.id for again, _ in pairs} == {first.id}  # committed before: found
        assert len({new.id for _, new in pairs}) == 1  # made by the first, found by the rest
        assert len(await rt.list_jobs("alice")) == 2
        assert set(counts) <= {1, 2}


async def test_the_window(make_backend: Any) -> None:
    backend = make_backend()
    async with runtime(backend, idempotency_window=0.2) as rt:
        first = await rt.create_job("hold", "alice", {}, idempotency_key="k")
        await trio.sleep(0.3)  # the real clock: created_at is wall time
        results = await create_all(rt, [("alice", {"other": True}, "k")] * 5)
        assert len({job.id for job in results}) == 1 and results[0].id != first.id
        assert len(await rt.list_jobs("alice")) == 2


async def test_keys_survive_a_reopen(tmp_path: Path) -> None:
    async with runtime(CountingSqlite(tmp_path / "r.db")) as rt:
        first = await rt.create_job("hold", "alice", {"a": 1}, idempotency_key="k")
    async with runtime(CountingSqlite(tmp_path / "r.db")) as rt:
        results = await create_all(rt, [("alice", {"a": 1}, "k")] * 5)
        assert {job.id for job in results} == {first.id}
        with pytest.raises(IdempotencyConflictError):
            await rt.create_job("hold", "alice", {"a": 2}, idempotency_key="k")


def test_key_filter() -> None:
    keys = KeyFilter()
    assert keys.needs_load("u", 100.0) and keys.may_exist("u", "k", 100.0)  # unknown: ask
    keys.load("u", 100.0, 200.0, ["a", "b"])
    assert not keys.needs_load("u", 150.0)
    assert keys.may_exist("u", "a", 150.0) and not keys.may_exist("u", "c", 150.0)
    keys.add("u", "c")
    assert keys.may_exist("u", "c", 150.0)
    assert keys.may_exist("u", "z", 50.0)  # a window reaching before the load: ask
    assert keys.needs_load("u", 201.0)  # the window moved past the load: read again
    keys.add("v", "k")  # a user never loaded: nothing kept
    assert keys.needs_load("v", 0.0)


def test_generated_keys_can_follow_a_flag() -> None:
    # A key starting with "-" would be read by the CLI as another flag (1 in 64 before).
    assert not any(new_key().startswith("-") for _ in range(2000))
