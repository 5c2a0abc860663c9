"""Progress reports written as progress (``Backend.commit``'s ``progress_only``): the store says
exactly which jobs changed only their progress fields, and SQLite's narrow write of them
stores the bytes a whole write would have."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import orjson
import trio

from actors import (
    Job,
    JobContext,
    JobState,
    MemoryBackend,
    SqliteBackend,
    open_runtime,
)
from actors._codec import converter
from actors._ops import create, progress, start

from .backends import Commit, CommitHooks
from .conftest import wait_for_state

_STEPS = [
    None,
    "",
    "plain",
    "üñíçødé ✓ 🚀",
    'quote " and backslash \\ and slash /',
    "line\nbreak\ttab\r\x01\x1f\x7f",
    "\u2028\u2029 separators",
    "x" * 5_000,
]
_PERCENTS = [0.0, 1e-7, 5e-324, 33.333333333333336, 99.99999999999999, 100.0, 42]
_TIMES = [1_764_467_123.123456, 1.5e9, 1_764_467_123.1234567, 0.1]


def _stored(path: Path, job_id: str) -> tuple[bytes, float | None]:
    with sqlite3.connect(path) as db:
        record, heartbeat = db.execute(
            "SELECT record, last_heartbeat_at FROM jobs WHERE id = ?", (job_id,)
        ).fetchone()
    return record.encode(), heartbeat


async def test_a_narrow_progress_write_stores_what_a_whole_write_would(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    backend = SqliteBackend(path)
    async with backend.opened():
        job, _ = create("01JOB", "alice", "k", {"n": [1, "ü", None]}, 1_700_000_000.5)
        job, _ = start(job, 1_700_000_001.25, "node-a", 1_700_000_031.25)
        await backend.commit([job], [], (), {})
        cases = [(p, s, t) for p in _PERCENTS for s in _STEPS[:3] for t in _TIMES[:2]]
        cases += [(p, s, t) for p, s in zip(_PERCENTS * 2, _STEPS, strict=False) for t in _TIMES]
        for pct, step, now in cases:
            job, _ = progress(job, job.attempt, pct, step, now)
            await backend.commit([job], [], (), {}, progress_only={job.id})
            record, heartbeat = _stored(path, job.id)
            assert record == orjson.dumps(converter.unstructure(job)), (pct, step, now)
            assert heartbeat == now
            assert await backend.load(job.id) == job
        # Other jobs of the same commit are written whole, as before.
        other, _ = create("02JOB", "bob", "k", {}, 1_700_000_002.0)
        job, _ = progress(job, job.attempt, 7.5, "both", 1_700_000_100.0)
        await backend.commit([job, other], [], (), {}, progress_only={job.id})
        assert await backend.load(other.id) == other
        assert await backend.load(job.id) == job


class Recording(CommitHooks, MemoryBackend):
    """Checks, at each commit, that the jobs said to be progress only changed nothing else."""

    def __init__(self) -> None:
        super().__init__()
        self.narrow = 0
        self.whole_running = 0

    async def before_commit(self, commit: Commit) -> None:
        fields = ("progress", "step", "updated_at", "last_heartbeat_at", "seq")
        for job in commit.jobs:
            before = self._jobs.get(job.id)
            types = {e.type.value for e in commit.events if e.job_id == job.id}
            if job.id in commit.progress_only:
                assert before is not None and types == {"progress"}, (job, types)
                assert converter.unstructure(job) == {
                    **converter.unstructure(before),
                    **{name: getattr(job, name) for name in fields},
                }
                self.narrow += 1
            elif before is not None and before.state.value == "running":
                assert types != {"progress"}, (job, types)  # progress only, yet written whole
                self.whole_running += 1


async def test_the_store_names_exactly_the_jobs_changed_by_progress_only() -> None:
    backend = Recording()
    go = trio.Event()

    async def handler(ctx: JobContext, input: Any) -> str:
        await go.wait()
        for i in range(30):
            await ctx.progress(i, f"step {i}")
            if i % 7 == 3:
                await ctx.checkpoint({"i": i})  # in the same group as progress, sometimes
            if i % 11 == 5:
                await ctx.heartbeat()
        return "done"

    async with open_runtime(backend=backend, handlers={"k": handler}) as rt:
        jobs = [await rt.create_job("k", f"user{n % 3}", {}) for n in range(12)]
        go.set()
        for job in jobs:
            await wait_for_state(rt, job.id, {JobState.COMPLETED})
    assert backend.narrow > 100
    assert backend.whole_running > 0  # checkpoints and ends


async def test_progress_mid_run_is_in_the_database_file(tmp_path: Path) -> None:
    """Through the runtime on SQLite: the record another connection reads while the job still
    runs holds the progress the runtime reports (the narrow writes committed)."""
    hold = trio.Event()

    async def handler(ctx: JobContext, input: Any) -> None:
        for i in range(50):
            await ctx.progress(i * 2, f"s{i} ü")
        await hold.wait()

    path = tmp_path / "jobs.db"
    async with open_runtime(path, handlers={"k": handler}) as rt:
        job = await rt.create_job("k", "alice", {})
        with trio.fail_after(10):
            while (live := await rt.get_job(job.id)).progress < 98:  # noqa: ASYNC110
                await trio.sleep(0.01)
        record, _ = _stored(path, job.id)
        stored = converter.structure(orjson.loads(record), Job)
        assert (stored.progress, stored.step, stored.seq, stored.updated_at) == (
            live.progress,
            live.step,
            live.seq,
            live.updated_at,
        )
        hold.set()
