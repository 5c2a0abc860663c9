"""The fan-out's sequencer, sans-I/O: any interleaving of pushed, duplicated, dropped and
reordered events, plus fills from a log, comes out as each tracked user's events in
``user_seq`` order, each once."""

from __future__ import annotations

import random

import pytest

from actors import EventType, JobEvent, JobState
from actors._events import event_bytes
from actors._sequencer import Sequencer


def ev(user: str, user_seq: int, job: str = "j") -> JobEvent:
    return JobEvent(
        f"{user}-{job}", user, user_seq, EventType.PROGRESS, JobState.RUNNING, 0.0, {}, None,
        user_seq,
    )  # fmt: skip


def seqs(events: list[JobEvent]) -> list[int]:
    return [e.user_seq for e in events]


def check_bytes(s: Sequencer) -> None:
    """The held events' cost is what the sequencer counts, within its budget."""
    held = [e for user in s._users.values() for e in user.held.values()]
    assert s.held_bytes == sum(map(event_bytes, held)) <= s.max_held_bytes
    assert all(u.held_bytes == sum(map(event_bytes, u.held.values())) for u in s._users.values())


def started(user: str = "u", head: int = 0, **kwargs: float) -> Sequencer:
    s = Sequencer(**kwargs)  # type: ignore[arg-type]
    s.watch(user)
    assert s.start(user, head, 0.0) == []
    return s


def test_in_order_passes_through_and_duplicates_are_dropped() -> None:
    s = started()
    assert seqs(s.offer([ev("u", 1), ev("u", 2)], 0.0)) == [1, 2]
    # Its own commit coming back from Redis, and an older one: dropped.
    assert s.offer([ev("u", 2), ev("u", 1)], 0.0) == []
    assert s.stats.duplicates == 2 and s.stats.delivered == 2


def test_reordered_events_are_held_then_released_in_order() -> None:
    s = started()
    assert s.offer([ev("u", 3), ev("u", 2)], 0.0) == []
    assert s.stats.gaps == 1 and s.held() == 2
    assert seqs(s.offer([ev("u", 1)], 0.01)) == [1, 2, 3]
    assert s.held() == 0 and s.next_deadline() is None


def test_a_gap_is_filled_from_the_log_after_the_wait() -> None:
    s = started(gap_wait=0.03)
    assert seqs(s.offer([ev("u", 1), ev("u", 3)], 1.0)) == [1]
    assert s.next_deadline() == pytest.approx(1.03)
    assert s.fills_due(1.02) == {}  # a reordering may still resolve it
    assert s.fills_due(1.03) == {"u": 1}
    assert s.fills_due(1.03) == {}  # one fill in flight per user
    # The fill returns 2 and 3 (3 is both held and read: passed on once, the held one).
    assert seqs(s.filled("u", [ev("u", 2), ev("u", 3)], 1.04)) == [2, 3]
    assert s.stats.filled == 1 and s.stats.duplicates == 1
    assert s.next_deadline() is None


def test_join_holds_events_until_started_and_drops_those_at_or_below_the_head() -> None:
    s = Sequencer()
    s.watch("u")
    assert s.offer([ev("u", 5), ev("u", 7), ev("u", 6)], 0.0) == []  # held: not started
    assert s.fills_due(10.0) == {}  # nothing is filled before the head is known
    assert seqs(s.start("u", 5, 0.0)) == [6, 7]
    # A later join's start is a no-op: the first head was read before its room head.
    assert s.start("u", 2, 0.0) == []
    assert s.head("u") == 7


def test_untracked_users_are_ignored_and_forgotten_at_the_last_unwatch() -> None:
    s = started("u")
    s.watch("u")
    assert s.offer([ev("other", 1)], 0.0) == []
    s.unwatch("u")
    assert s.tracked() == {"u": 0}
    s.unwatch("u")
    assert s.tracked() == {} and s.offer([ev("u", 1)], 0.0) == []
    assert s.filled("u", [ev("u", 1)], 0.0) == []  # a fill answered after the last leave


def test_held_events_are_bounded_and_overflow_is_filled() -> None:
    s = started(max_held=3, fill_limit=4)
    assert s.offer([ev("u", n) for n in range(2, 10)], 0.0) == []
    assert s.held() == 3 and s.stats.overflowed == 5
    # Behind: filled at once, without waiting out the gap.
    assert s.next_deadline() == float("-inf")
    assert s.fills_due(0.0) == {"u": 0}
    # A full page (fill_limit) leaves the user behind: read again from the new head.
    assert seqs(s.filled("u", [ev("u", n) for n in range(1, 5)], 0.0)) == [1, 2, 3, 4]
    assert s.fills_due(0.0) == {"u": 4}
    assert seqs(s.filled("u", [ev("u", n) for n in range(5, 9)], 0.0)) == [5, 6, 7, 8]
    assert s.fills_due(0.0) == {"u": 8}  # a full page again: read once more
    assert seqs(s.filled("u", [ev("u", 9)], 0.0)) == [9]
    assert s.fills_due(100.0) == {} and s.held() == 0


def test_a_failed_fill_is_retried_after_the_wait() -> None:
    s = started(gap_wait=0.05)
    s.offer([ev("u", 2)], 0.0)
    assert s.fills_due(0.05) == {"u": 0}
    s.fill_failed("u", 0.05)
    assert s.fills_due(0.06) == {}
    assert s.next_deadline() == pytest.approx(0.10)
    assert s.fills_due(0.10) == {"u": 0}
    assert seqs(s.filled("u", [ev("u", 1), ev("u", 2)], 0.11)) == [1, 2]


def test_a_hole_the_retention_left_in_the_log_is_skipped() -> None:
    s = started(head=3)
    s.mark_behind()
    assert s.fills_due(0.0) == {"u": 3}
    assert seqs(s.filled("u", [ev("u", 9), ev("u", 10)], 0.0)) == [9, 10]


@pytest.mark.parametrize("max_held_bytes", [64 * 2**20, 5 * event_bytes(ev("u", 1))])
def test_interleaved_nodes_with_drops_duplicates_and_reordering(max_held_bytes: int) -> None:
    """Two nodes commit one user's events interleaved (user_seq is gap-free across both);
    this node sees its own commits at once and both nodes' through a lossy, duplicating,
    reordering channel; the log fills the rest. Output: every event once, in order (also when
    the byte budget, shared by both users, holds only five events)."""
    rng = random.Random(11)
    for _ in range(50):
        s = started("u", gap_wait=0.03, max_held=8, fill_limit=5, max_held_bytes=max_held_bytes)
        s.watch("v")
        s.start("v", 0, 0.0)
        log = {user: [ev(user, n, rng.choice("ab")) for n in range(1, 61)] for user in "uv"}
        local = [e for user in "uv" for e in log[user] if e.job_id.endswith("a")]
        channel = [e for user in "uv" for e in log[user] if rng.random() > 0.2]  # drops
        channel += rng.sample(channel, len(channel) // 4)  # duplicates
        arrivals = local + channel
        rng.shuffle(arrivals)
        out: dict[str, list[int]] = {"u": [], "v": []}
        now = 0.0
        for event in arrivals:
            now += rng.choice([0.0, 0.001, 0.02])
            for delivered in s.offer([event], now):
                out[delivered.user_id].append(delivered.user_seq)
            check_bytes(s)
            for user, head in s.fills_due(now).items():
                page = [e for e in log[user] if e.user_seq > head][:5]
                for delivered in s.filled(user, page, now):
                    out[delivered.user_id].append(delivered.user_seq)
        while (deadline := s.next_deadline()) is not None:
            now = max(now, deadline)
            for user, head in s.fills_due(now).items():
                page = [e for e in log[user] if e.user_seq > head][:5]
                for delivered in s.filled(user, page, now):
                    out[delivered.user_id].append(delivered.user_seq)
        assert out == {"u": list(range(1, 61)), "v": list(range(1, 61))}
        assert s.held() == 0 and s.held_bytes == 0


def test_held_events_are_bounded_in_bytes_across_users() -> None:
    cost = event_bytes(ev("u", 2))
    s = started("u", max_held_bytes=3 * cost)
    s.watch("v")
    s.start("v", 0, 0.0)
    assert s.offer([ev("u", n) for n in range(2, 5)], 0.0) == []  # three held: the budget
    assert s.held_bytes == 3 * cost and s.stats.overflowed == 0
    assert s.offer([ev("v", 2)], 0.0) == []  # over the budget: dropped, v is filled
    assert s.stats.overflowed == 1 and s.fills_due(0.0) == {"v": 0}
    assert seqs(s.filled("v", [ev("v", 1), ev("v", 2)], 0.0)) == [1, 2]
    assert seqs(s.offer([ev("u", 1)], 0.0)) == [1, 2, 3, 4]  # released: the bytes go back
    assert s.held_bytes == 0
    check_bytes(s)
    s.offer([ev("u", 7)], 0.0)
    s.unwatch("u")  # forgotten with what it held
    assert s.held_bytes == 0


def test_events_held_below_a_hole_in_the_log_are_released() -> None:
    s = started("u")
    s.offer([ev("u", 3), ev("u", 4)], 0.0)
    s.mark_behind()
    assert s.fills_due(0.0) == {"u": 0}
    # Retention removed 1 to 5 meanwhile: the log starts at 6.
    assert seqs(s.filled("u", [ev("u", 6)], 0.0)) == [6]
    assert s.held() == 0 and s.held_bytes == 0


def test_an_announced_head_beyond_the_delivered_one_is_filled_at_once() -> None:
    """The last events of a user were never published (no later event reveals the gap):
    their node announces the user's head, and this node fills up to it."""
    s = started(head=4)
    s.announce("u", 4)  # delivered already
    s.announce("stranger", 9)  # not tracked here
    assert s.fills_due(0.0) == {}
    s.announce("u", 6)
    assert s.next_deadline() == float("-inf")
    assert s.fills_due(0.0) == {"u": 4}
    assert seqs(s.filled("u", [ev("u", 5), ev("u", 6)], 0.0)) == [5, 6]
