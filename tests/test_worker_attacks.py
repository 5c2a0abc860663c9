"""A worker that misbehaves on purpose or by a bug harms only itself, and one on a slow link
is not taken for a stalled one: a repeated drain starts nothing more, what its reports hold
while they wait for the store stays within the bound the protocol states however its frames
mix them, one churning kind names locks no other worker out, and an assignment of megabytes
reaches a worker that reads steadily but slowly, as a checkpoint of megabytes reaches the
server from one that sends steadily but slowly."""

from __future__ import annotations

import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio
from trio_websocket import (
    ConnectionClosed,
    WebSocketConnection,
    open_websocket_url,
    wrap_client_stream,
)

import actors._supervisor
import transport._workers
from actors import JobState, RuntimeConfig
from transport import ServerConfig, open_server
from transport._worker_process import SEND_TIMEOUT, _Session

from .conftest import wait_for_state
from .serving import SECRET
from .test_worker_protocol import (
    answers_by_id,
    assigned_steps_job,
    held_checkpoints,
    raw_worker,
    receive,
    receive_flat,
    send,
)
from .test_workers import event_types
from .worker_handlers import HANDLERS
from .worker_support import served, worker_token


async def test_a_repeated_drain_hands_each_attempt_back_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A batch of drains is answered drain by drain, but the attempts are stopped and handed
    back once: each drain stopped them all again (a log line per drain and a refused re-queue
    per drain and attempt: 1,000 drains in a frame made a million hand-backs of a full
    worker)."""
    caplog.set_level(logging.INFO)
    async with (
        served(tmp_path / "db", "in_process", in_process_handlers=False) as s,
        raw_worker(s.running.url, ["steps"], capacity=2, batch=True) as ws,
    ):
        rt = s.runtime
        jobs = {(await rt.create_job("steps", "alice", {"n": 1})).id for _ in range(2)}
        assigned = 0
        while assigned < 2:
            messages, _ = await receive_flat(ws, 1)
            assigned += sum(m["type"] == "assign" for m in messages)
        await send(ws, {"op": "batch", "requests": [{"op": "drain", "id": i} for i in range(50)]})
        answers: list[str] = []
        stops: list[dict[str, object]] = []
        while len(answers) < 50 or len(stops) < 2:
            messages, _ = await receive_flat(ws, 1)
            answers += [m["type"] for m in messages if m["type"] in ("reply", "error")]
            stops += [m for m in messages if m["type"] == "stop"]
        assert answers == ["reply"] * 50 and {stop["job_id"] for stop in stops} == jobs
        for stop in stops:
            ref = {"job_id": stop["job_id"], "attempt": stop["attempt"]}
            await send(ws, {"op": "stopped", "id": "s", **ref})
        for job_id in jobs:
            await wait_for_state(rt, job_id, {JobState.CREATED}, timeout=10)
        await trio.sleep(0.2)  # room for a second hand-back, were one running
        for job_id in jobs:
            assert await event_types(rt, job_id) == ["created", "started", "recovery"]
    lines = [record.getMessage() for record in caplog.records]
    assert sum("drains: handing back" in line for line in lines) == 1
    assert not [line for line in lines if "not re-queued" in line]


async def test_a_large_report_counts_its_whole_frame_while_it_waits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Large checkpoints, each sent in a frame with 999 heartbeats (served at once), while the
    database is slow: each frame counts whole towards the bound while its checkpoint waits.
    A report counted its share of its frame: 117 bytes for a 117 KB checkpoint, so that all
    ten waited here, and under the real bound a worker could park 64 GiB in the server."""
    monkeypatch.setattr(transport._workers, "MAX_WAITING_BYTES", 200_000)
    async with assigned_steps_job(tmp_path) as (s, ws, job):
        ref = {"job_id": job.id, "attempt": 1}
        fillers = [{"op": "heartbeat"}] * 999
        async with held_checkpoints(monkeypatch):
            for i in range(10):
                checkpoint = {"op": "checkpoint", "id": i, **ref, "data": "x" * 100_000}
                await send(ws, {"op": "batch", "requests": [checkpoint, *fillers]})
            busy, _ = await answers_by_id(ws, 9)
            assert busy == dict.fromkeys(range(1, 10), "busy")
        answers, _ = await answers_by_id(ws, 1)
        assert answers == {0: "reply"}
        assert (await s.runtime.get_job(job.id)).checkpoint_version == 1


class Throttled:
    """A client's TCP stream that takes at most ``rate`` bytes a second (a slow link)."""

    def __init__(self, stream: trio.SocketStream, rate: float) -> None:
        self.stream = stream
        self.rate = rate

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        data = await self.stream.receive_some(min(max_bytes or 4096, 4096))
        await trio.sleep(len(data) / self.rate)
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


async def test_a_worker_on_a_slow_link_gets_a_large_assignment(tmp_path: Path) -> None:
    """A worker that reads steadily, but slower than the server sends, gets an assignment
    that takes many send timeouts to cross: the server waits for a frame as the client
    endpoint does, in proportion to its size. It was closed 4011 as stalled in mid-frame (its
    attempt lost) and could never run a job with a large input or checkpoint."""
    config = RuntimeConfig(stop_grace=0.2, sqlite_synchronous="NORMAL", in_process_handlers=False)
    server = ServerConfig(secret=SECRET, port=0, send_timeout=0.1)
    async with (
        open_server(tmp_path / "db", server, handlers=HANDLERS, runtime_config=config) as running,
        trio.open_nursery() as nursery,
    ):
        tcp = await trio.open_tcp_stream("127.0.0.1", running.port)
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        link = Throttled(tcp, rate=2_000_000)
        ws = await wrap_client_stream(
            nursery,
            link,  # type: ignore[arg-type]
            "127.0.0.1",
            "/worker",
            max_message_size=4 * 2**20,
        )
        hello = {
            "op": "hello",
            "id": 0,
            "token": worker_token(),
            "kinds": ["steps"],
            "capacity": 1,
        }
        await send(ws, hello)
        assert (await receive_flat(ws, 1))[0][0]["id"] == 0
        job = await running.runtime.create_job("steps", "alice", {"n": 1, "pad": "x" * 900_000})
        with trio.fail_after(10):
            assign = orjson.loads(await ws.get_message())
        assert (assign["type"], assign["job_id"]) == ("assign", job.id)
        await send(ws, {"op": "complete", "id": 1, "job_id": job.id, "attempt": 1, "result": 1})
        done = await wait_for_state(running.runtime, job.id, timeout=10)
        assert done.state is JobState.COMPLETED
        await ws.aclose()


async def test_a_worker_churning_kind_names_leaves_room_for_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker that puts a counter in its kind names, reconnecting, fills the table of
    declared kinds again and again; an honest worker declaring a new kind is still accepted,
    and runs its jobs. The kinds of workers gone are forgotten to make room: the table was
    filled for good, and every new kind refused with 4002 (``jobspine worker`` exited) until
    the server restarted."""
    monkeypatch.setattr(actors._supervisor, "MAX_DECLARED_KINDS", 8)
    async with served(tmp_path / "db", "in_process", in_process_handlers=False) as s:
        for i in range(10):  # answered or refused, it goes on reconnecting
            async with open_websocket_url(s.running.url + "/worker") as ws:
                kinds = [f"pid-{i}-a", f"pid-{i}-b"]
                await send(
                    ws, {"op": "hello", "token": worker_token(), "kinds": kinds, "capacity": 1}
                )
                with suppress(ConnectionClosed):
                    await ws.get_message()
        async with raw_worker(s.running.url, ["steps"]) as ws:
            job = await s.runtime.create_job("steps", "alice", {"n": 1})
            assert (await receive(ws, "assign"))["job_id"] == job.id


class SlowUpload:
    """A client's TCP stream that sends at most ``rate`` bytes a second (a slow uplink)."""

    def __init__(self, stream: trio.SocketStream, rate: float) -> None:
        self.stream = stream
        self.rate = rate

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        for start in range(0, len(view), 4096):
            chunk = view[start : start + 4096]
            await self.stream.send_all(chunk)
            await trio.sleep(len(chunk) / self.rate)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


@asynccontextmanager
async def slow_worker(
    tmp_path: Path, rate: float, capacity: int = 1
) -> AsyncIterator[tuple[Any, WebSocketConnection, Any]]:
    """A worker on an uplink of ``rate`` bytes a second, heartbeat_timeout 0.5 s, with a
    ``steps`` job assigned: the server, the connection, the job."""
    config = RuntimeConfig(
        stop_grace=0.2,
        sqlite_synchronous="NORMAL",
        in_process_handlers=False,
        heartbeat_timeout=0.5,
    )
    server = ServerConfig(secret=SECRET, port=0)
    async with (
        open_server(tmp_path / "db", server, handlers=HANDLERS, runtime_config=config) as running,
        trio.open_nursery() as nursery,
    ):
        tcp = await trio.open_tcp_stream("127.0.0.1", running.port)
        link = SlowUpload(tcp, rate)
        ws = await wrap_client_stream(nursery, link, "127.0.0.1", "/worker")  # type: ignore[arg-type]
        hello = {
            "op": "hello",
            "id": 0,
            "token": worker_token(),
            "kinds": ["steps"],
            "capacity": capacity,
        }
        await send(ws, hello)
        assert (await receive_flat(ws, 1))[0][0]["id"] == 0
        job = await running.runtime.create_job("steps", "alice", {"n": 1})
        assert (await receive(ws, "assign"))["job_id"] == job.id
        yield running, ws, job
        nursery.cancel_scope.cancel()


async def test_a_worker_uploading_a_large_frame_slowly_is_not_stalled(tmp_path: Path) -> None:
    """A 600 KB checkpoint over a 500 KB/s uplink takes over twice heartbeat_timeout (0.5 s)
    to arrive: its bytes count as life, for the connection and for the attempts behind it
    (their heartbeats wait behind that frame). The idle check counted only complete frames:
    the worker was closed 4011 as stalled in mid-upload and its attempt lost."""
    async with slow_worker(tmp_path, rate=500_000) as (running, ws, job):
        ref = {"job_id": job.id, "attempt": 1}
        start = trio.current_time()
        await send(ws, {"op": "checkpoint", "id": 1, **ref, "data": "x" * 600_000})
        assert trio.current_time() - start > 1.0
        assert (await receive(ws, "reply"))["id"] == 1
        await send(ws, {"op": "complete", "id": 2, **ref, "result": 1})
        done = await wait_for_state(running.runtime, job.id, timeout=10)
        assert done.state is JobState.COMPLETED and done.checkpoint == "x" * 600_000
        assert await event_types(running.runtime, job.id) == [
            "created",
            "started",
            "checkpoint",
            "completed",
        ]


async def test_uploads_for_one_attempt_keep_no_other_hung_attempt_alive(tmp_path: Path) -> None:
    """Bytes arriving keep alive only the attempts that were alive when their frame began:
    a worker uploading checkpoints of attempt A slowly, frame after frame, and naming only A
    in its heartbeats, does not keep its hung attempt B running. Every partial frame beat all
    of the worker's attempts, so B was never recovered for as long as A kept uploading."""
    async with slow_worker(tmp_path, rate=200_000, capacity=2) as (running, ws, first):
        second = await running.runtime.create_job("steps", "alice", {"n": 1})
        assert (await receive(ws, "assign"))["job_id"] == second.id
        ref = {"job_id": first.id, "attempt": 1}
        recovered = False
        for i in range(12):  # each checkpoint takes 0.75 s to arrive: over heartbeat_timeout
            await send(ws, {"op": "heartbeat", "jobs": [ref]})
            await send(ws, {"op": "checkpoint", "id": i, **ref, "data": "x" * 150_000})
            assert (await receive(ws, "reply"))["id"] == i
            if (await running.runtime.get_job(second.id)).state is not JobState.RUNNING:
                recovered = True
                break
        assert recovered, "the hung attempt stayed running while the other one uploaded"
        assert "recovery" in await event_types(running.runtime, second.id) or (
            (await running.runtime.get_job(second.id)).state is JobState.FAILED
        )
        assert (await running.runtime.get_job(first.id)).state is JobState.RUNNING


async def test_a_worker_that_stops_in_mid_frame_is_closed_as_stalled(tmp_path: Path) -> None:
    """A worker that stops sending partway through a frame is closed 4011 within
    heartbeat_timeout of its last byte, and its attempt recovered at once."""
    async with slow_worker(tmp_path, rate=500_000) as (running, ws, job):
        checkpoint = {"op": "checkpoint", "id": 1, "job_id": job.id, "attempt": 1}
        with trio.move_on_after(0.6):  # cut off after about 300 KB of 600 KB
            await send(ws, {**checkpoint, "data": "x" * 600_000})
        stopped = trio.current_time()
        ended = {JobState.FAILED, JobState.CREATED, JobState.PAUSED}
        await wait_for_state(running.runtime, job.id, ended, timeout=10)
        assert trio.current_time() - stopped < 2.0
        assert "recovery" in await event_types(running.runtime, job.id) or (
            (await running.runtime.get_job(job.id)).state is JobState.FAILED
        )
        assert not running.server.workers.workers
        assert ws.closed is not None and ws.closed.code == 4011, ws.closed
        assert "worker stalled: nothing received for 0.5 s" in (ws.closed.reason or "")


class SlowServer:
    """The server's end as ``jobspine worker`` sees it, taking ``rate`` bytes a second (0:
    nothing at all)."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.closed: tuple[int, str] | None = None

    async def send_message(self, message: str) -> None:
        if not self.rate:
            await trio.sleep_forever()
        await trio.sleep(len(message) / self.rate)

    async def aclose(self, code: int, reason: str) -> None:
        self.closed = (code, reason)


async def test_jobspine_worker_uploads_a_large_frame_over_a_slow_link(
    autojump_clock: trio.abc.Clock,
) -> None:
    """``jobspine worker`` gives a frame SEND_TIMEOUT per 64 KiB, as the server does: a
    1 MB checkpoint over a 20 KB/s link takes 50 s and goes out. It gave any frame 10 s,
    then closed the connection itself (1011), its attempts lost. A server that takes
    nothing is still given up on after SEND_TIMEOUT for a frame of ordinary size."""
    slow = SlowServer(rate=20_000)
    session = _Session(None, slow)  # type: ignore[arg-type]
    start = trio.current_time()
    await session.send({"op": "checkpoint", "id": 1, "data": "x" * 1_000_000})
    assert trio.current_time() - start >= 50 and slow.closed is None
    gone = SlowServer(rate=0)
    session = _Session(None, gone)  # type: ignore[arg-type]
    start = trio.current_time()
    with pytest.raises(ConnectionClosed):
        await session.send({"op": "heartbeat", "jobs": []})
    assert trio.current_time() - start == pytest.approx(SEND_TIMEOUT)
    assert gone.closed == (1011, "a send to the server timed out")
