"""Counters the store actor keeps for monitoring: plain ints and dicts, no I/O, no library.

The store updates them once per committed group (a few dict increments per event), so the hot
path pays almost nothing; exporters (``transport._metrics`` renders them for Prometheus) read
them whenever they are scraped.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from ._events import JobEvent
from ._states import JobState

if TYPE_CHECKING:
    from ._broadcaster import Outbox

__all__ = ["COMMIT_BUCKETS", "Histogram", "OutboxTotals", "StoreMetrics", "move"]

#: Upper bounds (seconds) of the store commit duration histogram's buckets.
COMMIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Histogram:
    """Observations counted into buckets with fixed upper bounds (the last bucket is +Inf)."""

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: Iterable[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # per bucket, not cumulative
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[float, int]]:
        """``(upper bound, observations <= it)`` for every bucket, ending with +Inf."""
        total = 0
        out = []
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += n
            out.append((bound, total))
        return out


def move(delta: dict[JobState, int], old: JobState | None, new: JobState | None) -> None:
    """Record one job moving from ``old`` to ``new`` (None: not stored) in a per-state delta."""
    if old is not None:
        delta[old] = delta.get(old, 0) - 1
    if new is not None:
        delta[new] = delta.get(new, 0) + 1


class StoreMetrics:
    """What the store actor has committed since it started, and jobs by state."""

    __slots__ = ("commit_seconds", "commits", "events", "failed_commits", "jobs", "requests")

    def __init__(self) -> None:
        #: Seconds each group commit took in the database (its thread included).
        self.commit_seconds = Histogram(COMMIT_BUCKETS)
        self.commits = 0
        self.requests = 0
        self.failed_commits = 0
        #: Committed events by type.
        self.events: Counter[str] = Counter()
        #: Stored jobs by state: counted once when the store starts, then moved at each commit.
        self.jobs: Counter[JobState] = Counter()

    def load(self, counts: Mapping[str, int]) -> None:
        self.jobs = Counter({JobState(state): n for state, n in counts.items()})

    def committed(
        self,
        requests: int,
        events: Iterable[JobEvent],
        moves: Mapping[JobState, int],
        seconds: float,
    ) -> None:
        self.commits += 1
        self.requests += requests
        self.commit_seconds.observe(seconds)
        self.events.update(event.type.value for event in events)
        if moves:
            self.jobs.update(moves)


class OutboxTotals:
    """Delivery counters summed over connections that have ended (live ones are read live)."""

    __slots__ = ("coalesced", "delivered", "lagged")

    def __init__(self) -> None:
        self.delivered = 0
        self.coalesced = 0
        self.lagged = 0

    def add(self, outbox: Outbox) -> None:
        self.delivered += outbox.delivered
        self.coalesced += outbox.coalesced
        self.lagged += outbox.lagged
