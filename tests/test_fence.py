"""Several writers on one PostgreSQL database (issue 11): ``user_seq`` assigned in the commit's
transaction, fenced job writes, and the store's answer to a job lost to another writer.

Several stores open one real database (``PostgresBackend(url)``: no owner lock),
each with its own actor, connection and event hub, as several nodes would."""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import attrs
import psycopg
import pytest
import trio
import trio.testing

from actors import (
    EventHub,
    EventType,
    IllegalTransitionError,
    Job,
    JobEvent,
    JobState,
    MemoryBackend,
    PostgresBackend,
    StaleAttemptError,
    StaleWriteError,
    StoreActor,
    StoreClient,
)
from actors._ids import new_id
from actors._postgres import is_postgres_outage
from actors._store import MAX_CONFLICTS

from .backends import Commit, CommitHooks


@asynccontextmanager
async def node(pg_url: str) -> AsyncIterator[tuple[StoreClient, StoreActor, list[JobEvent]]]:
    """A store on the shared database, and the events its hub publishes (in order; the list
    is filled as they come)."""
    hub = EventHub()
    actor = StoreActor(PostgresBackend(pg_url), hub)
    published: list[JobEvent] = []
    async with trio.open_nursery() as nursery, actor.client() as client:
        await nursery.start(actor.run)

        async def collect(*, task_status: trio.TaskStatus[None]) -> None:
            async with hub.subscribe(math.inf) as stream:
                task_status.started()
                async for event in stream:
                    published.append(event)

        await nursery.start(collect)
        yield client, actor, published
        nursery.cancel_scope.cancel()


def stored_events(pg_url: str) -> list[tuple[str, int, str, int, str]]:
    """``(user_id, user_seq, job_id, seq, type)`` of every stored event, by user and user_seq."""
    with psycopg.connect(pg_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT user_id, user_seq, job_id, seq, type FROM events ORDER BY user_id, user_seq"
        ).fetchall()
    return [(str(u), int(us), str(j), int(s), str(t)) for u, us, j, s, t in rows]


async def test_two_writers_number_every_users_events_gap_free_in_commit_order(
    pg_url: str,
) -> None:
    """Two stores write jobs of the same three users at once (creates, starts, progress,
    completions): each user's stored ``user_seq`` runs 1..N with no gap or duplicate, each
    job's events are in its ``seq`` order within its user's log (commit order), both hubs
    published exactly the stored numbers, and either store's ``user_head`` is the stored head."""
    users = ["u0", "u1", "u2"]
    async with AsyncExitStack() as stack:
        nodes = [await stack.enter_async_context(node(pg_url)) for _ in range(2)]

        async def work(store: StoreClient, user: str, n: int) -> None:
            for _ in range(n):
                job = await store.create(user, "research", {"q": 1})
                await store.start(job.id)
                for pct in (10, 50, 90):
                    await store.set_progress(job.id, 1, pct, None)
                await store.complete(job.id, 1, {"ok": True})

        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                for store, _, _ in nodes:
                    for user in users:
                        for _ in range(3):  # several tasks per user and node: real groups
                            nursery.start_soon(work, store, user, 4)
        stored = stored_events(pg_url)
        for user in users:
            mine = [row for row in stored if row[0] == user]
            # 2 nodes x 3 tasks x 4 jobs x 6 events
            assert [row[1] for row in mine] == list(range(1, 2 * 3 * 4 * 6 + 1))
            seqs: dict[str, list[int]] = {}
            for _, _, job_id, seq, _ in mine:
                seqs.setdefault(job_id, []).append(seq)
            assert all(s == list(range(1, 7)) for s in seqs.values())
            for store, _, _ in nodes:
                assert await store.user_head(user) == len(mine)
        # Every commit's events were published by the node that committed them, as stored.
        await trio.testing.wait_all_tasks_blocked()
        published_rows = sorted(
            (e.user_id, e.user_seq, e.job_id, e.seq, e.type.value)
            for _, _, published in nodes
            for e in published
        )
        assert published_rows == stored
        for _, _, published in nodes:
            by_user: dict[str, list[int]] = {}
            for event in published:
                by_user.setdefault(event.user_id, []).append(event.user_seq)
            # Each node publishes its commits in commit order: its numbers only grow.
            assert all(seq == sorted(seq) for seq in by_user.values())
        # The stored records carry the final numbers too.
        first, _, _ = nodes[0]
        for user in users:
            log = await first.read_user_events(user, 0, 1000)
            assert [e.user_seq for e in log] == [row[1] for row in stored if row[0] == user]


async def test_a_stale_writer_is_refused_and_its_other_jobs_commit(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Store A runs jobs X and Y (cached as running); store B cancels X. A's progress on X
    and on Y, applied in one group, lose X to B: the group is replayed one request at a time,
    X's progress is refused by the ops' own checks after X is reloaded (cancelled), Y's
    commits; X's log ends with B's ``cancelled`` and A published nothing for X after it."""
    async with node(pg_url) as (a, actor_a, published_a), node(pg_url) as (b, _, _):
        x = await a.create("alice", "research", {})
        y = await a.create("alice", "research", {})
        await a.start(x.id)
        await a.start(y.id)
        assert (await b.cancel(x.id, "bob")).state is JobState.CANCELLED
        failed_before = actor_a.metrics.failed_commits
        outcomes: dict[str, object] = {}

        async def progress(job_id: str) -> None:
            try:
                outcomes[job_id] = await a.set_progress(job_id, 1, 42, "step")
            except (StaleAttemptError, IllegalTransitionError) as exc:
                outcomes[job_id] = exc

        with caplog.at_level(logging.WARNING, logger="jobspine.store"):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(progress, x.id)
                nursery.start_soon(progress, y.id)
        assert isinstance(outcomes[x.id], (StaleAttemptError, IllegalTransitionError))
        done = outcomes[y.id]
        assert isinstance(done, Job) and done.progress == 42
        assert actor_a.metrics.failed_commits == failed_before + 1
        assert "commit of 2 requests failed (StaleWriteError" in caplog.text
        x_log = await a.read_events(x.id)
        assert [e.type for e in x_log] == [
            EventType.CREATED,
            EventType.STARTED,
            EventType.CANCELLED,
        ]
        assert (await a.get(x.id)).state is JobState.CANCELLED  # A's cache was dropped
        y_log = await a.read_events(y.id)
        assert y_log[-1].type is EventType.PROGRESS
        assert not [e for e in published_a if e.job_id == x.id and e.type is EventType.PROGRESS]
        stored = stored_events(pg_url)
        assert [row[1] for row in stored] == list(range(1, len(stored) + 1))


async def test_a_fenced_delete_and_an_old_write_lose(pg_url: str) -> None:
    """At the backend: a job write or delete based on a ``seq`` the row no longer has is
    refused with :class:`StaleWriteError` naming it, and nothing of the commit is stored (not
    the other job's write, not the events, not the heads)."""
    async with node(pg_url) as (store, _, _):
        job = await store.create("alice", "research", {})
        other = await store.create("alice", "research", {})
        await store.start(job.id)  # stored seq 2
    backend = PostgresBackend(pg_url)
    async with backend.opened():
        stored = await backend.load(job.id)
        assert stored is not None and stored.seq == 2
        # A change based on seq 1 (the job as created): it lost to the start.
        stale = JobEvent(job.id, "alice", 2, EventType.PAUSED, JobState.PAUSED, 1.0, {}, None, 0)
        fine = JobEvent(other.id, "alice", 2, EventType.STARTED, JobState.RUNNING, 1.0, {}, None, 0)
        with pytest.raises(StaleWriteError) as lost:
            await backend.commit(
                [attrs.evolve(stored, state=JobState.PAUSED), attrs.evolve(other, seq=2)],
                [stale, fine],
                (),
                {},
            )
        assert lost.value.job_ids == [job.id]
        with pytest.raises(StaleWriteError):
            await backend.commit([], [stale], [job.id], {})
        assert await backend.load(job.id) == stored
        assert (await backend.load(other.id)).seq == 1  # type: ignore[union-attr]
        assert await backend.user_head("alice") == 3
        # Based on the stored seq: written, numbered from the head.
        ok = JobEvent(job.id, "alice", 3, EventType.PAUSED, JobState.PAUSED, 1.0, {}, None, 0)
        [numbered] = await backend.commit([attrs.evolve(stored, seq=3)], [ok], (), {})
        assert numbered.user_seq == 4
        assert (await backend.read_user_events("alice", 3, 10)) == [numbered]


class Contested(CommitHooks, MemoryBackend):
    """Another writer changes job ``lost`` before every commit that writes it."""

    def __init__(self) -> None:
        super().__init__()
        self.lost: str | None = None
        self.refused = 0

    async def before_commit(self, commit: Commit) -> None:
        if self.lost is not None and any(job.id == self.lost for job in commit.jobs):
            self.refused += 1
            raise StaleWriteError([self.lost])


async def test_a_storm_of_conflicts_cannot_livelock_the_store() -> None:
    """A job lost at every commit: its request is applied again at most ``MAX_CONFLICTS``
    times, then gets :class:`StaleWriteError`; requests for other jobs, in its groups and
    after, commit."""
    backend = Contested()
    actor = StoreActor(backend, EventHub())
    async with trio.open_nursery() as nursery, actor.client() as store:
        await nursery.start(actor.run)
        jobs = [await store.create("alice", "research", {}) for _ in range(5)]
        for job in jobs:
            await store.start(job.id)
        backend.lost = jobs[0].id
        results: dict[str, object] = {}

        async def progress(job_id: str) -> None:
            try:
                results[job_id] = await store.set_progress(job_id, 1, 5, None)
            except StaleWriteError as exc:
                results[job_id] = exc

        with trio.fail_after(10):
            async with trio.open_nursery() as tasks:
                for job in jobs:
                    tasks.start_soon(progress, job.id)
        assert isinstance(results[jobs[0].id], StaleWriteError)
        assert all(isinstance(results[job.id], Job) for job in jobs[1:])
        # Once in its group, then alone: first try and MAX_CONFLICTS replays.
        assert backend.refused == 2 + MAX_CONFLICTS
        assert (await store.set_progress(jobs[1].id, 1, 6, None)).progress == 6


async def test_migration_to_v4_fills_seq_and_user_heads(pg_url: str) -> None:
    """A v3 database (no ``seq`` column, heads only where retention wrote them) migrated on
    open: each job's ``seq`` from its record, each user's head from its events, so the next
    commit numbers on from there."""
    async with node(pg_url) as (store, _, _):
        job = await store.create("alice", "research", {})
        await store.start(job.id)
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("ALTER TABLE jobs DROP COLUMN seq")
        conn.execute("DELETE FROM user_heads")
        conn.execute("DROP TABLE nodes")
        conn.execute("DROP TABLE probes")  # v5's
        conn.execute("UPDATE meta SET value = '3' WHERE key = 'schema_version'")
    async with node(pg_url) as (store, _, _):
        await store.set_progress(job.id, 1, 50, None)
        assert await store.user_head("alice") == 3
    assert [row[1:4] for row in stored_events(pg_url)] == [
        (1, job.id, 1),
        (2, job.id, 2),
        (3, job.id, 3),
    ]


#: Statements a writer runs inside its transactions, each taking a lock another node waits
#: for: a user's head (every commit of the user), its node's row (claims, takeover), a job row.
HELD_LOCKS = {
    "user head": "UPDATE user_heads SET head = head WHERE user_id = 'u0'",
    "node row": "SELECT 1 FROM nodes WHERE node_id = 'n1' FOR SHARE",
    "job row": "SELECT 1 FROM jobs FOR UPDATE",
}


@pytest.mark.parametrize("lock", sorted(HELD_LOCKS))
async def test_a_frozen_writers_locks_are_released_by_the_server(pg_url: str, lock: str) -> None:
    """A writer frozen inside its transaction (SIGSTOP, a paused VM) holding a lock: the
    server ends its session after ``idle_timeout``, so other nodes' commits of the same user,
    and the takeover of the frozen node, wait that long, not for as long as it is frozen."""
    async with node(pg_url) as (client, _, _):
        job = await client.create("u0", "research", {"q": 1})
        other = PostgresBackend(pg_url, idle_timeout=0.3)
        async with other.opened():
            await other.register_node("n1", "i1", 0.05, "host", 1)
            await trio.sleep(0.1)
            (expired,) = await other.expired_nodes()
            frozen = await trio.to_thread.run_sync(other._connect)
            try:
                await trio.to_thread.run_sync(frozen.execute, "BEGIN")
                await trio.to_thread.run_sync(frozen.execute, HELD_LOCKS[lock])
                with trio.fail_after(5):
                    await client.start(job.id)
                    await client.set_progress(job.id, 1, 50, None)
                    assert await other.take_over(expired, "n2#1")
                # The frozen session was ended: its next statement fails as an outage.
                with pytest.raises(psycopg.Error) as info:
                    await trio.to_thread.run_sync(frozen.execute, "SELECT 1")
                assert is_postgres_outage(info.value)
            finally:
                frozen.close()


@pytest.mark.parametrize("lock", sorted(HELD_LOCKS))
async def test_a_takeover_ends_the_sessions_of_a_node_frozen_mid_pipeline(
    pg_url: str, lock: str
) -> None:
    """A node frozen in the middle of a pipelined commit holds its locks with its session
    *active* (waiting for the rest of the pipeline), where no idle timeout applies: the node
    that takes it over ends its sessions first, so that the takeover, and other nodes'
    commits of the same user, go on."""
    async with node(pg_url) as (client, _, _):
        job = await client.create("u0", "research", {"q": 1})
        frozen = PostgresBackend(pg_url, idle_timeout=3600)  # only the takeover can free it
        taker = PostgresBackend(pg_url)
        async with frozen.opened(), taker.opened():
            await frozen.register_node("n1", new_id(), 0.05, "host", 1)
            conn = await frozen._run(lambda conn: conn)  # its store session, named

            def freeze() -> int:
                # As libpq sends a pipelined commit: no Sync yet, the process froze.
                pgconn = conn.pgconn
                pgconn.enter_pipeline_mode()
                pgconn.send_query_params(b"BEGIN", None)
                pgconn.send_query_params(HELD_LOCKS[lock].encode(), None)
                pgconn.flush()
                return pgconn.backend_pid

            pid = await trio.to_thread.run_sync(freeze)
            await trio.sleep(0.2)
            with psycopg.connect(pg_url, autocommit=True) as admin:
                (state,) = admin.execute(
                    "SELECT state FROM pg_stat_activity WHERE pid = %s", (pid,)
                ).fetchone() or (None,)
            assert state == "active"
            (expired,) = [n for n in await taker.expired_nodes() if n.node_id == "n1"]
            with trio.fail_after(5):
                assert await taker.take_over(expired, "n2#1")
                await client.start(job.id)
                await client.set_progress(job.id, 1, 50, None)
            with psycopg.connect(pg_url, autocommit=True) as admin:
                gone = admin.execute("SELECT pid FROM pg_stat_activity WHERE pid = %s", (pid,))
                assert gone.fetchall() == []  # its session was ended
