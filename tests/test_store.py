"""The store actor on both backends: group commit, durability, events, faults, bad input."""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import pytest
import trio

from actors import (
    CheckpointTooLargeError,
    ClaimLimits,
    ClaimRequest,
    ClaimResult,
    EventHub,
    EventType,
    IllegalTransitionError,
    InvalidInputError,
    Job,
    JobError,
    JobQuery,
    JobState,
    MemoryBackend,
    NotSerializableError,
    SqliteBackend,
    StaleAttemptError,
    StoreActor,
    StoreClient,
    StoreConfig,
    StoreError,
    UnknownJobError,
)
from actors._backend import Backend

from .backends import Commit, CommitHooks, new_backend


@asynccontextmanager
async def open_store(
    backend: Backend, **config: object
) -> AsyncIterator[tuple[StoreClient, StoreActor, EventHub]]:
    hub = EventHub()
    actor = StoreActor(backend, hub, StoreConfig(**config))  # type: ignore[arg-type]
    client = actor.client()
    async with trio.open_nursery() as nursery:
        await nursery.start(actor.run)
        async with client:
            yield client, actor, hub


@pytest.fixture(params=["memory", "sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    return new_backend(request, tmp_path / "store.db")


async def running_job(store: StoreClient, user: str = "alice") -> str:
    job = await store.create(user, "research", {"query": "q"})
    await store.start(job.id)
    return job.id


async def test_events_are_sequenced_published_and_logged(backend: Backend) -> None:
    async with open_store(backend) as (store, _, hub), hub.subscribe() as stream:
        job_id = await running_job(store)
        await store.set_progress(job_id, 1, 10, "one")
        await store.checkpoint(job_id, 1, {"i": 1})
        await store.complete(job_id, 1, {"ok": True})
        published = [stream.receive_nowait() for _ in range(5)]
        assert [e.seq for e in published] == [1, 2, 3, 4, 5]
        assert [e.type for e in published] == [
            EventType.CREATED,
            EventType.STARTED,
            EventType.PROGRESS,
            EventType.CHECKPOINT,
            EventType.COMPLETED,
        ]
        assert await store.read_events(job_id) == published
        assert await store.read_events(job_id, after_seq=3) == published[3:]
        assert (await store.get(job_id)).seq == 5


async def test_user_sequences_are_gapless_across_jobs(backend: Backend) -> None:
    async with open_store(backend) as (store, _, hub), hub.subscribe() as stream:
        a = await running_job(store, "alice")
        b = await running_job(store, "bob")
        a2 = await running_job(store, "alice")
        async with trio.open_nursery() as nursery:
            for n in range(20):
                nursery.start_soon(store.set_progress, a if n % 2 else a2, 1, n, None)
                nursery.start_soon(store.set_progress, b, 1, n, None)
        published = []
        while True:
            try:
                published.append(stream.receive_nowait())
            except trio.WouldBlock:
                break
        alice = [e for e in published if e.user_id == "alice"]
        assert [e.user_seq for e in alice] == list(range(1, 25))
        assert await store.read_user_events("alice") == alice
        assert await store.read_user_events("alice", after_seq=20, limit=2) == alice[20:22]
        bob = [e for e in published if e.user_id == "bob"]
        # Many users in one request (the cluster fan-out's fills and polls).
        assert await store.read_users_events({"alice": 20, "bob": 0, "nobody": 0}, 3) == {
            "alice": alice[20:23],
            "bob": bob[:3],
        }
        assert await store.read_users_events({"alice": 24}) == {}
        assert await store.user_head("alice") == 24
        assert await store.user_head("bob") == 22
        assert await store.user_head("nobody") == 0


async def test_group_commit(backend: Backend) -> None:
    async with open_store(backend) as (store, actor, _):
        ids = [await running_job(store) for _ in range(20)]
        before = actor.commits
        async with trio.open_nursery() as nursery:
            for job_id in ids:
                for n in range(10):
                    nursery.start_soon(store.set_progress, job_id, 1, n, f"step {n}")
        commits = actor.commits - before
        assert commits < 20, f"200 concurrent writes took {commits} commits"
        for job_id in ids:
            events = await store.read_events(job_id, after_seq=2)
            assert [e.seq for e in events] == list(range(3, 13))


async def test_acknowledged_write_is_in_the_file(tmp_path: Path) -> None:
    path = tmp_path / "ack.db"
    async with open_store(SqliteBackend(path)) as (store, _, _):
        job_id = await running_job(store)
        await store.checkpoint(job_id, 1, {"state": "saved"})

        def read() -> str:
            with sqlite3.connect(path) as conn:
                return str(
                    conn.execute("SELECT record FROM jobs WHERE id=?", (job_id,)).fetchone()[0]
                )

        assert '"checkpoint":{"state":"saved"}' in await trio.to_thread.run_sync(read)


async def test_failed_commit_fails_only_its_culprit_and_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "fault.db"
    async with open_store(SqliteBackend(path)) as (store, _, hub):
        job_id = await running_job(store)
        await store.checkpoint(job_id, 1, {"v": 1})
        other = await running_job(store)

        def add_fault() -> None:
            with sqlite3.connect(path) as conn:
                conn.execute(
                    "CREATE TRIGGER fault BEFORE INSERT ON events WHEN NEW.type = 'checkpoint'"
                    " BEGIN SELECT RAISE(ABORT, 'simulated disk fault'); END"
                )

        await trio.to_thread.run_sync(add_fault)
        async with hub.subscribe() as stream:
            results: dict[str, BaseException | None] = {}

            async def attempt(name: str, fn: object) -> None:
                try:
                    await fn()  # type: ignore[operator]
                    results[name] = None
                except StoreError as exc:
                    results[name] = exc

            async with trio.open_nursery() as nursery:
                nursery.start_soon(
                    attempt, "checkpoint", lambda: store.checkpoint(job_id, 1, {"v": 2})
                )
                nursery.start_soon(
                    attempt, "progress", lambda: store.set_progress(other, 1, 50, "x")
                )
            assert isinstance(results["checkpoint"], StoreError)
            assert "simulated disk fault" in str(results["checkpoint"])
            # The group was committed again without the culprit: the progress is saved.
            assert results["progress"] is None
            published = stream.receive_nowait()
            assert (published.job_id, published.type) == (other, EventType.PROGRESS)
            with pytest.raises(trio.WouldBlock):
                stream.receive_nowait()  # nothing of the culprit was published
        job = await store.get(job_id)
        assert (job.checkpoint, job.checkpoint_version) == ({"v": 1}, 1)

        def drop_fault() -> None:
            with sqlite3.connect(path) as conn:
                conn.execute("DROP TRIGGER fault")

        await trio.to_thread.run_sync(drop_fault)
        job = await store.checkpoint(job_id, 1, {"v": 2})
        assert job.checkpoint_version == 2
        events = await store.read_events(job_id)
        assert [e.seq for e in events] == list(range(1, len(events) + 1))
        user_events = await store.read_user_events("alice")
        assert [e.user_seq for e in user_events] == list(range(1, len(user_events) + 1))


async def test_bad_input_leaves_the_job_unchanged(backend: Backend) -> None:
    async with open_store(backend, checkpoint_limit=1000) as (store, _, _):
        job_id = await running_job(store)
        await store.checkpoint(job_id, 1, {"good": True})
        before = await store.get(job_id)
        with pytest.raises(InvalidInputError, match=r"0\.\.100"):
            await store.set_progress(job_id, 1, 101, None)
        with pytest.raises(InvalidInputError, match=r"0\.\.100"):
            await store.set_progress(job_id, 1, float("nan"), None)
        with pytest.raises(NotSerializableError, match="checkpoint is not JSON-serializable"):
            await store.checkpoint(job_id, 1, {"when": object()})
        with pytest.raises(NotSerializableError, match="NaN or infinity"):
            await store.checkpoint(job_id, 1, {"ratio": float("nan")})
        with pytest.raises(CheckpointTooLargeError, match="previous checkpoint is kept"):
            await store.checkpoint(job_id, 1, {"blob": "x" * 2000})
        with pytest.raises(NotSerializableError, match="result"):
            await store.complete(job_id, 1, {1, 2})
        with pytest.raises(StaleAttemptError, match="attempt 0 rejected"):
            await store.set_progress(job_id, 0, 5, None)
        with pytest.raises(UnknownJobError, match="no job with id 'nope'"):
            await store.set_progress("nope", 1, 5, None)
        with pytest.raises(IllegalTransitionError, match="running -> created"):
            await store.restart(job_id, "alice")
        assert await store.get(job_id) == before
        with pytest.raises(InvalidInputError, match="user_id"):
            await store.create("", "research", {})
        with pytest.raises(InvalidInputError, match="user_id must not contain a NUL"):
            await store.create("al\x00ice", "research", {})
        with pytest.raises(InvalidInputError, match="kind must not contain a NUL"):
            await store.create("alice", "re\x00search", {})
        with pytest.raises(NotSerializableError):
            await store.create("alice", "research", {"x": b"bytes"})


async def test_fencing_rejects_an_older_attempt(backend: Backend) -> None:
    async with open_store(backend) as (store, _, _):
        job_id = await running_job(store)
        await store.checkpoint(job_id, 1, {"i": 1})
        await store.pause(job_id, 1, "alice")
        await store.resume(job_id, "alice")  # back in the queue
        await store.start(job_id)  # claimed: a new attempt
        with pytest.raises(
            StaleAttemptError, match="attempt 1 rejected: the job is running with current attempt 2"
        ):
            await store.checkpoint(job_id, 1, {"i": 0})
        await store.checkpoint(job_id, 2, {"i": 2})
        assert (await store.get(job_id)).checkpoint == {"i": 2}


async def test_a_cancelled_caller_queues_nothing() -> None:
    """A write from a task already cancelled raises Cancelled before it is queued (the store
    client queues without a scheduler round of its own): nothing of it is stored."""
    async with open_store(MemoryBackend()) as (store, _, _):
        job_id = await running_job(store)
        with trio.CancelScope() as scope:
            scope.cancel()
            await store.set_progress(job_id, 1, 50, "cancelled", durable=False)
        assert scope.cancelled_caught
        await store.checkpoint(job_id, 1, {"i": 1})  # a later write commits
        job = await store.get(job_id)
        assert job.progress == 0 and job.step != "cancelled" and job.checkpoint == {"i": 1}


async def test_heartbeats_are_coalesced(backend: Backend) -> None:
    async with open_store(backend, heartbeat_flush_interval=0.05) as (store, actor, _):
        job_id = await running_job(store)
        before = actor.commits
        first = (await store.get(job_id)).last_heartbeat_at
        for _ in range(1000):
            store.heartbeat(job_id, 1)
        store.heartbeat("unknown-job", 1)  # ignored, never an error
        await trio.sleep(0.2)
        assert actor.commits - before == 1
        assert (await store.get(job_id)).last_heartbeat_at > first  # type: ignore[operator]
        stale = await store.find_stale_running(older_than=60)
        assert stale == []


async def test_queries_and_stats(backend: Backend) -> None:
    async with open_store(backend) as (store, _, _):
        a1 = await running_job(store, "alice")
        a2 = await running_job(store, "alice")
        b1 = await running_job(store, "bob")
        await store.complete(a1, 1, 1)
        await store.checkpoint(a2, 1, {"x": 1})
        await store.pause(a2, 1, "alice")
        await store.fail(b1, 1, JobError("E", "m"))
        assert [j.id for j in await store.list_jobs(JobQuery(user_id="alice"))] == [a2, a1]
        assert [j.id for j in await store.list_jobs(JobQuery(limit=1))] == [b1]
        assert [j.id for j in await store.find_resumable("alice")] == [a2]
        assert await store.find_running() == []
        stats = await store.get_stats()
        assert stats["completed"] == stats["paused"] == stats["failed"] == 1
        assert stats["total"] == 3 and stats["running"] == 0
        assert (await store.get_stats("bob"))["failed"] == 1


async def test_find_stale_running(backend: Backend) -> None:
    async with open_store(backend) as (store, _, _):
        job_id = await running_job(store)
        assert await store.find_stale_running(older_than=60) == []
        await trio.sleep(0.05)
        assert [j.id for j in await store.find_stale_running(older_than=0.01)] == [job_id]


async def test_delete(backend: Backend) -> None:
    async with open_store(backend) as (store, _, _):
        job_id = await running_job(store)
        with pytest.raises(IllegalTransitionError, match="running -> deleted"):
            await store.delete(job_id)
        await store.cancel(job_id, "alice")
        await store.delete(job_id, "alice")
        with pytest.raises(UnknownJobError):
            await store.get(job_id)
        with pytest.raises(UnknownJobError):
            await store.delete(job_id)
        # The log stays, closed by a tombstone, so no cursor ever sees a gap.
        events = await store.read_events(job_id)
        assert [e.type for e in events][-2:] == [EventType.CANCELLED, EventType.DELETED]
        assert [e.seq for e in events] == list(range(1, len(events) + 1))


async def test_sqlite_epoch_and_schema(tmp_path: Path) -> None:
    path = tmp_path / "epoch.db"
    async with open_store(SqliteBackend(path)) as (store, _, _):
        epoch = store.epoch
        job_id = await running_job(store)
    async with open_store(SqliteBackend(path)) as (store, _, _):
        assert store.epoch == epoch
        assert (await store.get(job_id)).state is JobState.RUNNING
    async with open_store(SqliteBackend(tmp_path / "other.db")) as (store, _, _):
        assert store.epoch != epoch

    def meta() -> dict[str, str]:
        with sqlite3.connect(path) as conn:
            rows = conn.execute("SELECT key, value FROM meta").fetchall()
            conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            return dict(rows)

    assert (await trio.to_thread.run_sync(meta))["schema_version"] == "5"
    with pytest.raises(BaseExceptionGroup) as info:
        async with open_store(SqliteBackend(path)):
            pass  # pragma: no cover
    assert info.group_contains(StoreError, match="schema v99 is newer than this runtime's v5")


async def test_set_state_takes_the_one_operation_that_leads_there(backend: Backend) -> None:
    async with open_store(backend) as (store, _, _):
        job = await store.create("alice", "research", {})
        assert (await store.set_state(job.id, JobState.RUNNING)).attempt == 1  # start
        assert (await store.set_state(job.id, JobState.PAUSED, "alice")).pause_reason == "user"
        resumed = await store.set_state(job.id, JobState.RUNNING, "alice")  # resume
        assert (resumed.state, resumed.attempt) == (JobState.RUNNING, 2)
        failed = await store.set_state(job.id, JobState.FAILED, "ops")
        assert failed.error is not None
        assert (await store.set_state(job.id, JobState.CREATED, "alice")).error is None  # restart
        assert (await store.set_state(job.id, JobState.CANCELLED)).state is JobState.CANCELLED
        with pytest.raises(IllegalTransitionError, match="cancelled -> completed"):
            await store.set_state(job.id, JobState.COMPLETED)


class GatedMemory(CommitHooks, MemoryBackend):
    """Commits wait for ``gate`` while ``gated``: a slow disk, on Trio's clock."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = trio.Event()
        self.gated = False

    async def before_commit(self, commit: Commit) -> None:
        if self.gated:
            await self.gate.wait()


async def test_progress_is_answered_once_ordered_and_published_only_once_durable(
    autojump_clock: trio.abc.Clock,
) -> None:
    """``set_progress(durable=False)`` (what ``ctx.progress`` uses) returns while its commit
    is still running, ``progress_window`` per job at a time (1 here): a job's next one waits
    for that commit (another job's does not). No subscriber gets an event before it is
    stored; a checkpoint after them returns only once durable, and everything commits in
    call order. A refusal of the ops (a stale attempt) is still raised at the call."""
    backend = GatedMemory()
    async with open_store(backend, progress_window=1) as (store, _, hub):
        job_id = await running_job(store)
        other_id = await running_job(store, "bob")
        backend.gated = True
        async with hub.subscribe() as stream, trio.open_nursery() as nursery:
            with trio.fail_after(1):
                staged = await store.set_progress(job_id, 1, 40, "a", durable=False)
                await store.set_progress(other_id, 1, 10, None, durable=False)
            assert (staged.progress, staged.step) == (40, "a")
            answered, checkpointed = trio.Event(), trio.Event()

            async def second_progress() -> None:
                await store.set_progress(job_id, 1, 60, "b", durable=False)
                answered.set()

            async def checkpoint() -> None:
                await store.checkpoint(job_id, 1, {"at": 60})
                checkpointed.set()

            nursery.start_soon(second_progress)
            await trio.sleep(1)
            nursery.start_soon(checkpoint)
            await trio.sleep(10)
            with pytest.raises(trio.WouldBlock):
                stream.receive_nowait()  # nothing published before it is durable
            stored = await backend.load(job_id)
            assert stored is not None and stored.progress == 0
            assert not answered.is_set()  # its job's first one is not durable yet
            assert not checkpointed.is_set()  # a checkpoint waits for its commit
            backend.gate.set()
            await checkpointed.wait()
            assert answered.is_set()
            published = [stream.receive_nowait() for _ in range(4)]
        assert [(e.job_id, e.type, e.data.get("progress")) for e in published] == [
            (job_id, EventType.PROGRESS, 40),
            (other_id, EventType.PROGRESS, 10),
            (job_id, EventType.PROGRESS, 60),
            (job_id, EventType.CHECKPOINT, None),
        ]
        # Committed: the job's next one is answered early again.
        backend.gate = trio.Event()
        with trio.fail_after(1):
            await store.set_progress(job_id, 1, 65, None, durable=False)
        backend.gate.set()
        await store.checkpoint(job_id, 1, {"at": 60})
        stored = await backend.load(job_id)
        assert stored is not None and (stored.progress, stored.checkpoint) == (65, {"at": 60})
        with pytest.raises(StaleAttemptError):
            await store.set_progress(job_id, 7, 10, None, durable=False)
        # By default a progress returns only once durable.
        backend.gate = trio.Event()
        async with trio.open_nursery() as nursery:
            done = trio.Event()

            async def durable_progress() -> None:
                await store.set_progress(job_id, 1, 70, None)
                done.set()

            nursery.start_soon(durable_progress)
            await trio.sleep(10)
            assert not done.is_set()
            backend.gate.set()


class OrderedMemory(GatedMemory):
    """Records what reaches the database, in order: each commit's event types, each claim."""

    def __init__(self) -> None:
        super().__init__()
        self.log: list[str] = []

    async def after_commit(self, commit: Commit) -> None:
        self.log.append("commit " + " ".join(e.type.value for e in commit.events))

    async def claim(self, request: ClaimRequest) -> ClaimResult:
        self.log.append("claim")
        return await super().claim(request)


@pytest.mark.parametrize("queue_write", [False, True], ids=["progress", "create"])
async def test_a_claim_waits_for_the_writes_that_change_the_waiting_jobs_only(
    autojump_clock: trio.abc.Clock, queue_write: bool
) -> None:
    """A claim reads only waiting jobs. Progress staged behind a commit in flight does not
    change them: the claim runs as soon as that commit is done, before the progress's own
    commit (it waited for both, and every request behind it with it). A create staged there
    does change them: the claim waits for its commit, and takes it."""
    backend = OrderedMemory()
    # No flush of the staged group on a timer meanwhile (it would cut it behind the one in
    # flight, before the claim arrives).
    async with open_store(backend, heartbeat_flush_interval=60) as (store, _, _):
        first, second = await running_job(store), await running_job(store, "bob")
        waiting = await store.create("carol", "research", {})
        backend.gated = True
        backend.log.clear()
        await store.set_progress(first, 1, 10, None, durable=False)  # in flight, held
        claimed: list[str] = []
        created: list[str] = []

        async def create() -> None:  # answered once durable: after the gate opens
            created.append((await store.create("dave", "research", {})).id)

        async def claim() -> None:
            now = time.time()
            jobs, _ = await store.claim(ClaimRequest("me", now, now + 30, ClaimLimits(10)))
            claimed.extend(job.id for job in jobs)

        async with trio.open_nursery() as nursery:
            if queue_write:
                nursery.start_soon(create)  # staged behind it
            else:
                await store.set_progress(second, 1, 20, None, durable=False)  # staged behind it
            await trio.sleep(1)
            nursery.start_soon(claim)
            await trio.sleep(1)
            backend.gate.set()
        if queue_write:
            assert backend.log[:3] == ["commit progress", "commit created", "claim"]
            assert set(claimed) == {waiting.id, *created}
        else:
            assert backend.log[:3] == ["commit progress", "claim", "commit progress started"]
            assert claimed == [waiting.id]


class FailFirstGated(OrderedMemory):
    """Gated commits; the first one while ``fail`` is set is refused (nothing written), as
    the database refuses a write tied to its request."""

    def __init__(self) -> None:
        super().__init__()
        self.fail = False

    async def before_commit(self, commit: Commit) -> None:
        await super().before_commit(commit)
        if self.fail:
            self.fail = False
            raise ValueError("refused: tied to the request")


class CountingStarter:
    """The dispatcher's bookkeeping for a claim (:class:`FastStarter`): the jobs a claim in
    progress started count as running until the claim returns; no create starts at once."""

    def __init__(self) -> None:
        self.in_claim: dict[str, Job] = {}

    def admit(self, job: Job, settled_until: float) -> tuple[str, float] | None:
        return None

    def committed(self, jobs: Sequence[Job]) -> None:
        pass

    def voided(self, jobs: Sequence[Job]) -> None:
        pass

    def claiming(self, request: ClaimRequest) -> ClaimRequest:
        return attrs.evolve(request, running=request.running + len(self.in_claim))

    def claimed(self, jobs: Sequence[Job]) -> None:
        self.in_claim.update((job.id, job) for job in jobs)


async def test_a_claim_is_not_applied_on_a_group_the_commit_in_flight_voids(
    autojump_clock: trio.abc.Clock,
) -> None:
    """The commit in flight fails after the claim was queued: the group applied behind it is
    void (its requests are replayed). A claim applied there would be replayed too, and its
    replay would find its first run's jobs counted as running: with one slot it took
    nothing, and its job stayed waiting, marked by this owner. It waits for the commit in
    flight and starts its job in a group of its own."""
    backend = FailFirstGated()
    async with open_store(backend, heartbeat_flush_interval=60) as (store, _, _):
        first, second = await running_job(store), await running_job(store, "bob")
        waiting = await store.create("carol", "research", {})
        starter = CountingStarter()
        store.set_fast_starter(starter)
        backend.gated = backend.fail = True
        claimed: list[str] = []

        async def progress(job_id: str) -> None:
            with contextlib.suppress(StoreError):
                await store.set_progress(job_id, 1, 10, None)

        async def claim() -> None:
            now = time.time()
            jobs, _ = await store.claim(ClaimRequest("me", now, now + 30, ClaimLimits(1)))
            claimed.extend(job.id for job in jobs)
            starter.in_claim.clear()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(progress, first)  # in flight, held, then refused
            await trio.sleep(1)
            nursery.start_soon(progress, second)  # applied behind it
            await trio.sleep(1)
            nursery.start_soon(claim)
            await trio.sleep(1)
            backend.gate.set()
        assert claimed == [waiting.id]
        stored = await store.get(waiting.id)
        assert stored.state is JobState.RUNNING and stored.owner == "me"
