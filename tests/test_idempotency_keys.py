"""Idempotency keys looked up once per batch of creates (not once per create), on real SQLite
files and in memory: concurrent creates with one key make exactly one job, a different request
is refused, the window holds, and a barrier within a batch (a query) changes nothing."""

from __future__ import annotations

import secrets
import tracemalloc
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
from actors._keyfilter import HASH_BYTES, KeyFilter
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


def test_key_filter_keeps_to_its_byte_budget() -> None:
    """A user creating keyed jobs all day grew its set without bound (two windows of a day:
    100 creates a second made 17 million hashes, about 1.5 GB), read whole from the database
    at each window. The sets now hold ``max_bytes`` in all: the least recently used users'
    are dropped, and a user with more keys than that keeps none (each key looked up)."""
    keys = KeyFilter(max_bytes=10 * HASH_BYTES)
    assert keys.max_hashes == 10
    keys.load("a", 0.0, 100.0, [f"a{n}" for n in range(4)])
    keys.load("b", 0.0, 100.0, [f"b{n}" for n in range(4)])
    assert keys.bytes == 8 * HASH_BYTES
    keys.needs_load("a", 50.0)  # a used: b is now the least recently used
    for n in range(3):
        keys.add("a", f"new{n}")
    # 11 > 10: b dropped (loaded again when next needed), a kept whole.
    assert keys.needs_load("b", 50.0) and not keys.needs_load("a", 50.0)
    assert keys.bytes == 7 * HASH_BYTES
    assert keys.may_exist("a", "new2", 50.0) and not keys.may_exist("a", "fresh", 50.0)
    keys.add("a", "new0")  # a repeat: counted once
    assert keys.bytes == 7 * HASH_BYTES
    for n in range(3, 10):
        keys.add("a", f"new{n}")
    # a alone over the budget: it keeps no set, and every key of it may exist (looked up).
    assert keys.bytes == 0 and len(keys) == 1
    assert keys.may_exist("a", "fresh", 50.0) and not keys.needs_load("a", 50.0)
    keys.add("a", "more")
    assert keys.bytes == 0
    assert keys.needs_load("a", 101.0)  # its window moved past the load: read again
    keys.load("a", 101.0, 200.0, None)  # more than the budget read: no set either
    assert keys.bytes == 0 and keys.may_exist("a", "x", 150.0)
    keys.load("a", 101.0, 200.0, [f"k{n}" for n in range(11)])
    assert keys.bytes == 0 and keys.may_exist("a", "x", 150.0)
    keys.load("a", 101.0, 200.0, ["k"])
    assert keys.bytes == HASH_BYTES and not keys.may_exist("a", "x", 150.0)


@pytest.mark.parametrize("count", [1_000, 6_000, 20_000, 30_000, 98_305, 200_000])
def test_hash_bytes_is_an_upper_bound_of_what_a_key_costs(count: int) -> None:
    keys = [secrets.token_urlsafe(16) for _ in range(count)]
    tracemalloc.start()
    try:
        filter = KeyFilter(max_bytes=2 * count * HASH_BYTES)
        filter.load("u", 0.0, 1.0, keys)
        used, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert filter.bytes == count * HASH_BYTES
    assert peak <= count * HASH_BYTES, (used / count, peak / count)


async def test_a_user_over_the_key_budget_keeps_its_keys_idempotent(make_backend: Any) -> None:
    """Past the budget a user's keys are looked up in the database, one query per batch:
    a repeated key still returns its job, a new request with it is still refused, and the
    store reads at most one more key than it keeps."""
    backend = make_backend()
    reads: list[int] = []
    keys_since = backend.keys_since

    async def counted(user_id: str, since: float, limit: int) -> list[str]:
        found: list[str] = await keys_since(user_id, since, limit)
        reads.append(len(found))
        return found

    backend.keys_since = counted
    async with runtime(backend, key_filter_bytes=5 * HASH_BYTES) as rt:
        store = rt.store_actor
        first = [
            await rt.create_job("hold", "alice", {"n": n}, idempotency_key=f"k{n}")
            for n in range(8)
        ]
        await rt.create_job("hold", "bob", {}, idempotency_key="b")
        assert store._key_filter.bytes <= 5 * HASH_BYTES
        again = await create_all(rt, [("alice", {"n": n}, f"k{n}") for n in range(8)])
        assert [job.id for job in again] == [job.id for job in first]
        with pytest.raises(IdempotencyConflictError):
            await rt.create_job("hold", "alice", {"n": 99}, idempotency_key="k3")
        assert all(read <= 6 for read in reads), reads
        assert store._key_filter.bytes <= 5 * HASH_BYTES


def test_generated_keys_can_follow_a_flag() -> None:
    # A key starting with "-" would be read by the CLI as another flag (1 in 64 before).
    assert not any(new_key().startswith("-") for _ in range(2000))
