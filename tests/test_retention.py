"""Retention: the policy (sans-I/O), the backend prune on both backends, the store and the
runtime applying it in batches, the v1 -> v2 migration, settings, and a database that levels
off under a long synthetic load."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from actors import (
    DEMO_HANDLERS,
    BroadcasterConfig,
    EventHub,
    JobError,
    JobQuery,
    JobState,
    MemoryBackend,
    Pruned,
    RetentionPolicy,
    RetentionRule,
    SqliteBackend,
    StoreActor,
    StoreClient,
    StoreConfig,
    UnknownJobError,
    open_runtime,
    parse_duration,
)
from actors._backend import Backend
from actors._retention import DAY
from actors._runtime import RuntimeConfig
from transport._config import resolve, retention_policy
from transport._exit import CLIError

from .backends import new_backend
from .conftest import memory_runtime, wait_for_state

# -- the policy ---------------------------------------------------------------------------------


def test_rule_by_age_takes_the_oldest_prefix() -> None:
    rule = RetentionRule(keep_for=100.0)
    oldest = [("a", 10.0), ("b", 50.0), ("c", 950.0), ("d", 20.0)]
    # now 1000: a and b finished more than 100 s ago; c is recent, and d comes after it.
    assert rule.due(4, oldest, now=1000.0) == ["a", "b"]
    assert rule.due(4, oldest, now=10.0) == []
    assert rule.due(4, [("x", 900.0)], now=1000.0) == []  # exactly 100 s: kept


def test_rule_by_count_keeps_the_newest() -> None:
    rule = RetentionRule(keep_for=None, max_count=2)
    oldest = [("a", 1.0), ("b", 2.0), ("c", 3.0)]
    # 5 finished in all, 2 kept: the 3 oldest are due whatever their age.
    assert rule.due(5, oldest, now=3.0) == ["a", "b", "c"]
    assert rule.due(3, oldest, now=3.0) == ["a"]
    assert rule.due(2, oldest[:2], now=3.0) == []
    # Both limits: the count first, then the age.
    both = RetentionRule(keep_for=10.0, max_count=5)
    assert both.due(6, [("a", 95.0), ("b", 80.0), ("c", 99.0)], now=100.0) == ["a", "b"]


def test_policy_per_kind_and_older_than() -> None:
    policy = RetentionPolicy(
        RetentionRule(keep_for=7 * DAY), {"trade": RetentionRule(keep_for=DAY, max_count=3)}
    )
    assert policy.rule("research").keep_for == 7 * DAY
    assert policy.rule("trade") == RetentionRule(DAY, 3)
    manual = policy.older_than(60.0)
    assert manual.rule("research").keep_for == 60.0
    assert manual.rule("trade") == RetentionRule(60.0, 3)  # the count limit stays
    assert RetentionPolicy().rule("x") == RetentionRule(7 * DAY, None)


@pytest.mark.parametrize(
    "bad",
    [
        lambda: RetentionRule(keep_for=-1.0),
        lambda: RetentionRule(keep_for=float("nan")),
        lambda: RetentionRule(max_count=-1),
        lambda: RetentionRule(max_count=True),
        lambda: RetentionPolicy(interval=0),
        lambda: RetentionPolicy(batch_size=0),
    ],
)
def test_policy_refuses_bad_values(bad: object) -> None:
    with pytest.raises(ValueError):
        bad()  # type: ignore[operator]


def test_parse_duration() -> None:
    assert parse_duration("90") == 90.0
    assert parse_duration("45s") == 45.0
    assert parse_duration("30m") == 1800.0
    assert parse_duration("12h") == 12 * 3600.0
    assert parse_duration("7d") == 7 * DAY
    assert parse_duration("2W") == 14 * DAY
    for bad in ("", "d", "-1d", "7 days", "1y", "inf", "nan"):
        with pytest.raises(ValueError, match="duration"):
            parse_duration(bad)


# -- settings -----------------------------------------------------------------------------------


def test_settings_build_the_policy_with_per_kind_tables() -> None:
    file = {
        "runtime": {
            "retention_days": 2,
            "retention_interval": 5,
            "retention_kinds": {"trade": {"days": 0.5, "max_count": 10}, "analysis": {}},
        }
    }
    values = resolve({}, {"JOBSPINE_RETENTION_MAX_PER_KIND": "100"}, file)
    policy = retention_policy(values)
    assert policy.default == RetentionRule(2 * DAY, 100)
    assert policy.interval == 5.0
    assert policy.rule("trade") == RetentionRule(0.5 * DAY, 10)
    assert policy.rule("analysis") == RetentionRule(2 * DAY, 100)
    forever = resolve({}, {"JOBSPINE_RETENTION_DAYS": "inf"}, {})
    assert retention_policy(forever).default.keep_for is None
    assert retention_policy(resolve({}, {}, {})).default == RetentionRule(7 * DAY, None)


@pytest.mark.parametrize(
    "file",
    [
        {"runtime": {"retention_days": -1}},
        {"runtime": {"retention_max_per_kind": -5}},
        {"runtime": {"retention_kinds": {"trade": {"days": "x"}}}},
        {"runtime": {"retention_kinds": {"trade": {"keep": 1}}}},
        {"runtime": {"retention_kinds": {"trade": 3}}},
        {"runtime": {"retention_kinds": {"trade": {"max_count": -1}}}},
    ],
)
def test_bad_retention_settings_are_usage_errors(file: dict[str, object]) -> None:
    with pytest.raises(CLIError):
        resolve({}, {}, file)


# -- the backend and the store ------------------------------------------------------------------


@asynccontextmanager
async def open_store(backend: Backend) -> AsyncIterator[StoreClient]:
    actor = StoreActor(backend, EventHub(), StoreConfig())
    client = actor.client()
    async with trio.open_nursery() as nursery:
        await nursery.start(actor.run)
        async with client:
            yield client


@pytest.fixture(params=["memory", "sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    return new_backend(request, tmp_path / "retention.db")


async def finished_job(
    store: StoreClient, user: str, kind: str = "research", steps: int = 2
) -> str:
    job = await store.create(user, kind, {"query": "q"})
    job = await store.start(job.id)
    for step in range(steps):
        await store.set_progress(job.id, job.attempt, step / steps, f"step {step}")
    await store.complete(job.id, job.attempt, {"ok": True})
    return job.id


NOW_LATER = 10**12  # far in the future: every finished job is older than any age limit


async def test_prune_removes_finished_jobs_and_their_events_only(backend: Backend) -> None:
    async with open_store(backend) as store:
        done = [await finished_job(store, "alice") for _ in range(3)]
        failed = (await store.create("alice", "trade", {})).id
        await store.fail(failed, None, JobError("Boom", "x"))
        running = (await store.create("alice", "research", {"query": "q"})).id
        await store.start(running)
        other = await finished_job(store, "bob")
        head = await store.user_head("alice")
        policy = RetentionPolicy(RetentionRule(keep_for=0.0))
        dry = await store.prune(policy, NOW_LATER, 100, dry_run=True)
        assert set(dry.job_ids) == {*done, failed, other}
        assert (await store.get(done[0])).state is JobState.COMPLETED  # a dry run removes nothing
        pruned = await store.prune(policy, NOW_LATER, 100)
        assert set(pruned.job_ids) == {*done, failed, other}
        assert pruned.states == {"completed": 4, "failed": 1}
        assert pruned.events == 4 * 5 + 2  # created, running, 2 progress, completed; 2 for failed
        for job_id in pruned.job_ids:
            with pytest.raises(UnknownJobError):
                await store.get(job_id)
            assert await store.read_events(job_id) == []
        assert (await store.get(running)).state is JobState.RUNNING
        remaining = await store.read_user_events("alice")
        assert {e.job_id for e in remaining} == {running}
        # The head stays; the horizon is the last user_seq pruned.
        assert await store.user_head("alice") == head
        pruned_seqs = [head - 2 + 1]  # running's 2 events are the last: created, running
        assert await store.user_horizon("alice") < pruned_seqs[0]
        assert await store.user_horizon("bob") == await store.user_head("bob")
        stats = await store.get_stats()
        assert stats["total"] == 1 and stats["running"] == 1
        # Nothing more is due.
        assert (await store.prune(policy, NOW_LATER, 100)).job_ids == ()


async def test_user_head_never_goes_back_after_its_last_events_are_pruned(
    backend: Backend,
) -> None:
    """The key invariant: pruning a user's newest events must not free their numbers, also
    for a store started afresh on the database (no cached head)."""
    async with open_store(backend) as store:
        first = await finished_job(store, "alice")
        last = await finished_job(store, "alice")
        head = await store.user_head("alice")
        pruned = await store.prune(RetentionPolicy(RetentionRule(0.0)), NOW_LATER, 10)
        assert set(pruned.job_ids) == {first, last}
        assert await store.read_user_events("alice") == []
        assert await store.user_head("alice") == head  # not 0
    async with open_store(backend) as store:
        assert await store.user_head("alice") == head
        assert await store.user_horizon("alice") == head
        job = await store.create("alice", "research", {"query": "again"})
        events = await store.read_user_events("alice")
        assert [(e.job_id, e.user_seq) for e in events] == [(job.id, head + 1)]
        # Pruned again (the new job is not finished: nothing), the head holds.
        assert (await store.prune(RetentionPolicy(RetentionRule(0.0)), NOW_LATER, 10)).job_ids == ()
        assert await store.user_head("alice") == head + 1


async def test_count_and_per_kind_limits(backend: Backend) -> None:
    async with open_store(backend) as store:
        research = [await finished_job(store, "alice", "research", 0) for _ in range(5)]
        trades = [await finished_job(store, "alice", "trade", 0) for _ in range(4)]
        policy = RetentionPolicy(
            RetentionRule(keep_for=None, max_count=3), {"trade": RetentionRule(None, 1)}
        )
        pruned = await store.prune(policy, 0.0, 100)
        # ids sort by creation, and jobs finished in that order: the oldest go first.
        assert set(pruned.job_ids) == {*research[:2], *trades[:3]}
        # A small batch limit takes at most that many.
        more = [await finished_job(store, "alice", "research", 0) for _ in range(3)]
        assert len((await store.prune(policy, 0.0, 2)).job_ids) == 2
        assert len((await store.prune(policy, 0.0, 2)).job_ids) == 1
        left = await store.list_jobs(JobQuery(kind="research"))
        assert [job.id for job in left] == list(reversed(more))  # the 3 newest
        assert len(await store.list_jobs(JobQuery(kind="trade"))) == 1


async def test_prune_during_a_restart_never_removes_a_job_that_is_not_finished(
    backend: Backend,
) -> None:
    """A restart queued before the prune is committed first (the prune is a barrier)."""
    async with open_store(backend) as store:
        job_id = (await store.create("alice", "research", {"query": "q"})).id
        await store.cancel(job_id, "alice")
        policy = RetentionPolicy(RetentionRule(0.0))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(store.restart, job_id, "alice")
            await trio.testing.wait_all_tasks_blocked()
            pruned = await store.prune(policy, NOW_LATER, 10)
        assert pruned.job_ids == ()
        assert (await store.get(job_id)).state is JobState.CREATED


# -- the runtime: batches, the periodic task ----------------------------------------------------


async def test_batches_do_not_stall_other_writes(autojump_clock: trio.abc.Clock) -> None:
    """2,000 finished jobs pruned 100 at a time while another task keeps writing: its writes
    are served between the batches, not after the last one."""
    # Applied at start (nothing to do), then only by hand here.
    policy = RetentionPolicy(RetentionRule(keep_for=0.0), batch_size=100, interval=1e9)
    async with memory_runtime(retention=policy) as rt:
        store = rt._store
        for _ in range(2000):
            job = await store.create("alice", "trade", {})
            await store.cancel(job.id, None)
        progress: list[tuple[int, int]] = []  # (writes so far, batches so far) per write
        batches = 0
        real_prune = store.prune

        async def counting_prune(
            policy: RetentionPolicy,
            now: float,
            limit: int,
            *,
            dry_run: bool = False,
            idempotency_window: float = 86_400.0,
        ) -> Pruned:
            nonlocal batches
            result = await real_prune(
                policy, now, limit, dry_run=dry_run, idempotency_window=idempotency_window
            )
            batches += 1
            return result

        store.prune = counting_prune  # type: ignore[method-assign]
        done = trio.Event()

        async def writer() -> None:
            while not done.is_set():
                await store.create("bob", "trade", {})  # created: never due
                progress.append((len(progress) + 1, batches))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            report = await rt.prune()
            done.set()
        assert report.jobs >= 2000 and report.batches >= 20
        during = {b for _, b in progress if 0 < b < report.batches}
        assert len(during) >= report.batches // 2, progress[-5:]
        assert await rt.get_user_stats("alice") == {
            **{s.value: 0 for s in JobState},
            "total": 0,
            "waiting_by_kind": {},
        }


async def test_the_runtime_applies_its_policy_periodically(autojump_clock: trio.abc.Clock) -> None:
    # Ages are wall-clock (job timestamps are): under the mock clock, a count limit decides.
    policy = RetentionPolicy(RetentionRule(keep_for=None, max_count=0), interval=10.0)
    async with memory_runtime(retention=policy) as rt:
        job = await rt.create_job("trade", "alice", {"symbol": "X", "side": "buy", "quantity": 1})
        await wait_for_state(rt, job.id)
        assert (await rt.get_job(job.id)).state is JobState.COMPLETED  # until the next run
        await trio.sleep(10)
        with pytest.raises(UnknownJobError):
            await rt.get_job(job.id)
        # user_head stayed: the next job's events continue the numbering.
        head = await rt._store.user_head("alice")
        assert head > 0 and await rt._store.user_horizon("alice") == head
        # The jobs-by-state gauge follows the prune (no query at scrape time).
        assert rt.store_actor.metrics.jobs[JobState.COMPLETED] == 0


async def test_manual_prune_older_than_and_dry_run(autojump_clock: trio.abc.Clock) -> None:
    async with memory_runtime() as rt:
        assert rt.config.retention is None
        job = await rt.create_job("trade", "alice", {"symbol": "X", "side": "buy", "quantity": 1})
        await wait_for_state(rt, job.id)
        assert (await rt.prune()).jobs == 0  # the default policy: 7 days
        assert (await rt.prune(older_than=3600.0)).jobs == 0  # finished just now
        dry = await rt.prune(older_than=0.0, dry_run=True)
        assert (dry.jobs, dry.dry_run, dry.job_ids) == (1, True, (job.id,))
        assert (await rt.get_job(job.id)).state is JobState.COMPLETED
        real = await rt.prune(older_than=0.0)
        assert (real.jobs, real.batches, real.job_ids) == (1, 1, (job.id,))
        assert real.events > 0


# -- the schema migration -----------------------------------------------------------------------


def _v1_database(path: Path) -> None:
    """A v1 database as main wrote it before retention, with one completed and one running
    job (the DDL of schema v1)."""
    from actors._sqlite import MIGRATIONS

    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
        for statement in MIGRATIONS[0]:
            conn.execute(statement)
        conn.execute("INSERT INTO meta VALUES ('schema_version', '1'), ('epoch', 'E1')")


async def test_a_v1_database_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "v1.db"
    # Write jobs with the v1 schema: open at the current version, then strip what v4, v3 and
    # v2 added (tests/test_migration.py opens files the v1 and v2 releases wrote).
    async with open_store(SqliteBackend(path)) as store:
        done = await finished_job(store, "alice")
        running = (await store.create("alice", "research", {"query": "q"})).id
        await store.start(running)
        head = await store.user_head("alice")
        epoch = store.epoch

    def downgrade() -> None:
        with sqlite3.connect(path) as conn:
            conn.execute("DROP TABLE nodes")
            for index in ("waiting", "scheduled", "children", "keys", "owned"):
                conn.execute(f"DROP INDEX jobs_{index}")
            conn.execute("DROP TABLE job_tags")
            for column in ("priority", "created_at", "ready_at", "parent_id", "idempotency_key"):
                conn.execute(f"ALTER TABLE jobs DROP COLUMN {column}")
            for column in ("owner", "lease_expires_at"):
                conn.execute(f"ALTER TABLE jobs DROP COLUMN {column}")
            conn.execute("DROP INDEX jobs_finished")
            conn.execute("DROP TABLE user_heads")
            conn.execute("ALTER TABLE jobs DROP COLUMN finished_at")
            conn.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
            columns = [row[1] for row in conn.execute("PRAGMA table_info(jobs)")]
            assert "finished_at" not in columns

    await trio.to_thread.run_sync(downgrade)
    fresh = tmp_path / "fresh-v1.db"
    await trio.to_thread.run_sync(_v1_database, fresh)
    for db in (fresh, path):
        async with open_store(SqliteBackend(db)) as store:
            assert store.epoch == ("E1" if db == fresh else epoch)
    async with open_store(SqliteBackend(path)) as store:
        # finished_at was filled in from the records: the finished job is due, the other not.
        pruned = await store.prune(RetentionPolicy(RetentionRule(0.0)), NOW_LATER, 10)
        assert pruned.job_ids == (done,)
        assert await store.user_head("alice") == head
        assert (await store.get(running)).state is JobState.RUNNING

    def version() -> str:
        with sqlite3.connect(path) as conn:
            return str(conn.execute("SELECT value FROM meta WHERE key = 'schema_version'")
                       .fetchone()[0])  # fmt: skip

    assert await trio.to_thread.run_sync(version) == "5"


# -- a long synthetic load ----------------------------------------------------------------------

#: Rounds of the load test; JOBSPINE_RETENTION_SOAK_ROUNDS=40 for the long mode.
ROUNDS = int(os.environ.get("JOBSPINE_RETENTION_SOAK_ROUNDS", "8"))


def _used_pages(path: Path) -> tuple[int, int]:
    """Pages in use (page count minus the free list) and the file size after a checkpoint."""
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        free = conn.execute("PRAGMA freelist_count").fetchone()[0]
    return pages - free, path.stat().st_size


async def test_database_size_levels_off_under_load(tmp_path: Path) -> None:
    """Jobs are created, run and finished round after round, with retention keeping the 200
    newest: the database stops growing after the first rounds instead of growing with the
    jobs ever made (250 per round, 2,000 in the short mode)."""
    path = tmp_path / "soak.db"
    policy = RetentionPolicy(
        RetentionRule(keep_for=None, max_count=200), batch_size=100, interval=1e9
    )
    sizes: list[tuple[int, int]] = []
    async with open_runtime(
        path,
        handlers=DEMO_HANDLERS,
        config=RuntimeConfig(sqlite_synchronous="OFF", retention=policy),
    ) as rt:
        store = rt._store
        for _ in range(ROUNDS):
            async with trio.open_nursery() as nursery:
                for user in ("alice", "bob", "carol", "dave", "erin"):
                    for _ in range(50):
                        nursery.start_soon(finished_job, store, user, "research", 4)
            await rt.prune()
            # The database is owned by this process; a second connection may read it.
            sizes.append(await trio.to_thread.run_sync(_used_pages, path))
        stats = await rt.get_stats()
        assert stats["total"] == 200
    pages = [used for used, _ in sizes]
    files = [size for _, size in sizes]
    # Past the second round nothing grows by more than a little (page reuse, index splits).
    assert max(pages[2:]) <= pages[1] * 1.15, pages
    assert max(files[2:]) <= files[1] * 1.3, files
    # Without retention it would grow with every round: a linear fit would be ~ROUNDS x.
    assert pages[-1] < pages[0] * 2, pages


async def test_prune_drops_the_pruned_jobs_backlogs(autojump_clock: trio.abc.Clock) -> None:
    async with open_runtime(
        backend=MemoryBackend(), handlers=DEMO_HANDLERS, broadcast=BroadcasterConfig()
    ) as rt:
        job = await rt.create_job("trade", "alice", {"symbol": "X", "side": "buy", "quantity": 1})
        await wait_for_state(rt, job.id)
        assert rt.broadcaster is not None
        await rt.broadcaster.drained()
        backlogs = rt.broadcaster._backlogs
        assert f"job:{job.id}" in backlogs and "user:alice" in backlogs
        assert (await rt.prune(older_than=0.0)).job_ids == (job.id,)
        assert f"job:{job.id}" not in backlogs
        # The user room's backlog stays: a cursor it serves is at or past the horizon.
        assert "user:alice" in backlogs
