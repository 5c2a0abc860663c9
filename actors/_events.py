"""Job events and the in-process event stream that publishes them after each commit."""

from __future__ import annotations

import enum
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, NamedTuple

import attrs
import orjson
import trio

from ._codec import converter
from ._errors import JobspineError, shown
from ._states import JobState

__all__ = [
    "EVENT_OVERHEAD",
    "STREAM_BYTES",
    "EventHub",
    "EventStream",
    "EventStreamLagged",
    "EventType",
    "JobEvent",
    "StoredEvent",
    "encode_event",
    "event_bytes",
    "event_record",
]


class EventType(enum.StrEnum):
    CREATED = "created"
    STARTED = "started"
    PROGRESS = "progress"
    CHECKPOINT = "checkpoint"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    PAUSED = "paused"
    RESUMED = "resumed"
    RESTARTED = "restarted"
    RECOVERY = "recovery"
    RETRYING = "retrying"
    DELETED = "deleted"


#: Event types that record a person's (or the system's) decision: the audit trail.
AUDIT_TYPES = frozenset(
    {EventType.PAUSED, EventType.RESUMED, EventType.CANCELLED, EventType.RESTARTED}
)


@attrs.frozen
class JobEvent:
    """One change of one job.

    ``seq`` counts a job's events from 1 with no gap, ``user_seq`` counts all events of the
    job's user likewise; both are assigned in the same transaction as the change, so they
    survive restarts and cursors on them stay valid.
    """

    job_id: str
    user_id: str
    seq: int
    type: EventType
    state: JobState
    at: float
    data: dict[str, Any] = attrs.field(factory=dict)
    actor: str | None = None
    user_seq: int = 0


class StoredEvent(NamedTuple):
    """An event as the durable log holds it: its numbers, and ``record``, the UTF-8 JSON that
    :func:`encode_event` wrote, unparsed (what a replay sends)."""

    job_id: str
    user_id: str
    seq: int
    user_seq: int
    record: bytes


def event_record(event: JobEvent) -> dict[str, Any]:
    """The event as ``converter.unstructure`` writes it, for ``orjson``, without copying
    ``data`` (its values are JSON already; orjson writes the enums as their values). A third
    of the CPU of encoding an event (for its clients, and for the database)."""
    return {
        "job_id": event.job_id,
        "user_id": event.user_id,
        "seq": event.seq,
        "type": event.type,
        "state": event.state,
        "at": event.at,
        "data": event.data,
        "actor": event.actor,
        "user_seq": event.user_seq,
    }


def encode_event(event: JobEvent) -> bytes:
    """The event's JSON record as stored (what ``converter.unstructure`` and orjson write,
    byte for byte): :func:`event_record`, or the converter for a value orjson alone cannot
    write (``TypeError``)."""
    try:
        return orjson.dumps(event_record(event))
    except TypeError:
        return orjson.dumps(converter.unstructure(event))


_structure_event_checked = converter.get_structure_hook(JobEvent)
_EVENT_TYPES = {member.value: member for member in EventType}
_STATES = {member.value: member for member in JobState}
_is_str = str.__instancecheck__  # what the strict str hook accepts (subclasses too)


def _structure_event(record: Any, _: type) -> JobEvent:
    """:class:`JobEvent` from its record, with the generated hook's strict checks written out:
    every replayed, read or received event goes through here. A record
    the checks do not pass goes through the generated hook, which raises its detailed error."""
    try:
        data = record.get("data", {})
        actor = record.get("actor")
        user_seq = record.get("user_seq", 0)
        job_id, user_id, seq = record["job_id"], record["user_id"], record["seq"]
        at, type_, state = record["at"], record["type"], record["state"]
        if (
            type(job_id) is str
            and type(user_id) is str
            and type(seq) is int
            and type(user_seq) is int
            and (type(at) is float or type(at) is int)
            and type(type_) is str
            and type(state) is str
            and (actor is None or type(actor) is str)
            and type(data) is dict
            and all(map(_is_str, data))
        ):
            return JobEvent(
                job_id,
                user_id,
                seq,
                _EVENT_TYPES[type_],
                _STATES[state],
                float(at),
                dict(data),
                actor,
                user_seq,
            )
    except (AttributeError, KeyError, ValueError, OverflowError):
        pass
    return _structure_event_checked(record, JobEvent)  # type: ignore[no-any-return]


converter.register_structure_hook(JobEvent, _structure_event)


class EventStreamLagged(JobspineError):  # noqa: N818 - reads as a state
    """The consumer fell more than its buffer behind; re-read the durable log from its cursor."""

    code = "lagged"


#: What one buffered event costs against a subscriber's byte budget beyond its data's JSON:
#: the ``JobEvent``, its ``data`` dict and values, the channel's slot, as measured with
#: ``tracemalloc`` for a progress event (``tests/test_events_budget.py`` keeps it an upper
#: bound).
EVENT_OVERHEAD = 768

#: Each subscriber's byte budget by default (:meth:`EventHub.subscribe`).
STREAM_BYTES = 64 * 2**20


def event_bytes(event: JobEvent) -> int:
    """What ``event`` is counted as against a stream's ``max_bytes``: :data:`EVENT_OVERHEAD`
    plus its ``data`` as JSON."""
    try:
        return EVENT_OVERHEAD + len(orjson.dumps(event.data))
    except TypeError:  # a value only the converter knows how to write
        return EVENT_OVERHEAD + len(orjson.dumps(converter.unstructure(event.data)))


class EventStream:
    """An async iterator of events published after it was opened.

    ``max_bytes``: what its buffered events may cost in all (:func:`event_bytes`) before it
    is cut off; ``queued_bytes``: what they cost now."""

    def __init__(
        self, receive: trio.MemoryReceiveChannel[tuple[JobEvent, int]], max_bytes: int
    ) -> None:
        self._receive = receive
        self.lagged = False
        self.max_bytes = max_bytes
        self.queued_bytes = 0
        # Events buffered: counted here, as the channel's statistics() builds an object per
        # call (the broadcaster asks once per event).
        self._queued = 0

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> JobEvent:
        try:
            event, cost = await self._receive.receive()
        except trio.EndOfChannel:
            if self.lagged:
                # "buffer overflowed" said neither which bound nor what to do about it.
                buffer = self._receive.statistics().max_buffer_size
                raise EventStreamLagged(
                    f"event stream cut off: its reader fell more than {buffer:g} events or"
                    f" {self.max_bytes:,} bytes behind (events(buffer=, max_bytes=) set"
                    " them); what it missed is in each job's durable log:"
                    " read_events(job_id, after_seq=the last seq read)"
                ) from None
            raise StopAsyncIteration from None
        self._queued -= 1
        self.queued_bytes -= cost
        return event

    def pending(self) -> int:
        """Events buffered and not yet received."""
        return self._queued

    def receive_nowait(self) -> JobEvent:
        event, cost = self._receive.receive_nowait()
        self._queued -= 1
        self.queued_bytes -= cost
        return event


class EventHub:
    """Fans committed events out to subscribers without ever blocking the publisher.

    A subscriber whose buffer is full (its count, or its byte budget) is cut off (its stream
    raises :class:`EventStreamLagged` once it has read what was buffered) rather than slowing
    the store down: the durable event log lets it catch up.
    """

    def __init__(self) -> None:
        self._subscribers: dict[trio.MemorySendChannel[tuple[JobEvent, int]], EventStream] = {}
        #: Closed with the runtime: nothing is published any more.
        self.closed = False

    def publish(self, events: list[JobEvent]) -> None:
        if not self._subscribers:
            return
        costs = [event_bytes(event) for event in events]
        total = sum(costs)
        for send, stream in list(self._subscribers.items()):
            sent = 0
            try:
                # A stream with nothing buffered takes a commit's events whatever they
                # weigh: a subscriber that keeps up is never cut off (one commit of large
                # results would cut every one of them off, each time).
                if stream.queued_bytes and stream.queued_bytes + total > stream.max_bytes:
                    raise trio.WouldBlock
                for item in zip(events, costs, strict=True):
                    send.send_nowait(item)
                    sent += 1
                stream.queued_bytes += total
            except trio.WouldBlock:
                stream.lagged = True
                del self._subscribers[send]
                send.close()
            except trio.BrokenResourceError:
                del self._subscribers[send]
            stream._queued += sent

    def close(self) -> None:
        self.closed = True
        for send in self._subscribers:
            send.close()
        self._subscribers.clear()

    @asynccontextmanager
    async def subscribe(
        self, buffer: int | float = 10_000, max_bytes: int = STREAM_BYTES
    ) -> AsyncIterator[EventStream]:
        """A stream of every event published from now on; ``buffer`` events and ``max_bytes``
        (:func:`event_bytes`) at most waiting to be read, else it is cut off. A commit's events
        are taken whole by a stream with nothing waiting, however much they weigh."""
        if buffer != math.inf:
            buffer = int(buffer)
        if not max_bytes > 0:  # NaN too: it would bound nothing
            raise ValueError(f"max_bytes must be > 0, got {shown(max_bytes)}")
        send, receive = trio.open_memory_channel[tuple[JobEvent, int]](buffer)
        stream = EventStream(receive, max_bytes)
        if self.closed:
            send.close()  # nothing will be published: the stream ends at once
        else:
            self._subscribers[send] = stream
        async with receive:
            try:
                yield stream
            finally:
                self._subscribers.pop(send, None)
                send.close()
