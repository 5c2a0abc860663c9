"""Crash loop: the real server under load is SIGKILLed at random moments, again and again,
and restarted on the same database; with ``--worker-processes``, one of its worker processes
is SIGKILLed mid-job too in every cycle. Brief by default; ``JOBSPINE_CRASH_CYCLES=50`` for
long.

Capacity is 8 running jobs, so most jobs wait in the queue at every kill, and one kind fails
its first attempts and waits to be retried: none is lost, none runs twice at once (checked by
attempt in the durable event log), none stays stuck."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import sqlite3
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio

from actors import EventType, JobEvent
from transport import Client, ClientError, Reset, mint_token, open_client

from .serving import eventually, free_port

SECRET = "crash-loop-secret-crash-loop-secret-xx"
COMMAND = [sys.executable, "-m", "transport._cli", "--log-level", "WARNING", "serve"]
USERS = ["u0", "u1", "u2", "u3"]
CYCLES = int(os.environ.get("JOBSPINE_CRASH_CYCLES", "3"))

pytestmark = pytest.mark.slow


@asynccontextmanager
async def server(data: Path, port: int, workers: int) -> AsyncIterator[trio.Process]:
    env = {**os.environ, "JOBSPINE_SECRET": SECRET}
    log = await trio.Path(data / "serve.log").open("ab")
    process = await trio.lowlevel.open_process(
        [
            *COMMAND,
            "--db",
            str(data / "db.sqlite"),
            "--port",
            str(port),
            "--health-port",
            str(free_port()),
            "--heartbeat-timeout",
            "2",
            "--stop-grace",
            "0.5",
            "--config",
            str(data / "config.toml"),
            "--handlers",
            "tests.queue_handlers:HANDLERS",
            *(["--worker-processes", str(workers), "--concurrency", "100"] if workers else []),
        ],
        env=env,
        stdout=log.wrapped,
        stderr=log.wrapped,
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        await process.wait()
        await log.aclose()


def read_db(path: Path) -> tuple[dict[str, dict[str, Any]], dict[str, int], str]:
    with sqlite3.connect(path) as conn:
        jobs = {i: orjson.loads(r) for i, r in conn.execute("SELECT id, record FROM jobs")}
        heads = dict(conn.execute("SELECT user_id, max(user_seq) FROM events GROUP BY user_id"))
        integrity = conn.execute("PRAGMA integrity_check").fetchone()[0]
    return jobs, heads, integrity


def check_attempts(path: Path) -> int:
    """No job ran two attempts at once: in each job's durable log an attempt starts only once
    the previous one ended (its state left running), and attempts count 1, 2, 3... Returns
    how many retries were recorded."""
    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT job_id, record FROM events ORDER BY job_id, seq").fetchall()
    running: dict[str, bool] = {}
    attempts: dict[str, list[int]] = {}
    retries = 0
    for job_id, record in rows:
        event = orjson.loads(record)
        if event["type"] == "started":
            assert not running.get(job_id), (job_id, event)
            attempts.setdefault(job_id, []).append(event["data"]["attempt"])
        retries += event["type"] == "retrying"
        running[job_id] = event["state"] == "running"
    for job_id, seen in attempts.items():
        assert seen == list(range(1, len(seen) + 1)), (job_id, seen)
    return retries


async def kill_a_worker(server: trio.Process, rng: random.Random) -> bool:
    found = await trio.run_process(
        ["pgrep", "-P", str(server.pid)], capture_stdout=True, check=False
    )
    pids = [int(p) for p in found.stdout.split()]
    if not pids:
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(rng.choice(pids), signal.SIGKILL)
    return True


@pytest.mark.parametrize("workers", [0, 2])
async def test_crash_loop(tmp_path: Path, workers: int) -> None:
    data = tmp_path / "data"
    await trio.Path(data).mkdir()
    await trio.Path(data / "config.toml").write_text("[runtime]\nmax_running = 8\n")
    created: set[str] = set()
    port = free_port()
    url = f"ws://127.0.0.1:{port}"
    rng = random.Random(7)
    received: dict[str, list[int]] = {user: [] for user in USERS}
    acked: dict[str, int] = {}  # job id -> highest checkpoint version a client saw committed
    resets: list[Reset] = []

    async def follow(user: str, task_status: trio.TaskStatus[None]) -> None:
        async with open_client(url, mint_token(SECRET, user), max_backoff=0.2) as client:
            await client.subscribe(f"user:{user}")
            task_status.started()
            async for item in client.events():
                if isinstance(item, Reset):
                    resets.append(item)
                    continue
                assert isinstance(item, JobEvent)
                received[user].append(item.user_seq)
                if item.type is EventType.CHECKPOINT:
                    acked[item.job_id] = max(acked.get(item.job_id, 0), item.data["version"])

    async def admin_call(fn: Any) -> Any:
        async with open_client(url, mint_token(SECRET, "ops", admin=True), reconnect=False) as c:
            return await fn(c)

    async def serving_again() -> None:
        """Wait until the restarted server answers (it has run its restart recovery by then)."""
        with trio.fail_after(30):
            while True:
                try:
                    await admin_call(lambda c: c.ping())
                    return
                except (OSError, ClientError):
                    await trio.sleep(0.05)

    kills = worker_kills = 0
    async with trio.open_nursery() as nursery:
        async with server(data, port, workers) as first:
            await eventually(lambda: (data / "db.sqlite").exists(), 20)
            await trio.sleep(0.5)
            for user in USERS:
                await nursery.start(follow, user)
            for n in range(120):
                user = USERS[n % len(USERS)]
                async with open_client(url, mint_token(SECRET, user)) as c:
                    if n % 3:
                        input = {"query": f"q{n}", "depth": 30, "delay": 0.05}
                        job = await c.create("research", input)
                    else:
                        job = await c.create("flaky", {"steps": 10})
                    created.add(job["id"])
            await trio.sleep(rng.uniform(0.3, 1.0))
            if workers and await kill_a_worker(first, rng):
                worker_kills += 1
                await trio.sleep(rng.uniform(0.1, 0.5))
            first.send_signal(signal.SIGKILL)
            kills += 1
        for cycle in range(CYCLES):
            async with server(data, port, workers) as process:
                await serving_again()
                jobs, _, integrity = read_db(data / "db.sqlite")
                assert integrity == "ok"
                assert set(jobs) == created  # none lost, waiting ones included
                check_attempts(data / "db.sqlite")
                for job_id, job in jobs.items():
                    # No acknowledged checkpoint is older after recovery than before the kill.
                    assert job["checkpoint_version"] >= acked.get(job_id, 0), job_id
                paused = [j for j, job in jobs.items() if job["state"] == "paused"]

                async def resume_all(c: Client, ids: list[str] = paused) -> None:
                    for job_id in ids:
                        with contextlib.suppress(ClientError):  # it may have moved on
                            await c.resume(job_id)

                await admin_call(resume_all)
                if workers and await kill_a_worker(process, rng):
                    worker_kills += 1
                if cycle < CYCLES - 1:
                    await trio.sleep(rng.uniform(0.3, 1.5))
                    process.send_signal(signal.SIGKILL)
                    kills += 1
                    continue

                # Last cycle: let everything finish.
                def settled() -> bool:
                    found, _, _ = read_db(data / "db.sqlite")
                    return all(
                        j["state"] in ("completed", "failed", "paused") for j in found.values()
                    )

                await eventually(settled, 60)
                jobs, heads, integrity = read_db(data / "db.sqlite")
                final_heads = dict(heads)

                def caught_up() -> bool:
                    return all(len(received[u]) >= final_heads.get(u, 0) for u in USERS)  # noqa: B023 - called at once

                await eventually(caught_up, 20)
                process.send_signal(signal.SIGTERM)
                with trio.fail_after(20):
                    assert await process.wait() == 0
        nursery.cancel_scope.cancel()
    assert integrity == "ok" and not resets
    assert set(jobs) == created
    retries = check_attempts(data / "db.sqlite")
    assert retries > 0  # the flaky kind's retries waited in the queue
    for job_id, job in jobs.items():
        assert job["state"] in ("completed", "failed", "paused"), job
        if job["state"] == "failed":
            assert job["error"]["message"], job  # a recorded reason
        if job["state"] == "paused":
            assert job["checkpoint_version"] >= acked.get(job_id, 0)
    # Every client got every event of its room exactly once, in order, with no gap.
    for user in USERS:
        assert received[user] == list(range(1, heads[user] + 1)), user
    events = sum(heads.values())
    print(
        f"crash loop: {kills} kills, {worker_kills} worker kills, {len(jobs)} jobs,"
        f" {events} events checked, {retries} retries,"
        f" {sum(j['state'] == 'completed' for j in jobs.values())} completed"
    )
