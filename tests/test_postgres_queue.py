"""The queue's backend operations on every backend (queue counts, idempotency keys, children
and tags, lease renewal), and on PostgreSQL: claims by concurrent claimers on one database
(each job claimed exactly once) and the in-place migration of a v2 database written by the
release before the queue."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import attrs
import psycopg
import pytest
import trio

from actors import (
    Backend,
    ClaimLimits,
    ClaimRequest,
    EventType,
    Job,
    JobContext,
    JobQuery,
    JobState,
    MemoryBackend,
    PostgresBackend,
    RetryPolicy,
    RuntimeConfig,
    kind_options,
    open_runtime,
)
from actors._ops import create
from actors._options import CreateOptions
from actors._postgres_queue import GROUPS_SQL, NEXT_RUN_SQL, PLAN_SQL, WINDOW_SQL

from .conftest import wait_for_state

NOW = 1_000_000.0
DATA = Path(__file__).parent / "data"


def job(job_id: str, user: str = "alice", kind: str = "k", at: float = NOW, **options: Any) -> Job:
    return create(job_id, user, kind, {"id": job_id}, at, CreateOptions(**options))[0]


async def test_queue_stats_count_ready_scheduled_running_per_kind_and_user(
    backend: Backend,
) -> None:
    jobs = [
        job("a1", "alice", "mail"),
        job("a2", "alice", "mail", run_at=NOW + 60),
        job("a3", "alice", "resize"),
        job("b1", "bob", "mail"),
        job("b2", "bob", "mail"),
    ]
    running = attrs.evolve(job("b3", "bob", "mail"), state=JobState.RUNNING, attempt=1)
    done = attrs.evolve(job("b4", "bob", "mail"), state=JobState.CANCELLED)
    await backend.commit([*jobs, running, done], [], (), {})
    stats = await backend.queue_stats(NOW)
    assert (stats.waiting, stats.ready, stats.scheduled, stats.running) == (5, 4, 1, 1)
    assert stats.waiting_by_kind == {"mail": 4, "resize": 1}
    assert stats.waiting_by_user == {"alice": 3, "bob": 2}
    bob = await backend.queue_stats(NOW + 60, "bob")
    assert (bob.waiting, bob.ready, bob.scheduled, bob.running) == (2, 2, 0, 1)
    assert bob.waiting_by_user == {"bob": 2} and bob.waiting_by_kind == {"mail": 2}
    # At the run_at the delayed job is ready too; a job that starts leaves the waiting counts.
    await backend.commit([attrs.evolve(jobs[0], state=JobState.RUNNING, attempt=1)], [], (), {})
    later = await backend.queue_stats(NOW + 60)
    assert (later.waiting, later.ready, later.scheduled, later.running) == (4, 4, 0, 2)


async def test_find_by_key_takes_the_newest_of_the_user_within_the_window(
    backend: Backend,
) -> None:
    old = job("01OLD", at=NOW - 100, idempotency_key="k1")
    new = job("02NEW", at=NOW, idempotency_key="k1")
    other_user = job("03BOB", "bob", at=NOW, idempotency_key="k1")
    await backend.commit([old, new, other_user, job("04NOKEY")], [], (), {})
    found = await backend.find_by_key("alice", "k1", NOW - 200)
    assert found is not None and found.id == "02NEW" and found.idempotency_key == "k1"
    assert (await backend.find_by_key("alice", "k1", NOW + 1)) is None
    assert (await backend.find_by_key("alice", "k2", 0)) is None
    bob = await backend.find_by_key("bob", "k1", 0)
    assert bob is not None and bob.id == "03BOB"


async def test_children_and_tags_filter_listings(backend: Backend) -> None:
    parent = job("01P", tags=("batch",))
    children = [job(f"02C{i}", parent_id="01P", tags=("batch", f"n{i}")) for i in range(3)]
    await backend.commit([parent, *children, job("03X", tags=("other",))], [], (), {})
    listed = await backend.query(JobQuery(parent_id="01P"))
    assert [j.id for j in listed] == ["02C2", "02C1", "02C0"]  # newest first
    assert listed[0].parent_id == "01P" and listed[0].tags == ("batch", "n2")
    tagged = await backend.query(JobQuery(tag="batch", limit=2))
    assert [j.id for j in tagged] == ["02C2", "02C1"]
    assert [j.id for j in await backend.query(JobQuery(tag="n1"))] == ["02C1"]
    assert await backend.query(JobQuery(tag="batch", user_id="bob")) == []
    assert await backend.query(JobQuery(parent_id="02C0")) == []
    # The children of several parents in one query (a generation of a tree).
    grandchild = job("04G", parent_id="02C1")
    await backend.commit([grandchild], [], (), {})
    several = await backend.query(JobQuery(parent_ids=frozenset({"01P", "02C1", "none"})))
    assert [j.id for j in several] == ["04G", "02C2", "02C1", "02C0"]
    assert await backend.query(JobQuery(parent_ids=frozenset({"02C0", "03X"}))) == []


async def test_renewal_extends_only_the_owners_live_claims(backend: Backend) -> None:
    await backend.commit([job(f"j{i}") for i in range(4)], [], (), {})
    mine = await backend.claim(ClaimRequest("me", NOW, NOW + 5, ClaimLimits(2)))
    theirs = await backend.claim(ClaimRequest("them", NOW, NOW + 5, ClaimLimits(1)))
    started = attrs.evolve(mine.jobs[0], state=JobState.RUNNING, attempt=1)
    finished = attrs.evolve(
        theirs.jobs[0], state=JobState.COMPLETED, owner=None, lease_expires_at=None
    )
    await backend.commit([started, finished], [], (), {})
    assert await backend.renew_leases("me", NOW + 50) == 2  # one running, one claimed
    assert await backend.renew_leases("them", NOW + 50) == 0
    leases = {j.id: (j.owner, j.lease_expires_at) for j in await backend.query(JobQuery())}
    assert leases[mine.jobs[0].id] == leases[mine.jobs[1].id] == ("me", NOW + 50)
    assert leases[theirs.jobs[0].id] == (None, None)
    # A later write of the same claim carrying the older expiry does not move it back.
    await backend.commit([attrs.evolve(started, progress=50.0)], [], (), {})
    reloaded = await backend.load(started.id)
    assert reloaded is not None and reloaded.lease_expires_at == NOW + 50


async def test_claims_take_what_the_memory_backend_takes(backend: Backend) -> None:
    """The same queue in the memory backend (the reference: it plans over every waiting job
    at once) and in this one, claimed in the same steps: the same jobs, in the same order,
    through priorities, fair share, limits per user and kind, delayed jobs, other owners'
    live claims, and groups that must give more than their first window."""
    rng = random.Random(7)
    jobs = [
        job(
            f"{i:05}",
            "big" if i % 4 else f"u{rng.randrange(4)}",
            rng.choice(["k0", "k0", "k1"]),
            NOW - 1000 + rng.randrange(900),
            priority=rng.choice([0, 0, 5, 9]),
            run_at=NOW + 100 if i % 17 == 0 else None,
        )
        for i in range(400)
    ]
    reference = MemoryBackend()
    for target in (reference, backend):
        await target.commit(jobs, [], (), {})
    steps = [
        ("other", NOW, ClaimLimits(7)),
        ("me", NOW, ClaimLimits(60, max_running_per_user=40)),
        ("me", NOW, ClaimLimits(50, max_running_per_kind={"k1": 5})),
        ("third", NOW + 100, ClaimLimits(500)),
    ]
    for owner, now, limits in steps:
        request = ClaimRequest(owner, now, now + 50, limits, running=3, by_user={"u1": 2})
        expected = await reference.claim(request)
        found = await backend.claim(request)
        assert [j.id for j in found.jobs] == [j.id for j in expected.jobs], owner
        assert found.next_run_at == expected.next_run_at
    assert len(found.jobs) > 100  # the last claim took what was left


@pytest.mark.parametrize("start", [True, False], ids=["start", "mark-only"])
async def test_concurrent_claimers_on_one_database_claim_each_job_exactly_once(
    pg_url: str, start: bool
) -> None:
    """Four backends on one PostgreSQL database (nodes share one database), each
    in its own Trio task and worker thread, claim from 3,000 waiting jobs of 6 users, 2 kinds
    and 3 priorities, a few at a time, and start what they claimed, as fast as they can: every
    job is claimed exactly once, by the owner whose result holds it, and no claim goes over its
    slots. ``mark-only``: nothing is started and every claim is by a new owner id, so only the
    claims' marks keep the claimers apart."""
    total, claimers = 3000, 4
    first = PostgresBackend(pg_url)
    async with first.opened():
        jobs = [
            job(f"{i:06}", f"u{i % 6}", f"k{i % 2}", NOW - total + i, priority=(i % 3) * 10)
            for i in range(total)
        ]
        await first.commit(jobs, [], (), {})
    claimed: dict[str, list[str]] = {}
    rounds: dict[str, int] = {}

    async def claimer(node: str, slots: int) -> None:
        backend = PostgresBackend(pg_url)
        async with backend.opened():
            rounds[node] = 0
            while sum(map(len, claimed.values())) < total:
                owner = node if start else f"{node}-{rounds[node]}"
                result = await backend.claim(
                    ClaimRequest(owner, NOW, NOW + 3600, ClaimLimits(slots))
                )
                assert len(result.jobs) <= slots
                assert all(j.owner == owner and j.state is JobState.CREATED for j in result.jobs)
                claimed.setdefault(owner, []).extend(j.id for j in result.jobs)
                rounds[node] += 1
                if start:
                    # The owner starts what it claimed (a claim may take back its own marks).
                    started = [
                        attrs.evolve(j, state=JobState.RUNNING, attempt=j.attempt + 1)
                        for j in result.jobs
                    ]
                    await backend.commit(started, [], (), {})

    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            for n in range(claimers):
                nursery.start_soon(claimer, f"node{n}", 3 + n * 4)
    everything = [job_id for ids in claimed.values() for job_id in ids]
    assert len(everything) == total
    assert sorted(everything) == sorted(j.id for j in jobs)  # each exactly once
    assert len(rounds) == claimers and all(n > 10 for n in rounds.values())  # all took part
    with psycopg.connect(pg_url, autocommit=True) as conn:
        rows = conn.execute("SELECT id, owner, state, attempt FROM jobs").fetchall()
    expected = {job_id: owner for owner, ids in claimed.items() for job_id in ids}
    assert {job_id: owner for job_id, owner, _, _ in rows} == expected
    assert {(state, attempt) for _, _, state, attempt in rows} == (
        {("running", 1)} if start else {("created", 0)}
    )


async def test_a_v2_database_of_the_release_before_the_queue_migrates_in_place(
    pg_url: str,
) -> None:
    """``tests/data/v2_postgres.sql``: a database written by the release before the queue
    (``make_legacy_pg.py``, run with that release's code), dumped. Opened by this runtime it
    migrates to v5 in place: every job and event is still there, the epoch is the same, and
    the job that waited is in the queue (claimable, counted) under the new indexes."""
    ids: dict[str, str] = json.loads((DATA / "v2_postgres.ids.json").read_text())
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute((DATA / "v2_postgres.sql").read_text())
        before_jobs: dict[str, str] = dict(conn.execute("SELECT id, state FROM jobs").fetchall())
        before_events = conn.execute(
            "SELECT job_id, seq, user_seq, record FROM events ORDER BY job_id, seq"
        ).fetchall()
        meta: dict[str, str] = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        epoch = meta["epoch"]
    assert {before_jobs[job_id] for job_id in ids.values()} == {
        "completed",
        "failed",
        "cancelled",
        "paused",
        "running",
        "created",
    }
    backend = PostgresBackend(pg_url)
    async with backend.opened():
        assert backend.epoch == epoch
        for name, job_id in ids.items():
            found = await backend.load(job_id)
            assert found is not None and found.state.value == before_jobs[job_id] == name
            assert (found.priority, found.max_attempts, found.tags) == (0, 1, ())
            assert (found.owner, found.lease_expires_at) == (None, None)
            events = await backend.read_events(job_id, 0, 1000)
            assert [e.seq for e in events] == list(range(1, found.seq + 1))
        now = time.time()
        stats = await backend.queue_stats(now)
        assert (stats.waiting, stats.ready, stats.running) == (1, 1, 1)
        assert stats.waiting_by_user == {"carol": 1}
        result = await backend.claim(ClaimRequest("n1", now, now + 5, ClaimLimits(10)))
        assert [j.id for j in result.jobs] == [ids["created"]]
    with psycopg.connect(pg_url, autocommit=True) as conn:
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        after_events = conn.execute(
            "SELECT job_id, seq, user_seq, record FROM events ORDER BY job_id, seq"
        ).fetchall()
        indexes = {
            name
            for (name,) in conn.execute(
                "SELECT indexname FROM pg_indexes WHERE tablename = 'jobs'"
            ).fetchall()
        }
    assert meta == {"schema_version": "5", "epoch": epoch, "fanout_key": meta["fanout_key"]}
    assert after_events == before_events
    assert {
        "jobs_waiting",
        "jobs_scheduled",
        "jobs_children",
        "jobs_keys",
        "jobs_tags",
        "jobs_leases",
        "jobs_claimed",
    } <= indexes


async def test_the_queue_through_a_runtime_on_postgresql(pg_url: str) -> None:
    """A runtime on PostgreSQL dispatches through the backend's claim: never more running
    than its capacity, a higher priority first, a delayed job not before its run_at, a
    failed attempt retried after its backoff; every start is claimed by the runtime's node."""
    running = 0
    most = 0
    order: list[str] = []

    async def work(ctx: JobContext, input: Any) -> Any:
        nonlocal running, most
        running += 1
        most = max(most, running)
        order.append(input["name"])
        try:
            await trio.sleep(0.1)
        finally:
            running -= 1
        return input["name"]

    @kind_options(max_attempts=2, retry=RetryPolicy(initial_interval=0.2, jitter=0.0))
    async def flaky(ctx: JobContext, input: Any) -> Any:
        if ctx.attempt == 1:
            raise RuntimeError("first attempt fails")
        return "second"

    config = RuntimeConfig(node_id="pg-node", max_running=2)
    async with open_runtime(pg_url, handlers={"work": work, "flaky": flaky}, config=config) as rt:
        plain = [await rt.create_job("work", f"u{i % 3}", {"name": f"plain{i}"}) for i in range(8)]
        urgent = await rt.create_job("work", "u9", {"name": "urgent"}, priority=10)
        delayed = await rt.create_job("work", "u9", {"name": "delayed"}, delay=0.5)
        retried = await rt.create_job("flaky", "u9", None)
        created = time.time()
        for job in [*plain, urgent, delayed, retried]:
            done = await wait_for_state(rt, job.id)
            assert done.state is JobState.COMPLETED, done
        assert most <= 2 and len(order) == 10
        starts = {
            job.id: [e for e in await rt.read_events(job.id) if e.type is EventType.STARTED]
            for job in [*plain, urgent, delayed, retried]
        }
        owner = rt.node.owner
        assert owner is not None and owner.startswith("pg-node#")
        assert all(e.data["owner"] == owner for found in starts.values() for e in found)
        # No plain job that was still waiting when the urgent one came started before it.
        urgent_start = starts[urgent.id][0].at
        assert all(
            starts[job.id][0].at < urgent.created_at or starts[job.id][0].at >= urgent_start
            for job in plain
        )
        assert urgent_start < max(starts[job.id][0].at for job in plain)  # it did wait ahead
        assert starts[delayed.id][0].at >= created + 0.5 - 0.05
        first, second = starts[retried.id]
        assert second.at - first.at >= 0.2 and second.data["attempt"] == 2
        stats = await rt.queue_stats()
        assert (stats.waiting, stats.running) == (0, 0)


def scans(plan: dict[str, Any]) -> list[dict[str, Any]]:
    """Every node of an ``EXPLAIN (FORMAT JSON)`` plan that reads the jobs table or one of
    its indexes."""
    found = [plan] if plan.get("Relation Name") == "jobs" or "Index Name" in plan else []
    for child in plan.get("Plans", []):
        found += scans(child)
    return found


async def test_a_claim_reads_the_waiting_index_only_and_rows_it_can_take(pg_url: str) -> None:
    """The claim's statements on 30,000 waiting jobs (planner statistics up to date): each
    reads ``jobs`` through its partial index only, and the window statement examines no more
    rows than it returns plus the few ahead of a window's start: the cost does not grow with
    the number waiting. (Given an index on ``ready_at`` alone, or a window's start spelled as
    a row comparison, PostgreSQL 15 scanned that index and filtered every waiting job.)"""
    async with PostgresBackend(pg_url).opened():
        pass
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO jobs (id, user_id, kind, state, attempt, record, priority, created_at,"
            " ready_at, run_at) SELECT lpad(n::text, 8, '0'), 'u' || (n % 5), 'k' || (n % 2),"
            " 'created', 0, '{}', (n % 3) * 10, n, n, CASE WHEN n % 100 = 0 THEN n END"
            " FROM generate_series(1, 30000) AS n"
        )
        conn.execute("ANALYZE jobs")
        now = 40_000.0
        groups = conn.execute(GROUPS_SQL).fetchall()
        assert len(groups) == 30  # 3 priorities x 5 users x 2 kinds
        top = [(user, kind) for priority, user, kind in groups if priority == 20]
        params: dict[str, Any] = {
            "users": [user for user, _ in top],
            "kinds": [kind for _, kind in top],
            "after_at": [float("-inf"), *[15_000.0] * (len(top) - 1)],
            "after_id": ["", *["00015000"] * (len(top) - 1)],
            "priority": 20,
            "now": now,
            "owner": "me",
            "window": 8,
        }
        plans = {}
        with conn.transaction():
            conn.execute(PLAN_SQL)  # as the claim does
            for name, statement, args in [
                ("groups", GROUPS_SQL, None),
                ("window", WINDOW_SQL, params),
                ("next run", NEXT_RUN_SQL, (now,)),
            ]:
                row = conn.execute(f"EXPLAIN (ANALYZE, FORMAT JSON) {statement}", args).fetchone()
                assert row is not None
                plans[name] = scans(row[0][0]["Plan"])
    expected = {"groups": "jobs_waiting", "window": "jobs_waiting", "next run": "jobs_scheduled"}
    for name, found in plans.items():
        assert found and {node.get("Index Name") for node in found} == {expected[name]}, name
        assert {node["Node Type"] for node in found} <= {"Index Scan", "Index Only Scan"}, name
    (window,) = plans["window"]
    assert window["Actual Rows"] * window["Actual Loops"] == 8 * len(top)
    assert window.get("Rows Removed by Filter", 0) <= len(top)


async def test_key_lookups_and_held_leases_on_every_backend(backend: Backend) -> None:
    """The create path's batched idempotency lookups (``find_by_keys``, ``keys_since``) and
    the fast path's ``held_until`` answer alike on memory, SQLite and PostgreSQL."""
    jobs = [
        job("k1", "alice", idempotency_key="same"),
        job("k2", "alice", idempotency_key="same", at=NOW + 5),
        job("k3", "bob", idempotency_key="same"),
        job("k4", "alice", idempotency_key="old", at=NOW - 100),
        job("k5", "alice"),
        attrs.evolve(job("h1", "carol"), owner="other", lease_expires_at=NOW + 30),
        attrs.evolve(job("h2", "carol"), owner="other", lease_expires_at=NOW + 10),
        attrs.evolve(job("h3", "carol"), owner="me", lease_expires_at=NOW + 5),
        attrs.evolve(job("h4", "carol"), owner="other", lease_expires_at=NOW - 1),
    ]
    await backend.commit(jobs, [], [], {})
    found = await backend.find_by_keys(
        [("alice", "same"), ("bob", "same"), ("alice", "none"), ("carol", "same")]
    )
    assert {key: j.id for key, j in found.items()} == {
        ("alice", "same"): "k2",
        ("bob", "same"): "k3",
    }
    assert await backend.find_by_keys([]) == {}
    assert sorted(await backend.keys_since("alice", NOW - 50, 10)) == ["same", "same"]
    assert sorted(await backend.keys_since("alice", 0, 10)) == ["old", "same", "same"]
    assert len(await backend.keys_since("alice", 0, 2)) == 2
    assert await backend.held_until("me", NOW) == NOW + 10
    assert await backend.held_until("other", NOW) == NOW + 5
    assert await backend.held_until("me", NOW + 31) is None
