"""Hostile values and foreign messages through the PostgreSQL backend and the Redis fan-out,
compared with SQLite: each fault found stays with its cause, alike on every backend.

* Two nodes on one PostgreSQL database took the same idempotency key twice: a create retried
  through another node (as a client does that moved after a lost reply) made a second job,
  whether the first had committed long before (each store's filter of keys knew only its own)
  or was committing at the same moment (no check across writers).
* A user id or kind within 1,024 characters but over PostgreSQL's 2,704 bytes per index entry
  (three- or four-byte characters) failed every create on PostgreSQL only, as a ``StoreError``.
* A node id holding NUL or a lone surrogate failed the node's registration as a ``StoreError``
  (on PostgreSQL only for NUL).
* Commit groups of megabytes (jobs finishing at once with large results) went to Redis whole:
  Redis cut every node's subscription once more than 32 MiB waited for one.
"""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio

from actors import (
    BroadcasterConfig,
    IdempotencyConflictError,
    InvalidInputError,
    JobContext,
    Runtime,
    RuntimeConfig,
    open_runtime,
)
from actors._fanout import FanoutConfig
from actors._postgres import PostgresBackend

from .serving import eventually
from .test_fanout import RedisServer, Subscriber, redis  # noqa: F401 - a fixture


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


def text_of(count: int, first: int) -> str:
    """``count`` distinct characters from code point ``first`` on: nothing to compress."""
    return "".join(chr(first + n) for n in range(count))


CJK, EMOJI = 0x4E00, 0x1F300  # three and four bytes each in UTF-8


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "postgresql":
        url: str = request.getfixturevalue("pg_url")
        return url
    return str(tmp_path / "jobs.db")


async def test_names_are_bounded_in_bytes_alike_on_every_backend(store_url: str) -> None:
    """A user id or kind of 1,024 characters of three bytes each: SQLite stored it, and
    PostgreSQL refused it in every create (its index entries hold at most 2,704 bytes) as a
    ``StoreError`` naming an index. Both now refuse it at the call with ``InvalidInputError``
    naming the field; the longest names admitted (1,024 bytes each, with a key of 256
    four-byte characters) are stored by both."""
    kind = text_of(256, EMOJI)
    async with open_runtime(store_url, handlers={"echo": echo, kind: echo}) as rt:
        for user_id in (text_of(1024, CJK), text_of(342, CJK)):
            with pytest.raises(InvalidInputError, match=r"user_id is .* bytes of UTF-8"):
                await rt.create_job("echo", user_id, {})
        with pytest.raises(InvalidInputError, match=r"actor is .* bytes of UTF-8"):
            await rt.cancel((await rt.create_job("echo", "bob", {})).id, by=text_of(300, EMOJI))
        longest = await rt.create_job(
            kind, text_of(256, EMOJI + 300), {}, idempotency_key=text_of(256, EMOJI + 600)
        )
        assert (await rt.get_job(longest.id)).user_id == text_of(256, EMOJI + 300)
    with pytest.raises(InvalidInputError, match="bytes of UTF-8"):
        async with open_runtime(store_url, handlers={text_of(400, CJK): echo}):
            pass  # pragma: no cover


@pytest.mark.parametrize("node_id", ["a\x00b", "a\udce9", "line\nbreak", text_of(400, CJK)])
async def test_a_node_id_no_backend_can_store_is_refused_in_the_config(
    node_id: str, store_url: str
) -> None:
    """A node id holding NUL opened on SQLite and failed on PostgreSQL at its registration,
    a lone surrogate failed on both, as a ``StoreError`` with a traceback logged ("node
    request failed"); a line break went into every log line and metrics label naming the
    node. Each is now refused by ``RuntimeConfig`` naming the field, before anything opens."""
    with pytest.raises(InvalidInputError, match="node_id"):
        async with open_runtime(store_url, config=RuntimeConfig(node_id=node_id)):
            pass  # pragma: no cover


release = trio.Event()


async def large(ctx: JobContext, input: Any) -> Any:
    """Waits for ``release`` (so that many finish at once), then returns ``input`` bytes."""
    await release.wait()
    return "r" * input


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="no redis-server")
async def test_large_results_finishing_at_once_never_cut_the_subscriptions(
    pg_url: str,
    redis: RedisServer,  # noqa: F811 - test_fanout's fixture, imported above
) -> None:
    """Sixty jobs finishing at once with results of 600 KB: their commit groups went to Redis
    whole, 36 MB of messages for each subscriber at once, over the 32 MiB Redis lets wait for
    one, so Redis cut every node's subscription (the publisher's too): each logged Redis as
    unavailable and polled the log until it subscribed again. A group over
    ``max_message_bytes`` now publishes only its users' heads, the other nodes read its
    events from the log at once, and the subscriptions stay up; every event reaches the other
    node's subscriber once, in order."""
    global release
    release = trio.Event()

    def fan_node(handlers: dict[str, Any]) -> Any:
        return open_runtime(
            backend=PostgresBackend(pg_url),
            handlers=handlers,
            config=RuntimeConfig(resume_on_start=False),
            broadcast=BroadcasterConfig(),
            fanout=FanoutConfig(redis.url, secret="shared", ping_interval=0.2),
        )

    async with fan_node({"large": large}) as a, fan_node({}) as b:
        assert a.fanout is not None and b.fanout is not None
        watcher = Subscriber(b)
        await watcher.join("user:alice")
        await eventually(lambda: a.fanout.health.ok and b.fanout.health.ok)
        outages = (a.fanout.health.outages, b.fanout.health.outages)
        jobs = [await a.create_job("large", "alice", 600_000) for _ in range(60)]
        await eventually(lambda: a.supervisor.running_counts()[0] == len(jobs))
        release.set()
        for job in jobs:
            await a.wait_job(job.id)
        await watcher.until(
            lambda: sum(e["type"] == "completed" for e in watcher.events["user:alice"]) == 60
        )
        assert watcher.seqs("user:alice") == list(range(1, 3 * len(jobs) + 1))
        assert (a.fanout.health.outages, b.fanout.health.outages) == outages
        assert a.fanout.health.ok and b.fanout.health.ok
        assert a.fanout.stats.publish_oversized > 0
        # Announced, not found late: no warning that a node died before publishing them.
        assert b.fanout.stats.late == 0
