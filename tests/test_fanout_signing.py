"""Fan-out messages are signed whatever the configuration, against real PostgreSQL and Redis:
nodes given no secret (``FanoutConfig(url)``, as an embedding application writes it) sign
with the key their database keeps, so that another program publishing on the channel reaches
no client. Before, such nodes sent and took unsigned messages: anyone who could publish on
the Redis delivered forged events (a progress, a completion) to every node's clients."""

from __future__ import annotations

import hashlib
import hmac
import shutil
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import psycopg
import pytest
import trio

from actors import (
    BroadcasterConfig,
    InvalidInputError,
    JobContext,
    MemoryBackend,
    Runtime,
    RuntimeConfig,
    StoreError,
    open_runtime,
)
from actors._events import EventType, JobEvent
from actors._fanout import Fanout, FanoutConfig, group_message
from actors._postgres import PostgresBackend
from actors._states import JobState

from .serving import eventually
from .test_fanout import RedisServer, Subscriber, finished, redis  # noqa: F401 - a fixture

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="no redis-server")


async def steps(ctx: JobContext, input: Any) -> Any:
    """``input`` progress events, then done."""
    for step in range(input):
        await ctx.progress(100 * (step + 1) / input, f"step {step}")
        await trio.sleep(0.01)
    return input


@asynccontextmanager
async def unsigned_node(
    backend: PostgresBackend | MemoryBackend, redis_url: str, node_id: str
) -> AsyncIterator[Runtime]:
    """A node as an embedder opens one: fan-out with no secret."""
    async with open_runtime(
        backend=backend,
        handlers={"steps": steps},
        config=RuntimeConfig(node_id=node_id, resume_on_start=False),
        broadcast=BroadcasterConfig(),
        fanout=FanoutConfig(redis_url, ping_interval=0.2),
    ) as rt:
        yield rt


def fan(rt: Runtime) -> Fanout:
    assert rt.fanout is not None
    return rt.fanout


def forged_events(victim: str, job_id: str) -> list[JobEvent]:
    """What a forger would publish: the next events of ``victim`` as a node commits them,
    numbered from 1 (the user's head on a fresh database), ending in a completion."""
    now = time.time()
    return [
        JobEvent(job_id, victim, 1, EventType.PROGRESS, JobState.RUNNING, now,
                 {"progress": 99.0, "step": "forged"}, None, 1),
        JobEvent(job_id, victim, 2, EventType.COMPLETED, JobState.COMPLETED, now,
                 {"result": "forged"}, None, 2),
    ]  # fmt: skip


def forgeries(victim: str, job_id: str) -> list[bytes]:
    """Messages crafted as a node's (:func:`group_message`, another node's id): unsigned, and
    signed with keys a forger might try (a random one; one derived from an empty secret)."""
    body, _, _ = group_message("forger", forged_events(victim, job_id), {victim: 2}, 1 << 20)

    def signed(key: bytes) -> bytes:
        return hmac.new(key, body, hashlib.sha256).hexdigest().encode() + body

    # The key an empty secret gives (:func:`~actors._fanout.signing_key`).
    return [body, signed(b"k" * 32), signed(hashlib.sha256(b"jobspine fan-out\0").digest())]


async def publish(server: RedisServer, channel: str, message: bytes) -> int:
    """``message`` published on ``channel`` by another program (``redis-cli``); returns how
    many subscribers Redis handed it to."""
    done = await trio.run_process(
        ["redis-cli", "-p", str(server.port), "-x", "PUBLISH", channel],
        stdin=message,
        capture_stdout=True,
    )
    return int(done.stdout.split()[-1])


async def test_a_foreign_publisher_reaches_no_client_of_nodes_given_no_secret(
    pg_url: str,
    redis: RedisServer,  # noqa: F811 - test_fanout's fixture, imported above
) -> None:
    """Two nodes on one database with ``FanoutConfig(url)`` and no secret; another program
    publishes event groups crafted as a node's on their channel (unsigned, and wrongly
    signed): no subscriber of either node gets a forged event, each node counts every such
    message as forged, and the nodes' own events still flow between them through Redis."""
    async with (
        unsigned_node(PostgresBackend(pg_url), redis.url, "n1") as a,
        unsigned_node(PostgresBackend(pg_url), redis.url, "n2") as b,
    ):
        watchers = [Subscriber(a), Subscriber(b)]
        for watcher in watchers:
            await watcher.join("user:victim")
        await eventually(lambda: fan(a).health.ok and fan(b).health.ok)
        channel = fan(a).channel
        for message in forgeries("victim", "01FORGEDJOB0000000000000000"):
            assert await publish(redis, channel, message) == 2  # both nodes subscribed
        # Pub/sub hands them over within milliseconds: what a node delivers is out by then.
        await trio.sleep(0.5)
        for watcher in watchers:
            watcher.drain()
            assert watcher.events["user:victim"] == []  # no forged event reached a client
        await eventually(lambda: fan(a).stats.forged >= 3 and fan(b).stats.forged >= 3)
        assert (fan(a).stats.received, fan(b).stats.received) == (0, 0)
        # The real events of the user, committed by A, reach B's subscriber through Redis,
        # from the first (the forged ``user_seq`` 1 took no place of a real one).
        job = await a.create_job("steps", "victim", 5)
        await a.wait_job(job.id)
        stored = await a.get_job(job.id)
        for watcher in watchers:
            await watcher.until(finished(watcher, "user:victim"), timeout=15)
            assert watcher.seqs("user:victim") == list(range(1, stored.seq + 1))
            assert {e["job_id"] for e in watcher.events["user:victim"]} == {job.id}
        assert fan(b).stats.received > 0 and fan(b).stats.late == 0
        assert (fan(a).stats.forged, fan(b).stats.forged) == (3, 3)


async def test_nodes_started_at_once_on_a_fresh_database_agree_on_the_key(
    pg_url: str,
    redis: RedisServer,  # noqa: F811 - test_fanout's fixture, imported above
) -> None:
    """Two nodes opening a fresh database at the same moment: one key is stored and both sign
    with it, so that each one's events reach the other's subscribers through Redis, none
    dropped as forged."""
    nodes: dict[str, Runtime] = {}
    release = trio.Event()

    async def run_node(node_id: str) -> None:
        async with unsigned_node(PostgresBackend(pg_url), redis.url, node_id) as rt:
            nodes[node_id] = rt
            await release.wait()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_node, "n1")
        nursery.start_soon(run_node, "n2")
        await eventually(lambda: len(nodes) == 2, 30)
        a, b = nodes["n1"], nodes["n2"]
        with psycopg.connect(pg_url, autocommit=True) as conn:
            rows = conn.execute("SELECT value FROM meta WHERE key = 'fanout_key'").fetchall()
        assert len(rows) == 1 and len(bytes.fromhex(rows[0][0])) == 32
        await eventually(lambda: fan(a).health.ok and fan(b).health.ok)
        # Each node creates a job for a user the other node's subscriber follows: its commits
        # (the creation at least, whoever runs the job) cross from that node to the other.
        on_a, on_b = Subscriber(a), Subscriber(b)
        await on_a.join("user:bob")
        await on_b.join("user:alice")
        heads = {}
        for node, user in ((a, "alice"), (b, "bob")):
            job = await node.create_job("steps", user, 3)
            await node.wait_job(job.id)
            heads[user] = (await node.get_job(job.id)).seq
        for watcher, user in ((on_b, "alice"), (on_a, "bob")):
            await watcher.until(finished(watcher, f"user:{user}"), timeout=15)
            assert watcher.seqs(f"user:{user}") == list(range(1, heads[user] + 1))
        for node in (a, b):
            assert fan(node).stats.received > 0
            assert (fan(node).stats.forged, fan(node).stats.late) == (0, 0)
        release.set()


def test_a_secret_keeps_its_key_and_a_database_without_one_signs_with_its_own() -> None:
    """Nodes given a secret sign as before (a key derived from it alone, whatever the
    database: they interoperate with nodes of the release before). Given none, the database's
    key as it is. A memory database (or a SQLite file, one process's) makes a key of its own."""
    from actors._fanout import signing_key

    derived = hashlib.sha256(b"jobspine fan-out\0shared").digest()
    assert signing_key("shared", b"a" * 32) == signing_key("shared", b"b" * 32) == derived
    assert signing_key(None, b"a" * 32) == b"a" * 32
    first, second = MemoryBackend(), MemoryBackend()
    assert len(first.fanout_key) == 32 and first.fanout_key != second.fanout_key


@pytest.mark.parametrize("secret", ["", b"bytes", 7])
def test_a_secret_that_would_sign_nothing_is_refused(secret: Any) -> None:
    """An empty secret derives a key anyone can compute (as good as none): refused by name,
    as is a secret that is not a string."""
    with pytest.raises(InvalidInputError, match="secret must be a non-empty string"):
        FanoutConfig("redis://127.0.0.1:6379/0", secret=secret)


async def test_a_node_on_a_database_of_its_own_drops_unsigned_messages(
    redis: RedisServer,  # noqa: F811 - test_fanout's fixture, imported above
) -> None:
    """A runtime on a database no other node opens (here memory) with Redis fan-out and no
    secret: it signs with a key of its own, so a message another program publishes on its
    channel reaches none of its clients; its own events still reach them."""
    async with unsigned_node(MemoryBackend(), redis.url, "solo") as rt:
        watcher = Subscriber(rt)
        await watcher.join("user:victim")
        await eventually(lambda: fan(rt).health.ok)
        for message in forgeries("victim", "01FORGEDJOB0000000000000000"):
            assert await publish(redis, fan(rt).channel, message) == 1
        await trio.sleep(0.5)
        watcher.drain()
        assert watcher.events["user:victim"] == []
        await eventually(lambda: fan(rt).stats.forged == 3)
        job = await rt.create_job("steps", "victim", 2)
        await watcher.until(finished(watcher, "user:victim"))
        assert {e["job_id"] for e in watcher.events["user:victim"]} == {job.id}


async def test_a_fanout_key_jobspine_did_not_write_is_refused_at_open(pg_url: str) -> None:
    """A ``fanout_key`` row that is not 32 bytes in hex (written by hand, damaged): the
    database is refused at open with a :class:`StoreError` saying which row, not used with a
    key that would make this node unverifiable."""
    async with PostgresBackend(pg_url).opened():
        pass
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("UPDATE meta SET value = 'not hex' WHERE key = 'fanout_key'")
    with pytest.raises(StoreError, match="fan-out key in meta is not one jobspine wrote"):
        async with PostgresBackend(pg_url).opened():
            pass  # pragma: no cover
