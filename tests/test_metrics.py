"""``/metrics`` in the Prometheus text format, scraped from a real health port and parsed with
prometheus-client's own parser; the store's job counts against the database's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import trio
from prometheus_client.parser import text_string_to_metric_families

from actors import (
    DEMO_HANDLERS,
    BroadcasterConfig,
    EventType,
    JobContext,
    JobState,
    MemoryBackend,
    Outbox,
    RuntimeConfig,
    open_runtime,
)
from actors._events import JobEvent
from transport import ServerConfig, open_server

from .conftest import memory_runtime, wait_for_state
from .serving import SECRET, raw
from .test_cli import http_exchange

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(port: int, path: str = "/metrics") -> tuple[bytes, dict[str, str], bytes]:
    """(status line, headers, body) of one GET."""
    head, body = await http_exchange(port, path)
    status, *lines = head.split(b"\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


async def samples(port: int) -> Samples:
    status, headers, body = await scrape(port)
    assert status == b"HTTP/1.1 200 OK"
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    found: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(found: Samples, name: str, **labels: str) -> float:
    return found[(name, tuple(sorted(labels.items())))]


async def parked(ctx: JobContext, input: Any) -> Any:
    """Checkpoints, then hangs without heartbeats: stalls and is paused (a recovery)."""
    await ctx.checkpoint({"step": 1})
    await trio.sleep_forever()


async def test_metrics_exposition_moves_with_jobs(tmp_path: Path) -> None:
    config = ServerConfig(secret=SECRET, port=0, heartbeat_interval=0.2)
    runtime_config = RuntimeConfig(
        heartbeat_timeout=0.5, stop_grace=0.2, sqlite_synchronous="NORMAL"
    )
    async with open_server(
        tmp_path / "db.sqlite",
        config,
        handlers={**DEMO_HANDLERS, "parked": parked},
        runtime_config=runtime_config,
        broadcast=BroadcasterConfig(),
        health_port=0,
    ) as running:
        assert running.health_port is not None
        before = await samples(running.health_port)
        for state in JobState:
            assert value(before, "jobspine_jobs", state=state.value) == 0
        assert value(before, "jobspine_job_events_total", type="completed") == 0
        assert value(before, "jobspine_connections") == 0
        assert value(before, "jobspine_stalls_total") == 0
        assert value(before, "jobspine_lagged_total") == 0
        assert value(before, "jobspine_info", epoch=running.runtime.epoch) == 1
        assert ("process_resident_memory_bytes", ()) in before

        rt = running.runtime
        job = await rt.create_job("research", "alice", {"query": "q", "depth": 2, "delay": 0})
        await wait_for_state(rt, job.id)
        stalled = await rt.create_job("parked", "bob", {})
        await wait_for_state(rt, stalled.id, {JobState.PAUSED})
        async with raw(running):
            after = await samples(running.health_port)
            assert value(after, "jobspine_connections") == 1
            assert value(after, "jobspine_subscriptions") == 0

    assert value(after, "jobspine_jobs", state="completed") == 1
    assert value(after, "jobspine_jobs", state="paused") == 1
    assert value(after, "jobspine_jobs", state="running") == 0
    assert value(after, "jobspine_job_events_total", type="created") == 2
    assert value(after, "jobspine_job_events_total", type="completed") == 1
    assert value(after, "jobspine_job_events_total", type="recovery") == 1
    assert value(after, "jobspine_job_events_total", type="progress") >= 3
    assert value(after, "jobspine_stalls_total") == 1
    assert value(after, "jobspine_recoveries_total") == 1
    commits = value(after, "jobspine_store_commits_total")
    assert commits > value(before, "jobspine_store_commits_total")
    assert value(after, "jobspine_store_commit_seconds_count") == commits
    assert value(after, "jobspine_store_commit_seconds_bucket", le="+Inf") == commits
    assert 0 < value(after, "jobspine_store_commit_seconds_sum") < commits
    assert value(after, "jobspine_events_published_total") >= 8


async def test_health_answers_carry_reason_phrases(tmp_path: Path) -> None:
    config = ServerConfig(secret=SECRET, port=0)
    async with open_server(
        tmp_path / "db.sqlite",
        config,
        runtime_config=RuntimeConfig(stop_grace=0.2),
        health_port=0,
    ) as running:
        assert running.health_port is not None
        ok, headers, body = await scrape(running.health_port, "/healthz")
        assert ok == b"HTTP/1.1 200 OK" and headers["content-type"] == "application/json"
        missing, _, _ = await scrape(running.health_port, "/nope")
        assert missing == b"HTTP/1.1 404 Not Found"
        status, _, body = await scrape(running.health_port, "/status")
        assert status == b"HTTP/1.1 200 OK" and b'"supervisor"' in body


async def _check_counts(rt: Any) -> None:
    counts = rt.store_actor.metrics.jobs
    stats = await rt.get_stats()
    assert {state.value: counts.get(state, 0) for state in JobState} == {
        state.value: stats[state.value] for state in JobState
    }


async def test_job_counts_follow_every_transition() -> None:
    backend = MemoryBackend()
    hold = trio.Event()

    async def waiting(ctx: JobContext, input: Any) -> Any:
        await hold.wait()
        return input

    handlers = {"waiting": waiting}
    async with memory_runtime(handlers, backend, stop_grace=0.01) as rt:
        jobs = [await rt.create_job("waiting", "alice", {"n": i}) for i in range(6)]
        await _check_counts(rt)
        await rt.pause(jobs[0].id)
        await rt.cancel(jobs[1].id)
        await rt.pause(jobs[2].id)
        await rt.resume(jobs[2].id)
        await rt.cancel(jobs[3].id)
        await rt.restart(jobs[3].id)
        await rt.cancel(jobs[4].id)
        await rt.delete_job(jobs[4].id)
        await _check_counts(rt)
        hold.set()
        for job in jobs[2:4] + jobs[5:]:
            await wait_for_state(rt, job.id)
        await _check_counts(rt)
    async with memory_runtime(handlers, backend) as rt:  # counted from the database at start
        await _check_counts(rt)
        assert rt.store_actor.metrics.jobs[JobState.COMPLETED] == 3


async def test_job_counts_are_loaded_from_sqlite(tmp_path: Path) -> None:
    config = RuntimeConfig(sqlite_synchronous="NORMAL")
    async with open_runtime(tmp_path / "j.db", handlers=DEMO_HANDLERS, config=config) as rt:
        job = await rt.create_job("research", "alice", {"query": "q", "depth": 1, "delay": 0})
        await wait_for_state(rt, job.id)
    async with open_runtime(tmp_path / "j.db", handlers={"parked": parked}, config=config) as rt:
        parked_job = await rt.create_job("parked", "alice", {})
        await wait_for_state(rt, parked_job.id, {JobState.RUNNING})
        await _check_counts(rt)
        metrics = rt.store_actor.metrics
        assert metrics.jobs[JobState.COMPLETED] == 1 and metrics.jobs[JobState.RUNNING] == 1


async def test_an_overflowing_outbox_counts_a_lag() -> None:
    outbox = Outbox(BroadcasterConfig(coalesce_after=10, overflow_after=3))
    for seq in range(1, 6):
        event = JobEvent("j", "u", seq, EventType.CHECKPOINT, JobState.RUNNING, 0.0, {}, None, seq)
        outbox.push_event(event, b"{}", live=True)
    assert outbox.lagged == 1


async def test_status_lists_the_connected_workers_by_name(tmp_path: Path) -> None:
    """``jobspine worker --name`` names a worker in ``/status`` too (the README said so, and
    a new user found no worker there): its kinds, capacity, running attempts, drain."""
    from .test_worker_protocol import raw_worker, receive
    from .worker_support import worker_token

    config = ServerConfig(secret=SECRET, port=0)
    runtime = RuntimeConfig(stop_grace=0.2, in_process_handlers=False)
    async with open_server(
        tmp_path / "db.sqlite", config, runtime_config=runtime, health_port=0
    ) as running:
        assert running.health_port is not None
        async with raw_worker(running.url, ["steps"], capacity=3, tok=worker_token("box-2")) as ws:
            await running.runtime.create_job("steps", "alice", {"n": 1})
            await receive(ws, "assign")
            _, _, body = await scrape(running.health_port, "/status")
    workers = orjson.loads(body)["workers"]
    assert workers == [
        {"name": "box-2", "kinds": ["steps"], "capacity": 3, "running": 1, "draining": False}
    ]
