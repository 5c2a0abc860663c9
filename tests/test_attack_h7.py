"""Attacks on several nodes sharing one PostgreSQL database and one Redis (helper h7)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import attrs
import psycopg
import pytest
import trio

from actors import (
    EventType,
    InvalidInputError,
    JobContext,
    JobEvent,
    JobState,
    PostgresBackend,
    RuntimeConfig,
    open_runtime,
)
from actors._fanout import FanoutConfig
from actors._nodes import NodeInfo

from .conftest import wait_for_state
from .test_cli import COMMAND
from .test_nodes import FAST, HANDLERS, SharedMemory, job_is, owned, wait_until

T = TypeVar("T")

BAD_REDIS_URLS = [
    "redis://127.0.0.1:x/7",  # a port that is no number
    "redis://127.0.0.1:99999/7",  # past 65535
    "redis://127.0.0.1:6379/db7",  # a database that is no number: was database 0, silently
    "redis://127.0.0.1:6379?db=seven",
]


@pytest.mark.parametrize("url", BAD_REDIS_URLS)
def test_a_redis_url_the_client_cannot_open_is_refused_by_the_fanout_config(url: str) -> None:
    with pytest.raises(InvalidInputError, match="must be a redis://"):
        FanoutConfig(url)


@pytest.mark.parametrize(
    "url", ["redis://127.0.0.1:6379/7", "redis://h", "redis://h:1/", "unix:///s"]
)
def test_redis_urls_the_client_opens_are_taken(url: str) -> None:
    assert FanoutConfig(url).redis == url


@pytest.mark.parametrize("url", BAD_REDIS_URLS[:3])
async def test_serve_refuses_a_redis_url_it_cannot_open_as_a_usage_error(
    tmp_path: Path, url: str
) -> None:
    """``serve --redis redis://127.0.0.1:x/7`` failed with a ValueError traceback from the
    Redis client (exit 1) once the store was open, instead of a usage error naming the flag."""
    refused = await trio.run_process(
        [*COMMAND, "serve", "--redis", url, "--port", "0", "--health-port", "0"],
        env={**os.environ, "JOBSPINE_DATA": str(tmp_path)},
        capture_stderr=True,
        check=False,
    )
    stderr = refused.stderr.decode()
    assert refused.returncode == 2, stderr
    assert "Traceback" not in stderr
    assert "redis" in stderr and url in stderr


async def finish(ctx: JobContext, input: Any) -> Any:
    return input


@pytest.mark.parametrize("ttl", [30 * 86400.0, 1e20])
async def test_a_lease_ttl_of_a_month_or_more_opens_on_postgresql(pg_url: str, ttl: float) -> None:
    """PostgreSQL's ``idle_in_transaction_session_timeout`` (the lease TTL) is at most INT_MAX
    ms (24.8 days): every connection failed "Value exceeds integer range", the node never
    opened. (1e20 s failed first on every backend: see the next test.)"""
    config = RuntimeConfig(lease_ttl=ttl)
    async with open_runtime(pg_url, handlers={"finish": finish}, config=config) as rt:
        job = await rt.create_job("finish", "u", {"n": 1})
        done = await wait_for_state(rt, job.id, {JobState.COMPLETED}, timeout=20)
        assert done.result == {"n": 1}


async def test_a_lease_ttl_under_a_millisecond_opens_on_postgresql(pg_url: str) -> None:
    """The runtime's settings take it (any positive number of seconds), but the backend
    refused it with a ValueError about ``idle_timeout``, a setting the user never gave. (So
    short a lease lapses before any renewal is answered: the node is fenced again and again,
    and says so.)"""
    config = RuntimeConfig(lease_ttl=0.0005, lease_renew_interval=0.0001)
    async with open_runtime(pg_url, handlers={"finish": finish}, config=config) as rt:
        await rt.create_job("finish", "u", {"n": 1})


class AnswerLost(PostgresBackend):
    """Commits as PostgreSQL does, but the answer of the first commit holding an event of type
    ``lose`` is lost (the connection dropped after the server committed it)."""

    lose: str | None = None

    async def _run(self, fn: Callable[..., T], **kw: Any) -> T:
        out = await super()._run(fn, **kw)
        if isinstance(out, list) and any(
            isinstance(e, JobEvent) and e.type.value == self.lose for e in out
        ):
            self.lose = None
            raise psycopg.OperationalError("server closed the connection unexpectedly")
        return out


async def checkpoint_then_finish(ctx: JobContext, input: Any) -> Any:
    await ctx.checkpoint({"step": 1})
    return {"done": True}


@pytest.mark.parametrize("lost", ["started", "checkpoint", "completed"])
async def test_a_commit_whose_answer_was_lost_is_not_written_again(pg_url: str, lost: str) -> None:
    """The connection lost after PostgreSQL committed a group, before its answer: the store
    retried the group as an outage, and its fenced writes found the rows it had itself
    written. A create and start lost so failed ``create_job`` with StaleWriteError though the
    job was there and ran; a checkpoint was stored twice; and the events committed never
    reached this node's subscribers (a completed job whose ``completed`` nobody saw)."""
    backend = AnswerLost(pg_url)
    async with open_runtime(handlers={"work": checkpoint_then_finish}, backend=backend) as rt:
        async with rt.events() as stream:
            backend.lose = lost
            job = await rt.create_job("work", "u", {})
            seen = []
            with trio.fail_after(20):
                async for event in stream:
                    if event.job_id == job.id:
                        seen.append((event.seq, event.type.value))
                        if event.type.value == "completed":
                            break
        assert backend.lose is None  # the answer was lost
        done = await rt.get_job(job.id)
        assert done.state is JobState.COMPLETED and done.result == {"done": True}
    expected = [(1, "created"), (2, "started"), (3, "checkpoint"), (4, "completed")]
    assert seen == expected
    with psycopg.connect(pg_url) as conn:
        stored = conn.execute(
            "SELECT seq, type FROM events WHERE job_id = %s ORDER BY seq", (job.id,)
        ).fetchall()
    assert stored == expected


class TakeoverAnswerLost(SharedMemory):
    """A takeover that is stored, but whose answer is lost (the lease's connection dropped
    after the server committed it), once."""

    lost = 0

    async def take_over(self, node: NodeInfo, by: str) -> bool:
        won = await super().take_over(node, by)
        if won and not self.lost:
            self.lost += 1
            raise psycopg.OperationalError("server closed the connection unexpectedly")
        return won


async def test_jobs_of_a_takeover_whose_answer_was_lost_are_recovered_by_the_taker(
    autojump_clock: trio.abc.Clock,
) -> None:
    """The taker, told its takeover failed, queued no recovery; the node, dead in the
    database, was no longer listed as expired, and the orphan sweep left alone the jobs of a
    node whose taker is alive (this one): they stayed running under the dead owner, nobody
    recovering them, for as long as the taker lived."""
    backend = TakeoverAnswerLost()
    dead = await backend.register_node("dead", "d1", 1.0, "elsewhere", 1)
    await backend.commit(owned("j", "hang", dead.owner, backend._clock(), ckpt=True), [], (), {})
    config = attrs.evolve(FAST, node_id="a")
    async with open_runtime(backend=backend, handlers=HANDLERS, config=config) as rt:
        await wait_until(lambda: backend.lost, 5)
        await wait_until(lambda: job_is(rt, "j", JobState.PAUSED), 10)
        await trio.sleep(10)  # more sweeps: nothing more
        types = [e.type for e in await rt.read_events("j")]
        assert types.count(EventType.RECOVERY) == 1, types


@pytest.mark.parametrize(("ttl", "interval"), [(1e20, 1.0), (5.0, 1e-300), (1e300, 1e-300)])
async def test_lease_settings_the_runtime_takes_open_on_every_backend(
    tmp_path: Path, ttl: float, interval: float
) -> None:
    """The node keeps the ids of its unanswered registrations for one lease: ttl / interval
    of them, a count too large for a deque (OverflowError at every start, whatever the
    database) for a lease this long or an interval this short."""
    config = RuntimeConfig(lease_ttl=ttl, lease_renew_interval=interval)
    async with open_runtime(tmp_path / "j.db", handlers={"finish": finish}, config=config) as rt:
        job = await rt.create_job("finish", "u", {"n": 1})
        done = await wait_for_state(rt, job.id, {JobState.COMPLETED}, timeout=20)
        assert done.result == {"n": 1}
