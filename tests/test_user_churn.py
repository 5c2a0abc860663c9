"""Structures a long-running server keeps per user, job or room stay bounded under churn:
thousands of distinct users each come once, and what they leave behind in memory is
bounded by a documented default, not by how many came since the server started."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.lowlevel
from trio.testing import wait_all_tasks_blocked

from actors import (
    BroadcasterConfig,
    EventHub,
    FanoutConfig,
    JobContext,
    MemoryBackend,
    Outbox,
    RuntimeConfig,
    StoreActor,
    StoreClient,
    StoreConfig,
    StoreError,
    TooManyJobsError,
    open_runtime,
)
from actors._options import CreateOptions

USERS = 1000
CACHED = 64


@asynccontextmanager
async def open_store(**config: int) -> AsyncIterator[tuple[StoreClient, StoreActor]]:
    async with open_store_on(MemoryBackend(), **config) as opened:
        yield opened


@asynccontextmanager
async def open_store_on(
    backend: MemoryBackend, **config: int
) -> AsyncIterator[tuple[StoreClient, StoreActor]]:
    actor = StoreActor(backend, EventHub(), StoreConfig(**config))
    client = actor.client()
    async with trio.open_nursery() as nursery:
        await nursery.start(actor.run)
        async with client:
            yield client, actor


async def test_the_store_keeps_at_most_users_cached_users(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Each distinct user's event head, waiting count and idempotency-key filter stayed in
    the store for the life of the process (here 2,000 entries each; a real server's RSS grew
    with them, about 1 KB per user). Now at most ``users_cached``; a
    forgotten user is read again: its numbering, its keys and its waiting count are as if
    it had never been forgotten."""
    async with open_store(users_cached=CACHED) as (client, actor):
        first = {}

        async def create(n: int, key: str | None, max_waiting: int | None) -> None:
            options = CreateOptions(idempotency_key=key)
            job = await client.create(f"user{n}", "k", n, options, max_waiting=max_waiting)
            if key == f"key{n}":
                first[n] = job

        # Many at once, two per user: a user with events staged or committing is never
        # forgotten (its head is ahead of the database's). Without a waiting limit too, as
        # a first create with one waits for every write staged before it to commit.
        for start in range(0, 2 * USERS, 200):
            async with trio.open_nursery() as nursery:
                for n in range(start, start + 200):
                    limit = 3 if n < USERS else None
                    nursery.start_soon(create, n, f"key{n}", limit)
                    nursery.start_soon(create, n, f"other{n}", limit)
        assert len(actor._user_heads) <= CACHED
        assert len(actor._waiting) <= CACHED
        assert len(actor._key_filter) <= CACHED

        again = await client.create(
            "user0", "k", 0, CreateOptions(idempotency_key="key0"), max_waiting=3
        )
        assert again.id == first[0].id  # its key found again
        await client.create("user0", "k", 1, CreateOptions(idempotency_key="new"), max_waiting=3)
        with pytest.raises(TooManyJobsError):  # its three waiting jobs counted again
            await client.create("user0", "k", 2, max_waiting=3)
        for n in range(2 * USERS):
            seqs = [event.user_seq for event in await client.read_user_events(f"user{n}")]
            assert seqs == ([1, 2, 3] if n == 0 else [1, 2]), (n, seqs)
        assert len(actor._user_heads) <= CACHED


class _HeldBackend(MemoryBackend):
    """A memory backend whose commits wait while ``hold`` is set and not yet released."""

    hold: trio.Event | None = None

    async def commit(self, *args: Any, **kwargs: Any) -> Any:
        if self.hold is not None:
            await self.hold.wait()
        return await super().commit(*args, **kwargs)


async def test_a_user_with_events_in_flight_is_not_forgotten(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A head forgotten while its user's event was staged or committing would be read again
    from the database, behind it, and the user's next event would take a number already
    given: the head of a user in flight stays, however long unused."""
    backend = _HeldBackend()
    actor = StoreActor(backend, EventHub(), StoreConfig(users_cached=CACHED))
    client = actor.client()
    async with trio.open_nursery() as nursery:
        await nursery.start(actor.run)
        async with client:
            async with trio.open_nursery() as creates:
                await _race(client, backend, creates)
            seqs = [event.user_seq for event in await client.read_user_events("x")]
            assert seqs == [1, 2]
            assert len(actor._user_heads) <= CACHED


async def _race(client: StoreClient, backend: _HeldBackend, creates: trio.Nursery) -> None:
    # No time passes (the store cuts a group on a timer): each step runs until every task
    # waits.
    backend.hold = trio.Event()
    creates.start_soon(client.create, "first", "k", None)
    await wait_all_tasks_blocked()  # its group commits, held
    creates.start_soon(client.create, "x", "k", None)
    await wait_all_tasks_blocked()  # staged in the next group
    for n in range(2 * CACHED):  # x becomes the least recently used
        creates.start_soon(client.create, f"user{n}", "k", None)
    await wait_all_tasks_blocked()  # staged there too: that group waits for the first
    held, backend.hold = backend.hold, trio.Event()
    held.set()  # the first group commits and leaves; the next one is held
    await wait_all_tasks_blocked()
    creates.start_soon(client.create, "x", "k", None)
    await wait_all_tasks_blocked()
    backend.hold.set()
    backend.hold = None


async def _quick(ctx: JobContext, input: Any) -> Any:
    return input


@pytest.mark.parametrize("fanout", [False, True], ids=["one node", "fan-out"])
async def test_an_unsubscribe_served_during_its_subscribe_leaves_nothing(
    autojump_clock: trio.abc.Clock, fanout: bool
) -> None:
    """A connection's requests run at once: an unsubscribe sent right behind its subscribe
    is served while the join reads the job. The join then kept the room's head for good (an
    entry per room so left, never removed: job rooms of pruned jobs included), and, with the
    fan-out, watched the job's user with no subscription left to unwatch it: the node
    tracked that user, and read the log for it, for the life of the process."""
    async with open_runtime(
        backend=MemoryBackend(),
        handlers={"quick": _quick},
        broadcast=BroadcasterConfig(),
        fanout=FanoutConfig(None) if fanout else None,
    ) as rt:
        broadcaster = rt.broadcaster
        assert broadcaster is not None
        for n in range(50):
            job = await rt.create_job("quick", f"user{n}", n)
            await rt.wait_job(job.id)
            outbox = Outbox(broadcaster.config)
            room = f"job:{job.id}"
            async with trio.open_nursery() as nursery:
                nursery.start_soon(broadcaster.join, outbox, room, None)
                # Once registered, the join reads the job: the unsubscribe is served then.
                while room not in outbox.subscriptions:
                    await trio.lowlevel.checkpoint()
                broadcaster.leave(outbox, room)
            broadcaster.finish_join(outbox, room)
            assert not outbox.subscriptions
        assert broadcaster.subscriber_count == 0
        if rt.fanout is not None:
            assert not rt.fanout.sequencer._users
        assert not broadcaster._heads


class _RefusingBackend(MemoryBackend):
    """A memory backend that refuses (a request-tied error) every commit with a job of a
    user named ``bad...``."""

    async def commit(self, jobs: Any, *args: Any, **kwargs: Any) -> Any:
        if any(job.user_id.startswith("bad") for job in jobs):
            raise ValueError("refused")
        return await super().commit(jobs, *args, **kwargs)


async def test_failed_commits_leave_nothing_behind(autojump_clock: trio.abc.Clock) -> None:
    """Each failed commit voids a generation of groups and records why; that record stayed
    after its groups were answered, one per failed commit for the life of the process (on a
    database several nodes share, a write that lost a job to another node is one)."""
    async with open_store_on(_RefusingBackend()) as (client, actor):
        for n in range(100):
            with pytest.raises(StoreError):
                await client.create(f"bad{n}", "k", n)
            await client.create(f"good{n}", "k", n)
        assert actor._generation >= 100
        assert len(actor._void) <= 1


async def test_a_runtime_keeps_at_most_users_cached_users(
    autojump_clock: trio.abc.Clock,
) -> None:
    """The same through a runtime (``RuntimeConfig.users_cached``, the config file's
    ``[runtime]`` key): users who each come once, run a job with a key and leave."""
    async with open_runtime(
        backend=MemoryBackend(),
        handlers={"quick": _quick},
        config=RuntimeConfig(users_cached=CACHED),
    ) as rt:
        for n in range(300):
            job = await rt.create_job("quick", f"user{n}", n, idempotency_key=f"key{n}")
            await rt.wait_job(job.id)
        store = rt.store_actor
        assert len(store._user_heads) <= CACHED
        assert len(store._waiting) <= CACHED
        assert len(store._key_filter) <= CACHED
