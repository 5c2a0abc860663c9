"""The client's reconnect policy, sans-I/O under a fake clock: backoff growth and cap, reset
only after a healthy connection, the full backoff for closes that would recur."""

from __future__ import annotations

import random

import pytest

from transport import ReconnectPolicy
from transport._reconnect import FATAL_CLOSE, RECURRING_CLOSE


class NoJitter(random.Random):
    def uniform(self, a: float, b: float) -> float:
        return b


def policy(healthy_after: float = 10.0) -> ReconnectPolicy:
    return ReconnectPolicy(0.1, 5.0, healthy_after, rng=NoJitter())


def test_delays_double_up_to_the_cap() -> None:
    p = policy()
    delays = [p.next_delay(now=float(i)) for i in range(10)]
    assert delays == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0, 5.0]


def test_jitter_stays_between_half_and_full() -> None:
    p = ReconnectPolicy(min_backoff=1.0, max_backoff=1.0, rng=random.Random(7))
    delays = [p.next_delay(now=0.0) for _ in range(200)]
    assert all(0.5 <= d <= 1.0 for d in delays) and len(set(delays)) > 100


def test_a_connection_that_drops_right_after_the_hello_does_not_reset_the_backoff() -> None:
    """The 1009 loop: every hello succeeded, then the connection died at once. Each
    reconnect must wait longer, never the minimum again."""
    p = policy(healthy_after=10.0)
    now, delays = 0.0, []
    for _ in range(8):
        p.connected(now)
        now += 0.01  # up for 10 ms, then closed (no close code: reset by peer)
        delay = p.next_delay(now)
        delays.append(delay)
        now += delay
    assert delays == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0]


def test_backoff_resets_after_a_healthy_connection() -> None:
    p = policy(healthy_after=10.0)
    for _ in range(5):
        p.next_delay(now=0.0)
    p.connected(now=100.0)
    assert p.next_delay(now=109.9) == 3.2  # up 9.9 s: not healthy yet, keeps growing
    p.connected(now=200.0)
    assert p.next_delay(now=210.0) == 0.1  # up 10 s: healthy, starts over


@pytest.mark.parametrize("code", sorted(RECURRING_CLOSE))
def test_a_close_that_would_recur_waits_the_full_backoff(code: int) -> None:
    p = policy()
    p.connected(now=0.0)
    assert p.next_delay(now=0.5, close_code=code) == 5.0
    # Even after a healthy connection: the cause is still there.
    p.connected(now=100.0)
    assert p.next_delay(now=500.0, close_code=code) == 5.0


@pytest.mark.parametrize("code", [1000, 1001, 1006, 4001, None])
def test_other_closes_start_from_the_minimum(code: int | None) -> None:
    assert policy().next_delay(now=0.0, close_code=code) == 0.1


def test_fatal_and_recurring_codes_are_disjoint_and_documented() -> None:
    from .test_protocol_doc import DOC

    assert not set(FATAL_CLOSE) & set(RECURRING_CLOSE)
    section = DOC[DOC.index("**Reconnecting.**") :]
    for code in [*FATAL_CLOSE, *RECURRING_CLOSE]:
        assert str(code) in section, code


def test_succeeded_starts_over() -> None:
    p = policy()
    for _ in range(4):
        p.next_delay(now=0.0)
    p.succeeded()
    assert p.next_delay(now=0.0) == 0.1
