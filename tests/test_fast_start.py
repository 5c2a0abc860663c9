"""The fast path: a create with free capacity starts in its own commit, exactly when the
dispatcher's claim would start it next (mock clock, in-memory store); the verdict itself
(:class:`QueueVerdict`) without Trio."""

from __future__ import annotations

import math
import time
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from actors import EventType, Job, JobContext, JobState, MemoryBackend, Runtime, StoreError
from actors._fast_start import QueueVerdict
from actors._ops import create

from .backends import Commit, CommitHooks
from .conftest import memory_runtime, wait_for_state

S = JobState


async def hold(ctx: JobContext, input: Any) -> Any:
    with ctx.keep_alive():
        await trio.sleep(input.get("for", 3600) if isinstance(input, dict) else 3600)
    return "held"


HANDLERS = {"hold": hold, "other": hold}


def counters(rt: Runtime) -> tuple[int, int, int]:
    """(commits, claims, fast starts) so far."""
    assert rt.dispatcher is not None
    return rt.store_actor.commits, rt.dispatcher.claims, rt.dispatcher.fast_started


async def state(rt: Runtime, job: Job) -> JobState:
    return (await rt.get_job(job.id)).state


async def test_a_create_with_free_capacity_starts_in_one_commit(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with memory_runtime(HANDLERS) as rt:
        commits, claims, fast = counters(rt)
        start = trio.current_time()
        job = await rt.create_job("hold", "alice", {})
        # Returned as created and claimed: the caller sees the create it asked for.
        assert (job.state, job.attempt, job.owner) == (S.CREATED, 0, rt.dispatcher.node_id)  # type: ignore[union-attr]
        assert counters(rt) == (commits + 1, claims, fast)  # one commit, no claim
        await trio.testing.wait_all_tasks_blocked()
        assert counters(rt) == (commits + 1, claims, fast + 1)
        assert trio.current_time() == start
        stored = await rt.get_job(job.id)
        assert (stored.state, stored.attempt) == (S.RUNNING, 1)
        assert stored.owner == rt.dispatcher.node_id  # type: ignore[union-attr]
        assert stored.lease_expires_at is not None
        assert job.id in rt.supervisor.workers
        events = await rt.read_events(job.id)
        assert [(e.type, e.seq) for e in events] == [(EventType.CREATED, 1), (EventType.STARTED, 2)]
        assert events[1].user_seq == events[0].user_seq + 1  # gap-free in the user's log
        assert events[1].data["owner"] == stored.owner and events[1].data["attempt"] == 1


async def test_limits_decide_and_a_kind_at_its_limit_blocks_only_itself(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with memory_runtime(
        HANDLERS, max_running=3, max_running_per_user=2, max_running_per_kind={"other": 1}
    ) as rt:
        o1 = await rt.create_job("other", "alice", {})
        o2 = await rt.create_job("other", "alice", {})  # kind at its limit: waits
        h1 = await rt.create_job("hold", "alice", {})  # another kind of the same user: starts
        h2 = await rt.create_job("hold", "alice", {})  # the user at its limit: waits
        b1 = await rt.create_job("hold", "bob", {})  # starts: the runtime's last slot
        b2 = await rt.create_job("hold", "bob", {})  # the runtime is full: waits
        await trio.sleep(1)
        states = [await state(rt, j) for j in (o1, o2, h1, h2, b1, b2)]
        assert states == [S.RUNNING, S.CREATED, S.RUNNING, S.CREATED, S.RUNNING, S.CREATED], states


async def test_waiting_jobs_are_never_overtaken(autojump_clock: trio.abc.Clock) -> None:
    """Jobs waiting for capacity: when it frees, the claim's order decides (priority, then
    the user with the fewest running jobs, then the oldest), however fast a create follows."""
    async with memory_runtime(HANDLERS, max_running=3) as rt:
        a1 = await rt.create_job("hold", "alice", {})
        a2 = await rt.create_job("hold", "alice", {})
        c1 = await rt.create_job("hold", "carol", {})
        waiting_a = await rt.create_job("hold", "alice", {})
        waiting_b = await rt.create_job("hold", "bob", {})
        urgent = await rt.create_job("hold", "dave", {}, priority=5)
        await trio.sleep(1)
        assert [await state(rt, j) for j in (a1, a2, c1)] == [S.RUNNING] * 3
        # A slot frees and a create comes at once: the create waits its turn.
        await rt.cancel(c1.id)
        late = await rt.create_job("hold", "erin", {}, priority=5)
        await trio.sleep(1)
        assert await state(rt, urgent) is S.RUNNING  # the oldest of the highest priority
        assert await state(rt, late) is S.CREATED
        await rt.cancel(urgent.id)
        again = await rt.create_job("hold", "alice", {})
        await trio.sleep(1)
        assert await state(rt, late) is S.RUNNING  # a higher priority than older jobs
        await rt.cancel(a1.id)
        await trio.sleep(1)
        # Fair share: bob (none running) before alice (one), whose job is older.
        assert await state(rt, waiting_b) is S.RUNNING
        assert [await state(rt, j) for j in (waiting_a, again)] == [S.CREATED, S.CREATED]


async def test_a_delayed_job_never_starts_at_its_create(autojump_clock: trio.abc.Clock) -> None:
    async with memory_runtime(HANDLERS) as rt:
        _, claims, fast = counters(rt)
        start = trio.current_time()
        job = await rt.create_job("hold", "alice", {}, delay=5)
        assert job.owner is None
        await trio.sleep(4.9)
        assert await state(rt, job) is S.CREATED
        running = await wait_for_state(rt, job.id, {S.RUNNING})
        assert trio.current_time() - start == pytest.approx(5, abs=0.01)
        assert running.attempt == 1
        assert counters(rt)[1:] == (claims + 1, fast)  # started by the dispatcher's claim
        # Once the delayed job was due, the next create starts at once again.
        now = await rt.create_job("hold", "alice", {})
        await trio.testing.wait_all_tasks_blocked()
        assert await state(rt, now) is S.RUNNING
        assert counters(rt)[1:] == (claims + 1, fast + 1)


async def test_a_due_run_at_ends_the_verdict(autojump_clock: trio.abc.Clock) -> None:
    """A delayed job that is due must be claimed before a later create can start at once."""
    async with memory_runtime(HANDLERS, max_running=1) as rt:
        delayed = await rt.create_job("hold", "alice", {}, delay=1)
        assert rt.dispatcher is not None
        rt.dispatcher.close()  # the dispatcher stops: the due job is left waiting
        await rt.dispatcher.stopped.wait()
        await trio.sleep(2)
        fresh = await rt.create_job("hold", "alice", {})
        assert fresh.owner is None  # not admitted: the verdict lapsed at the delayed run_at
        assert [await state(rt, j) for j in (delayed, fresh)] == [S.CREATED, S.CREATED]


async def test_a_job_marked_by_a_dead_owner_is_claimed_once_its_lease_lapses(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A process died between its claim's mark and the start: its job is skipped while the
    lease holds (by the claim and the fast path alike), and claimed after, never passed over
    by creates that start at once."""
    backend = MemoryBackend()
    marked = attrs.evolve(
        create("01MARKED00000000000000000", "alice", "hold", {}, time.time() - 10)[0],
        owner="dead-node",
        lease_expires_at=time.time() + 5,
    )
    await backend.commit([marked], [], (), {})
    async with memory_runtime(HANDLERS, backend) as rt:
        early = await rt.create_job("hold", "bob", {})
        assert early.owner is not None  # the claim would skip the marked job too
        await trio.sleep(6)
        assert await state(rt, marked) is S.CREATED  # nothing woke the dispatcher
        late = await rt.create_job("hold", "bob", {})
        assert late.owner is None  # the verdict ended with the lease: through the claim
        await trio.sleep(0.1)
        assert [await state(rt, j) for j in (marked, late)] == [S.RUNNING, S.RUNNING]


async def test_paused_parent_and_idempotent_repeat(autojump_clock: trio.abc.Clock) -> None:
    async with memory_runtime(HANDLERS) as rt:
        parent = await rt.create_job("hold", "alice", {})
        await trio.testing.wait_all_tasks_blocked()
        await rt.pause(parent.id)
        await wait_for_state(rt, parent.id, {S.PAUSED})
        # The claim does not look at a parent's state: neither does the fast path.
        child = await rt.create_job("hold", "alice", {}, parent_id=parent.id)
        await trio.testing.wait_all_tasks_blocked()
        assert await state(rt, child) is S.RUNNING
        assert await state(rt, parent) is S.PAUSED
        first = await rt.create_job("hold", "alice", {"n": 1}, idempotency_key="k")
        await trio.testing.wait_all_tasks_blocked()
        commits, claims, fast = counters(rt)
        again = await rt.create_job("hold", "alice", {"n": 1}, idempotency_key="k")
        assert again.id == first.id and again.state is S.RUNNING and again.attempt == 1
        await trio.testing.wait_all_tasks_blocked()
        assert counters(rt) == (commits, claims, fast)  # nothing stored, nothing started
        started = [e for e in await rt.read_events(first.id) if e.type is EventType.STARTED]
        assert len(started) == 1


class FailOnce(CommitHooks, MemoryBackend):
    """Refuses (not an outage) the first commit that starts a job at its create."""

    def __init__(self) -> None:
        super().__init__()
        self.refused = 0

    async def before_commit(self, commit: Commit) -> None:
        types = [event.type for event in commit.events]
        if not self.refused and EventType.CREATED in types and EventType.STARTED in types:
            self.refused += 1
            raise ValueError("refused")


async def test_a_void_commit_releases_the_slot_and_nothing_starts_twice(
    autojump_clock: trio.abc.Clock,
) -> None:
    """The group that started a job at its create is refused: a lone create gets the error
    (nothing stored), creates grouped with it are replayed one at a time; either way the
    admitted slot is released, and every stored job starts once, within the capacity."""
    backend = FailOnce()
    async with memory_runtime(HANDLERS, backend, max_running=3) as rt:
        stored: list[Job] = []
        refused: list[StoreError] = []

        async def one(n: int) -> None:
            try:
                stored.append(await rt.create_job("hold", f"u{n}", {}))
            except StoreError as exc:
                refused.append(exc)

        async with trio.open_nursery() as nursery:
            for n in range(10):
                nursery.start_soon(one, n)
        await trio.sleep(1)
        assert backend.refused == 1 and len(refused) <= 1
        assert len(stored) + len(refused) == 10
        states = [(await rt.get_job(j.id)).state for j in stored]
        running = {j.id for j, st in zip(stored, states, strict=True) if st is S.RUNNING}
        assert len(running) == 3 and states.count(S.CREATED) == len(stored) - 3
        assert set(rt.supervisor.workers) == running
        assert rt.dispatcher is not None and not rt.dispatcher._admitted
        for job in stored:
            started = [e for e in await rt.read_events(job.id) if e.type is EventType.STARTED]
            assert len(started) == (job.id in running)


async def test_shutdown_records_every_job_started_at_create(
    autojump_clock: trio.abc.Clock,
) -> None:
    ran: set[str] = set()

    async def tracked(ctx: JobContext, input: Any) -> Any:
        ran.add(ctx.job_id)
        return await hold(ctx, input)

    async with memory_runtime({"hold": tracked}) as rt:
        jobs = [await rt.create_job("hold", f"u{n}", {}) for n in range(5)]
    # Leaving the runtime: no job started at its create is left running. One launched before
    # the shutdown began was paused; one not launched by then never ran and is back in the
    # queue, nothing counted.
    backend_jobs = [await _state_after(rt, job) for job in jobs]
    assert backend_jobs == [S.PAUSED if job.id in ran else S.CREATED for job in jobs]


async def _state_after(rt: Runtime, job: Job) -> JobState:
    found = await rt.store_actor.backend.load(job.id)
    assert found is not None
    return found.state


async def test_churn_never_exceeds_capacity_and_starts_each_job_once(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Jobs ending while others are created, some at once, some waiting, some in the same
    group as a claim: never more running than the capacity, each started once, none lost."""
    running = peak = 0

    async def brief(ctx: JobContext, input: Any) -> Any:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        try:
            await trio.sleep(input["for"])
        finally:
            running -= 1

    for per_user in (None, 1):
        peak = 0
        async with memory_runtime(
            {"brief": brief}, max_running=2, max_running_per_user=per_user
        ) as rt:
            jobs: list[Job] = []

            async with trio.open_nursery() as nursery:
                for n in range(8):
                    nursery.start_soon(_burst, rt, jobs, n)
                    await trio.sleep(0.05 * (n % 3))
            for job in jobs:
                await wait_for_state(rt, job.id)
            assert rt.dispatcher is not None and rt.dispatcher.fast_started > 0
            for job in jobs:
                events = await rt.read_events(job.id)
                assert [e.type for e in events].count(EventType.STARTED) == 1
                assert events[-1].type is EventType.COMPLETED
        assert 0 < peak <= 2


async def _burst(rt: Runtime, jobs: list[Job], n: int) -> None:
    for i in range(5):
        user = f"u{(n + i) % 3}"
        jobs.append(await rt.create_job("brief", user, {"for": (n * 7 + i) % 3 / 10}))


def _job(state: JobState = S.CREATED, run_at: float | None = None) -> Job:
    job = create("j1", "alice", "k", {}, 1000.0)[0]
    return attrs.evolve(job, state=state, run_at=run_at)


def test_verdict() -> None:
    verdict = QueueVerdict()
    assert not verdict.settled  # until a claim has looked
    verdict.claimed(verdict.epoch, 2, 3, None)
    assert verdict.settled and verdict.until == math.inf
    verdict.claimed(verdict.epoch, 3, 3, 50.0)  # the claim filled every slot: maybe more
    assert not verdict.settled and verdict.until == 50.0
    epoch = verdict.epoch
    verdict.unsettle()  # while a claim runs: it settles nothing
    verdict.claimed(epoch, 0, 3, None)
    assert not verdict.settled
    verdict.claimed(verdict.epoch, 0, 3, None)
    verdict.staged(None, _job(run_at=70.0))  # a delayed create bounds it in time
    assert verdict.settled and verdict.until == 70.0
    verdict.staged(S.CREATED, _job(S.RUNNING))  # a start changes nothing
    verdict.staged(S.CREATED, _job(S.PAUSED))  # nor a waiting job leaving the queue
    assert verdict.settled
    verdict.staged(S.RUNNING, _job(S.COMPLETED))  # capacity freed
    assert not verdict.settled
    for old, job in [
        (None, _job()),  # a create
        (S.PAUSED, _job()),  # a resume
        (S.RUNNING, _job(run_at=80.0)),  # a retry: capacity freed too
    ]:
        verdict.claimed(verdict.epoch, 0, 3, None)
        verdict.staged(old, job)
        assert not verdict.settled
    # With no per-user or per-kind limit, a slot left free means no job was left waiting:
    # an end opens nothing.
    verdict = QueueVerdict(capacity_matters=False)
    verdict.claimed(verdict.epoch, 0, 3, None)
    verdict.staged(S.RUNNING, _job(S.COMPLETED))
    assert verdict.settled
    verdict.staged(S.RUNNING, _job(run_at=80.0))  # a retry later: bounds it in time
    assert verdict.settled and verdict.until == 80.0


async def report(ctx: JobContext, input: Any) -> Any:
    for n in range(1000):
        await ctx.progress(n / 10)
        await trio.sleep(0.01)
    return "reported"


class RefuseClaimStart(CommitHooks, MemoryBackend):
    """Commits take 50 ms; while ``armed``, the first one that starts a job it does not
    create (a claim's start) is refused, as the database refuses a write tied to its
    request. ``refused``: the job ids each refused commit held."""

    def __init__(self) -> None:
        super().__init__()
        self.armed = False
        self.refused: list[set[str]] = []

    async def before_commit(self, commit: Commit) -> None:
        await trio.sleep(0.05)
        types = {event.type for event in commit.events}
        if self.armed and EventType.STARTED in types and EventType.CREATED not in types:
            self.armed = False
            self.refused.append({event.job_id for event in commit.events})
            raise ValueError("refused")


async def test_a_claim_replayed_after_its_group_was_refused_counts_only_what_runs(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A claim's start shares its group with another job's progress, and the group is
    refused: its requests are replayed one at a time. The replayed claim counts what runs
    now, not the job its own refused first run started: with one slot free it starts that
    job at once (counting it, it took nothing and the job waited for another wake)."""
    backend = RefuseClaimStart()
    async with memory_runtime({**HANDLERS, "report": report}, backend, max_running=2) as rt:
        busy = await rt.create_job("report", "alice", {})
        await wait_for_state(rt, busy.id, {S.RUNNING})
        backend.armed = True
        delayed = await rt.create_job("hold", "bob", {}, run_at=time.time() + 1)
        await trio.sleep(1.5)
        assert len(backend.refused) == 1 and backend.refused[0] == {busy.id, delayed.id}
        assert await state(rt, delayed) is S.RUNNING
        assert await state(rt, busy) is S.RUNNING


class HeldUntilFails(MemoryBackend):
    """``held_until`` fails once while ``armed`` (the database went away mid-claim)."""

    armed = False

    async def held_until(self, owner: str, now: float) -> float | None:
        if self.armed:
            self.armed = False
            raise StoreError("held_until refused (test)")
        return await super().held_until(owner, now)


async def test_a_claim_that_fails_after_choosing_its_jobs_starts_none_of_them(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A claim whose last read fails is answered with the error: none of its jobs may be
    stored as started (none is launched: each would be running with no worker until the
    stall rule found it). The dispatcher's retry starts them."""
    backend = HeldUntilFails()
    async with memory_runtime(HANDLERS, backend, max_running=5) as rt:
        backend.armed = True
        delayed = await rt.create_job("hold", "bob", {}, run_at=time.time() + 1)
        await trio.sleep(1.1)  # the claim at the run_at failed
        assert not backend.armed
        assert await state(rt, delayed) is S.CREATED
        assert not rt.supervisor.workers
        await trio.sleep(1.5)  # retried
        assert await state(rt, delayed) is S.RUNNING
        assert set(rt.supervisor.workers) == {delayed.id}
