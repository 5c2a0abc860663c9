"""The ``jobspine`` command end to end: real processes, real sockets, real signals."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from actors import EventType, JobEvent
from transport import CLOSE, open_client

from .serving import free_port

SCRIPT = Path(sys.executable).with_name("jobspine")
COMMAND = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "transport._cli"]


class Served:
    def __init__(self, data: Path, port: int, health: int, process: trio.Process) -> None:
        self.data = data
        self.port = port
        self.health = health
        self.process = process
        self.url = f"ws://127.0.0.1:{port}"
        self.tokens: dict[str, str] = {}

    def env(self) -> dict[str, str]:
        return {**os.environ, "JOBSPINE_DATA": str(self.data), "JOBSPINE_URL": self.url}

    async def cli(
        self, *args: str, user: str = "alice", env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        environment = self.env()
        if args[0] != "token":
            environment["JOBSPINE_TOKEN"] = self.tokens.get(user) or self.token(user)
            self.tokens[user] = environment["JOBSPINE_TOKEN"]
        result = await trio.run_process(
            [*COMMAND, *args],
            env={**environment, **(env or {})},
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        return subprocess.CompletedProcess(
            result.args, result.returncode, result.stdout.decode(), result.stderr.decode()
        )

    def token(self, user: str) -> str:
        out = subprocess.run(
            [*COMMAND, "token", "--user", user],
            env=self.env(),
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.strip()


@asynccontextmanager
async def serve_process(
    data: Path, port: int | None = None, extra: tuple[str, ...] = ()
) -> AsyncIterator[Served]:
    port = port or free_port()
    health = free_port()
    env = {
        **os.environ,
        "JOBSPINE_DATA": str(data),
        "PYTHONPATH": str(Path(__file__).parent.parent),
    }
    env.pop("JOBSPINE_SECRET", None)
    await trio.Path(data).mkdir(parents=True, exist_ok=True)
    log_path = trio.Path(data / "serve.log")
    log = await log_path.open("ab")
    process = await trio.lowlevel.open_process(
        [
            *COMMAND,
            "serve",
            "--port",
            str(port),
            "--health-port",
            str(health),
            "--stop-grace",
            "0.5",
            *extra,
        ],
        env=env,
        stdout=log.wrapped,
        stderr=log.wrapped,
    )
    served = Served(data, port, health, process)
    starts = (await log_path.read_text()).count("listening on")
    try:
        with trio.fail_after(20):
            while (await log_path.read_text()).count("listening on") == starts:
                assert process.poll() is None, await log_path.read_text()
                await trio.sleep(0.05)
        yield served
    finally:
        if process.poll() is None:
            process.kill()
        await process.wait()
        await log.aclose()


async def http_exchange(port: int, path: str) -> tuple[bytes, bytes]:
    """(head, body) of one plain GET to the health port."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(f"GET {path} HTTP/1.1\r\nhost: x\r\n\r\n".encode())
        data = b""
        while chunk := await stream.receive_some():
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return head, body


async def http_get(port: int, path: str) -> tuple[int, bytes]:
    head, body = await http_exchange(port, path)
    return int(head.split()[1]), body


async def test_submit_watch_end_to_end_and_health(tmp_path: Path) -> None:
    async with serve_process(tmp_path / "data") as served:
        assert (await http_get(served.health, "/healthz"))[0] == 200
        status, body = await http_get(served.health, "/readyz")
        assert status == 200 and b"ready" in body
        assert b"supervisor" in (await http_get(served.health, "/status"))[1]
        assert (await http_get(served.health, "/nope"))[0] == 404
        result = await served.cli(
            "submit",
            "research",
            '{"query": "structured concurrency", "depth": 3, "delay": 0.05}',
            "--watch",
        )
        assert result.returncode == 0, result.stderr
        assert "completed: " in result.stdout and '"sources":3' in result.stdout
        assert "synthesizing" in result.stdout
        jobs = await served.cli("jobs")
        assert "research" in jobs.stdout and "completed" in jobs.stdout
        bad = await served.cli("submit", "research", "{not json")
        assert bad.returncode != 0 and "INPUT must be JSON" in bad.stderr
        unknown = await served.cli("pause", "01NOSUCHJOB")
        assert unknown.returncode == 6 and "unknown_job" in unknown.stderr
    assert "development secret" in (tmp_path / "data" / "serve.log").read_text()


async def test_watch_follows_a_restarted_job_past_its_old_outcome(tmp_path: Path) -> None:
    """A cancelled job that was restarted: its replayed ``cancelled`` event is history, so
    ``watch`` follows the new run to its end (still running, or already finished)."""
    async with serve_process(tmp_path / "data") as served:
        for delay in (0.3, 0.0):  # the new run still running when watched; already done
            slow = '{"query": "q", "depth": 3, "delay": 5}'
            job_id = (await served.cli("submit", "research", slow)).stdout.strip()
            assert (await served.cli("cancel", job_id)).returncode == 0
            restarted = await served.cli("restart", job_id, f'{{"delay": {delay}}}')
            assert restarted.returncode == 0, restarted.stderr
            for _ in range(200 if delay == 0.0 else 0):  # wait (up to 20 s) for the end
                if '"completed"' in (await served.cli("get", job_id, "--json")).stdout:
                    break
                await trio.sleep(0.1)
            watched = await served.cli("watch", job_id, "--json")
            assert watched.returncode == 0, (delay, watched.stdout, watched.stderr)
            types = [json.loads(line)["type"] for line in watched.stdout.splitlines()]
            assert types.count("cancelled") == 1 and "restarted" in types, types
            assert types[-1] == "completed", types


DEPTH = 100  # sources per research job, 0.1 s each: 10 s of work


async def _running_jobs(
    url: str, token: str, n: int, acked: dict[str, int] | None = None
) -> list[dict[str, Any]]:
    """Start ``n`` research jobs and return once each has acknowledged a checkpoint."""
    acked = {} if acked is None else acked
    async with open_client(url, token) as client:
        await client.subscribe("user:alice")
        jobs = [
            await client.create("research", {"query": f"q{i}", "depth": DEPTH, "delay": 0.1})
            for i in range(n)
        ]
        with trio.fail_after(30):
            async for item in client.events():
                if isinstance(item, JobEvent) and item.type is EventType.CHECKPOINT:
                    acked[item.job_id] = item.data["version"]
                    if len(acked) == n:
                        break
    return jobs


def _states(db: Path) -> dict[str, tuple[str, str | None, int]]:
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT id, state, record FROM jobs").fetchall()
    return {
        job_id: (
            state,
            json.loads(record)["pause_reason"],
            json.loads(record)["checkpoint_version"],
        )
        for job_id, state, record in rows
    }


async def test_sigterm_loses_nothing_and_jobs_resume(tmp_path: Path) -> None:
    data = tmp_path / "data"
    port = free_port()
    async with serve_process(data, port) as served:
        token = served.token("alice")
        acked: dict[str, int] = {}
        jobs = await _running_jobs(served.url, token, 100, acked)  # heavy load
        async with open_websocket_url(served.url) as ws:
            await ws.send_message(orjson.dumps({"op": "hello", "token": token}).decode())
            await ws.get_message()
            start = trio.current_time()
            served.process.send_signal(signal.SIGTERM)
            with trio.fail_after(15):
                assert await served.process.wait() == 0
            assert trio.current_time() - start < 10
            with pytest.raises(ConnectionClosed) as info:
                while True:
                    await ws.get_message()
            assert info.value.reason is not None
            assert info.value.reason.code == CLOSE["going_away"]
    states = _states(data / "jobspine.db")
    assert {job["id"] for job in jobs} <= set(states)
    for job in jobs:
        state, reason, version = states[job["id"]]
        assert (state, reason) == ("paused", "shutdown") and version >= acked[job["id"]]
    async with (
        serve_process(data, port) as served,
        open_client(served.url, served.token("alice")) as client,
    ):
        for job in jobs:
            with trio.fail_after(60):
                while (final := await client.get(job["id"]))["state"] != "completed":  # noqa: ASYNC110
                    await trio.sleep(0.1)
            await trio.sleep(0.03)  # within the request rate limit
            assert final["attempt"] == 2 and final["result"]["sources"] == DEPTH


async def test_sigkill_then_recover_and_resume(tmp_path: Path) -> None:
    data = tmp_path / "data"
    port = free_port()
    async with serve_process(data, port) as served:
        token = served.token("alice")
        (job,) = await _running_jobs(served.url, token, 1)
        served.process.kill()
        await served.process.wait()
    state, _, version = _states(data / "jobspine.db")[job["id"]]
    assert state == "running" and version > 0
    async with serve_process(data, port) as served:
        options = await served.cli("recovery", job["id"], "--json")
        assert '"resumable": true' in options.stdout, options
        assert (await served.cli("resume", job["id"])).returncode == 0
        watched = await served.cli("watch", job["id"])
        assert watched.returncode == 0 and "completed:" in watched.stdout
        assert "resumed (attempt 2)" in watched.stdout
    assert "recovered job" in (data / "serve.log").read_text()
