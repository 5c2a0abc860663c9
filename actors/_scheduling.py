"""Sans-I/O queue decisions: which waiting jobs to claim, whether and when a failed attempt is
retried. Nothing here awaits or reads a clock: callers pass ``now`` and the random source.

Claim order (:class:`ClaimPlanner`): the highest priority first; within a priority the user
with the fewest running jobs gets the next slot (max-min fair share, so one user's 90,000
waiting jobs do not starve another's 10), then the oldest job ``(ready_at, id)``. Limits:
the runtime's total, per kind, per user; a kind or user at its limit is skipped, it does not
block the others (nor lower priorities).
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable, Iterable, Mapping

import attrs

from ._options import KindOptions, RetryPolicy

__all__ = [
    "Candidate",
    "ClaimLimits",
    "ClaimPlanner",
    "GroupKey",
    "RetryDecision",
    "backoff_delay",
    "decide_retry",
    "ready_at",
]

#: Waiting jobs are grouped by (priority, user id, kind); each group is served oldest first.
GroupKey = tuple[int, str, str]


@attrs.frozen
class Candidate:
    """A waiting, ready job as the planner sees it. ``ready_at``: when it became claimable
    (its ``run_at``, else its creation), Unix seconds."""

    id: str
    priority: int
    user_id: str
    kind: str
    ready_at: float

    @property
    def group(self) -> GroupKey:
        return (self.priority, self.user_id, self.kind)


@attrs.frozen
class ClaimLimits:
    """Capacity of one owner: ``max_running`` in all; per kind (absent: no limit); per user
    (None: no limit). Running counts are the owner's jobs running now."""

    max_running: int = 1000
    max_running_per_kind: Mapping[str, int] = attrs.field(factory=dict)
    max_running_per_user: int | None = None


@attrs.define
class ClaimPlanner:
    """Plans one claim: ``running`` counts (total, per user, per kind) are updated as jobs
    are picked, so a planner can be fed groups incrementally.

    Use: :meth:`slots` free; for each priority, highest first, :meth:`pick` from that
    priority's groups (each an iterator of its candidates, oldest first) until it returns
    None."""

    limits: ClaimLimits
    running: int = 0
    by_user: dict[str, int] = attrs.field(factory=dict)
    by_kind: dict[str, int] = attrs.field(factory=dict)
    #: Kinds the owner can run (None: any).
    kinds: frozenset[str] | None = None

    def slots(self) -> int:
        return max(0, self.limits.max_running - self.running)

    def user_open(self, user_id: str) -> bool:
        limit = self.limits.max_running_per_user
        return limit is None or self.by_user.get(user_id, 0) < limit

    def kind_open(self, kind: str) -> bool:
        if self.kinds is not None and kind not in self.kinds:
            return False
        limit = self.limits.max_running_per_kind.get(kind)
        return limit is None or self.by_kind.get(kind, 0) < limit

    def group_open(self, key: GroupKey) -> bool:
        return self.user_open(key[1]) and self.kind_open(key[2])

    def take(self, candidate: Candidate) -> None:
        self.running += 1
        self.by_user[candidate.user_id] = self.by_user.get(candidate.user_id, 0) + 1
        self.by_kind[candidate.kind] = self.by_kind.get(candidate.kind, 0) + 1

    def plan_priority(
        self, heads: Mapping[GroupKey, Candidate], next_of: Callable[[Candidate], Candidate | None]
    ) -> list[Candidate]:
        """Pick from one priority's groups until no slot is free or no group is open.

        ``heads``: the oldest ready candidate of each group; ``next_of(c)``: the candidate
        after ``c`` in its group, None at its end. Returns the picks in order."""
        # A heap of the heads by rank (running jobs of the user, ready_at, id): O((picks +
        # groups) x log groups), where a scan of every head per pick was O(picks x groups).
        # A rank only grows while a plan runs (counts only grow), so an entry whose user took
        # a slot since it was pushed is pushed again with its new rank when it surfaces; the
        # entry popped with its rank still current is the least of all. A group closed by a
        # limit stays closed for the same reason: its entry is dropped.
        queue = [
            (self.by_user.get(head.user_id, 0), head.ready_at, head.id, head)
            for head in heads.values()
        ]
        heapq.heapify(queue)
        picked: list[Candidate] = []
        while queue and self.slots():
            count, _, _, head = queue[0]
            if not self.group_open(head.group):
                heapq.heappop(queue)
                continue
            current = self.by_user.get(head.user_id, 0)
            if current != count:
                heapq.heapreplace(queue, (current, head.ready_at, head.id, head))
                continue
            picked.append(head)
            self.take(head)
            following = next_of(head)
            if following is None:
                heapq.heappop(queue)
            else:
                rank = self.by_user.get(following.user_id, 0)
                heapq.heapreplace(queue, (rank, following.ready_at, following.id, following))
        return picked

    def plan(self, candidates: Iterable[Candidate]) -> list[Candidate]:
        """Plan from every candidate at once (small queues, tests): groups them and serves
        each priority, highest first."""
        groups: dict[GroupKey, list[Candidate]] = {}
        for candidate in sorted(candidates, key=lambda c: (c.ready_at, c.id)):
            groups.setdefault(candidate.group, []).append(candidate)
        position = {c.id: i for members in groups.values() for i, c in enumerate(members)}

        def next_of(candidate: Candidate) -> Candidate | None:
            members = groups[candidate.group]
            i = position[candidate.id] + 1
            return members[i] if i < len(members) else None

        picked: list[Candidate] = []
        for priority in sorted({key[0] for key in groups}, reverse=True):
            heads = {key: members[0] for key, members in groups.items() if key[0] == priority}
            picked += self.plan_priority(heads, next_of)
        return picked


def backoff_delay(policy: RetryPolicy, failed_attempts: int, rng: random.Random) -> float:
    """Seconds to wait after ``failed_attempts`` (>= 1) failures, jitter included."""
    base = min(
        policy.maximum_interval,
        policy.initial_interval * policy.backoff_coefficient ** (failed_attempts - 1),
    )
    factor = rng.uniform(1 - policy.jitter, 1 + policy.jitter)
    return min(policy.maximum_interval, base * factor)


@attrs.frozen
class RetryDecision:
    """``retry``: back to the queue at ``next_attempt_at`` (Unix seconds) after ``delay``
    seconds; else the job fails for good. ``failed_attempts`` counts this one."""

    retry: bool
    failed_attempts: int
    delay: float = 0.0
    next_attempt_at: float | None = None


def decide_retry(
    options: KindOptions,
    failed_attempts: int,
    max_attempts: int,
    error_type: str,
    permanent: bool,
    now: float,
    rng: random.Random,
) -> RetryDecision:
    """After a failed attempt (``failed_attempts`` before it): retried while the failures stay
    under ``max_attempts`` and the error is neither permanent nor of a non-retryable type."""
    failed = failed_attempts + 1
    if permanent or error_type in options.non_retryable or failed >= max_attempts:
        return RetryDecision(False, failed)
    delay = backoff_delay(options.retry, failed, rng)
    return RetryDecision(True, failed, delay, now + delay)


def ready_at(created_at: float, run_at: float | None) -> float:
    """When a waiting job became (or becomes) claimable: its ``run_at``, else its creation."""
    return created_at if run_at is None else run_at
