"""Backend.claim on real SQLite files (and the memory backend): order, limits, the mark, leases
and the next run_at, and the claim survives a reopen."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from actors import (
    Backend,
    ClaimLimits,
    ClaimRequest,
    Job,
    SqliteBackend,
)
from actors._ops import create
from actors._options import CreateOptions
from actors._sqlite import waiting_counts_sql

NOW = 1_000_000.0


async def add(
    backend: Backend, n: int, user: str, priority: int = 0, run_at: float | None = None
) -> list[Job]:
    options = CreateOptions(priority=priority, run_at=run_at)
    jobs = [create(f"{user}{i:05}", user, "k", {}, NOW - 100 + i, options)[0] for i in range(n)]
    await backend.commit(jobs, [], (), {})
    return jobs


def request(owner: str = "a", slots: int = 10, now: float = NOW, **limits: object) -> ClaimRequest:
    return ClaimRequest(owner, now, now + 5, ClaimLimits(slots, **limits))  # type: ignore[arg-type]


async def test_claim_order_limits_and_mark(backend: Backend) -> None:
    heavy = await add(backend, 20, "heavy")
    light = await add(backend, 2, "light")
    urgent = await add(backend, 1, "late", priority=5)
    result = await backend.claim(request(slots=5, max_running_per_user=3))
    ids = [job.id for job in result.jobs]
    assert ids == [urgent[0].id, heavy[0].id, light[0].id, heavy[1].id, light[1].id]
    assert all(j.owner == "a" and j.lease_expires_at == NOW + 5 for j in result.jobs)
    assert all(j.state.value == "created" for j in result.jobs)  # the start is the caller's
    # Another owner does not get them while the lease holds; after it lapses it does.
    other = await backend.claim(request("b", slots=30))
    assert not set(ids) & {job.id for job in other.jobs}
    assert len(other.jobs) == 18
    again = await backend.claim(request("c", slots=30, now=NOW + 6))
    assert {job.id for job in again.jobs} == set(ids) | {job.id for job in other.jobs}


async def test_next_run_at_and_reopen(backend: Backend, tmp_path: Path) -> None:
    await add(backend, 1, "alice", run_at=NOW + 50)
    result = await backend.claim(request())
    assert result.jobs == [] and result.next_run_at == NOW + 50
    later = await backend.claim(request(now=NOW + 50))
    assert len(later.jobs) == 1 and later.next_run_at is None
    renewed = await backend.renew_leases("a", NOW + 500)
    assert renewed == 1
    job = await backend.load(later.jobs[0].id)
    assert job is not None and job.lease_expires_at == NOW + 500
    # A write of the same claim carrying the older expiry does not move the renewal back.
    await backend.commit([later.jobs[0]], [], (), {})
    job = await backend.load(later.jobs[0].id)
    assert job is not None and job.lease_expires_at == NOW + 500


async def test_one_users_queue_counts_read_that_users_jobs_only(tmp_path: Path) -> None:
    # By jobs_by_state, one user's stats scanned every waiting job of every user.
    async with SqliteBackend(tmp_path / "c.db").opened():
        pass
    with sqlite3.connect(tmp_path / "c.db") as conn:
        plan = conn.execute(
            "EXPLAIN QUERY PLAN " + waiting_counts_sql(True), (NOW, "alice")
        ).fetchall()
    assert "jobs_by_user (user_id=?)" in " ".join(row[3] for row in plan), plan
    backend = SqliteBackend(tmp_path / "c.db")
    async with backend.opened():
        await add(backend, 3, "alice")
        await add(backend, 2, "bob", run_at=NOW + 60)
        stats = await backend.queue_stats(NOW, "bob")
        assert (stats.waiting, stats.ready, dict(stats.waiting_by_user)) == (2, 0, {"bob": 2})
        assert (await backend.queue_stats(NOW)).waiting == 5
