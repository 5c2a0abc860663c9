"""Sans-I/O queue decisions: which waiting jobs to claim, whether and when a failed attempt is
retried. Nothing here awaits or reads a clock: callers pass ``now`` and the random source.

Claim order (:class:`ClaimPlanner`): the highest priority first; within a priority the user
with the fewest running jobs gets the next slot (max-min fair share, so one user's 90,000
waiting jobs do not starve another's 10); among users tied on running jobs, the one served
least recently (round-robin: :class:`ServedOrder`); then that user's oldest job
``(ready_at, id)``. Limits: the runtime's total, per kind, per user; a kind or user at its
limit is skipped, it does not block the others (nor lower priorities).

Why the turn and not only the running count: a slot is usually filled as soon as it frees,
so every user ties at the count (at ``max_running=1``, or a kind limited to 1, every claim
sees 0 running for all; at any capacity the user whose job just ended ties with the users
that have none running). Ranking ties by the oldest job made the share plain FIFO there: one
user's backlog, older, ran before another's single job. The turn makes the tied users take
slots in turn, each its own oldest job first (as Oban's and BullMQ's group fairness, or a
deficit round-robin with one job as the quantum). The served order is the caller's memory
(the dispatcher's, of this runtime: :class:`ServedOrder`), given to each plan as an immutable
:class:`ServedTurns`; the plan counts its own picks as turns after it.
"""

from __future__ import annotations

import heapq
import random
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType

import attrs

from ._options import KindOptions, RetryPolicy

__all__ = [
    "Candidate",
    "ClaimLimits",
    "ClaimPlanner",
    "GroupKey",
    "RetryDecision",
    "SERVED_BOUND",
    "SERVED_FOLD",
    "ServedOrder",
    "ServedTurns",
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


#: Users a :class:`ServedOrder` remembers (about 200 bytes each besides the id).
SERVED_BOUND = 10_000

#: Services a :class:`ServedOrder` keeps apart before folding them into a new base copy.
SERVED_FOLD = 256

_EMPTY: Mapping[str, int] = MappingProxyType({})


@attrs.frozen
class ServedTurns:
    """When each user was last given a slot, as of one claim, immutable: the turn (a
    sequence number, 1 up) of that service is the user's in ``recent``, else in ``base``
    (:meth:`last`); a user in neither was never served, or longer ago than every user in
    them (0: first in line). ``next_turn`` is above every turn: the plan's first pick takes
    it."""

    base: Mapping[str, int] = _EMPTY
    recent: Mapping[str, int] = _EMPTY
    next_turn: int = 1

    def last(self, user_id: str) -> int:
        turn = self.recent.get(user_id)
        return self.base.get(user_id, 0) if turn is None else turn


class ServedOrder:
    """The order in which users were given slots, for the planner's round-robin among users
    tied on running jobs: mutable, kept by one caller (the dispatcher), read by each plan
    as an immutable :class:`ServedTurns` (a plan may run in a database thread while the
    order changes).

    Bounded: ``bound`` users, the least recently served forgotten first. Forgetting them
    keeps the order: each forgotten user was served before every user remembered, and ranks
    as never served (turn 0), still ahead of them; only the order among the forgotten is
    lost (they tie, and the oldest job goes first). So with at most ``bound`` users taking
    turns the order is exact.

    Cost: a snapshot does not copy every user remembered (at 10,000 users that took about a
    millisecond, in every claim). It shares ``base``, a frozen copy made every
    ``SERVED_FOLD`` services, and copies only the services since (``recent``): a few
    microseconds per claim. A base may
    still name users forgotten since it was made, with their true (old) turn: older than
    every turn remembered, so the order is the same. Memory: at most ``2 x bound +
    SERVED_FOLD`` entries (the order, one base, the recent ones)."""

    def __init__(self, bound: int = SERVED_BOUND) -> None:
        if bound < 1:
            raise ValueError("bound must be at least 1")
        self.bound = bound
        # Least recently served first: a service moves its user to the end.
        self._order: OrderedDict[str, int] = OrderedDict()
        self._base: Mapping[str, int] = _EMPTY
        self._recent: dict[str, int] = {}
        self._next_turn = 1
        self._snapshot: ServedTurns | None = None

    def __len__(self) -> int:
        return len(self._order)

    def served(self, user_ids: Iterable[str]) -> None:
        """Record that each of ``user_ids`` got a slot, in order (the last most recently)."""
        for user_id in user_ids:
            self._order[user_id] = self._recent[user_id] = self._next_turn
            self._order.move_to_end(user_id)
            self._next_turn += 1
            self._snapshot = None
        while len(self._order) > self.bound:
            self._order.popitem(last=False)
        if len(self._recent) > SERVED_FOLD:
            self._base = MappingProxyType(dict(self._order))
            self._recent = {}

    def snapshot(self) -> ServedTurns:
        """The order now; made once per change, not once per claim."""
        if self._snapshot is None:
            recent = MappingProxyType(dict(self._recent)) if self._recent else _EMPTY
            self._snapshot = ServedTurns(self._base, recent, self._next_turn)
        return self._snapshot


@attrs.define
class ClaimPlanner:
    """Plans one claim: ``running`` counts (total, per user, per kind) and the users' turns
    are updated as jobs are picked, so a planner can be fed groups incrementally.

    Use: :meth:`slots` free; for each priority, highest first, :meth:`plan_priority` with
    that priority's groups."""

    limits: ClaimLimits
    running: int = 0
    by_user: dict[str, int] = attrs.field(factory=dict)
    by_kind: dict[str, int] = attrs.field(factory=dict)
    #: Kinds the owner can run (None: any).
    kinds: frozenset[str] | None = None
    #: When each user was last served before this plan (none: everyone ties, oldest first).
    served: ServedTurns = attrs.field(factory=ServedTurns)
    # The turns this plan gave (user -> turn), above every turn in ``served``.
    _turns: dict[str, int] = attrs.field(init=False, factory=dict)
    _next_turn: int = attrs.field(init=False, default=0)

    def __attrs_post_init__(self) -> None:
        self._next_turn = self.served.next_turn

    def turn(self, user_id: str) -> int:
        """When ``user_id`` last got a slot (this plan's picks included); 0: never, as far
        as the served order remembers. Lower goes first among users tied on running jobs."""
        turn = self._turns.get(user_id)
        return self.served.last(user_id) if turn is None else turn

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
        self._turns[candidate.user_id] = self._next_turn
        self._next_turn += 1

    def rank(self, user_id: str) -> tuple[int, int]:
        """A user's place in line within a priority, lowest first: running jobs, then turn."""
        return self.by_user.get(user_id, 0), self.turn(user_id)

    def plan_priority(
        self, heads: Mapping[GroupKey, Candidate], next_of: Callable[[Candidate], Candidate | None]
    ) -> list[Candidate]:
        """Pick from one priority's groups until no slot is free or no group is open.

        ``heads``: the oldest ready candidate of each group; ``next_of(c)``: the candidate
        after ``c`` in its group, None at its end. Returns the picks in order."""
        # A heap of the heads by rank (the user's running jobs, the user's turn, ready_at, id):
        # O((picks + groups) x log groups), where a scan of every head per pick was O(picks x
        # groups). A rank only grows while a plan runs (a pick raises its user's count and
        # gives it the newest turn; nothing lowers either), so an entry whose user took a
        # slot since it was pushed is pushed again with its new rank when it surfaces; the
        # entry popped with its rank still current is the least of all. A group closed by a
        # limit stays closed for the same reason: its entry is dropped.
        # The first ranks inline (as :meth:`rank`, turns being 1 up): one entry per group,
        # thousands in a claim of many users.
        count_of, turn_of = self.by_user.get, self._turns.get
        recent_of, base_of = self.served.recent.get, self.served.base.get
        queue = [
            (
                count_of(head.user_id, 0),
                turn_of(head.user_id) or recent_of(head.user_id) or base_of(head.user_id, 0),
                head.ready_at,
                head.id,
                head,
            )
            for head in heads.values()
        ]
        heapq.heapify(queue)
        picked: list[Candidate] = []
        while queue and self.slots():
            count, turn, _, _, head = queue[0]
            if not self.group_open(head.group):
                heapq.heappop(queue)
                continue
            current = self.rank(head.user_id)
            if current != (count, turn):
                heapq.heapreplace(queue, (*current, head.ready_at, head.id, head))
                continue
            picked.append(head)
            self.take(head)
            following = next_of(head)
            if following is None:
                heapq.heappop(queue)
            else:
                rank = self.rank(following.user_id)
                heapq.heapreplace(queue, (*rank, following.ready_at, following.id, following))
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
