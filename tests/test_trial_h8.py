"""Faults found trying jobspine from its README (helper h8)."""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any

import pytest

from transport import _cli


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
