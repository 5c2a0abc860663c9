"""Database files written by the v1 and v2 releases (tests/data) migrate in place to v5: every
job, event and checkpoint survives, and the jobs run afterwards. A migration that fails leaves
the file as it was."""

from __future__ import annotations

import json
import logging
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import trio

from actors import EventType, JobContext, JobState, RuntimeConfig, StoreError, open_runtime

from .conftest import wait_for_state

DATA = Path(__file__).with_name("data")


async def ok(ctx: JobContext, input: Any) -> Any:
    return {"echo": input}


async def steps(ctx: JobContext, input: Any) -> Any:
    start = 0 if ctx.resumed_from is None else ctx.resumed_from["i"]
    for i in range(start, input["n"]):
        await ctx.checkpoint({"i": i + 1})
    return {"done": input["n"], "from": start}


HANDLERS = {"ok": ok, "boom": ok, "steps": steps}


def _snapshot(path: Path) -> tuple[dict[str, dict[str, Any]], list[tuple[Any, ...]]]:
    with sqlite3.connect(path) as conn:
        jobs = {job_id: json.loads(record) for job_id, record in conn.execute(
            "SELECT id, record FROM jobs")}  # fmt: skip
        events = conn.execute(
            "SELECT job_id, seq, user_id, user_seq, type, record FROM events ORDER BY job_id, seq"
        ).fetchall()
    return jobs, events


@pytest.mark.parametrize("version", ["v1", "v2"])
async def test_a_release_database_migrates_in_place(tmp_path: Path, version: str) -> None:
    path = tmp_path / f"{version}.db"
    shutil.copy(DATA / f"{version}.db", path)
    ids: dict[str, str] = json.loads((DATA / f"{version}.ids.json").read_text())
    old_jobs, old_events = _snapshot(path)
    assert {record["state"] for record in old_jobs.values()} == set(ids)
    config = RuntimeConfig(resume_on_start=False, stop_grace=0.2)
    async with open_runtime(path, handlers=HANDLERS, config=config) as rt:
        for job_id, old in old_jobs.items():
            job = await rt.get_job(job_id)
            assert (job.user_id, job.kind, job.input) == (old["user_id"], old["kind"], old["input"])
            assert job.checkpoint == old["checkpoint"]
            assert (job.priority, job.max_attempts, job.failed_attempts, job.tags) == (0, 1, 0, ())
        # The events are all there, in order, still readable (then the runtime's own follow).
        for job_id in old_jobs:
            events = await rt.read_events(job_id, limit=10_000)
            mine = [e for e in old_events if e[0] == job_id]
            assert [(e.seq, e.type.value) for e in events[: len(mine)]] == [
                (seq, kind) for _, seq, _, _, kind, _ in mine
            ]
        # The job left running was recovered at start (it has a checkpoint: paused).
        running = await rt.get_job(ids["running"])
        assert running.state is JobState.PAUSED and running.checkpoint == {"i": 3}
        # The job stored as created waits in the queue and runs.
        assert (await wait_for_state(rt, ids["created"])).state is JobState.COMPLETED
        # Paused jobs resume from their checkpoints and finish.
        for name, at in (("paused", 2), ("running", 3)):
            await rt.resume(ids[name], by="bob")
            done = await wait_for_state(rt, ids[name])
            assert done.state is JobState.COMPLETED and done.result == {"done": 5, "from": at}
            started = [
                e for e in await rt.read_events(ids[name], limit=10_000)
                if e.type is EventType.STARTED
            ]  # fmt: skip
            assert started[-1].data["resumed_from_checkpoint"] == at
        # Finished jobs keep their outcome; restart brings one back.
        assert (await rt.get_job(ids["completed"])).result == {"echo": {"x": 1}}
        failed = await rt.get_job(ids["failed"])
        assert failed.error is not None and failed.error.message == "boom"
        await rt.restart(ids["cancelled"], by="bob")
        assert (await wait_for_state(rt, ids["cancelled"])).result == {"done": 5, "from": 0}
    with sqlite3.connect(path) as conn:
        version_now = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'")
        assert version_now.fetchone()[0] == "5"
        assert events_layout(conn) == V5_EVENTS
    await trio.lowlevel.checkpoint()


#: Schema v5's events: a rowid table (each commit's events appended to its last pages), found
#: by job and by user through unique indexes.
V5_EVENTS = ("rowid", ["events_by_job", "events_by_user"])


def events_layout(conn: sqlite3.Connection) -> tuple[str, list[str]]:
    (table,) = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'events'").fetchone()
    indexes = conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'events'"
        " AND sql IS NOT NULL ORDER BY name"
    ).fetchall()
    return ("without rowid" if "WITHOUT ROWID" in table else "rowid", [n for (n,) in indexes])


async def test_a_large_log_moves_to_v5_and_the_wal_gives_its_pages_back(tmp_path: Path) -> None:
    """v5 copies every event: the copy's pages leave the WAL file once it commits (before,
    it kept their size, twice the events', for as long as the server ran)."""
    path = tmp_path / "v2.db"
    shutil.copy(DATA / "v2.db", path)
    job_id = json.loads((DATA / "v2.ids.json").read_text())["completed"]
    with sqlite3.connect(path) as conn:
        conn.executemany(
            "INSERT INTO events VALUES (?, ?, 'bulk', ?, 'progress', ?)",
            [(job_id, 1000 + n, n, "x" * 450) for n in range(20_000)],
        )
    conn.close()
    config = RuntimeConfig(resume_on_start=False)
    async with open_runtime(path, handlers=HANDLERS, config=config) as rt:
        wal = path.with_name(path.name + "-wal").stat().st_size
        assert wal < 1 << 20, wal  # the copy took about 20 MB
        assert (await rt.get_job(job_id)).state is JobState.COMPLETED
    with sqlite3.connect(path) as conn:
        moved = conn.execute("SELECT count(*) FROM events WHERE user_id = 'bulk'").fetchone()
        assert moved[0] == 20_000
    conn.close()


async def test_a_wal_left_large_is_emptied_at_start_and_a_reader_does_not_stop_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A process killed after a large transaction (a migration's copy) and before its last
    checkpoint leaves its WAL file at that size: the next start empties it. Another program
    reading the file at that moment only leaves it to later checkpoints (logged), and the
    start goes on."""
    path = tmp_path / "j.db"
    async with open_runtime(path, handlers=HANDLERS):
        pass
    wal = path.with_name(path.name + "-wal")
    # An open connection keeps SQLite from checkpointing at its close: the WAL stays, as a
    # killed process leaves it.
    writer = sqlite3.connect(path)
    writer.execute("PRAGMA wal_autocheckpoint=0")
    with writer:
        writer.executemany(
            "INSERT INTO meta VALUES (?, ?)", [(f"filler{n}", "x" * 4000) for n in range(5000)]
        )
    assert wal.stat().st_size > 16 << 20
    async with open_runtime(path, handlers=HANDLERS):
        assert wal.stat().st_size < 1 << 20  # what the start wrote since
    reader = sqlite3.connect(path)
    with writer:
        writer.execute("DELETE FROM meta WHERE key LIKE 'filler%'")
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM meta").fetchall()  # holds its snapshot of the WAL
    with caplog.at_level(logging.INFO, logger="jobspine.sqlite"):
        async with open_runtime(path, handlers=HANDLERS):
            pass
    assert "the WAL file was not emptied at start: a reader holds it" in caplog.text
    reader.close()
    writer.close()


async def test_a_new_database_has_the_current_layout(tmp_path: Path) -> None:
    async with open_runtime(tmp_path / "new.db", handlers=HANDLERS):
        pass
    with sqlite3.connect(tmp_path / "new.db") as conn:
        assert events_layout(conn) == V5_EVENTS


async def test_a_migration_that_fails_leaves_the_file_at_its_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every step runs in one transaction with the version written: a failure (here the last
    statement of v5's step; in life a full disk, a crash) leaves neither half a layout nor a
    version that skips what did not happen, and the next open migrates from the start."""
    from actors import _sqlite

    path = tmp_path / "v2.db"
    shutil.copy(DATA / "v2.db", path)
    _, old_events = _snapshot(path)
    failing = [*_sqlite.MIGRATIONS[:-1], [*_sqlite.MIGRATIONS[-1], "SELECT * FROM no_such"]]
    monkeypatch.setattr(_sqlite, "MIGRATIONS", failing)
    with pytest.raises(StoreError, match="no such table: no_such"):
        async with open_runtime(path, handlers=HANDLERS):
            pass
    with sqlite3.connect(path) as conn:
        version = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'")
        assert version.fetchone()[0] == "2"
        columns = [row[1] for row in conn.execute("PRAGMA table_info(jobs)")]
        assert "priority" not in columns  # v3's columns: rolled back with the rest
        assert events_layout(conn) == ("without rowid", ["events_by_user"])
    monkeypatch.undo()
    async with open_runtime(path, handlers=HANDLERS, config=RuntimeConfig(resume_on_start=False)):
        pass
    old = {(job_id, seq) for job_id, seq, *_ in old_events}
    assert [e for e in _snapshot(path)[1] if (e[0], e[1]) in old] == old_events
    with sqlite3.connect(path) as conn:
        assert events_layout(conn) == V5_EVENTS
