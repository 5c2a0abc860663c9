"""The database fills up under a running runtime: writes fail clearly, reads and subscriptions
keep working, nothing acknowledged is lost, and everything recovers when space returns.

The fault is injected from another connection as SQLite would report it (a trigger raising
"database or disk is full" on every append to the event log): the runtime's own connection
belongs to the store actor alone."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest
import trio

from actors import (
    BroadcasterConfig,
    Cursor,
    JobContext,
    JobState,
    Outbox,
    RuntimeConfig,
    StoreError,
    open_runtime,
)

from .conftest import wait_for_state
from .serving import eventually

FILL = (
    "CREATE TRIGGER disk_full BEFORE INSERT ON events"
    " BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END"
)


def sql(path: Path, statement: str) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute(statement)


async def test_disk_full_and_back(tmp_path: Path) -> None:
    acked: list[int] = []

    async def counter(ctx: JobContext, input: Any) -> Any:
        i = ctx.resumed_from["i"] + 1 if ctx.resumed_from else 0
        while i < input["to"]:
            await ctx.checkpoint({"i": i, "pad": "x" * 2000})
            acked.append(i)
            i += 1
            await trio.sleep(0.005)
        return i

    config = RuntimeConfig(heartbeat_timeout=0.5, sqlite_synchronous="NORMAL")
    path = tmp_path / "full.db"
    async with open_runtime(
        path,
        handlers={"counter": counter},
        config=config,
        broadcast=BroadcasterConfig(),
    ) as rt:
        job = await rt.create_job("counter", "alice", {"to": 100_000})
        await eventually(lambda: len(acked) >= 20)
        # The disk fills up: every write that appends to the log fails as SQLite reports it.
        await trio.to_thread.run_sync(sql, path, FILL)
        with pytest.raises(StoreError, match="database or disk is full"):
            await rt.create_job("counter", "bob", {"to": 1})
        last_acked = acked[-1]
        # Reads and subscriptions keep working.
        assert (await rt.get_job(job.id)).user_id == "alice"
        assert await rt.list_jobs("alice")
        events = await rt.read_events(job.id, limit=5)
        assert [e.seq for e in events] == [1, 2, 3, 4, 5]
        assert rt.broadcaster is not None
        joined = await rt.broadcaster.join(Outbox(), f"job:{job.id}", Cursor(rt.epoch, 0))
        assert joined.recovered and joined.replayed > 20
        # The job's own writes fail; its outcome cannot be stored: it stays watched.
        await eventually(lambda: rt.status().orphans > 0)
        assert (await rt.get_job(job.id)).state is JobState.RUNNING
        # Space returns: the job is recovered by the stall rule, at its latest checkpoint.
        await trio.to_thread.run_sync(sql, path, "DROP TRIGGER disk_full")
        paused = await wait_for_state(rt, job.id, {JobState.PAUSED, JobState.FAILED}, timeout=10)
        assert paused.state is JobState.PAUSED, paused.error
        assert paused.checkpoint["i"] >= last_acked  # nothing acknowledged was lost
        assert rt.status().orphans == 0
        resumed = await rt.resume(job.id)
        assert resumed.state is JobState.CREATED  # back in the queue
        assert (await wait_for_state(rt, job.id, {JobState.RUNNING})).attempt == 2
        await rt.cancel(job.id)
        created = await rt.create_job("counter", "bob", {"to": 3})
        done = await wait_for_state(rt, created.id)
        assert done.state is JobState.COMPLETED and done.result == 3
