"""The sans-I/O queue decisions: claim order, fairness and limits; retry backoff."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from actors import (
    Candidate,
    ClaimLimits,
    ClaimPlanner,
    InvalidInputError,
    KindOptions,
    RetryPolicy,
    decide_retry,
)
from actors._scheduling import ServedOrder


def jobs(
    user: str, n: int, *, priority: int = 0, kind: str = "k", at: float = 0
) -> list[Candidate]:
    return [Candidate(f"{user}{i:05}", priority, user, kind, at + i) for i in range(n)]


def test_priority_first_then_fair_then_oldest() -> None:
    planner = ClaimPlanner(ClaimLimits(max_running=4))
    picked = planner.plan(jobs("a", 90) + jobs("b", 10) + jobs("c", 1, priority=5, at=100))
    # The high-priority job first, then the two users alternate (fewest running first).
    assert [c.id for c in picked] == ["c00000", "a00000", "b00000", "a00001"]


def test_fair_share_counts_what_already_runs() -> None:
    planner = ClaimPlanner(ClaimLimits(max_running=10), running=5, by_user={"a": 5})
    picked = planner.plan(jobs("a", 90) + jobs("b", 10))
    assert [c.user_id for c in picked] == ["b"] * 5  # b catches up to a before a gets more


def test_a_kind_at_its_limit_does_not_block_other_kinds_or_priorities() -> None:
    limits = ClaimLimits(max_running=10, max_running_per_kind={"slow": 1})
    planner = ClaimPlanner(limits, running=1, by_kind={"slow": 1})
    picked = planner.plan(jobs("a", 5, kind="slow", priority=9) + jobs("a", 3, kind="fast"))
    assert [c.kind for c in picked] == ["fast"] * 3


def test_per_user_limit_and_unknown_kinds() -> None:
    planner = ClaimPlanner(
        ClaimLimits(max_running=10, max_running_per_user=2), kinds=frozenset({"k"})
    )
    picked = planner.plan(jobs("a", 5) + jobs("b", 5, kind="other"))
    assert [c.id for c in picked] == ["a00000", "a00001"]


@settings(deadline=None, max_examples=200)
@given(
    sizes=st.lists(st.integers(0, 30), min_size=1, max_size=6),
    slots=st.integers(0, 60),
    per_user=st.none() | st.integers(1, 10),
)
def test_limits_and_max_min_fairness(sizes: list[int], slots: int, per_user: int | None) -> None:
    waiting = [c for i, n in enumerate(sizes) for c in jobs(f"u{i}", n)]
    planner = ClaimPlanner(ClaimLimits(max_running=slots, max_running_per_user=per_user))
    picked = planner.plan(waiting)
    counts = {f"u{i}": 0 for i in range(len(sizes))}
    for c in picked:
        counts[c.user_id] += 1
    assert len(picked) <= slots and len({c.id for c in picked}) == len(picked)
    cap = {u: min(n, per_user or n) for u, n in zip(counts, sizes, strict=True)}
    assert all(counts[u] <= cap[u] for u in counts)
    # Max-min fair: a user got fewer than another only when it had nothing more to give.
    for u in counts:
        for v in counts:
            if counts[u] < counts[v] - 1:
                assert counts[u] == cap[u]
    # Work-conserving: a free slot is left only when nothing claimable is left.
    assert len(picked) == min(slots, sum(cap.values()))
    # Oldest first within a user.
    for u in counts:
        mine = [c.ready_at for c in picked if c.user_id == u]
        assert mine == sorted(mine) == [float(i) for i in range(len(mine))]


def _reference_plan(planner: ClaimPlanner, candidates: list[Candidate]) -> list[Candidate]:
    """The claim order by its definition: at each pick, of every open group's head the one
    whose user runs fewest, then whose user was served least recently, then the oldest
    ``(ready_at, id)``."""
    waiting = sorted(candidates, key=lambda c: (-c.priority, c.ready_at, c.id))
    picked: list[Candidate] = []
    while planner.slots():
        heads: dict[tuple[int, str, str], Candidate] = {}
        for c in waiting:
            if c not in picked and planner.group_open(c.group):
                heads.setdefault(c.group, c)
        if not heads:
            break
        top = max(key[0] for key in heads)
        best = min(
            (c for key, c in heads.items() if key[0] == top),
            key=lambda c: (
                planner.by_user.get(c.user_id, 0),
                planner.turn(c.user_id),
                c.ready_at,
                c.id,
            ),
        )
        picked.append(best)
        planner.take(best)
    return picked


@settings(deadline=None, max_examples=300)
@given(
    seed=st.integers(0, 2**32),
    slots=st.integers(0, 40),
    per_user=st.none() | st.integers(1, 4),
    per_kind=st.none() | st.integers(1, 6),
)
def test_the_plan_takes_what_the_definition_takes(
    seed: int, slots: int, per_user: int | None, per_kind: int | None
) -> None:
    rng = random.Random(seed)
    candidates = [
        Candidate(
            f"{rng.randrange(100):02}-{n:03}",
            rng.choice([0, 0, 1, 5]),
            rng.choice(["a", "b", "c", "d", "e"]),
            rng.choice(["k", "k", "x", "y"]),
            float(rng.randrange(20)),
        )
        for n in range(rng.randrange(60))
    ]
    running = {u: rng.randrange(3) for u in "abcde" if rng.random() < 0.5}
    served = ServedOrder()
    served.served(rng.choice("abcde") for _ in range(rng.randrange(8)))
    limits = ClaimLimits(
        max_running=slots + sum(running.values()),
        max_running_per_kind={} if per_kind is None else {"k": per_kind, "x": per_kind + 1},
        max_running_per_user=per_user,
    )

    def planner() -> ClaimPlanner:
        return ClaimPlanner(
            limits, sum(running.values()), dict(running), {}, served=served.snapshot()
        )

    assert planner().plan(candidates) == _reference_plan(planner(), candidates)


class _CountingPlanner(ClaimPlanner):
    looks = 0

    def group_open(self, key: tuple[int, str, str]) -> bool:
        self.looks += 1
        return super().group_open(key)


def test_a_plan_looks_at_each_group_a_few_times_not_once_per_pick() -> None:
    # Each pick scanned every group's head: a claim of 100 slots among 2,000 users waiting
    # made 200,000 looks (50 ms in the SQLite claim); a heap makes it O(groups + picks).
    groups, picks = 2000, 100
    planner = _CountingPlanner(ClaimLimits(max_running=picks))
    picked = planner.plan(c for u in range(groups) for c in jobs(f"u{u:04}", 3))
    assert len(picked) == picks and len({c.user_id for c in picked}) == picks
    assert planner.looks <= 2 * picks, planner.looks


def test_backoff_within_jitter_and_capped() -> None:
    options = KindOptions(max_attempts=10, retry=RetryPolicy(1.0, 2.0, 10.0, 0.2))
    rng = random.Random(7)
    for failed, base in [(0, 1.0), (1, 2.0), (2, 4.0), (3, 8.0), (5, 10.0)]:
        decision = decide_retry(options, failed, 10, "ValueError", False, 1000.0, rng)
        assert decision.retry and decision.failed_attempts == failed + 1
        assert base * 0.8 <= decision.delay <= min(10.0, base * 1.2)
        assert decision.next_attempt_at == 1000.0 + decision.delay


def test_no_retry_when_permanent_non_retryable_or_exhausted() -> None:
    options = KindOptions(max_attempts=3, non_retryable=["KeyError"])
    rng = random.Random(1)
    assert not decide_retry(options, 0, 3, "PermanentError", True, 0, rng).retry
    assert not decide_retry(options, 0, 3, "KeyError", False, 0, rng).retry
    assert decide_retry(options, 1, 3, "ValueError", False, 0, rng).retry
    last = decide_retry(options, 2, 3, "ValueError", False, 0, rng)
    assert (last.retry, last.failed_attempts) == (False, 3)


def test_bad_options_are_refused() -> None:
    for bad in (
        lambda: RetryPolicy(initial_interval=0),
        lambda: RetryPolicy(jitter=1.5),
        lambda: RetryPolicy(backoff_coefficient=0.5),
        lambda: KindOptions(max_attempts=0),
        lambda: KindOptions(timeout=-1),
    ):
        try:
            bad()
        except InvalidInputError:
            continue
        raise AssertionError("accepted")
