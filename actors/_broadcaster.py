"""The broadcaster actor: fans committed job events out to subscribers of rooms.

Rooms are ``job:<id>`` (cursor on the job's ``seq``) and ``user:<id>`` (cursor on
``user_seq``). Each event is serialized once; the same bytes go to every subscriber, appended
to the subscriber's :class:`Outbox`. The broadcaster never awaits a socket: a connection's own
sender task drains its outbox one bounded frame at a time (:meth:`Outbox.take`); a connection
that falls behind has its progress coalesced, then is told it ``lagged``.

Joining is gap-free: a subscription is registered (and holds live events) before the room's
head and history are read; history and held events are then merged by sequence number.
History comes from the room's in-memory backlog when it reaches back to the cursor, else from
the store's durable log, paged; a cursor from another epoch, ahead of the head, or behind
what retention kept (``cursor_too_old``), gets a snapshot reset with its reason.

In cluster mode (a :class:`~._fanout.Fanout`), events come from the fan-out, every node's, in
order, instead of from this node's hub. A join then also has the fan-out track the room's
user (:meth:`~._fanout.Fanout.watch` before anything is read, ``start`` with the user head
read before the room's head), so events after that head all arrive. No backlog is kept: a
room nobody here subscribes to receives no events, so its backlog would have holes; replays
come from the log.
"""

from __future__ import annotations

import logging
import weakref
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import attrs
import orjson
import trio

from ._codec import check_name, converter
from ._errors import InvalidInputError, shown
from ._events import (
    EventHub,
    EventStream,
    EventStreamLagged,
    EventType,
    JobEvent,
    StoredEvent,
    event_record,
)
from ._payloads import inline_payloads
from ._ranges import check_fields
from ._store import StoreClient

if TYPE_CHECKING:
    from ._fanout import Fanout

__all__ = [
    "Broadcaster",
    "BroadcasterConfig",
    "Cursor",
    "JoinResult",
    "Outbox",
    "Subscription",
    "encode_batch",
]

log = logging.getLogger("jobspine.broadcaster")


@attrs.frozen
class Cursor:
    epoch: str
    seq: int


#: The :class:`BroadcasterConfig` limits for which 0 is a setting.
_ZERO_LIMITS = frozenset(
    {"backlog", "backlog_rooms", "backlog_bytes", "coalesce_after", "coalesce_bytes",
     "overflow_after", "overflow_bytes", "max_lags", "replay_bytes", "replay_total_bytes",
     "inline_payload_limit"}
)  # fmt: skip


@attrs.frozen
class BroadcasterConfig:
    #: Events kept in memory per room, for cheap replay after a short disconnect.
    backlog: int = 200
    #: Rooms whose backlog is kept (least recently active dropped first; their cursors are
    #: then served from the durable log).
    backlog_rooms: int = 2000
    #: Bytes all backlogs together may hold (each event counted as its encoded message plus
    #: :data:`BACKLOG_ENTRY_OVERHEAD` for the objects that hold it). Past it the least
    #: recently active rooms' backlogs are dropped first; the durable log serves them.
    backlog_bytes: int = 8 * 1024 * 1024
    #: Queued live events (or bytes of queued live events and skipped markers) on one
    #: connection past which its progress events are coalesced: those behind (queued before
    #: the current burst while its sender was sending, see :class:`Outbox`).
    coalesce_after: int = 256
    coalesce_bytes: int = 128 * 1024
    #: Queued live events (or bytes) past which the connection is told to resubscribe from
    #: its cursor (``lagged``); those held for a join that has not queued its replay yet
    #: count too.
    overflow_after: int = 4096
    overflow_bytes: int = 1024 * 1024
    #: Overflows within ``lag_window`` seconds that get a connection disconnected.
    max_lags: int = 3
    lag_window: float = 60.0
    #: Events read from the durable log per store request while replaying.
    page_size: int = 1000
    #: Bytes of missed events (their encoded messages) one connection has replayed and not
    #: yet read, at most: a join that would exceed it gets a snapshot reset
    #: (``cursor_too_far``) instead, so that no connection holds more than this of replays
    #: in memory (16 MiB: about 60,000 progress events).
    replay_bytes: int = 16 * 1024 * 1024
    #: Bytes of replays all connections together have queued and not read, at most: past it
    #: a join gets ``cursor_too_far`` too (what one user's 32 connections could otherwise
    #: hold is 32 times ``replay_bytes``).
    replay_total_bytes: int = 256 * 1024 * 1024
    #: Replays built at once, server-wide (each holds up to ``replay_bytes`` while it is
    #: built; one connection builds one at a time, and so does one user's rooms).
    replay_builds: int = 4
    #: An event ``data`` value whose JSON is larger than this (bytes) is sent as an
    #: ``{"$omitted": field, "size": bytes}`` marker; clients fetch it with ``get_payload``.
    inline_payload_limit: int = 16 * 1024

    def __attrs_post_init__(self) -> None:
        """Refuse, with :class:`InvalidInputError` naming it and its value, a number out of
        range: ``lag_window`` finite seconds above 0; ``page_size`` and ``replay_builds``
        integers from 1 (a replay reads a page and takes a build slot); every other limit an
        integer from 0 (0: nothing kept, or coalesced, lagged, omitted at once)."""
        check_fields(self, zero=_ZERO_LIMITS)


# Outbox entry kinds.
_CONTROL = 0  # a reply, error, heartbeat or lagged message
_LIVE = 1  # a live event: may be coalesced, counts towards the lag limits
_REPLAY = 2  # a replayed event: never coalesced
_SKIPPED = 3  # live progress events coalesced away: a skipped marker, sent in their place
_CLOSE = 4  # where the connection is to be closed: nothing after it is sent

# Entry fields (entries are lists, the cheapest mutable record): kind, encoded message (b""
# for a skipped marker, encoded when taken), job id, user id, seq, user seq, count (events a
# skipped marker stands for), bytes counted against the lag limit, and why a live event or
# marker is not behind (see :class:`Outbox`): _WAITED, the number of the burst it came in, or
# None (behind).
_KIND, _DATA, _JOB, _USER, _SEQ, _USER_SEQ, _COUNT, _SIZE, _MARK = range(9)
#: The mark of an entry queued while the sender waited: not behind until taken.
_WAITED = object()

#: An event message is ``_EVENT_HEAD + record + b"}"`` (see :meth:`Broadcaster.replayed`).
_EVENT_HEAD = b'{"type":"event","event":'
_RECORD_HEAD = b'{"job_id":'
_OMITTED = b'"$omitted"'
_BATCH_HEAD = b'{"type":"batch","messages":['
_BATCH_TAIL = b"]}"
#: A skipped marker's encoded size, beyond its ids, with room for 20-digit numbers.
_MARKER_OVERHEAD = len(b'{"type":"skipped","job_id":"","user_id":"","seq":,"user_seq":,"count":}')
_MARKER_OVERHEAD += 3 * 20


#: Bytes one backlog entry costs beyond its encoded message: the ``JobEvent`` with its ``data``
#: dict, the entry tuple and the deque slot, as measured with ``tracemalloc`` for a progress
#: event (``tests/test_broadcaster.py`` checks the estimate stays an upper bound).
BACKLOG_ENTRY_OVERHEAD = 512


class _TooFar(Exception):  # noqa: N818 - a join's outcome, caught in Broadcaster.join
    """The missed events are more than the connection's replay budget."""


def _cost(data: bytes) -> int:
    """What one backlog entry is counted as against ``backlog_bytes``."""
    return len(data) + BACKLOG_ENTRY_OVERHEAD


def lagged_message(rooms: list[str]) -> bytes:
    return orjson.dumps(
        {
            "type": "lagged",
            "rooms": rooms,
            "message": "events were dropped: subscribe again from your cursor",
        }
    )


def encode_batch(messages: list[bytes]) -> bytes:
    """One frame for ``messages``: the message itself when there is one, else a batch."""
    if len(messages) == 1:
        return messages[0]
    return _BATCH_HEAD + b",".join(messages) + _BATCH_TAIL


def _marker(entry: list[Any]) -> bytes:
    return orjson.dumps(
        {
            "type": "skipped",
            "job_id": entry[_JOB],
            "user_id": entry[_USER],
            "seq": entry[_SEQ],
            "user_seq": entry[_USER_SEQ],
            "count": entry[_COUNT],
        }
    )


class Outbox:
    """Encoded messages waiting for one connection's sender, in order. Sans-I/O apart from
    :meth:`wait`; only its owner awaits it.

    A connection that falls behind (more than ``coalesce_after`` live events or
    ``coalesce_bytes`` queued that its sender could not take at once) has a queued progress
    event replaced, *in place*, by a skipped marker when a newer progress event of the same
    job is queued; consecutive markers of one job with consecutive numbers become one marker
    with a ``count``. Past ``overflow_after`` live events or ``overflow_bytes`` (events and
    markers, all of them), its live and replayed events are dropped and ``lagged`` is queued;
    more than ``max_lags`` of those within ``lag_window`` seconds queue a close.

    Behind is what was queued before the current burst (the events the broadcaster publishes
    together, without a checkpoint: one commit's, or several) while the sender was busy
    sending. So neither a burst's own events (however many: one slow group commit publishes
    hundreds at once) nor those queued while the sender waits (from its call to :meth:`wait`
    to the :meth:`take` that hands them out, in as many frames as they need) count towards
    coalescing; the overflow limits count them, as everything queued.
    """

    def __init__(self, config: BroadcasterConfig | None = None) -> None:
        self.config = config or BroadcasterConfig()
        self._entries: deque[list[Any]] = deque()
        #: job id -> its newest queued live progress entry (the one a newer one supersedes).
        self._progress: dict[str, list[Any]] = {}
        self._live = 0  # queued live events, markers not included
        self._live_bytes = 0  # bytes of queued live events and markers
        #: The sender waits in :meth:`wait`: what is queued now is what it takes next.
        self._ready = False
        #: The current burst's number (see :meth:`push_event`).
        self._burst: int | None = None
        #: Queued live events, and bytes of live events and markers, that are not behind:
        #: marked _WAITED, and marked with the current burst. Invariant: their sums at most
        #: ``_live`` and ``_live_bytes``.
        self._waited_live = self._waited_bytes = 0
        self._burst_live = self._burst_bytes = 0
        self._replayed_bytes = 0  # bytes of queued replayed events
        self._control_bytes = 0  # bytes of queued control messages
        #: Live events (and their bytes) held for this connection's joins (see :meth:`hold`).
        self._held = 0
        self._held_bytes = 0
        #: Set by each take of messages (replaced by :meth:`wait_control` before it waits).
        self._taken = trio.Event()
        #: Bytes of the replays joined on this connection and not queued yet (see
        #: :meth:`Broadcaster.join`), and the lock its joins build their replays under.
        self.replay_reserved = 0
        self.replay_lock = trio.Lock()  # held by a join: the connection's joins run in turn
        self._wakeup = trio.Event()
        self._lag_times: deque[float] = deque()
        self.subscriptions: dict[str, Subscription] = {}
        #: Why the connection is to be closed once what was queued before is sent, or None.
        self.close_reason: str | None = None
        #: The close point was taken: everything queued before it has been handed out.
        self.closed = False
        self.delivered = 0
        self.coalesced = 0
        #: Times this connection fell behind and was told to resubscribe (``lagged``).
        self.lagged = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def queued_bytes(self) -> int:
        """Bytes of queued live events and skipped markers (what ``overflow_bytes`` bounds)."""
        return self._live_bytes

    @property
    def replay_bytes(self) -> int:
        """Bytes of replayed events queued or joined to be queued, not yet handed to the
        sender (what ``replay_bytes`` bounds, per connection)."""
        return self._replayed_bytes + self.replay_reserved

    @property
    def control_bytes(self) -> int:
        """Bytes of queued control messages: replies, errors, heartbeats, ``lagged``."""
        return self._control_bytes

    def push_control(self, data: bytes) -> None:
        self._control_bytes += len(data)
        self._entries.append([_CONTROL, data, None, None, 0, 0, 0, 0, None])
        self._wakeup.set()

    def close(self, reason: str) -> None:
        """Close the connection after what is queued now; later messages are never sent."""
        if self.close_reason is None:
            self.close_reason = reason
            self._entries.append([_CLOSE, b"", None, None, 0, 0, 0, 0, None])
            self._wakeup.set()

    def push_event(
        self, event: JobEvent | StoredEvent, data: bytes, *, live: bool, burst: int | None = None
    ) -> None:
        """Queue an event's message: ``live`` as published, else replayed. ``burst``: the
        number of the burst a live event comes in (a new number starts the next burst: the
        last one's events still queued are behind from then on); None, none (each event is
        on its own)."""
        mark: object = None
        if live:
            if burst != self._burst:
                self._burst = burst
                self._burst_live = self._burst_bytes = 0
            if self._ready:
                mark = _WAITED
                self._waited_live += 1
                self._waited_bytes += len(data)
            elif burst is not None:
                mark = burst
                self._burst_live += 1
                self._burst_bytes += len(data)
        entry = [
            _LIVE if live else _REPLAY,
            data,
            event.job_id,
            event.user_id,
            event.seq,
            event.user_seq,
            1,
            len(data),
            mark,
        ]
        if live:
            self._live += 1
            self._live_bytes += len(data)
            if isinstance(event, JobEvent) and event.type is EventType.PROGRESS:
                previous = self._progress.get(event.job_id)
                if previous is not None and (
                    self._live - self._waited_live - self._burst_live > self.config.coalesce_after
                    or self._live_bytes - self._waited_bytes - self._burst_bytes
                    > self.config.coalesce_bytes
                ):
                    self._coalesce(previous)
                self._progress[event.job_id] = entry
        else:
            self._replayed_bytes += len(data)
        self._entries.append(entry)
        if live and self._over():
            self._overflow()
            return
        self._wakeup.set()

    def hold(self, sub: Subscription, event: JobEvent, data: bytes) -> None:
        """Hold a live event for ``sub``, whose join has not queued its replay yet (it is queued
        after it, as replayed). Held events count towards the lag limits as queued live
        events do: however long the join waits, the connection holds no more."""
        sub.held.append((event, data))
        sub.held_live += 1
        sub.held_bytes += len(data)
        self._held += 1
        self._held_bytes += len(data)
        if self._over():
            self._overflow()

    def release(self, sub: Subscription) -> None:
        """``sub``'s held live events were queued or dropped."""
        self._held -= sub.held_live
        self._held_bytes -= sub.held_bytes
        sub.held_live = sub.held_bytes = 0

    def _over(self) -> bool:
        """Past the lag limits: queued and held live events, with markers' bytes."""
        return (
            self._live + self._held > self.config.overflow_after
            or self._live_bytes + self._held_bytes > self.config.overflow_bytes
        )

    def _coalesce(self, entry: list[Any]) -> None:
        """Turn a superseded progress event into a skipped marker where it stands, so that a
        client meets its numbers in order, before the event that supersedes it."""
        self._live -= 1
        self._live_bytes -= entry[_SIZE]
        self._unmark(entry, 1)
        self.coalesced += 1
        entry[_KIND] = _SKIPPED
        entry[_DATA] = b""
        entries = self._entries
        if len(entries) >= 2 and entries[-1] is entry:
            run = entries[-2]
            if (
                run[_KIND] == _SKIPPED
                and run[_JOB] == entry[_JOB]
                and run[_SEQ] + run[_COUNT] == entry[_SEQ]
                and run[_USER_SEQ] + run[_COUNT] == entry[_USER_SEQ]
            ):
                run[_COUNT] += 1
                entries.pop()
                return
        entry[_SIZE] = _MARKER_OVERHEAD + len(entry[_JOB]) + len(entry[_USER])
        self._live_bytes += entry[_SIZE]
        self._unmark(entry, 0, -entry[_SIZE])  # the marker is as much not behind

    def _unmark(self, entry: list[Any], events: int, size: int | None = None) -> None:
        """Take ``events`` and ``size`` bytes (the entry's own by default) off the count of
        what is not behind that ``entry`` is in, if any."""
        mark = entry[_MARK]
        size = entry[_SIZE] if size is None else size
        if mark is _WAITED:
            self._waited_live -= events
            self._waited_bytes -= size
        elif mark is not None and mark == self._burst:
            self._burst_live -= events
            self._burst_bytes -= size

    def _overflow(self) -> None:
        self.lagged += 1
        now = trio.current_time()
        self._lag_times.append(now)
        while self._lag_times and self._lag_times[0] < now - self.config.lag_window:
            self._lag_times.popleft()
        # Control messages and the close point stay; lagged goes right behind them.
        self._entries = deque(e for e in self._entries if e[_KIND] in (_CONTROL, _CLOSE))
        self._progress.clear()
        self._live = self._waited_live = self._burst_live = 0
        self._live_bytes = self._waited_bytes = self._burst_bytes = 0
        self._replayed_bytes = 0
        rooms = sorted(self.subscriptions)
        for sub in self.subscriptions.values():
            sub.suspended = True
            sub.held = []  # a join's finish queues none of it now
            self.release(sub)
        self.push_control(lagged_message(rooms))
        if len(self._lag_times) > self.config.max_lags:
            self.close("slow consumer: fell behind repeatedly")

    def take(self, max_bytes: int = 64 * 1024) -> list[bytes]:
        """The next messages, in order, whose frame (:func:`encode_batch`) is at most
        ``max_bytes`` long, or a single larger message; empty once nothing is queued or the
        close point is reached (then :attr:`closed` is set)."""
        messages: list[bytes] = []
        size = len(_BATCH_HEAD) + len(_BATCH_TAIL)
        entries = self._entries
        self._ready = False  # what comes next waits for this take's frame to be sent
        while entries:
            entry = entries[0]
            kind = entry[_KIND]
            if kind == _CLOSE:
                if not messages:
                    entries.popleft()
                    self.closed = True
                break
            data = _marker(entry) if kind == _SKIPPED else entry[_DATA]
            if messages and size + 1 + len(data) > max_bytes:
                break
            entries.popleft()
            if kind == _LIVE:
                self._live -= 1
                self._live_bytes -= entry[_SIZE]
                self._unmark(entry, 1)
                if self._progress.get(entry[_JOB]) is entry:
                    del self._progress[entry[_JOB]]
            elif kind == _SKIPPED:
                self._live_bytes -= entry[_SIZE]
                self._unmark(entry, 0)
            elif kind == _REPLAY:
                self._replayed_bytes -= len(data)
            elif kind == _CONTROL:
                self._control_bytes -= len(data)
            if data:
                messages.append(data)
                size += len(data) + 1
        if not entries:
            self._wakeup = trio.Event()
        self.delivered += len(messages)
        if messages:
            self._taken.set()
        return messages

    async def wait(self) -> None:
        """Return once something is queued. The sender is ready from the call to its next
        :meth:`take`: live events queued meanwhile do not count towards coalescing."""
        self._ready = True
        if not self._entries:
            await self._wakeup.wait()

    async def wait_control(self, limit: int) -> None:
        """Return once at most ``limit`` bytes of control messages are queued (those behind
        the close point never are: the connection ends first)."""
        while self._control_bytes > limit:
            self._taken = trio.Event()
            await self._taken.wait()


@attrs.define(eq=False)
class Subscription:
    room: str
    outbox: Outbox
    last_seq: int = 0
    replaying: bool = True
    suspended: bool = False
    held: list[tuple[JobEvent | StoredEvent, bytes]] = attrs.field(factory=list)
    #: The live events in ``held`` and their bytes (the history's are ``reserved``), counted
    #: in the outbox's lag limits until queued or dropped (:meth:`Outbox.hold`).
    held_live: int = 0
    held_bytes: int = 0
    #: Bytes of the history joined, counted in the outbox's ``replay_reserved`` until queued.
    reserved: int = 0
    #: The user the fan-out tracks for this subscription (cluster mode), once watched.
    user: str | None = None


@attrs.define(eq=False)
class _UserBuilds:
    """A user's replay builds: the one running and the ones waiting for it."""

    lock: trio.Lock = attrs.field(factory=trio.Lock)
    waiting: int = 0


@attrs.frozen
class JoinResult:
    room: str
    epoch: str
    head: int
    recovered: bool
    replayed: int
    reset_reason: str | None = None


def parse_room(room: object) -> tuple[str, str]:
    """``(kind, ident)`` of a room name ``job:<id>`` or ``user:<id>``. Raises
    :class:`InvalidInputError` for anything else, a name holding NUL among them (it names no
    job or user: see :func:`~._codec.check_name`)."""
    if isinstance(room, str):
        check_name(room, "room")
        kind, _, ident = room.partition(":")
        if kind in ("job", "user") and ident:
            return kind, ident
    raise InvalidInputError(f"room must be 'job:<id>' or 'user:<id>', not {shown(room)}")


def _room_seq(room_kind: str, event: JobEvent | StoredEvent) -> int:
    return event.seq if room_kind == "job" else event.user_seq


class Broadcaster:
    def __init__(
        self,
        store: StoreClient,
        hub: EventHub,
        config: BroadcasterConfig | None = None,
        fanout: Fanout | None = None,
    ) -> None:
        self.store = store
        self.hub = hub
        self.config = config or BroadcasterConfig()
        self.fanout = fanout
        if fanout is not None:
            fanout.deliver = self.publish_all
        self._rooms: dict[str, dict[Outbox, Subscription]] = {}
        self._backlogs: OrderedDict[str, deque[tuple[int, JobEvent, bytes]]] = OrderedDict()
        self._backlog_bytes = 0  # the backlogs' cost, see :func:`_cost`
        self._heads: dict[str, int] = {}
        #: The number of the burst being published (see :class:`Outbox`).
        self._burst = 0
        self._stream: EventStream | None = None
        self._idle = trio.Event()
        self.published = 0
        #: Outboxes that joined with a cursor: their replays count towards
        #: ``replay_total_bytes`` for as long as they live.
        self._replayers: weakref.WeakSet[Outbox] = weakref.WeakSet()
        self._builds = trio.CapacityLimiter(self.config.replay_builds)
        self._user_builds: dict[str, _UserBuilds] = {}

    @property
    def epoch(self) -> str:
        return self.store.epoch

    async def run(
        self, *, task_status: trio.TaskStatus[Broadcaster] = trio.TASK_STATUS_IGNORED
    ) -> None:
        async with self.store:
            if self.fanout is not None:
                # The fan-out delivers (publish_all); this actor only outlives it.
                task_status.started(self)
                await self.fanout.closed.wait()
                return
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
                            self._burst += 1
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
        if self.fanout is not None:
            await self.fanout.drained()
        elif self._stream is not None and self._stream.pending():
            self._idle = trio.Event()
            await self._idle.wait()

    def _lag_everyone(self) -> None:
        self._backlogs.clear()  # they may have gaps now
        self._backlog_bytes = 0
        outboxes = {o for subs in self._rooms.values() for o in subs}
        for outbox in outboxes:
            outbox._overflow()

    # -- live path (never awaits) ---------------------------------------------------------------

    def replayed(self, stored: StoredEvent) -> bytes:
        """The message of a logged event: :meth:`encode`'s bytes, built around the stored
        record without parsing it when the record has this runtime's layout (it starts with
        ``job_id`` and ends with its own ``user_seq``: what :func:`encode_event` writes) and
        the message needs nothing left out; else from the parsed event."""
        record = stored.record
        tail = b',"user_seq":%d}' % stored.user_seq
        if record.startswith(_RECORD_HEAD) and record.endswith(tail):
            data = _EVENT_HEAD + record + b"}"
            if len(data) <= self.config.inline_payload_limit and _OMITTED not in data:
                return data
        return self.encode(converter.structure(orjson.loads(record), JobEvent))

    def encode(self, event: JobEvent) -> bytes:
        """The event message, with each ``data`` value over the inline limit left out.

        Copied to an exact-size ``bytes``: orjson returns its output in a buffer of at least
        4 KiB that it does not shrink, so every message kept in a backlog or an outbox would
        hold 4 KiB (measured: 4,098 bytes held for a 142-byte message; 184 once copied)."""
        record = event_record(event)
        try:
            data = orjson.dumps({"type": "event", "event": record})
        except TypeError:  # a value only the converter knows how to write
            record = converter.unstructure(event)
            data = orjson.dumps({"type": "event", "event": record})
        limit = self.config.inline_payload_limit
        if len(data) > limit or _OMITTED in data:
            record["data"] = inline_payloads(record["data"], limit)
            data = orjson.dumps({"type": "event", "event": record})
        return bytes(memoryview(data))

    def publish_all(self, events: list[JobEvent]) -> None:
        """Publish ``events`` as one burst (see :class:`Outbox`)."""
        self._burst += 1
        for event in events:
            self.publish(event)

    def publish(self, event: JobEvent) -> None:
        data = self.encode(event)
        self.published += 1
        targets: dict[Outbox, None] = {}
        holding: list[Subscription] = []
        for room, seq in (
            (f"job:{event.job_id}", event.seq),
            (f"user:{event.user_id}", event.user_seq),
        ):
            if self.fanout is None:
                self._remember(room, seq, event, data)
            subs = self._rooms.get(room)
            if not subs:
                continue
            self._heads[room] = seq
            for sub in subs.values():
                if sub.suspended:
                    continue
                if sub.replaying:
                    holding.append(sub)
                elif seq > sub.last_seq:
                    sub.last_seq = seq
                    targets[sub.outbox] = None
        for outbox in targets:
            outbox.push_event(event, data, live=True, burst=self._burst)
        # Held after it is queued: a hold past the lag limits then comes after the event, as
        # the lagged of a push does (nothing of a room follows its lagged).
        for sub in holding:
            if not sub.suspended:
                sub.outbox.hold(sub, event, data)

    def _remember(self, room: str, seq: int, event: JobEvent, data: bytes) -> None:
        """Append to ``room``'s backlog, within the count per room, the rooms kept and the
        byte budget of all backlogs (least recently active rooms dropped first)."""
        backlogs = self._backlogs
        backlog = backlogs.get(room)
        if backlog is None:
            backlog = backlogs[room] = deque()
            if len(backlogs) > self.config.backlog_rooms:
                self._drop_backlog(next(iter(backlogs)))
        else:
            backlogs.move_to_end(room)
            if len(backlog) >= self.config.backlog:
                self._backlog_bytes -= _cost(backlog.popleft()[2])
        backlog.append((seq, event, data))
        self._backlog_bytes += _cost(data)
        while self._backlog_bytes > self.config.backlog_bytes:
            oldest = next(iter(backlogs))
            if oldest != room:
                self._drop_backlog(oldest)
            elif len(backlog) > 1:  # the only room left: its oldest events go
                self._backlog_bytes -= _cost(backlog.popleft()[2])
            else:
                break

    def _drop_backlog(self, room: str) -> None:
        dropped = self._backlogs.pop(room, None)
        if dropped:
            self._backlog_bytes -= sum(_cost(data) for _, _, data in dropped)

    @property
    def backlog_bytes(self) -> int:
        """Bytes the backlogs hold now, as counted against ``backlog_bytes``."""
        return self._backlog_bytes

    def head(self, room: str) -> int | None:
        return self._heads.get(room)

    # -- joining --------------------------------------------------------------------------------

    async def join(self, outbox: Outbox, room: str, cursor: Cursor | None) -> JoinResult:
        """Register ``outbox`` in ``room`` and work out what it missed.

        The caller queues its reply, then calls :meth:`finish_join` without awaiting in
        between, so the reply precedes the replayed events. A connection's joins run one at a
        time, each to its end: a later subscribe to the same room replaces this one only once
        its replay is queued (it then gets its own), and each sees the replays before it.
        """
        kind, ident = parse_room(room)
        async with outbox.replay_lock:
            return await self._join(outbox, room, kind, ident, cursor)

    async def _join(
        self, outbox: Outbox, room: str, kind: str, ident: str, cursor: Cursor | None
    ) -> JoinResult:
        self.leave(outbox, room)
        sub = Subscription(room, outbox)
        self._rooms.setdefault(room, {})[outbox] = sub
        outbox.subscriptions[room] = sub
        try:
            if self.fanout is not None:
                await self._track(self.fanout, sub, kind, ident)
            if kind == "job":
                job = await self.store.get(ident)
                head, user = job.seq, job.user_id
            else:
                head, user = await self.store.user_head(ident), ident
                if self.fanout is not None:
                    # Other nodes' commits may be ahead of this store's count; what the
                    # fan-out delivered is committed (in the log) and later events follow.
                    head = max(head, self.fanout.sequencer.head(ident) or 0)
            # Only for a room still joined: an unsubscribe served while this join waited
            # (requests of a connection run at once) emptied the room, and a head kept for
            # it then was never removed (one entry per room so left, for good).
            if outbox.subscriptions.get(room) is sub and self._heads.get(room, 0) < head:
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
            horizon = 0 if kind == "job" else await self.store.user_horizon(ident)
            history: list[tuple[JobEvent | StoredEvent, bytes]] | None = None
            if cursor.seq == head:
                history = []  # nothing missed (the usual reconnect): nothing to build
            elif cursor.seq >= horizon:
                # The budget is the connection's and the server's: replays not read yet count
                # (else subscribing again and again would queue a replay each time, or many
                # connections would each queue their own).
                async with self._building(user):
                    self._replayers.add(outbox)
                    queued = outbox.replay_bytes
                    everyone = sum(each.replay_bytes for each in self._replayers)
                    mine = self.config.replay_bytes - queued
                    budget = max(0, min(mine, self.config.replay_total_bytes - everyone))
                    try:
                        history = await self._history(kind, ident, room, cursor.seq, head, budget)
                    except _TooFar:
                        reason = (
                            f"cursor_too_far: the {head - cursor.seq} events after sequence"
                            f" {cursor.seq} are more than the {budget:,} bytes a replay may"
                            " hold now"
                        )
                        if budget < mine:
                            reason += " (the server holds many replays not read yet)"
                        elif queued:
                            reason += (
                                f" ({queued:,} of this connection's"
                                f" {self.config.replay_bytes:,} are taken by replays it has"
                                " not read yet)"
                            )
                        return JoinResult(room, epoch, head, False, 0, reason)
                    if outbox.subscriptions.get(room) is not sub:
                        # Left meanwhile (unsubscribed, or the connection closed): nothing
                        # will be sent, and nothing is reserved.
                        return JoinResult(room, epoch, head, recovered=True, replayed=0)
                    if history is not None:
                        sub.reserved = sum(len(data) for _, data in history)
                        outbox.replay_reserved += sub.reserved
            if history is None:
                # Retention removed events after the cursor (also when it happened during
                # this join): a replay would have holes, so the client gets a snapshot.
                horizon = max(horizon, await self.store.user_horizon(ident))
                reason = (
                    f"cursor_too_old: events after sequence {cursor.seq} (up to {horizon})"
                    " were removed by the retention policy"
                )
                return JoinResult(room, epoch, head, False, 0, reason)
            sub.held[:0] = history
            sub.last_seq = cursor.seq
            return JoinResult(room, epoch, head, recovered=True, replayed=len(history))
        except BaseException:
            if outbox.subscriptions.get(room) is sub:
                self.leave(outbox, room)
            raise

    @asynccontextmanager
    async def _building(self, user: str) -> AsyncIterator[None]:
        """Room to build a replay of ``user``'s rooms: one at a time per user, and
        ``replay_builds`` server-wide, so that one user's many connections cannot keep
        every other user's replays waiting."""
        entry = self._user_builds.get(user)
        if entry is None:
            entry = self._user_builds[user] = _UserBuilds()
        entry.waiting += 1
        try:
            async with entry.lock, self._builds:
                yield
        finally:
            entry.waiting -= 1
            if not entry.waiting:
                del self._user_builds[user]

    async def _track(self, fanout: Fanout, sub: Subscription, kind: str, ident: str) -> None:
        """Have the fan-out deliver the room's user's events: watched from now (held until
        started), started (if no other join did) at the user head read now, before the
        room's own head, so every event after the room's head reaches ``sub``."""
        user = ident if kind == "user" else (await self.store.get(ident)).user_id
        if sub.outbox.subscriptions.get(sub.room) is not sub:
            # Left while the job was read (an unsubscribe served meanwhile): its leave
            # unwatched nothing, so a watch now would never be undone, and the fan-out
            # would track the user, and read the log for it, for the life of the process.
            return
        fanout.watch(user)
        sub.user = user
        if not fanout.started(user):
            fanout.start(user, await self.store.user_head(user))

    async def _history(
        self, kind: str, ident: str, room: str, after: int, head: int, budget: int
    ) -> list[tuple[JobEvent | StoredEvent, bytes]] | None:
        """The room's events after ``after`` up to ``head``; None for a user room whose log
        has a hole there (``user_seq`` is gap-free but for what retention removed).
        :class:`_TooFar` once they are more than ``budget`` bytes."""
        if after >= head:
            return []
        backlog = self._backlogs.get(room)
        if backlog and backlog[0][0] <= after + 1:
            recent: list[tuple[JobEvent | StoredEvent, bytes]] = [
                (event, data) for seq, event, data in backlog if after < seq <= head
            ]
            if sum(len(data) for _, data in recent) > budget:
                raise _TooFar
            return recent
        history: list[tuple[JobEvent | StoredEvent, bytes]] = []
        size = 0
        while after < head:
            page = await self.store.read_records(kind, ident, after, self.config.page_size)
            if not page:
                break
            for event in page:
                seq = _room_seq(kind, event)
                if seq > head:
                    break
                if kind == "user" and seq != after + 1:
                    return None
                data = self.replayed(event)
                size += len(data)
                if size > budget:
                    raise _TooFar
                history.append((event, data))
                after = seq
            else:
                continue
            break
        if kind == "user" and after < head:
            return None
        return history

    def forget(self, job_ids: Iterable[str]) -> None:
        """Drop the backlogs of pruned jobs' rooms (a user room's backlog stays valid: a
        cursor it could serve is at or past the user's horizon, see :meth:`join`)."""
        for job_id in job_ids:
            self._drop_backlog(f"job:{job_id}")

    def finish_join(self, outbox: Outbox, room: str) -> None:
        """Queue the history and the events held during the join, in order, once each."""
        sub = outbox.subscriptions.get(room)
        if sub is None or not sub.replaying:
            return
        outbox.replay_reserved -= sub.reserved  # queued now (or dropped), counted as such
        sub.reserved = 0
        outbox.release(sub)
        if sub.suspended:
            # The connection lagged during the join: the client ignored that ``lagged`` (the
            # room was not live until the reply just queued), so it is told again, after it.
            sub.held = []
            sub.replaying = False
            outbox.push_control(lagged_message([room]))
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
        outbox.replay_reserved -= sub.reserved
        sub.reserved = 0
        outbox.release(sub)
        if sub.user is not None and self.fanout is not None:
            self.fanout.unwatch(sub.user)
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
