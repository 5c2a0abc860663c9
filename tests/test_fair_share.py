"""Fair share when every user ties on running jobs: a freed slot goes round-robin among the
tied users (the one served least recently first, its oldest job), not to the oldest job of
all. The planner and its served order without Trio; then a runtime on every backend under
the mock clock.

The fault: at ``max_running=1`` (or a kind limited to 1) each claim sees nobody running, so
the share was FIFO: alice's six jobs, older, all ran before bob's one."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from actors import (
    Backend,
    Candidate,
    ClaimLimits,
    ClaimPlanner,
    JobContext,
    JobState,
    RuntimeConfig,
    ServedOrder,
    ServedTurns,
    open_runtime,
)
from actors._scheduling import SERVED_FOLD

from .backends import new_backend
from .conftest import wait_for_state


def cand(job_id: str, user: str, at: float, priority: int = 0, kind: str = "k") -> Candidate:
    return Candidate(job_id, priority, user, kind, at)


def one_at_a_time(
    waiting: list[Candidate],
    served: ServedOrder,
    limits: ClaimLimits,
    running: list[Candidate],
    ends: int,
) -> Iterator[Candidate]:
    """Run ``ends`` rounds of what a runtime does: the oldest running job ends, then a claim
    plans with the counts and the served order, and its picks are served. Yields each job
    started."""
    for _ in range(ends):
        if running:
            running.pop(0)
        by_user: dict[str, int] = {}
        by_kind: dict[str, int] = {}
        for job in running:
            by_user[job.user_id] = by_user.get(job.user_id, 0) + 1
            by_kind[job.kind] = by_kind.get(job.kind, 0) + 1
        planner = ClaimPlanner(limits, len(running), by_user, by_kind, served=served.snapshot())
        picked = planner.plan(waiting)
        served.served(c.user_id for c in picked)
        for c in picked:
            waiting.remove(c)
            running.append(c)
            yield c


def test_one_slot_goes_round_robin_not_fifo() -> None:
    """The reported order: alice's first job runs; then six more of alice's, bob's one and
    carol's one of priority 10 wait. Carol first (priority), then bob (alice was served
    last), then alice's. It was first, c-high, a-low0..5, b-low."""
    served = ServedOrder()
    first = cand("first", "alice", 0)
    served.served(["alice"])
    waiting = [cand(f"a-low{i}", "alice", 1 + i) for i in range(6)]
    waiting += [cand("b-low", "bob", 10), cand("c-high", "carol", 11, priority=10)]
    order = one_at_a_time(waiting, served, ClaimLimits(max_running=1), [first], 8)
    assert [c.id for c in order] == ["c-high", "b-low", *(f"a-low{i}" for i in range(6))]


@pytest.mark.parametrize(
    "limits",
    [
        ClaimLimits(max_running=1),
        ClaimLimits(max_running=50, max_running_per_kind={"k": 1}),
        ClaimLimits(max_running=50, max_running_per_user=1, max_running_per_kind={"k": 1}),
    ],
    ids=["max_running", "per_kind", "per_user_and_kind"],
)
def test_tied_users_take_turns_at_a_single_slot(limits: ClaimLimits) -> None:
    # Alice's 30 jobs are all older than bob's and carol's.
    waiting = [cand(f"a{i:02}", "alice", i) for i in range(30)]
    waiting += [cand(f"b{i:02}", "bob", 100 + i) for i in range(10)]
    waiting += [cand(f"c{i:02}", "carol", 200 + i) for i in range(10)]
    order = [c.id for c in one_at_a_time(waiting, ServedOrder(), limits, [], 12)]
    # Never served, all three tie: the oldest job first; then each in turn, oldest first.
    assert order == [f"{user}{i:02}" for i in range(4) for user in "abc"]


def test_a_slot_freed_by_one_of_several_running_goes_to_the_user_served_longest_ago() -> None:
    """Capacity 2, jobs ending one at a time: the user whose job ended ties (at 0 running)
    with the user who has none running; by age alone alice, whose backlog is older, took
    every freed slot she could and carol waited behind all of it."""
    waiting = [cand(f"a{i:02}", "alice", i) for i in range(20)]
    waiting += [cand(f"b{i:02}", "bob", 100 + i) for i in range(20)]
    waiting += [cand(f"c{i:02}", "carol", 200 + i) for i in range(20)]
    served = ServedOrder()
    order = list(one_at_a_time(waiting, served, ClaimLimits(max_running=2), [], 31))
    users = [c.user_id for c in order]
    # In turn: alice and bob (the first claim's two slots), then the freed slot of alice's
    # ended job goes to carol, never served; bob's to alice; and so on.
    assert users == ["alice", "bob", "carol"] * 10 + ["alice", "bob"], users


def test_priorities_stay_strict_and_the_count_comes_before_the_turn() -> None:
    served = ServedOrder()
    served.served(["alice", "bob"])  # bob served last
    waiting = [
        cand("a0", "alice", 0),
        cand("b0", "bob", 1),
        cand("b-high", "bob", 5, priority=3),
        cand("c0", "carol", 9),
    ]
    # Priority 3 first whoever was served. Then carol, never served but with one running,
    # after alice with none; then all at one running: carol's turn (never) comes before
    # bob's (b-high, this plan).
    planner = ClaimPlanner(
        ClaimLimits(max_running=10), 1, {"carol": 1}, {}, served=served.snapshot()
    )
    assert [c.id for c in planner.plan(waiting)] == ["b-high", "a0", "c0", "b0"]


def test_a_plan_of_several_slots_takes_turns_after_the_served_order() -> None:
    served = ServedOrder()
    served.served(["carol", "bob", "alice"])  # alice served last
    waiting = [cand(f"{u[0]}{i}", u, i) for u in ("alice", "bob", "carol") for i in range(3)]
    planner = ClaimPlanner(ClaimLimits(max_running=5), served=served.snapshot())
    picked = [c.id for c in planner.plan(waiting)]
    # carol (least recently), bob, alice; then the plan's own picks are the newest turns.
    assert picked == ["c0", "b0", "a0", "c1", "b1"]
    assert planner.turn("alice") == served.snapshot().next_turn + 2


def test_the_served_order_is_bounded_and_forgetting_keeps_the_order() -> None:
    order = ServedOrder(bound=3)
    order.served(["u1", "u2", "u3", "u4", "u2", "u5"])
    snapshot = order.snapshot()
    assert len(order) == 3 and snapshot.next_turn == 7
    planner = ClaimPlanner(ClaimLimits(max_running=10), served=snapshot)
    assert [planner.turn(u) for u in ("u4", "u2", "u5")] == [4, 5, 6]
    # u1 and u3 forgotten: served before every user remembered, so still ahead of them.
    ranks = sorted(["u5", "u2", "u4", "u3", "u1"], key=planner.turn)
    assert set(ranks[:2]) == {"u3", "u1"} and ranks[2:] == ["u4", "u2", "u5"]
    # Immutable, and made once per change, not per claim.
    assert order.snapshot() is snapshot
    with pytest.raises(TypeError):
        snapshot.recent["u1"] = 0  # type: ignore[index]
    order.served(["u4"])
    assert order.snapshot() is not snapshot and snapshot.last("u4") == 4
    assert order.snapshot().last("u4") == 7
    with pytest.raises(ValueError, match="bound"):
        ServedOrder(bound=0)


@settings(deadline=None, max_examples=100)
@given(
    services=st.lists(st.integers(0, 39), max_size=3 * SERVED_FOLD),
    bound=st.integers(1, 30),
    looks=st.sets(st.integers(0, 3 * SERVED_FOLD)),
)
def test_snapshots_rank_as_a_plain_lru_of_the_last_services(
    services: list[int], bound: int, looks: set[int]
) -> None:
    """Whatever the folds: a user remembered by an LRU of ``bound`` has its true last turn;
    any other ranks ahead of every one remembered (its true turn, or 0)."""
    order = ServedOrder(bound)
    truth: dict[str, int] = {}
    for turn, n in enumerate(services, start=1):
        user = f"u{n}"
        order.served([user])
        truth[user] = turn
        if turn not in looks:
            continue
        snapshot = order.snapshot()
        kept = sorted(truth, key=truth.__getitem__)[-bound:]
        assert snapshot.next_turn == turn + 1
        for u in kept:
            assert snapshot.last(u) == truth[u]
        for u in set(truth) - set(kept):
            assert snapshot.last(u) in (0, truth[u]) and truth[u] < min(truth[k] for k in kept)
        assert len(order) == len(kept)
        assert len(snapshot.recent) <= SERVED_FOLD + 1


def test_no_served_order_ranks_ties_by_age_as_before() -> None:
    planner = ClaimPlanner(ClaimLimits(max_running=1), served=ServedTurns())
    waiting = [cand("b0", "bob", 5), cand("a0", "alice", 1)]
    assert [c.id for c in planner.plan(waiting)] == ["a0"]


# -- through a runtime: the dispatcher's memory, on every backend ---------------------------


@pytest.fixture(params=["memory", "sqlite", "postgresql"])
def fresh_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    return new_backend(request, tmp_path / "jobs.db")


@pytest.mark.parametrize(
    "limits",
    [{"max_running": 1}, {"max_running": 20, "max_running_per_kind": {"step": 1}}],
    ids=["max_running_1", "per_kind_1"],
)
async def test_a_runtime_serves_tied_users_in_turn(
    fresh_backend: Backend, limits: dict[str, Any]
) -> None:
    """On Trio's real clock: SQLite and PostgreSQL work in threads, which the mock clock takes
    for idle time (the project tests thread-backed I/O apart from timing logic)."""
    order: list[str] = []
    gate = trio.Event()

    async def step(ctx: JobContext, input: Any) -> Any:
        order.append(input["n"])
        if input["n"] == "first":
            with ctx.keep_alive():
                await gate.wait()  # until every other job waits
        return input["n"]

    config = RuntimeConfig(**limits)
    async with open_runtime(backend=fresh_backend, handlers={"step": step}, config=config) as rt:
        first = await rt.create_job("step", "alice", {"n": "first"})
        jobs = [first]
        await wait_for_state(rt, first.id, {JobState.RUNNING})
        jobs += [await rt.create_job("step", "alice", {"n": f"a-low{i}"}) for i in range(6)]
        jobs.append(await rt.create_job("step", "bob", {"n": "b-low"}))
        jobs.append(await rt.create_job("step", "carol", {"n": "c-high"}, priority=10))
        gate.set()
        for job in jobs:
            await wait_for_state(rt, job.id)
    # Was: first, c-high, a-low0..a-low5, b-low (bob behind all of alice's jobs).
    assert order == ["first", "c-high", "b-low", *(f"a-low{i}" for i in range(6))]
