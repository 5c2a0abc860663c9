"""Faults found trying jobspine from its README (helper h8)."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from transport import _cli, open_client

from .serving import token
from .worker_support import kill_and_outlive, serve_one_worker


def test_parent_watch_survives_stdin_made_non_blocking(monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker of ``serve --worker-processes`` watches its stdin pipe in a thread while its
    handlers import, then with a Trio ``FdStream`` on a dup of the same pipe, which sets
    ``O_NONBLOCK`` on the shared file description. The thread's next ``os.read`` raised
    ``BlockingIOError``, and the server's log showed a traceback, ``Exception in thread
    jobspine-parent-watch``, at a worker's start: the watch must wait for the pipe instead."""
    read_end, write_end = os.pipe()
    failures: list[BaseException] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: failures.append(args.exc_value))

    class Stdin:
        def fileno(self) -> int:
            return read_end

    monkeypatch.setattr(sys, "stdin", Stdin())
    exits: list[Any] = []
    monkeypatch.setattr(os, "_exit", exits.append)
    os.set_blocking(read_end, False)  # what the FdStream does once the handlers are loaded
    loaded = _cli._exit_with_parent_while_loading()
    watcher = next(t for t in threading.enumerate() if t.name == "jobspine-parent-watch")
    loaded.set()
    time.sleep(0.3)
    assert failures == []
    assert watcher.is_alive()
    os.close(write_end)  # the server is gone
    watcher.join(5)
    assert not watcher.is_alive()
    assert failures == []
    assert exits == []  # loaded: the running worker's own watch stops it, not this thread
    os.close(read_end)


async def test_a_worker_computing_in_a_thread_dies_with_its_server(tmp_path: Path) -> None:
    """README: a server that dies (even by SIGKILL) takes its workers with it. A worker of
    ``serve --worker-processes`` whose job computes in a thread (as README advises for
    CPU-bound code) logged ``the server that started this worker is gone: stopping`` but
    lived on, computing for nobody, until the thread's step ended: Trio waits for a thread
    it cannot cancel. It now ends within moments of the server's death."""
    async with serve_one_worker(tmp_path, "tests.trial_h8_handlers") as served:
        with trio.fail_after(30):
            async with open_client(served.url, token("alice")) as client:
                job = await client.create("grind", {})
                while (await client.get(job["id"]))["step"] != "grinding":  # noqa: ASYNC110
                    await trio.sleep(0.1)
        worker = await served.worker()
        await trio.sleep(0.5)  # in its thread's step now
        await kill_and_outlive(served, worker, 15)
