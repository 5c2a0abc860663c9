"""Per-user ordering of events that reach a node from several sources (sans-I/O).

In cluster mode a node's broadcaster gets events from its own commits, from Redis pub/sub
(other nodes' commits, and its own coming back) and from fills read from the durable log.
Pub/sub may drop, and the sources interleave, so the :class:`Sequencer` restores the one
order the log defines: for each *tracked* user (one with a subscriber on this node, in its
user room or in one of its jobs' rooms) it keeps the delivered head (``user_seq``) and

- passes an event on when it is the head's successor, then any held successors;
- drops an event at or below the head (a duplicate: its own commit back from Redis, an event
  both pushed and filled);
- holds an event beyond the successor (a gap) for ``gap_wait`` seconds, then asks for a fill
  from the log (:meth:`fills_due`): one in flight per user at a time.

Per-user ``user_seq`` order implies per-job ``seq`` order (a job belongs to one user), so job
rooms need nothing more. Memory is bounded: a user is tracked only while it has watchers,
at most ``max_held`` events are held per user and ``max_held_bytes`` in all (each event counted
as :func:`~._events.event_bytes`); beyond that they are dropped and the user is marked
``behind``: filled from the log, which holds everything.

Tracking begins in two steps, so that a subscriber's join stays gap-free: :meth:`watch` (before
the join reads anything: events arriving from then on are held) and :meth:`start` with the
user head read next (held events at or below it dropped, the rest passed on in order). The
first ``start`` of a user wins: it was read before any later join's room head, and everything
after it is delivered, so every later join is covered too.

Every method takes ``now`` (seconds, any monotonic clock) where timing matters; nothing here
awaits or reads a clock.
"""

from __future__ import annotations

from collections.abc import Iterable

import attrs

from ._events import JobEvent, event_bytes

__all__ = ["Sequencer", "SequencerStats"]


@attrs.define
class SequencerStats:
    #: Events passed on, in order.
    delivered: int = 0
    #: Events dropped at or below the head (or already held).
    duplicates: int = 0
    #: Times an event arrived beyond the head's successor (a gap opened).
    gaps: int = 0
    #: Events passed on that came from fills.
    filled: int = 0
    #: Events dropped because the user's held events were at ``max_held``.
    overflowed: int = 0


@attrs.define(eq=False)
class _User:
    #: Watchers (subscriptions on this node needing the user's events).
    refs: int = 0
    #: The last ``user_seq`` passed on; None until :meth:`Sequencer.start`.
    head: int | None = None
    #: Events beyond ``head + 1``, by ``user_seq``, and what they cost (``event_bytes``).
    held: dict[int, JobEvent] = attrs.field(factory=dict)
    held_bytes: int = 0
    #: When the current gap opened (None: no gap).
    gap_since: float | None = None
    #: The log may hold events past ``head`` this node has not seen (held events dropped,
    #: Redis was down): fill at once.
    behind: bool = False
    #: A fill is in flight.
    filling: bool = False
    #: After a failed fill: no new one before this.
    retry_at: float | None = None


class Sequencer:
    """In-order, exactly-once delivery of the tracked users' events (see the module doc).

    ``gap_wait``: seconds an out-of-order event is held before the gap is filled from the log.
    ``max_held``: events held per user at most; ``max_held_bytes``: what all users' held events
    may cost (:func:`~._events.event_bytes`). ``fill_limit``: events one fill reads; a fill
    that returns that many leaves the user ``behind`` (filled again at once).
    """

    def __init__(
        self,
        *,
        gap_wait: float = 0.03,
        max_held: int = 1000,
        max_held_bytes: int = 64 * 2**20,
        fill_limit: int = 500,
    ):
        self.gap_wait = gap_wait
        self.max_held = max_held
        self.max_held_bytes = max_held_bytes
        self.fill_limit = fill_limit
        self.stats = SequencerStats()
        self._users: dict[str, _User] = {}
        #: What the held events of every user cost now.
        self.held_bytes = 0

    # -- tracking -------------------------------------------------------------------------------

    def watch(self, user_id: str) -> None:
        """One more watcher of ``user_id``; a new user's events are held until :meth:`start`."""
        user = self._users.get(user_id)
        if user is None:
            user = self._users[user_id] = _User()
        user.refs += 1

    def start(self, user_id: str, head: int, now: float) -> list[JobEvent]:
        """Begin delivering ``user_id``'s events after ``head`` (a user head read after
        :meth:`watch`); returns the held events now deliverable. A no-op (empty) once started,
        or when the user is not watched."""
        user = self._users.get(user_id)
        if user is None or user.head is not None:
            return []
        user.head = head
        held, user.held = user.held, {}
        self._release(user, user.held_bytes)
        return self._offer_user(user, sorted(held.values(), key=_user_seq), now)

    def unwatch(self, user_id: str) -> None:
        """One watcher less; the user is forgotten (its held events dropped) at zero."""
        user = self._users.get(user_id)
        if user is None:
            return
        user.refs -= 1
        if user.refs <= 0:
            self._release(user, user.held_bytes)
            del self._users[user_id]

    def tracked(self) -> dict[str, int]:
        """The started users and their heads."""
        return {uid: u.head for uid, u in self._users.items() if u.head is not None}

    def head(self, user_id: str) -> int | None:
        user = self._users.get(user_id)
        return None if user is None else user.head

    def held(self) -> int:
        """Events held across all users."""
        return sum(len(u.held) for u in self._users.values())

    # -- input ----------------------------------------------------------------------------------

    def offer(self, events: Iterable[JobEvent], now: float) -> list[JobEvent]:
        """Events from any source, in any order, for any users; returns those now deliverable,
        in ``user_seq`` order per user. Events of users not watched are ignored."""
        out: list[JobEvent] = []
        by_user: dict[str, list[JobEvent]] = {}
        for event in events:
            if event.user_id in self._users:
                by_user.setdefault(event.user_id, []).append(event)
        for user_id, batch in by_user.items():
            out += self._offer_user(self._users[user_id], batch, now)
        return out

    def _offer_user(self, user: _User, events: list[JobEvent], now: float) -> list[JobEvent]:
        out: list[JobEvent] = []
        if user.head is None:
            for event in events:
                self._hold(user, event)
            return out
        for event in events:
            seq = event.user_seq
            if seq <= user.head or seq in user.held:
                self.stats.duplicates += 1
            elif seq == user.head + 1:
                out.append(event)
                user.head = seq
                while (successor := user.held.pop(user.head + 1, None)) is not None:
                    self._release(user, event_bytes(successor))
                    out.append(successor)
                    user.head += 1
            else:
                if user.gap_since is None and not user.held:
                    self.stats.gaps += 1
                self._hold(user, event)
        if user.held:
            if user.gap_since is None or out:
                user.gap_since = now  # a gap remains (or a new one starts at the new head)
        else:
            user.gap_since = None
        self.stats.delivered += len(out)
        return out

    def _hold(self, user: _User, event: JobEvent) -> None:
        if event.user_seq in user.held:
            self.stats.duplicates += 1
            return
        cost = event_bytes(event)
        if len(user.held) < self.max_held and self.held_bytes + cost <= self.max_held_bytes:
            user.held[event.user_seq] = event
            user.held_bytes += cost
            self.held_bytes += cost
        else:
            self.stats.overflowed += 1
            user.behind = True

    def _release(self, user: _User, cost: int) -> None:
        user.held_bytes -= cost
        self.held_bytes -= cost

    # -- fills ----------------------------------------------------------------------------------

    def mark_behind(self, user_ids: Iterable[str] | None = None) -> None:
        """The log may have events of these users (None: every tracked user) this node has not
        seen (Redis was down, or is being polled): fill them at the next :meth:`fills_due`."""
        for user_id in self._users if user_ids is None else user_ids:
            user = self._users.get(user_id)
            if user is not None:
                user.behind = True

    def announce(self, user_id: str, user_seq: int) -> None:
        """Another node says ``user_id``'s events reach ``user_seq`` (events it could not
        publish): if this node has not delivered that far, fill from the log at once."""
        user = self._users.get(user_id)
        if (
            user is not None
            and user.head is not None
            and user_seq > user.head
            and user_seq not in user.held
        ):
            user.behind = True

    def fills_due(self, now: float) -> dict[str, int]:
        """Users to fill from the log now, with the ``user_seq`` to read after: those behind,
        and those whose gap is ``gap_wait`` old. Each is then in flight until :meth:`filled`
        or :meth:`fill_failed`."""
        due: dict[str, int] = {}
        for user_id, user in self._users.items():
            if user.head is None or user.filling:
                continue
            if user.retry_at is not None and now < user.retry_at:
                continue
            if user.behind or (
                user.gap_since is not None and now - user.gap_since >= self.gap_wait
            ):
                user.filling = True
                user.behind = False
                user.retry_at = None
                due[user_id] = user.head
        return due

    def filled(self, user_id: str, events: list[JobEvent], now: float) -> list[JobEvent]:
        """A fill's result (the log's events after the head it was asked for, in order, at
        most ``fill_limit``); returns what is now deliverable. A hole at the start of the log
        (events removed by retention) is skipped: they are gone for every reader."""
        user = self._users.get(user_id)
        if user is None:
            return []
        user.filling = False
        if user.head is None:
            return []
        if events and events[0].user_seq > user.head + 1:
            user.head = events[0].user_seq - 1
            for seq in [seq for seq in user.held if seq <= user.head]:  # gone from the log
                self._release(user, event_bytes(user.held.pop(seq)))
        out = self._offer_user(user, events, now)
        read = {id(event) for event in events}
        self.stats.filled += sum(1 for event in out if id(event) in read)
        if len(events) >= self.fill_limit:
            user.behind = True
        elif user.held:
            user.gap_since = now  # not in the log yet: wait once more, then read again
        return out

    def fill_failed(self, user_id: str, now: float) -> None:
        """The fill could not be read: try again ``gap_wait`` later."""
        user = self._users.get(user_id)
        if user is not None:
            user.filling = False
            user.behind = True
            user.retry_at = now + self.gap_wait

    def next_deadline(self) -> float | None:
        """When :meth:`fills_due` next has something (``-inf``: now), or None."""
        deadline: float | None = None
        for user in self._users.values():
            if user.head is None or user.filling:
                continue
            if user.behind:
                at = float("-inf") if user.retry_at is None else user.retry_at
            elif user.gap_since is not None:
                at = user.gap_since + self.gap_wait
            else:
                continue
            if user.retry_at is not None:
                at = max(at, user.retry_at)
            deadline = at if deadline is None else min(deadline, at)
        return deadline


def _user_seq(event: JobEvent) -> int:
    return event.user_seq
