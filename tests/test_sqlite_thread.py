"""The SQLite backend's crossing into aiosqlite's thread (``actors._sqlite._in_thread``):
answers, errors, order, an abandoned call, a closed connection. Thread-backed: real time."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest
import trio

from actors._errors import StoreError
from actors._sqlite import SqliteBackend


def _value(db: sqlite3.Connection, x: int) -> int:
    (row,) = db.execute("SELECT ? + 1", (x,)).fetchall()
    return int(row[0])


def _fail(db: sqlite3.Connection) -> None:
    db.execute("SELECT * FROM no_such_table")


async def test_a_call_returns_its_value_or_raises_its_error(tmp_path: Path) -> None:
    backend = SqliteBackend(tmp_path / "j.db")
    async with backend.opened():
        assert await backend._call(_value, 41) == 42
        with pytest.raises(sqlite3.OperationalError, match="no such table"):
            await backend._call(_fail)
        assert await backend._call(_value, 1) == 2  # the thread is still there


async def test_an_abandoned_call_still_runs_and_later_calls_queue_behind_it(
    tmp_path: Path,
) -> None:
    """A cancelled caller returns at once (as with an asyncio future), nothing is answered to a
    task that no longer waits, and the next call runs after the abandoned one ended."""
    backend = SqliteBackend(tmp_path / "j.db")
    release, ran = threading.Event(), []

    def blocked(db: sqlite3.Connection) -> str:
        release.wait(10)
        ran.append("blocked")
        return "late"

    def after(db: sqlite3.Connection) -> list[str]:
        ran.append("after")
        return list(ran)

    async with backend.opened():
        with trio.move_on_after(0.1) as cancelled:
            await backend._call(blocked)
        assert cancelled.cancelled_caught
        async with trio.open_nursery() as nursery:
            results: list[list[str]] = []

            async def next_call() -> None:
                results.append(await backend._call(after))

            nursery.start_soon(next_call)
            await trio.sleep(0.1)
            assert not results  # queued behind the abandoned call
            release.set()
        assert results == [["blocked", "after"]]


async def test_a_call_on_a_closed_database_is_refused(tmp_path: Path) -> None:
    backend = SqliteBackend(tmp_path / "j.db")
    async with backend.opened():
        pass
    with pytest.raises(StoreError, match="not open"):
        await backend._call(_value, 1)


async def test_a_call_left_before_its_wait_began_is_not_answered_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A KeyboardInterrupt between queueing the call and waiting for it (an application
    without a SIGINT handler of its own): the thread's answer, when it comes, must not wake
    the task while it waits for something else (Trio: "Should never have been rescheduled")."""
    backend = SqliteBackend(tmp_path / "j.db")

    def slow(db: sqlite3.Connection) -> int:
        threading.Event().wait(0.1)
        return 1

    async def interrupted(abort: object) -> None:
        raise KeyboardInterrupt

    async with backend.opened():
        monkeypatch.setattr(trio.lowlevel, "wait_task_rescheduled", interrupted)
        with pytest.raises(KeyboardInterrupt):
            await backend._call(slow)
        monkeypatch.undo()
        await trio.sleep(0.3)  # the answer arrives meanwhile
        assert await backend._call(_value, 2) == 3
