"""Helpers for the worker tests: a served runtime whose handlers run in-process or in a
connected worker (in this process, over the wire), and worker subprocesses."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import trio
from trio_websocket import CloseReason, ConnectionClosed, WebSocketConnection

from actors import RuntimeConfig
from transport import RunningServer, ServerConfig, mint_token, open_server
from transport._worker_process import WorkerProcess

from .serving import SECRET, free_port
from .worker_handlers import HANDLERS

MODES = ("in_process", "remote")
ROOT = Path(__file__).parent.parent
WORKER_COMMAND = [sys.executable, "-m", "transport._cli", "--log-level", "WARNING", "worker"]


def worker_token(name: str = "w") -> str:
    return mint_token(SECRET, name, role="worker")


async def run_jobspine_worker(url: str, token: str, *options: str) -> tuple[int, str]:
    """``jobspine worker`` of ``tests.worker_handlers`` against ``url``, with ``options``, run
    to its end (within 20 s): its exit status and its stderr."""
    command = [*WORKER_COMMAND, "--url", url, "--handlers", "tests.worker_handlers", *options]
    return await run_command(command, token, seconds=20)


async def run_command(command: list[str], token: str, *, seconds: float) -> tuple[int, str]:
    """``command`` (a ``jobspine`` command line) with ``JOBSPINE_TOKEN`` set to ``token``, run
    to its end within ``seconds``: its exit status and its stderr."""
    with trio.fail_after(seconds):
        done = await trio.run_process(
            command,
            env={**os.environ, "JOBSPINE_TOKEN": token},
            check=False,
            capture_stdout=True,
            capture_stderr=True,
            cwd=str(ROOT),
        )
    return done.returncode, done.stderr.decode()


@attrs.define
class Served:
    running: RunningServer
    worker: WorkerProcess | None

    @property
    def runtime(self) -> Any:
        return self.running.runtime


async def close_of(ws: WebSocketConnection) -> CloseReason:
    """How the server closes ``ws`` (within 10 s), whatever it sends before."""
    with trio.fail_after(10):
        try:
            while True:
                await ws.get_message()
        except ConnectionClosed as exc:
            assert exc.reason is not None
            return exc.reason


async def wait_connected(running: RunningServer, count: int = 1) -> None:
    with trio.fail_after(20):
        # Ready: the worker has the hello's reply, and its slots are open.
        while sum(w.ready for w in running.server.workers.workers) < count:  # noqa: ASYNC110
            await trio.sleep(0.01)


@asynccontextmanager
async def served(
    db: Path, mode: str, *, concurrency: int = 4, **runtime: Any
) -> AsyncIterator[Served]:
    """Handlers of :mod:`tests.worker_handlers` run in the server (``in_process``) or only in
    a :class:`WorkerProcess` connected over the wire (``remote``)."""
    config = RuntimeConfig(
        **{
            "stop_grace": 0.5,
            "sqlite_synchronous": "NORMAL",
            "in_process_handlers": mode == "in_process",
            **runtime,
        }
    )
    # The worker outlives the server's graceful shutdown, as local worker processes do.
    async with trio.open_nursery() as nursery:
        async with open_server(
            db, ServerConfig(secret=SECRET, port=0), handlers=HANDLERS, runtime_config=config
        ) as running:
            worker = None
            if mode == "remote":
                worker = WorkerProcess(
                    running.url, worker_token(), HANDLERS, concurrency=concurrency
                )
                nursery.start_soon(worker.run)
                await wait_connected(running)
            yield Served(running, worker)
        nursery.cancel_scope.cancel()


def worker_env() -> dict[str, str]:
    env = dict(os.environ)
    env["JOBSPINE_TOKEN"] = worker_token("proc")
    return env


async def start_worker_process(nursery: trio.Nursery, url: str, *args: str) -> trio.Process:
    """A ``jobspine worker`` process serving :mod:`tests.worker_handlers`."""
    command = [
        *WORKER_COMMAND,
        "--url",
        url,
        "--no-demo",
        "--handlers",
        "tests.worker_handlers",
        *args,
    ]
    run = partial(trio.run_process, command, env=worker_env(), check=False, cwd=str(ROOT))
    process: trio.Process = await nursery.start(run)
    return process


@attrs.define
class LocalServe:
    """A ``jobspine serve --worker-processes 1`` process (see :func:`serve_one_worker`)."""

    process: trio.Process
    url: str

    async def worker(self) -> int:
        """The pid of its worker process, once started (within 20 s)."""
        with trio.fail_after(20):
            while True:
                found = (await trio.run_process(
                    ["pgrep", "-P", str(self.process.pid)], capture_stdout=True, check=False
                )).stdout.split()  # fmt: skip
                if found:
                    (pid,) = map(int, found)
                    return pid
                await trio.sleep(0.1)


def running(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, gone but not yet reaped by whoever adopted
    it, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


@asynccontextmanager
async def serve_one_worker(tmp_path: Path, handlers: str) -> AsyncIterator[LocalServe]:
    """``jobspine serve --worker-processes 1 --handlers HANDLERS`` as a real process; killed
    at the end, with any process it started."""
    port = free_port()
    env = {**os.environ, "JOBSPINE_SECRET": SECRET, "JOBSPINE_DATA": str(tmp_path)}
    command = [
        sys.executable, "-m", "transport._cli", "--log-level", "WARNING", "serve",
        "--port", str(port), "--health-port", str(free_port()), "--no-demo",
        "--handlers", handlers, "--worker-processes", "1",
    ]  # fmt: skip
    server = await trio.lowlevel.open_process(command, env=env, cwd=str(ROOT))
    children: list[bytes] = []
    try:
        yield LocalServe(server, f"ws://127.0.0.1:{port}")
    finally:
        with trio.CancelScope(shield=True):
            children = (await trio.run_process(
                ["pgrep", "-P", str(server.pid)], capture_stdout=True, check=False
            )).stdout.split()  # fmt: skip
        with suppress(ProcessLookupError):
            server.kill()
        for pid in children:
            with suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)


async def kill_and_outlive(served: LocalServe, worker: int, seconds: float) -> None:
    """SIGKILL the server; its worker ``worker`` must be gone within ``seconds``."""
    served.process.kill()
    await served.process.wait()
    with trio.fail_after(seconds):
        while running(worker):  # noqa: ASYNC110 - another process
            await trio.sleep(0.1)
