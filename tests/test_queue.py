"""The queue through the embedding API, under the mock clock on the in-memory store: waiting,
capacity and fairness, run_at, retries, timeouts, stall re-queue, idempotency, parents."""

from __future__ import annotations

import itertools
import time
from typing import Any

import pytest
import trio

from actors import (
    EventType,
    IdempotencyConflictError,
    InvalidInputError,
    InvalidParentError,
    JobContext,
    JobState,
    KindOptions,
    MemoryBackend,
    PermanentError,
    RetryPolicy,
    kind_options,
)
from actors._repository import CANCEL_WAVE

from .backends import Commit, CommitHooks
from .conftest import memory_runtime, wait_for_state

S = JobState


async def hold(ctx: JobContext, input: Any) -> Any:
    await ctx.checkpoint({"started": True})
    with ctx.keep_alive():  # alive, not stalled, however long it holds
        await trio.sleep(input.get("for", 3600) if isinstance(input, dict) else 3600)
    return "held"


async def quick(ctx: JobContext, input: Any) -> Any:
    return input


async def test_create_returns_created_and_the_job_starts_at_once(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with memory_runtime({"quick": quick}) as rt:
        start = trio.current_time()
        job = await rt.create_job("quick", "alice", {"x": 1})
        assert (job.state, job.attempt) == (S.CREATED, 0)
        done = await wait_for_state(rt, job.id)
        assert done.state is S.COMPLETED and done.attempt == 1
        assert trio.current_time() - start < 0.01  # within one dispatch, no timer
        started = [e for e in await rt.read_events(job.id) if e.type is EventType.STARTED]
        assert started[0].data["owner"] and started[0].data["resumed_from_checkpoint"] is None


async def test_capacity_per_runtime_user_and_kind(autojump_clock: trio.abc.Clock) -> None:
    handlers = {"hold": hold, "other": hold}
    async with memory_runtime(
        handlers, max_running=4, max_running_per_user=3, max_running_per_kind={"other": 1}
    ) as rt:
        alice = [await rt.create_job("hold", "alice", {}) for _ in range(5)]
        others = [await rt.create_job("other", "bob", {}) for _ in range(2)]
        await trio.sleep(1)
        states = {job.id: (await rt.get_job(job.id)).state for job in [*alice, *others]}
        assert [states[j.id] for j in alice].count(S.RUNNING) == 3  # per user
        assert [states[j.id] for j in others].count(S.RUNNING) == 1  # per kind
        stats = await rt.queue_stats()
        assert (stats.running, stats.waiting, stats.ready) == (4, 3, 3)
        assert stats.waiting_by_kind == {"hold": 2, "other": 1}
        assert (await rt.get_stats())["waiting_by_kind"] == {"hold": 2, "other": 1}
        # An end frees a slot: the oldest waiting job of that user takes it.
        running = [j for j in alice if states[j.id] is S.RUNNING]
        await rt.cancel(running[0].id)
        await trio.sleep(0.01)
        waiting = [j for j in alice if states[j.id] is S.CREATED]
        assert (await rt.get_job(waiting[0].id)).state is S.RUNNING


class SlowCommits(CommitHooks, MemoryBackend):
    """Every commit takes a second; records which jobs each one stored, in which state."""

    def __init__(self) -> None:
        super().__init__()
        self.stored: list[dict[str, JobState]] = []

    async def before_commit(self, commit: Commit) -> None:
        await trio.sleep(1)

    async def after_commit(self, commit: Commit) -> None:
        self.stored.append({job.id: job.state for job in commit.jobs})


@pytest.mark.parametrize("ends", [S.COMPLETED, S.FAILED])
async def test_a_slot_frees_once_the_outcome_is_ordered_not_once_it_is_durable(
    autojump_clock: trio.abc.Clock, ends: JobState
) -> None:
    """An attempt that ended holds no slot while its outcome waits for a busy committer: the
    claim that fills its slot joins that outcome's commit, and the next job starts a commit
    sooner (one slot, every commit a second: the start used to wait for the outcome's
    commit, then commit on its own). Never two handlers at once."""
    backend = SlowCommits()
    running: list[str] = []
    seen: list[tuple[str, float, int]] = []
    go = trio.Event()

    async def report(ctx: JobContext, input: Any) -> Any:
        running.append(ctx.job_id)
        seen.append((ctx.job_id, trio.current_time(), len(running)))
        await go.wait()  # until the next job waits, committed
        # Its progress commits while it ends: the outcome waits for the busy committer.
        await ctx.progress(50)
        running.remove(ctx.job_id)
        if ends is S.FAILED:
            raise PermanentError("refused")
        return "done"

    # Leases renewed rarely: a renewal waits for every write before it to commit.
    config = {"max_running": 1, "lease_ttl": 60.0, "lease_renew_interval": 30.0}
    async with memory_runtime({"report": report}, backend, **config) as rt:
        first = await rt.create_job("report", "alice", {})
        second = await rt.create_job("report", "alice", {})
        go.set()
        ended = trio.current_time()
        for job in (first, second):
            await wait_for_state(rt, job.id)
    assert [job_id for job_id, _, _ in seen] == [first.id, second.id]
    assert max(count for _, _, count in seen) == 1
    # The first's outcome and the second's start in one commit.
    together = [c for c in backend.stored if c.get(first.id) is ends]
    assert together == [{first.id: ends, second.id: S.RUNNING}]
    # Its progress committing (1 s), then the outcome with the next start (1 s).
    assert seen[1][1] - ended == pytest.approx(2.0)


async def test_priority_first(autojump_clock: trio.abc.Clock) -> None:
    order: list[str] = []

    async def record(ctx: JobContext, input: Any) -> Any:
        order.append(input)
        await trio.sleep(1)

    async with memory_runtime({"r": record}, max_running=1) as rt:
        blocker = await rt.create_job("r", "z", "blocker")
        await wait_for_state(rt, blocker.id, {S.RUNNING})
        await rt.create_job("r", "alice", "low")
        await rt.create_job("r", "bob", "high", priority=10)
        await trio.sleep(5)
    assert order == ["blocker", "high", "low"]


async def test_max_min_fair_share(autojump_clock: trio.abc.Clock) -> None:
    """A freed slot goes to the user with the fewest running jobs, not to the oldest job."""
    async with memory_runtime({"hold": hold}, max_running=4) as rt:
        first = await rt.create_job("hold", "heavy", {"for": 10})
        for _ in range(3):
            await rt.create_job("hold", "heavy", {"for": 1000})
        older = [await rt.create_job("hold", "heavy", {}) for _ in range(50)]
        light = await rt.create_job("hold", "light", {})
        await trio.sleep(5)
        assert (await rt.get_job(light.id)).state is S.CREATED  # no slot yet
        await wait_for_state(rt, first.id)
        await trio.sleep(0.01)
        assert (await rt.get_job(light.id)).state is S.RUNNING
        assert (await rt.get_job(older[0].id)).state is S.CREATED


async def test_delay_and_run_at_are_precise(autojump_clock: trio.abc.Clock) -> None:
    async with memory_runtime({"quick": quick}) as rt:
        start = trio.current_time()
        job = await rt.create_job("quick", "alice", 1, delay=30)
        assert job.run_at is not None and job.state is S.CREATED
        assert (await rt.queue_stats()).scheduled == 1
        await wait_for_state(rt, job.id, {S.RUNNING, S.COMPLETED}, timeout=60)
        assert trio.current_time() - start == pytest.approx(30, abs=0.01)


async def test_retries_with_backoff_then_success(autojump_clock: trio.abc.Clock) -> None:
    calls: list[float] = []

    @kind_options(max_attempts=3, retry=RetryPolicy(initial_interval=2, jitter=0.1))
    async def flaky(ctx: JobContext, input: Any) -> Any:
        calls.append(trio.current_time())
        if len(calls) < 3:
            raise ValueError(f"try {len(calls)}")
        return "ok"

    async with memory_runtime({"flaky": flaky}) as rt:
        job = await rt.create_job("flaky", "alice", {})
        await trio.sleep(1)  # the first attempt failed; the retry waits its backoff
        waiting = await rt.get_job(job.id)
        assert (waiting.state, waiting.failed_attempts, waiting.owner) == (S.CREATED, 1, None)
        assert waiting.run_at is not None and (await rt.queue_stats()).scheduled == 1
        done = await wait_for_state(rt, job.id)
        assert done.state is S.COMPLETED and done.attempt == 3 and done.failed_attempts == 2
        gaps = [b - a for a, b in itertools.pairwise(calls)]
        assert 1.8 <= gaps[0] <= 2.2 and 3.6 <= gaps[1] <= 4.4
        retrying = [e for e in await rt.read_events(job.id) if e.type is EventType.RETRYING]
        assert [e.state for e in retrying] == [S.CREATED, S.CREATED]
        first = retrying[0].data
        assert first["error"] == {"type": "ValueError", "message": "try 1"}
        assert (first["failed_attempts"], first["max_attempts"]) == (1, 3)
        assert first["next_attempt_at"] == pytest.approx(retrying[0].at + first["delay"], abs=1)


async def test_attempts_exhausted_permanent_and_non_retryable(
    autojump_clock: trio.abc.Clock,
) -> None:
    async def boom(ctx: JobContext, input: Any) -> Any:
        if input == "permanent":
            raise PermanentError("bad data")
        if input == "key":
            raise KeyError("k")
        raise ValueError("again")

    kinds = {"boom": KindOptions(max_attempts=2, non_retryable=["KeyError"])}
    async with memory_runtime({"boom": boom}, kinds=kinds) as rt:
        for input, attempts in (("value", 2), ("permanent", 1), ("key", 1)):
            job = await rt.create_job("boom", "alice", input)
            done = await wait_for_state(rt, job.id)
            assert (done.state, done.failed_attempts, done.attempt) == (
                S.FAILED,
                attempts,
                attempts,
            )
        job = await rt.create_job("boom", "alice", "value", max_attempts=1)  # the job's own
        assert (await wait_for_state(rt, job.id)).failed_attempts == 1


async def test_timeout_stops_with_grace_and_counts_as_a_failed_attempt(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with memory_runtime({"hold": hold}, stop_grace=2) as rt:
        start = trio.current_time()
        job = await rt.create_job("hold", "alice", {}, timeout=10, max_attempts=2)
        done = await wait_for_state(rt, job.id)
        assert done.state is S.FAILED and done.error is not None
        assert done.error.type == "JobTimeout" and done.failed_attempts == 2
        # Two attempts of 10 s, each stopped after the 2 s grace, and one backoff (~1 s).
        assert 22 <= trio.current_time() - start <= 26
        started = [e for e in await rt.read_events(job.id) if e.type is EventType.STARTED]
        assert started[1].data["resumed_from_checkpoint"] == 1  # the retry resumed


async def test_a_stalled_job_is_requeued_at_its_checkpoint(autojump_clock: trio.abc.Clock) -> None:
    runs: list[Any] = []

    @kind_options(requeue_stalled=True)
    async def stalls(ctx: JobContext, input: Any) -> Any:
        runs.append(ctx.resumed_from)
        if ctx.resumed_from is None:
            await ctx.checkpoint({"i": 1})
            await trio.sleep_forever()  # no heartbeat: stalls
        return ctx.resumed_from

    async with memory_runtime({"stalls": stalls}, heartbeat_timeout=5) as rt:
        job = await rt.create_job("stalls", "alice", {})
        done = await wait_for_state(rt, job.id)
        assert done.state is S.COMPLETED and done.result == {"i": 1}
        assert runs == [None, {"i": 1}] and done.recovery_attempts == 1
        recovery = [e for e in await rt.read_events(job.id) if e.type is EventType.RECOVERY]
        assert recovery[0].data["requeued"] is True and recovery[0].state is S.CREATED


async def test_waiting_jobs_pause_resume_cancel_restart(autojump_clock: trio.abc.Clock) -> None:
    async with memory_runtime({"quick": quick}) as rt:
        job = await rt.create_job("quick", "alice", 1, delay=100)
        paused = await rt.pause(job.id, by="alice")
        assert paused.state is S.PAUSED
        await trio.sleep(200)
        assert (await rt.get_job(job.id)).state is S.PAUSED  # out of the queue
        assert (await rt.resume(job.id)).state is S.CREATED
        assert (await wait_for_state(rt, job.id)).result == 1
        later = await rt.create_job("quick", "alice", {"x": 0}, delay=100)
        restarted = await rt.restart(later.id, {"x": 1})
        assert (restarted.state, restarted.run_at) == (S.CREATED, None)
        cancelled = await rt.create_job("quick", "alice", 3, delay=100)
        assert (await rt.cancel(cancelled.id)).state is S.CANCELLED


async def test_idempotent_create(autojump_clock: trio.abc.Clock) -> None:
    async with memory_runtime({"hold": hold}) as rt:
        first = await rt.create_job("hold", "alice", {"a": 1}, idempotency_key="k1")
        await wait_for_state(rt, first.id, {S.RUNNING})
        again = await rt.create_job("hold", "alice", {"a": 1}, idempotency_key="k1")
        assert again.id == first.id
        before = await rt.get_stats()
        with pytest.raises(IdempotencyConflictError, match="different request"):
            await rt.create_job("hold", "alice", {"a": 2}, idempotency_key="k1")
        assert await rt.get_stats() == before
        other = await rt.create_job("hold", "bob", {"a": 1}, idempotency_key="k1")
        assert other.id != first.id  # keys are per user


async def test_parents_children_and_cascading_cancel(autojump_clock: trio.abc.Clock) -> None:
    async with memory_runtime({"hold": hold}) as rt:
        parent = await rt.create_job("hold", "alice", {})
        child = await rt.create_job("hold", "alice", {}, parent_id=parent.id, tags=["t"])
        grandchild = await rt.create_job("hold", "alice", {}, parent_id=child.id, delay=50)
        with pytest.raises(InvalidParentError) as missing:
            await rt.create_job("hold", "alice", {}, parent_id="01NOTAJOB")
        with pytest.raises(InvalidParentError) as foreign:
            await rt.create_job("hold", "bob", {}, parent_id=parent.id)
        assert str(missing.value).replace("01NOTAJOB", parent.id) == str(foreign.value)
        assert [j.id for j in await rt.list_children(parent.id)] == [child.id]
        assert [j.id for j in await rt.list_jobs("alice", tag="t")] == [child.id]
        await wait_for_state(rt, child.id, {S.RUNNING})
        await rt.cancel(parent.id, by="alice")
        for job_id in (child.id, grandchild.id):
            job = await rt.get_job(job_id)
            assert job.state is S.CANCELLED
            audit = await rt.get_audit(job_id)
            assert [(e.type, e.actor) for e in audit] == [(EventType.CANCELLED, "alice")]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"priority": -1}, "priority"),
        ({"priority": 1001}, "priority"),
        ({"priority": True}, "priority"),
        ({"delay": -5}, "delay"),
        ({"delay": float("nan")}, "delay"),
        ({"delay": 1, "run_at": time.time()}, "not both"),
        ({"run_at": 1e12}, "within a year"),
        ({"max_attempts": 0}, "max_attempts"),
        ({"max_attempts": 101}, "max_attempts"),
        ({"timeout": 0}, "timeout"),
        ({"timeout": 8 * 86_400}, "timeout"),
        ({"tags": ["a", "a"]}, "distinct"),
        ({"tags": ["x" * 65]}, "tag"),
        ({"tags": [str(n) for n in range(33)]}, "32 tags"),
        ({"tags": "abc"}, "list of strings"),
        ({"tags": {"a": 1}}, "list of strings"),  # not its keys
        ({"tags": {"a", "b"}}, "list of strings"),  # no order to keep
        ({"tags": (t for t in ["a"])}, "list of strings"),
        ({"idempotency_key": ""}, "idempotency_key"),
        ({"idempotency_key": "k" * 257}, "idempotency_key"),
    ],
)
async def test_bad_options_change_nothing(
    autojump_clock: trio.abc.Clock, options: dict[str, Any], message: str
) -> None:
    async with memory_runtime({"quick": quick}) as rt:
        before = await rt.get_stats()
        with pytest.raises(InvalidInputError, match=message):
            await rt.create_job("quick", "alice", {}, **options)
        assert await rt.get_stats() == before


async def test_waiting_jobs_are_not_cached(autojump_clock: trio.abc.Clock) -> None:
    async with memory_runtime({"hold": hold}, max_running=2) as rt:
        for _ in range(200):
            await rt.create_job("hold", "alice", {})
        await trio.sleep(1)
        assert (await rt.queue_stats()).waiting == 198
        assert len(rt.store_actor._cache) == 2  # the running jobs only


async def test_later_jobs_cost_no_claim_and_a_full_runtime_does_not_spin(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with memory_runtime({"hold": hold}, max_running=1) as rt:
        assert rt.dispatcher is not None
        await trio.sleep(0.1)  # the claim at start is made
        before = rt.dispatcher.claims
        later = [await rt.create_job("hold", "alice", {}, delay=10 + n) for n in range(50)]
        assert rt.dispatcher.claims == before  # each only moved the one sleep
        first = await wait_for_state(rt, later[0].id, {S.RUNNING}, timeout=20)
        assert first.attempt == 1
        # The others come due while the one slot is taken: the dispatcher sleeps until an end
        # (a spin would keep the mock clock from ever reaching the end of this sleep).
        with trio.fail_after(100):
            await trio.sleep(90)
        assert rt.dispatcher.claims <= before + 3
        stats = await rt.queue_stats()
        assert (stats.ready, stats.running) == (49, 1)


async def test_control_ops_right_after_create_stop_the_claimed_job(
    autojump_clock: trio.abc.Clock,
) -> None:
    # A create wakes the dispatcher, whose claim is applied before a pause, cancel or fail
    # sent just after: the op finds the job claimed (maybe not launched yet), and must stop
    # its worker, not leave a handler running for a job stored as paused, cancelled or failed.
    ops = {
        S.PAUSED: lambda rt, job_id: rt.pause(job_id),
        S.CANCELLED: lambda rt, job_id: rt.cancel(job_id),
        S.FAILED: lambda rt, job_id: rt.mark_failed(job_id, "no"),
    }

    async def sleeper(ctx: JobContext, input: Any) -> None:  # writes nothing: never fenced
        with ctx.keep_alive():
            await trio.sleep(3600)

    async with memory_runtime({"hold": sleeper}, stop_grace=0.1) as rt:
        for state, op in ops.items():
            ids: list[str] = []

            async def create_then(i: int, op: Any = op, ids: list[str] = ids) -> None:
                job = await rt.create_job("hold", f"u{i % 3}", {})
                ids.append(job.id)
                await op(rt, job.id)

            await create_then(0)  # alone
            async with trio.open_nursery() as nursery:  # and many at once
                for i in range(20):
                    nursery.start_soon(create_then, i)
            await trio.sleep(1)
            assert {(await rt.get_job(job_id)).state for job_id in ids} == {state}
            assert not set(ids) & set(rt.supervisor.workers), state
            assert (await rt.queue_stats()).running == 0


async def test_cancel_of_a_parent_cancels_many_children_in_few_commits(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with memory_runtime({"hold": hold}, max_running=50, stop_grace=0.1) as rt:
        parent = await rt.create_job("hold", "alice", {})
        children = [
            await rt.create_job("hold", "alice", {}, parent_id=parent.id) for _ in range(300)
        ]
        grandchild = await rt.create_job("hold", "alice", {}, parent_id=children[-1].id)
        await trio.sleep(1)  # 50 run, the others wait
        commits = rt.store_actor.commits
        await rt.cancel(parent.id)
        # One by one, this took a commit per child (and 1,000 children seconds on SQLite).
        assert rt.store_actor.commits - commits < 30
        jobs = [*children, grandchild]
        assert {(await rt.get_job(job.id)).state for job in jobs} == {S.CANCELLED}
        assert not rt.supervisor.workers


async def test_a_cancelled_tree_leaves_room_for_other_writes(
    autojump_clock: trio.abc.Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tree's children are listed a generation at a time, in few queries, and cancelled a
    wave (``CANCEL_WAVE``) at a time: another user's write made meanwhile waits behind a wave,
    not behind the whole tree (16,000 children cancelled at once held every other write for
    50 s, and one listing per child 7.8 s more)."""
    async with memory_runtime({"hold": hold}, max_running=10, stop_grace=0.1) as rt:
        parent = await rt.create_job("hold", "alice", {})
        for _ in range(600):
            await rt.create_job("hold", "alice", {}, parent_id=parent.id)
        store, cancel = rt._store, rt._store.cancel
        in_flight = peak = done = 0

        async def counted(job_id: str, by: str | None, attempt: int | None = None) -> Any:
            nonlocal in_flight, peak, done
            in_flight += 1
            peak = max(peak, in_flight)
            try:
                return await cancel(job_id, by, attempt)
            finally:
                in_flight -= 1
                done += 1

        monkeypatch.setattr(store, "cancel", counted)
        list_jobs, listing, listings = store.list_jobs, [0], [0]
        calls = 0

        async def listed(query: Any) -> Any:
            nonlocal calls
            calls += 1
            listing[0] += 1
            listings[0] = max(listings[0], listing[0])
            try:
                return await list_jobs(query)
            finally:
                listing[0] -= 1

        monkeypatch.setattr(store, "list_jobs", listed)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(rt.cancel, parent.id)
            while not done:
                await trio.lowlevel.checkpoint()
            await rt.create_job("hold", "bob", {})
            assert done < 3 * CANCEL_WAVE < 600
        assert peak == CANCEL_WAVE
        assert done == 601
        # The root's children in one listing, theirs in two (500 parents each), both at once.
        assert (calls, listings[0]) == (3, 2)


async def test_a_child_created_under_a_cancelled_parent_is_cancelled(
    autojump_clock: trio.abc.Clock,
) -> None:
    # The parent's handler may create children until it is stopped, after the cancel's walk
    # listed its children: such a child ran on, orphaned.
    async with memory_runtime({"hold": hold}, stop_grace=0.1) as rt:
        parent = await rt.create_job("hold", "alice", {})
        await rt.cancel(parent.id)
        child = await rt.create_job("hold", "alice", {}, parent_id=parent.id)
        assert child.state is S.CANCELLED
        await trio.sleep(1)
        assert (await rt.get_job(child.id)).state is S.CANCELLED
        assert not rt.supervisor.workers


async def test_a_running_jobs_lease_reads_as_its_last_renewal(
    autojump_clock: trio.abc.Clock,
) -> None:
    """The dispatcher renews its claims' lease every ``lease_renew_interval`` (the column
    alone); a job read by id showed its claim's lease instead, in the past once the claim was
    older than ``lease_ttl`` (a walk-through saw 09:14:18 at 09:15:01)."""

    async def long(ctx: JobContext, input: Any) -> Any:
        for step in range(100):
            await ctx.progress(step, None)
            await trio.sleep(1)

    async with memory_runtime({"long": long}, lease_ttl=5.0, lease_renew_interval=1.0) as rt:
        job = await rt.create_job("long", "alice", {})
        running = await wait_for_state(rt, job.id, {JobState.RUNNING})
        assert running.lease_expires_at is not None
        for _ in range(3):
            await trio.sleep(20)
            seen = await rt.get_job(job.id)
            assert seen.lease_expires_at is not None
            assert seen.lease_expires_at > running.lease_expires_at + 15
