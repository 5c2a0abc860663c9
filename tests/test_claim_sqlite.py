"""Backend.claim on real SQLite files (and the memory backend): order, limits, the mark, leases
and the next run_at, and the claim survives a reopen; random queues claimed as the reference
plans them (every backend); the rows a SQLite claim reads."""

from __future__ import annotations

import random
import sqlite3
from collections.abc import Sequence
from pathlib import Path

import attrs
import pytest

from actors import (
    Backend,
    ClaimLimits,
    ClaimRequest,
    Job,
    JobState,
    MemoryBackend,
    SqliteBackend,
)
from actors._ops import create
from actors._options import CreateOptions
from actors._queue_sql import claim_sync
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


class _CountingConnection:
    """A sqlite3 connection that counts the rows its statements hand back."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.rows = 0

    def execute(self, sql: str, parameters: Sequence[object] = ()) -> _CountingCursor:
        return _CountingCursor(self, self.db.execute(sql, parameters))

    def __getattr__(self, name: str) -> object:
        return getattr(self.db, name)


class _CountingCursor:
    def __init__(self, connection: _CountingConnection, cursor: sqlite3.Cursor) -> None:
        self.connection = connection
        self.cursor = cursor

    def fetchall(self) -> list[object]:
        rows = self.cursor.fetchall()
        self.connection.rows += len(rows)
        return rows

    def fetchone(self) -> object:
        row = self.cursor.fetchone()
        self.connection.rows += row is not None
        return row


@pytest.mark.parametrize("free", [1, 10, 150])
async def test_a_claim_reads_rows_for_the_groups_and_the_free_slots_not_whole_batches(
    tmp_path: Path, free: int
) -> None:
    # Each (user, kind) group's first read took 64 of its jobs: a claim of one free slot
    # with 100 users waiting read 2,000 rows (4.6 ms with 60 users, 18 ms with 200).
    groups, per_group = 100, 20
    backend = SqliteBackend(tmp_path / "q.db")
    async with backend.opened():
        for g in range(groups):
            await add(backend, per_group, f"user{g:03}")
    db = sqlite3.connect(tmp_path / "q.db", isolation_level=None)
    try:
        counting = _CountingConnection(db)
        claim = ClaimRequest("a", NOW, NOW + 5, ClaimLimits(1000), running=1000 - free)
        ids, _ = claim_sync(counting, claim)  # type: ignore[arg-type]
    finally:
        db.close()
    assert len(ids) == free
    # The fair share: one job from each user before a second from any.
    assert len({job_id[:7] for job_id in ids}) == min(free, groups)
    # Per group, a row to find it and its head; twice what is taken from it; the three
    # aggregates (the top priority, the next one, the earliest later run_at).
    assert counting.rows <= 2 * groups + 2 * free + 3, counting.rows


def _random_queue(rng: random.Random) -> list[Job]:
    """Many small groups and a few past the 64-row read, over users, kinds and priorities;
    ready times that tie (ids then decide) and ids out of creation order; some delayed."""
    jobs: list[Job] = []
    users = [f"u{i:02}" for i in range(rng.randrange(5, 60))]
    for priority in rng.sample([0, 1, 3, 7], rng.randrange(1, 5)):
        for user in users:
            for kind in ("k0", "k1", "k2"):
                if rng.random() < 0.4:
                    continue
                if rng.random() < 0.15:
                    size = rng.choice([0, 1, 2, 5, 9, 64, 65, 130])
                else:
                    size = rng.choice([1, 1, 2, 3, 4])
                for _ in range(size):
                    job_id = f"{rng.randrange(16**6):06x}{len(jobs):05}"
                    at = NOW - 100 + rng.choice([0, 0, 1, 2, 3, 10, 50])
                    r = rng.random()
                    run_at = NOW + rng.choice([5, 10, 20]) if r < 0.05 else None
                    if 0.05 <= r < 0.1:
                        run_at = NOW - rng.choice([1, 50])
                    options = CreateOptions(priority=priority, run_at=run_at)
                    jobs.append(create(job_id, user, kind, {}, at, options)[0])
    return jobs


@pytest.mark.parametrize("seed", range(10))
async def test_random_claims_take_what_the_memory_backend_takes(
    backend: Backend, seed: int
) -> None:
    """Claims by three owners with odd limits, leases that lapse (at the boundary too) and
    jobs started between claims: the same jobs in the same order as the reference, which
    plans over every waiting job at once."""
    rng = random.Random(seed)
    jobs = _random_queue(rng)
    reference = MemoryBackend()
    for target in (reference, backend):
        await target.commit(jobs, [], (), {})
    users = sorted({job.user_id for job in jobs})
    now = NOW
    for step in range(12):
        lease = now + rng.choice([1, 3, 7])
        limits = ClaimLimits(
            rng.choice([1, 2, 3, 7, 13, 31, 67, 129, 257]),
            {k: rng.randrange(1, 9) for k in ("k0", "k1", "k2") if rng.random() < 0.3},
            rng.choice([None, None, 1, 2, 3, 5, 70]),
        )
        some_users = rng.sample(users, min(len(users), rng.randrange(0, 6)))
        request = ClaimRequest(
            rng.choice(["a", "b", "c"]),
            now,
            lease,
            limits,
            running=rng.randrange(0, 3),
            by_user={user: rng.randrange(0, 4) for user in some_users},
            by_kind={k: rng.randrange(0, 3) for k in ("k0", "k1") if rng.random() < 0.3},
            kinds=frozenset(rng.sample(["k0", "k1", "k2"], 2)) if rng.random() < 0.2 else None,
        )
        expected = await reference.claim(request)
        found = await backend.claim(request)
        assert [j.id for j in found.jobs] == [j.id for j in expected.jobs], (seed, step)
        assert found.next_run_at == expected.next_run_at, (seed, step)
        started = [
            attrs.evolve(job, state=JobState.RUNNING, attempt=job.attempt + 1)
            for job in expected.jobs
            if rng.random() < 0.3
        ]
        for target in (reference, backend):
            await target.commit(started, [], (), {})
        now = rng.choice([now, now + 1, now + 3, lease, lease + 0.5])
