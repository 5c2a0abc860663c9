"""The broadcaster actor: fans committed job events out to subscribers of rooms.

Rooms are ``job:<id>`` (cursor on the job's ``seq``) and ``user:<id>`` (cursor on
``user_seq``). Each event is serialized once; the same bytes go to every subscriber, appended
to the subscriber's :class:`Outbox`. The broadcaster never awaits a socket: a connection's own
sender task drains its outbox, taking everything queued at once (one frame per batch).

Joining is gap-free: a subscription is registered (and holds live events) before the room's
head and history are read; history and held events are then merged by sequence number.
History comes from the room's in-memory backlog when it reaches back to the cursor, else from
the store's durable log, paged; a cursor from another epoch, or ahead of the head, gets a
snapshot reset with its reason.
"""

from __future__ import annotations

import logging
from collections import OrderedDict, deque
from typing import Any

import attrs
import orjson
import trio

from ._codec import converter
from ._errors import InvalidInputError
from ._events import EventHub, EventStream, EventStreamLagged, EventType, JobEvent
from ._payloads import inline_payloads
from ._store import StoreClient

__all__ = ["Broadcaster", "BroadcasterConfig", "Cursor", "JoinResult", "Outbox", "Subscription"]

log = logging.getLogger("jobspine.broadcaster")


@attrs.frozen
class Cursor:
    epoch: str
    seq: int


@attrs.frozen
class BroadcasterConfig:
    #: Events kept in memory per room, for cheap replay after a short disconnect.
    backlog: int = 200
    #: Rooms whose backlog is kept (least recently active dropped first; their cursors are
    #: then served from the durable log).
    backlog_rooms: int = 2000
    #: Queued live events on one connection past which its progress events are coalesced.
    coalesce_after: int = 256
    #: Queued live events past which the connection is told to resubscribe from its cursor.
    overflow_after: int = 4096
    #: Overflows within ``lag_window`` seconds that get a connection disconnected.
    max_lags: int = 3
    lag_window: float = 60.0
    #: Events read from the durable log per store request while replaying.
    page_size: int = 1000
    #: An event ``data`` value whose JSON is larger than this (bytes) is sent as an
    #: ``{"$omitted": field, "size": bytes}`` marker; clients fetch it with ``get_payload``.
    inline_payload_limit: int = 16 * 1024


class Outbox:
    """Encoded messages waiting for one connection's sender. Only its owner awaits it."""

    def __init__(self, config: BroadcasterConfig | None = None) -> None:
        self.config = config or BroadcasterConfig()
        # entry: [bytes | None (coalesced away), live?, job id, user id, seq, user seq]
        self._entries: deque[list[Any]] = deque()
        self._progress: dict[str, list[Any]] = {}
        self._skipped: list[tuple[str, str, int, int]] = []
        self._live = 0
        self._dead = 0  # coalesced entries still in the queue
        self._wakeup = trio.Event()
        self._lag_times: deque[float] = deque()
        self.subscriptions: dict[str, Subscription] = {}
        #: Why the connection must be closed (the hard limit was passed), or None.
        self.close_reason: str | None = None
        self.delivered = 0
        self.coalesced = 0
        #: Times this connection fell behind and was told to resubscribe (``lagged``).
        self.lagged = 0

    def __len__(self) -> int:
        return len(self._entries)

    def push_control(self, data: bytes) -> None:
        self._entries.append([data, False, None, None, 0, 0])
        self._wakeup.set()

    def push_event(self, event: JobEvent, data: bytes, *, live: bool) -> None:
        entry = [data, live, event.job_id, event.user_id, event.seq, event.user_seq]
        if live:
            self._live += 1
            if event.type is EventType.PROGRESS:
                previous = self._progress.get(event.job_id)
                if previous is not None and self._live > self.config.coalesce_after:
                    # A newer progress event supersedes a queued one: the client is told the
                    # sequence numbers it will never receive, so it sees no gap.
                    previous[0] = None
                    self._live -= 1
                    self._dead += 1
                    self.coalesced += 1
                    self._skipped.append((previous[2], previous[3], previous[4], previous[5]))
                    if self._dead > 64 and 2 * self._dead > len(self._entries):
                        self._entries = deque(e for e in self._entries if e[0] is not None)
                        self._dead = 0
                self._progress[event.job_id] = entry
            if self._live > self.config.overflow_after:
                self._overflow()
                return
        self._entries.append(entry)
        self._wakeup.set()

    def _overflow(self) -> None:
        self.lagged += 1
        now = trio.current_time()
        self._lag_times.append(now)
        while self._lag_times and self._lag_times[0] < now - self.config.lag_window:
            self._lag_times.popleft()
        self._entries = deque(e for e in self._entries if e[2] is None)  # keep control messages
        self._progress.clear()
        self._skipped.clear()
        self._live = 0
        self._dead = 0
        rooms = sorted(self.subscriptions)
        for sub in self.subscriptions.values():
            sub.suspended = True
        if len(self._lag_times) > self.config.max_lags:
            self.close_reason = "slow consumer: fell behind repeatedly"
        self.push_control(
            orjson.dumps(
                {
                    "type": "lagged",
                    "rooms": rooms,
                    "message": "events were dropped: subscribe again from your cursor",
                }
            )
        )

    def take(
        self, max_bytes: int = 256 * 1024
    ) -> tuple[list[bytes], list[tuple[str, str, int, int]]]:
        """What is queued, in order, up to about ``max_bytes`` (at least one message); and
        ``(job id, user id, seq, user seq)`` of the events coalesced away before those."""
        items: list[bytes] = []
        size = 0
        entries = self._entries
        while entries and (not items or size + len(entries[0][0] or b"") <= max_bytes):
            entry = entries.popleft()
            data = entry[0]
            if data is None:
                self._dead -= 1
                continue
            if entry[1]:
                self._live -= 1
                if self._progress.get(entry[2]) is entry:
                    del self._progress[entry[2]]
            items.append(data)
            size += len(data)
        skipped = self._skipped
        self._skipped = []
        if not entries:
            self._wakeup = trio.Event()
        self.delivered += len(items)
        return items, skipped

    async def wait(self) -> None:
        """Return once something is queued."""
        if not self._entries and self.close_reason is None:
            await self._wakeup.wait()


@attrs.define(eq=False)
class Subscription:
    room: str
    outbox: Outbox
    last_seq: int = 0
    replaying: bool = True
    suspended: bool = False
    held: list[tuple[JobEvent, bytes]] = attrs.field(factory=list)


@attrs.frozen
class JoinResult:
    room: str
    epoch: str
    head: int
    recovered: bool
    replayed: int
    reset_reason: str | None = None


def parse_room(room: object) -> tuple[str, str]:
    if isinstance(room, str):
        kind, _, ident = room.partition(":")
        if kind in ("job", "user") and ident:
            return kind, ident
    raise InvalidInputError(f"room must be 'job:<id>' or 'user:<id>', not {room!r}")


def _room_seq(room_kind: str, event: JobEvent) -> int:
    return event.seq if room_kind == "job" else event.user_seq


class Broadcaster:
    def __init__(
        self, store: StoreClient, hub: EventHub, config: BroadcasterConfig | None = None
    ) -> None:
        self.store = store
        self.hub = hub
        self.config = config or BroadcasterConfig()
        self._rooms: dict[str, dict[Outbox, Subscription]] = {}
        self._backlogs: OrderedDict[str, deque[tuple[int, JobEvent, bytes]]] = OrderedDict()
        self._heads: dict[str, int] = {}
        self._stream: EventStream | None = None
        self._idle = trio.Event()
        self.published = 0

    @property
    def epoch(self) -> str:
        return self.store.epoch

    async def run(
        self, *, task_status: trio.TaskStatus[Broadcaster] = trio.TASK_STATUS_IGNORED
    ) -> None:
        async with self.store:
            started = False
            while True:
                async with self.hub.subscribe(buffer=1_000_000) as stream:
                    self._stream = stream
                    if not started:
                        task_status.started(self)
                        started = True
                    try:
                        async for event in stream:
                            # A commit's events arrive together: publish them all before
                            # yielding, so each connection's sender takes them as one frame.
                            self.publish(event)
                            while stream.pending():
                                self.publish(stream.receive_nowait())
                            self._idle.set()
                    except EventStreamLagged:
                        log.error("broadcaster fell behind the store; asking clients to resync")
                        self._lag_everyone()
                        continue
                return

    async def drained(self) -> None:
        """Return once every event committed so far has been published to subscribers."""
        if self._stream is not None and self._stream.pending():
            self._idle = trio.Event()
            await self._idle.wait()

    def _lag_everyone(self) -> None:
        self._backlogs.clear()  # they may have gaps now
        outboxes = {o for subs in self._rooms.values() for o in subs}
        for outbox in outboxes:
            outbox._overflow()

    # -- live path (never awaits) ---------------------------------------------------------------

    def encode(self, event: JobEvent) -> bytes:
        """The event message, with each ``data`` value over the inline limit left out."""
        message = {"type": "event", "event": converter.unstructure(event)}
        data = orjson.dumps(message)
        limit = self.config.inline_payload_limit
        if len(data) <= limit and b'"$omitted"' not in data:
            return data  # the common case: nothing can be over the limit
        message["event"]["data"] = inline_payloads(message["event"]["data"], limit)
        return orjson.dumps(message)

    def publish(self, event: JobEvent) -> None:
        data = self.encode(event)
        self.published += 1
        targets: dict[Outbox, None] = {}
        for room, seq in (
            (f"job:{event.job_id}", event.seq),
            (f"user:{event.user_id}", event.user_seq),
        ):
            self._remember(room, seq, event, data)
            subs = self._rooms.get(room)
            if not subs:
                continue
            self._heads[room] = seq
            for sub in subs.values():
                if sub.suspended:
                    continue
                if sub.replaying:
                    sub.held.append((event, data))
                elif seq > sub.last_seq:
                    sub.last_seq = seq
                    targets[sub.outbox] = None
        for outbox in targets:
            outbox.push_event(event, data, live=True)

    def _remember(self, room: str, seq: int, event: JobEvent, data: bytes) -> None:
        backlog = self._backlogs.get(room)
        if backlog is None:
            backlog = self._backlogs[room] = deque(maxlen=self.config.backlog)
            if len(self._backlogs) > self.config.backlog_rooms:
                self._backlogs.popitem(last=False)
        else:
            self._backlogs.move_to_end(room)
        backlog.append((seq, event, data))

    def head(self, room: str) -> int | None:
        return self._heads.get(room)

    # -- joining --------------------------------------------------------------------------------

    async def join(self, outbox: Outbox, room: str, cursor: Cursor | None) -> JoinResult:
        """Register ``outbox`` in ``room`` and work out what it missed.

        The caller queues its reply, then calls :meth:`finish_join` without awaiting in
        between, so the reply precedes the replayed events.
        """
        kind, ident = parse_room(room)
        self.leave(outbox, room)
        sub = Subscription(room, outbox)
        self._rooms.setdefault(room, {})[outbox] = sub
        outbox.subscriptions[room] = sub
        try:
            if kind == "job":
                head = (await self.store.get(ident)).seq
            else:
                head = await self.store.user_head(ident)
            if self._heads.get(room, 0) < head:
                self._heads[room] = head
            sub.last_seq = head
            epoch = self.epoch
            if cursor is None:
                return JoinResult(room, epoch, head, recovered=False, replayed=0)
            if cursor.epoch != epoch:
                reason = "epoch_changed: the server's database is not the one your cursor is from"
                return JoinResult(room, epoch, head, False, 0, reason)
            if cursor.seq > head:
                reason = f"cursor_ahead: sequence {cursor.seq} is beyond the room's head {head}"
                return JoinResult(room, epoch, head, False, 0, reason)
            history = await self._history(kind, ident, room, cursor.seq, head)
            sub.held[:0] = history
            sub.last_seq = cursor.seq
            return JoinResult(room, epoch, head, recovered=True, replayed=len(history))
        except BaseException:
            self.leave(outbox, room)
            raise

    async def _history(
        self, kind: str, ident: str, room: str, after: int, head: int
    ) -> list[tuple[JobEvent, bytes]]:
        if after >= head:
            return []
        backlog = self._backlogs.get(room)
        if backlog and backlog[0][0] <= after + 1:
            return [(event, data) for seq, event, data in backlog if after < seq <= head]
        history: list[tuple[JobEvent, bytes]] = []
        while after < head:
            if kind == "job":
                page = await self.store.read_events(ident, after, self.config.page_size)
            else:
                page = await self.store.read_user_events(ident, after, self.config.page_size)
            if not page:
                break
            for event in page:
                seq = _room_seq(kind, event)
                if seq > head:
                    break
                history.append((event, self.encode(event)))
                after = seq
            else:
                continue
            break
        return history

    def finish_join(self, outbox: Outbox, room: str) -> None:
        """Queue the history and the events held during the join, in order, once each."""
        sub = outbox.subscriptions.get(room)
        if sub is None or not sub.replaying:
            return
        kind, _ = parse_room(room)
        for event, data in sub.held:
            seq = _room_seq(kind, event)
            if seq > sub.last_seq:
                sub.last_seq = seq
                outbox.push_event(event, data, live=False)
        sub.held = []
        sub.replaying = False

    def leave(self, outbox: Outbox, room: str) -> None:
        sub = outbox.subscriptions.pop(room, None)
        if sub is None:
            return
        subs = self._rooms.get(room)
        if subs is not None:
            subs.pop(outbox, None)
            if not subs:
                del self._rooms[room]
                self._heads.pop(room, None)

    def leave_all(self, outbox: Outbox) -> None:
        for room in list(outbox.subscriptions):
            self.leave(outbox, room)

    def heads_for(self, outbox: Outbox) -> dict[str, int]:
        """Heads of the rooms this outbox is live in (not replaying, not suspended)."""
        return {
            room: self._heads.get(room, sub.last_seq)
            for room, sub in outbox.subscriptions.items()
            if not sub.replaying and not sub.suspended
        }

    @property
    def subscriber_count(self) -> int:
        return sum(len(subs) for subs in self._rooms.values())
