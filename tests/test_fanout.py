"""Cluster fan-out against real PostgreSQL and Redis: two runtimes on one database, each with
its own Redis connection (a ``redis-server`` of the test's own, killed and restarted), deliver
every event of the rooms their subscribers joined, once, in order, whoever committed it."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio

from actors import (
    BroadcasterConfig,
    Cursor,
    InvalidInputError,
    JobContext,
    JoinResult,
    Outbox,
    Runtime,
    RuntimeConfig,
    open_runtime,
)
from actors._events import EVENT_OVERHEAD, EventHub, EventType, JobEvent, event_bytes
from actors._fanout import Fanout, FanoutConfig
from actors._postgres import PostgresBackend
from actors._states import JobState
from transport import open_client

from .conftest import wait_for_state
from .serving import eventually, free_port
from .test_cli import COMMAND, http_get, serve_process

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="no redis-server")


class RedisServer:
    """A ``redis-server`` of the test's own on a free port (no persistence)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while (
            subprocess.run(
                ["redis-cli", "-p", str(self.port), "ping"], capture_output=True, check=False
            ).stdout.strip()
            != b"PONG"
        ):
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait()
        self.process = None


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        if server.process is not None:
            server.kill()


async def ticker(ctx: JobContext, input: Any) -> Any:
    """``n`` progress events ``pause`` seconds apart, each labelled with when it was made."""
    for step in range(input["n"]):
        await ctx.progress(step * 100 / input["n"], repr(time.time()))
        await trio.sleep(input["pause"])
    return input["n"]


@asynccontextmanager
async def node(
    pg_url: str, redis_url: str, *, runs_jobs: bool, **fanout: Any
) -> AsyncIterator[Runtime]:
    """One node: a runtime on the shared database with the fan-out on."""
    async with open_runtime(
        backend=PostgresBackend(pg_url),
        handlers={"ticker": ticker} if runs_jobs else {},
        config=RuntimeConfig(resume_on_start=False),
        broadcast=BroadcasterConfig(),
        fanout=FanoutConfig(redis_url, **fanout),
    ) as rt:
        yield rt


class Subscriber:
    """An outbox joined to rooms of one node's broadcaster, collecting what it receives."""

    def __init__(self, rt: Runtime) -> None:
        assert rt.broadcaster is not None
        self.rt = rt
        self.broadcaster = rt.broadcaster
        self.outbox = Outbox(self.broadcaster.config)
        #: room -> events received (their JSON), in order.
        self.events: dict[str, list[dict[str, Any]]] = {}
        self.arrived: list[float] = []

    async def join(self, room: str, cursor: Cursor | None = None) -> JoinResult:
        joined = await self.broadcaster.join(self.outbox, room, cursor)
        assert joined.reset_reason is None
        self.broadcaster.finish_join(self.outbox, room)
        self.events.setdefault(room, [])
        return joined

    def drain(self) -> None:
        for item in self.outbox.take(max_bytes=1 << 30):
            message = orjson.loads(item)
            if message["type"] != "event":
                continue
            event = message["event"]
            self.arrived.append(time.time())
            for room in (f"job:{event['job_id']}", f"user:{event['user_id']}"):
                if room in self.events:
                    self.events[room].append(event)

    async def until(self, done: Any, timeout: float = 30) -> None:  # noqa: ASYNC109
        with trio.fail_after(timeout):
            while True:
                self.drain()
                if done():
                    return
                with trio.move_on_after(0.05):
                    await self.outbox.wait()

    def seqs(self, room: str) -> list[int]:
        key = "seq" if room.startswith("job:") else "user_seq"
        return [e[key] for e in self.events[room]]


def finished(sub: Subscriber, room: str) -> Any:
    return lambda: any(e["type"] == "completed" for e in sub.events[room])


async def test_events_of_a_job_on_another_node_arrive_once_in_order_and_live(
    pg_url: str, redis: RedisServer
) -> None:
    async with (
        node(pg_url, redis.url, runs_jobs=True) as a,
        node(pg_url, redis.url, runs_jobs=False) as b,
    ):
        assert a.epoch == b.epoch  # one database, one epoch: cursors are portable
        watcher = Subscriber(b)
        await watcher.join("user:alice")
        await eventually(lambda: bool(a.fanout and b.fanout and a.fanout.health.ok
                                      and b.fanout.health.ok))  # fmt: skip
        job = await a.create_job("ticker", "alice", {"n": 40, "pause": 0.02})
        # A connection of its own (one connection's overlapping rooms may both deliver an
        # event, which a client tells apart by room cursor).
        job_watcher = Subscriber(b)
        await job_watcher.join(f"job:{job.id}")
        await watcher.until(finished(watcher, "user:alice"))  # drained as events arrive
        await job_watcher.until(finished(job_watcher, f"job:{job.id}"))
        stored = await a.get_job(job.id)
        seqs = job_watcher.seqs(f"job:{job.id}")
        assert seqs == list(range(seqs[0], stored.seq + 1))  # joined live: from then on
        assert watcher.seqs("user:alice") == list(range(1, stored.seq + 1))
        # Live: progress reached B's subscriber well under a log poll interval after A
        # committed it (pushed, not polled; a loaded machine gets room).
        delays = sorted(
            arrived - float(e["data"]["step"])
            for e, arrived in zip(watcher.events["user:alice"], watcher.arrived, strict=True)
            if e["type"] == "progress"
        )
        assert delays[len(delays) // 2] < 0.1, delays
        assert b.fanout is not None and b.fanout.stats.received >= stored.seq
        assert a.fanout is not None and a.fanout.stats.published_events >= stored.seq
        # A later join on B starts at the user's true head (B's own store never wrote
        # alice's events), and its next event follows it.
        late = Subscriber(b)
        joined = await late.join("user:alice")
        assert joined.head == stored.seq
        second = await a.create_job("ticker", "alice", {"n": 3, "pause": 0.01})
        await late.until(finished(late, "user:alice"))
        assert late.seqs("user:alice") == list(
            range(stored.seq + 1, stored.seq + 1 + (await a.get_job(second.id)).seq)
        )


async def test_dropped_publishes_are_filled_from_the_log(pg_url: str, redis: RedisServer) -> None:
    """Commit groups that never reach Redis (as if pub/sub dropped them): a gap in the middle
    is filled when the next event shows it; the last events of a job, which no later event
    reveals, are filled once their node announces the user's head."""
    async with (
        node(pg_url, redis.url, runs_jobs=True) as a,
        node(pg_url, redis.url, runs_jobs=False) as b,
    ):
        assert a.fanout is not None and b.fanout is not None
        watcher = Subscriber(b)
        await watcher.join("user:bob")
        job = await a.create_job("ticker", "bob", {"n": 30, "pause": 0.02})
        await watcher.until(lambda: len(watcher.events["user:bob"]) >= 5)
        a.fanout.skip_publish = True
        await trio.sleep(0.1)
        a.fanout.skip_publish = False
        await watcher.until(lambda: len(watcher.events["user:bob"]) >= 20)
        assert b.fanout.sequencer.stats.gaps >= 1 and b.fanout.sequencer.stats.filled >= 1
        a.fanout.skip_publish = True  # the rest of the job, its completion included
        await wait_for_state(a, job.id)
        stored = await a.get_job(job.id)
        await watcher.until(finished(watcher, "user:bob"), timeout=15)
        assert watcher.seqs("user:bob") == list(range(1, stored.seq + 1))


async def test_events_no_message_carries_reach_the_other_nodes_from_the_log(
    pg_url: str, redis: RedisServer
) -> None:
    """Events no message will ever bring (their node died between its commit and its
    ``PUBLISH``, or publishes where this node does not listen: here another Redis, as a
    misconfigured node would) reach this node's clients from the log within
    ``check_interval``, once each and in order, and are counted late. Before, a user none of
    whose later events revealed the gap never got them (a finished job's last events)."""
    elsewhere = RedisServer()
    elsewhere.start()
    try:
        async with (
            node(pg_url, elsewhere.url, runs_jobs=True) as a,
            node(pg_url, redis.url, runs_jobs=False, check_interval=3.0) as b,
        ):
            assert b.fanout is not None
            watcher = Subscriber(b)
            await watcher.join("user:erin")
            job = await a.create_job("ticker", "erin", {"n": 5, "pause": 0.001})
            await wait_for_state(a, job.id)
            stored = await a.get_job(job.id)
            await watcher.until(finished(watcher, "user:erin"), timeout=10)
            assert watcher.seqs("user:erin") == list(range(1, stored.seq + 1))
            assert b.fanout.stats.received == 0  # none came through Redis
            assert b.fanout.stats.late >= 1
    finally:
        elsewhere.kill()


async def test_nodes_without_redis_deliver_each_others_events_from_the_log(pg_url: str) -> None:
    """Two nodes on one database and no Redis (or a node left out of the fan-out by mistake):
    each reads the other's events from the log (``poll_interval``), so a client of either gets
    every event of its rooms once, in order. Before, a node given no fan-out delivered only
    its own commits: the other node's were never sent, and a client resubscribing to close
    the gaps looped on them."""

    async def bare_node(runs_jobs: bool) -> Any:
        return open_runtime(
            backend=PostgresBackend(pg_url),
            handlers={"ticker": ticker} if runs_jobs else {},
            config=RuntimeConfig(resume_on_start=False),
            broadcast=BroadcasterConfig(),
        )

    async with await bare_node(True) as a, await bare_node(False) as b:
        assert b.fanout is not None and b.fanout.config.redis is None
        watcher = Subscriber(b)
        await watcher.join("user:fay")
        job = await a.create_job("ticker", "fay", {"n": 10, "pause": 0.01})
        await wait_for_state(a, job.id)
        stored = await a.get_job(job.id)
        await watcher.until(finished(watcher, "user:fay"), timeout=10)
        assert watcher.seqs("user:fay") == list(range(1, stored.seq + 1))


async def test_groups_over_the_outbox_byte_budget_are_filled_from_the_log(
    pg_url: str, redis: RedisServer
) -> None:
    """The publish outbox is bounded in bytes too: with room for about two events, what does
    not fit is not queued (nothing past the budget is held), and reaches the other node from
    the log, once each and in order."""
    budget = 2 * EVENT_OVERHEAD + 200
    async with (
        node(pg_url, redis.url, runs_jobs=True, outbox_bytes=budget) as a,
        node(pg_url, redis.url, runs_jobs=False) as b,
    ):
        assert a.fanout is not None and b.fanout is not None
        watcher = Subscriber(b)
        await watcher.join("user:dora")
        jobs = [await a.create_job("ticker", "dora", {"n": 30, "pause": 0.001}) for _ in range(3)]
        for job in jobs:
            await wait_for_state(a, job.id)
        total = sum([(await a.get_job(job.id)).seq for job in jobs])
        await watcher.until(lambda: len(watcher.events["user:dora"]) >= total, timeout=15)
        assert watcher.seqs("user:dora") == list(range(1, total + 1))
        assert a.fanout.stats.published_groups >= 1
        assert 0 <= a.fanout.outbox_bytes <= budget


async def test_the_outbox_takes_groups_within_its_byte_budget_or_when_empty() -> None:
    """Without Redis: what the publish outbox queues, by bytes (the publisher is not running,
    so nothing leaves it)."""
    event = JobEvent("j", "u", 1, EventType.PROGRESS, JobState.RUNNING, 1.0, {"step": "s"})
    cost = event_bytes(event)
    fanout = Fanout(None, EventHub(), FanoutConfig("redis://x", outbox_bytes=3 * cost), "n")  # type: ignore[arg-type]
    fanout._commit_group([event] * 10)  # over the budget, but the outbox is empty: queued
    assert fanout.outbox_bytes == 10 * cost and fanout.stats.publish_dropped == 0
    fanout._commit_group([event])  # over the budget: not queued, filled from the log
    assert fanout.outbox_bytes == 10 * cost and fanout.stats.publish_dropped == 1
    group, queued = fanout._outbox_receive.receive_nowait()
    assert (len(group), queued) == (10, 10 * cost)
    fanout.outbox_bytes -= queued  # what the publisher does as it takes a group
    for n in range(3):
        fanout._commit_group([event])
        assert fanout.outbox_bytes == (n + 1) * cost
    fanout._commit_group([event])  # the fourth does not fit
    assert fanout.outbox_bytes == 3 * cost and fanout.stats.publish_dropped == 2


async def test_redis_down_falls_back_to_the_log_and_push_resumes(
    pg_url: str, redis: RedisServer
) -> None:
    async with (
        node(pg_url, redis.url, runs_jobs=True, ping_interval=0.2) as a,
        node(pg_url, redis.url, runs_jobs=False, ping_interval=0.2) as b,
    ):
        assert a.fanout is not None and b.fanout is not None
        watcher = Subscriber(b)
        await watcher.join("user:carol")
        job = await a.create_job("ticker", "carol", {"n": 150, "pause": 0.02})
        await watcher.until(lambda: len(watcher.events["user:carol"]) >= 10)
        redis.kill()
        await eventually(lambda: not b.fanout.health.ok)  # type: ignore[union-attr]
        assert b.fanout.health.reason
        outage_start = len(watcher.events["user:carol"])
        reads = b.fanout.stats.fill_reads
        # Nothing pushed now: events keep coming from the log.
        await watcher.until(lambda: len(watcher.events["user:carol"]) >= outage_start + 10)
        assert b.fanout.stats.fill_reads > reads
        redis.start()
        await eventually(
            lambda: b.fanout.health.ok and a.fanout.health.ok,  # type: ignore[union-attr]
            15,
        )
        received = b.fanout.stats.received
        await watcher.until(finished(watcher, "user:carol"))
        assert b.fanout.stats.received > received  # pushed again after the restart
        stored = await a.get_job(job.id)
        assert watcher.seqs("user:carol") == list(range(1, stored.seq + 1))
        assert b.fanout.health.outages == 1


async def test_a_cursor_taken_on_one_node_resumes_on_another(
    pg_url: str, redis: RedisServer
) -> None:
    async with (
        node(pg_url, redis.url, runs_jobs=True) as a,
        node(pg_url, redis.url, runs_jobs=False) as b,
    ):
        job = await a.create_job("ticker", "dana", {"n": 40, "pause": 0.01})
        room = f"job:{job.id}"
        first = Subscriber(a)
        await first.join(room)
        await first.until(lambda: len(first.events[room]) >= 8)
        a.broadcaster.leave_all(first.outbox)  # type: ignore[union-attr]
        first.drain()
        seen = first.seqs(room)
        # The client moves to node B with its cursor (same database, same epoch).
        second = Subscriber(b)
        await second.join(room, Cursor(a.epoch, seen[-1]))
        await second.until(finished(second, room))
        stored = await a.get_job(job.id)
        assert second.seqs(room) == list(range(seen[-1] + 1, stored.seq + 1))


async def test_serve_with_redis_reports_its_health_and_keeps_serving(
    pg_url: str, redis: RedisServer, tmp_path: Any
) -> None:
    """``jobspine serve --redis``: /readyz and /metrics show Redis health; with Redis killed
    the node stays ready (events come from the log) and says why; back when Redis is."""
    async with serve_process(
        tmp_path / "data", extra=("--store", pg_url, "--redis", redis.url)
    ) as served:

        async def ready() -> dict[str, Any]:
            status, body = await http_get(served.health, "/readyz")
            assert status == 200, body
            found: dict[str, Any] = orjson.loads(body)
            return found

        async def redis_up() -> float:
            _, body = await http_get(served.health, "/metrics")
            line = next(x for x in body.decode().splitlines() if x.startswith("jobspine_redis_up"))
            return float(line.split()[-1])

        with trio.fail_after(20):
            while not (await ready())["redis"]["ok"]:  # noqa: ASYNC110 - polling a server
                await trio.sleep(0.1)
        assert await redis_up() == 1
        redis.kill()
        with trio.fail_after(20):
            while (found := await ready())["redis"]["ok"]:  # noqa: ASYNC110
                await trio.sleep(0.1)
        assert found["status"] == "ready, redis unavailable" and found["redis"]["reason"]
        assert await redis_up() == 0
        async with open_client(served.url, served.token("erin")) as client:
            await client.subscribe("user:erin")
            job = await client.create("research", {"query": "q", "depth": 3})
            with trio.fail_after(30):
                async for event in client.events():
                    if getattr(event, "type", None) == "completed":
                        assert event.job_id == job["id"]  # type: ignore[union-attr]
                        break
        redis.start()
        with trio.fail_after(20):
            while not (await ready())["redis"]["ok"]:  # noqa: ASYNC110
                await trio.sleep(0.1)
        assert (await ready())["redis"]["outages"] == 1


async def test_the_redis_setting_comes_from_flag_env_or_file(tmp_path: Any) -> None:
    env = {**os.environ, "JOBSPINE_DATA": str(tmp_path)}
    shown = await trio.run_process(
        [*COMMAND, "config", "--json"],
        env={**env, "JOBSPINE_REDIS": "redis://app:hunter2@cache.example:6380/2"},
        capture_stdout=True,
        check=True,
    )
    setting = orjson.loads(shown.stdout)["server.redis"]
    assert setting["value"] == "redis://app:***@cache.example:6380/2"  # no password shown
    assert setting["source"] == "env JOBSPINE_REDIS"
    refused = await trio.run_process(
        [*COMMAND, "serve", "--redis", "cache.example:6380", "--port", "0", "--health-port", "0"],
        env=env,
        capture_stderr=True,
        check=False,
    )
    assert refused.returncode == 2
    assert "expected a redis://HOST:PORT/DB URL" in refused.stderr.decode()
    with pytest.raises(InvalidInputError, match="gap_wait must be a positive number"):
        FanoutConfig("redis://127.0.0.1:6379/0", gap_wait=0)
    with pytest.raises(InvalidInputError, match="must be a redis://"):
        FanoutConfig("127.0.0.1:6379")


async def test_serve_given_a_redis_url_its_server_refuses_stops_at_start(
    tmp_path: Any, redis: RedisServer
) -> None:
    """A ``--redis`` URL whose server answers "no" (a database index it does not have, a
    wrong user or password) started a node that polled the log for ever, one warning at
    start and its ``/readyz`` 200: a mistake no retry mends. ``serve`` stops at start with
    one line naming the answer (status 2, the password not shown); a Redis that does not
    answer yet still starts the node, polling the log until it does."""
    env = {
        **os.environ,
        "JOBSPINE_DATA": str(tmp_path),
        "PYTHONPATH": str(Path(__file__).parent.parent),
    }
    base = redis.url.rsplit("/", 1)[0]
    for url, said in (
        (f"{base}/99", "DB index is out of range"),
        (base.replace("redis://", "redis://bob:hunter2@") + "/0", "AuthenticationFailureError"),
    ):
        with trio.fail_after(30):  # before, it served on (killed here when the time is up)
            refused = await trio.run_process(
                [*COMMAND, "serve", "--redis", url, "--port", "0", "--health-port", "0"],
                env=env,
                capture_stderr=True,
                check=False,
            )
        lines = refused.stderr.decode().splitlines()
        assert refused.returncode == 2, lines
        assert len(lines) == 1 and lines[0].startswith("jobspine: error: --redis "), lines
        assert said in lines[0] and "hunter2" not in lines[0], lines
    down = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens: an outage, not a mistake
    async with serve_process(tmp_path / "down", extra=("--redis", down)) as served:
        status, body = await http_get(served.health, "/readyz")
        assert status == 200 and orjson.loads(body)["redis"]["ok"] is False, body


def test_only_an_answer_no_retry_mends_stops_serve_at_start() -> None:
    """A wrong password, a missing right or database index stop ``serve``; an answer that
    passes (a restarted Redis loading its dataset, a busy script) does not."""
    from coredis import exceptions as errors

    from actors._fanout import is_permanent_refusal

    assert is_permanent_refusal(errors.AuthenticationFailureError("invalid password"))
    assert is_permanent_refusal(errors.AuthorizationError("NOPERM no permissions"))
    assert is_permanent_refusal(errors.ResponseError("DB index is out of range"))
    assert not is_permanent_refusal(errors.ResponseError("LOADING Redis is loading the dataset"))
    assert not is_permanent_refusal(errors.ResponseError("BUSY Redis is busy running a script"))
    assert not is_permanent_refusal(OSError("connection refused"))


async def test_a_user_tracked_again_is_caught_up_from_the_log(
    pg_url: str, redis: RedisServer
) -> None:
    """A user B tracked, then stopped tracking while A committed its events: tracking it
    again (a subscriber resuming from its cursor) reads the log once, and the subscriber
    gets every event exactly once, from the join's history and the catch-up together."""
    async with (
        node(pg_url, redis.url, runs_jobs=True) as a,
        node(pg_url, redis.url, runs_jobs=False) as b,
    ):
        early = Subscriber(b)
        await early.join("user:frank")  # B counts frank's events: 0
        b.broadcaster.leave_all(early.outbox)  # type: ignore[union-attr]
        job = await a.create_job("ticker", "frank", {"n": 3, "pause": 0.01})
        stored = await wait_for_state(a, job.id)
        late = Subscriber(b)
        await late.join("user:frank", Cursor(b.epoch, 0))
        await late.until(lambda: len(late.events["user:frank"]) == stored.seq, timeout=10)
        assert late.seqs("user:frank") == list(range(1, stored.seq + 1))
