"""Python client: requests, live events with exactly-once delivery across reconnects.

    async with open_client("ws://127.0.0.1:8765", token) as client:
        job = await client.create("research", {"query": "trio"})
        await client.subscribe(f"job:{job['id']}")
        async for item in client.events():
            ...  # JobEvent, or Reset when the server could not prove continuity

The client keeps a cursor (epoch, sequence) per room. After a disconnect it reconnects with a
jittered exponential backoff (:class:`ReconnectPolicy`: reset only after a connection stayed
healthy; closes that would recur wait the full backoff; fatal ones raise) and resubscribes
from its cursors; events already seen are dropped by sequence number; a gap (or a heartbeat
head beyond the cursor) triggers a resubscription from the cursor, which replays what was
missed. A refused resubscription is retried with backoff until it succeeds, but for the
refusals no retry can change (``unknown_job``: the server came back on another database, or
pruned the job): the room is then dropped and :meth:`Client.events` hands out a
:class:`RoomRefused`.

A connection the client will not recover (a fatal close: :class:`ClientError`
``auth_failed``, ``token_expired``...; with ``reconnect=False``, any lost connection:
:class:`ConnectionLostError`) ends the client: :meth:`Client.events` raises the error once
the events received before it are handed out, so a loop over the events never ends as if
its job had; requests raise it; the ``open_client`` block is cancelled and raises it.
Leaving the block ends the events without an error.

Payloads larger than the server's inline limit arrive as ``{"$omitted": field, "size": n}``
markers (:func:`is_omitted`); :meth:`Client.get_payload` fetches them.
"""

from __future__ import annotations

import inspect
import logging
import math
import secrets
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import attrs
import orjson
import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    HandshakeError,
    WebSocketConnection,
    open_websocket_url,
)

from actors import JobEvent
from actors._codec import converter
from actors._errors import leaves, shown, unwrap_group
from actors._payloads import is_marker

from ._reconnect import FATAL_CLOSE, RECURRING_CLOSE, ReconnectPolicy

__all__ = [
    "Client",
    "ClientError",
    "ClientStats",
    "ConnectionLostError",
    "Reset",
    "RoomCursor",
    "RoomRefused",
    "is_omitted",
    "new_key",
    "open_client",
]

log = logging.getLogger("jobspine.client")

#: Largest message accepted from the server by default: twice the server's default
#: ``max_message_size`` (2 MiB), which no message it sends exceeds.
MAX_MESSAGE = 4 * 1024 * 1024


def new_key() -> str:
    """A fresh idempotency key: 128 random bits (the default of :meth:`Client.create` and
    ``jobspine submit``), 32 hex digits: never starting with ``-``, so that the re-run
    ``jobspine submit`` prints (``--idempotency-key KEY``) parses."""
    return secrets.token_hex(16)


def is_omitted(value: object) -> bool:
    """True for a payload the server left out of a message (``{"$omitted": field, "size":
    bytes}``); fetch it with :meth:`Client.get_payload`."""
    return is_marker(value)


def _not_finite(value: Any, path: str) -> str | None:
    """Where ``value`` holds NaN or an infinity (a float, or a subclass such as numpy's
    float64), None if nowhere. orjson encodes each as ``null``: sent so, a ``delay`` of NaN
    was no delay and a ``timeout`` of infinity the kind's, silently. Walked only once orjson
    has encoded the value, so its nesting is bounded."""
    if isinstance(value, float):
        return None if math.isfinite(value) else path
    items: Any = ()
    if isinstance(value, dict):
        items = ((f"{path}.{key}", item) for key, item in value.items())
    elif isinstance(value, list | tuple):
        items = ((f"{path}[{index}]", item) for index, item in enumerate(value))
    for where, item in items:
        found = _not_finite(item, where)
        if found is not None:
            return found
    return None


#: What a close without a reason means, in a user's words.
_UNSAID = {
    1006: "the connection dropped without a close frame (the server stopped or the network failed)",
    1001: "the server is going away",
}


def _problem(exc: BaseException) -> str:
    """Why a connection attempt failed, in a user's words (trio-websocket's own say little:
    ``HandshakeError()``)."""
    if isinstance(exc, ConnectionRejected):
        return f"it answered HTTP {exc.status_code}, not a websocket"
    if isinstance(exc, HandshakeError):  # wraps the OSError of the TCP connection
        return "refused, unreachable or no such host"
    if isinstance(exc, ConnectionClosed):
        code = exc.reason.code if exc.reason is not None else 1006
        said = exc.reason.reason if exc.reason is not None else None
        return f"closed with {code}: {said or _UNSAID.get(code, 'no reason given')}"
    return str(exc) or type(exc).__name__


class ClientError(Exception):
    """An error reply from the server, or a failure of the connection."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class ConnectionLostError(ClientError):
    """The connection ended; ``close_code`` is the websocket close code when there was one
    (1006: it dropped, the server died or the network failed; 1001: the server shut down).
    Raised by a request; with ``reconnect=False``, by :meth:`Client.events`,
    :meth:`Client.run` and ``open_client``'s block too."""

    def __init__(
        self, message: str = "the connection was lost", close_code: int | None = None
    ) -> None:
        super().__init__("connection_lost", message)
        self.close_code = close_code


@attrs.frozen
class RoomCursor:
    epoch: str
    seq: int


@attrs.frozen
class Reset:
    """The server could not replay what this room missed: re-read state from ``snapshot``."""

    room: str
    reason: str
    snapshot: Any
    cursor: RoomCursor


#: Refusals of a (re)subscription that a retry cannot change (as the dashboard has them): the
#: room names no job of this user on this server, or is not a room.
PERMANENT_REFUSALS = frozenset({"unknown_job", "forbidden", "invalid_input", "bad_request"})


@attrs.frozen
class RoomRefused(Reset):
    """The server refused to resubscribe ``room`` for good (``reason``: the refusal's code,
    one of :data:`PERMANENT_REFUSALS`; ``unknown_job``: the job is not on this server any
    more, which came back on another database or removed it), so the room is no longer
    followed: a :class:`Reset` with no snapshot (re-reading the state gets the refusal too).
    ``cursor`` is where the room was, ``server_epoch`` the server's epoch now."""

    error: ClientError
    server_epoch: str | None


@attrs.define
class _Room:
    #: What has been received (for duplicate and gap detection).
    cursor: RoomCursor | None
    #: What the application has taken from :meth:`Client.events`: where to resume from.
    consumed: RoomCursor | None = None
    #: Where the room became live (its head or the cursor it was joined from; a reset's
    #: head): every number past it up to ``cursor`` was handed out (or covered by a
    #: skipped marker).
    since: int | None = None
    #: Events are ignored until a (re)subscription is answered.
    resyncing: bool = True
    #: A task is resubscribing this room (retrying, with backoff, until it is answered).
    resync_pending: bool = False
    #: Resubscriptions refused in a row, and the last refusal.
    resync_failures: int = 0
    resync_error: str | None = None


#: An item of the event buffer: what :meth:`Client.events` hands out, and up to two rooms it
#: was next in with where each stands once it is taken (``cursor(room)`` moves then, in the
#: room's order). One flat tuple: a buffer of thousands of events is that many objects more
#: for the garbage collector to scan, not four times as many.
_Taken = tuple[JobEvent | Reset, _Room | None, RoomCursor | None, _Room | None, RoomCursor | None]


@attrs.define(eq=False)
class _Pending:
    done: trio.Event = attrs.field(factory=trio.Event)
    result: Any = None
    error: ClientError | None = None
    on_reply: Callable[[Any], Reset | None] | None = None


@attrs.define
class ClientStats:
    """Counters of one client. Delays are seconds."""

    #: Hellos answered.
    connects: int = 0
    duplicates: int = 0
    gaps: int = 0
    resets: int = 0
    delivered: int = 0
    #: Reconnections scheduled after a connection (or an attempt) ended, the delay before the
    #: last one, their sum, and why the last connection ended.
    reconnects: int = 0
    last_delay: float = 0.0
    total_delay: float = 0.0
    last_problem: str | None = None
    #: Resubscriptions refused (each was retried).
    resync_failures: int = 0
    #: Creates sent again, with their idempotency key, after the connection was lost.
    create_retries: int = 0
    #: Events (and resets) not taken because the event buffer was full: their rooms were
    #: resubscribed from their cursors once the application had taken half the buffer.
    buffer_full: int = 0
    #: Progress events the server coalesced away (the counts of its skipped markers: a later
    #: progress event of the same job superseded each), and ``lagged`` messages received
    #: (their rooms were resubscribed from their cursors). Both mean the connection fell
    #: behind (PROTOCOL.md, *Slow consumers*).
    skipped: int = 0
    lagged: int = 0


class Client:
    def __init__(
        self,
        url: str,
        token: str | Callable[[], str],
        *,
        reconnect: bool = True,
        min_backoff: float = 0.05,
        max_backoff: float = 10.0,
        healthy_after: float = 10.0,
        request_timeout: float = 30.0,
        event_buffer: int = 10_000,
        max_message_size: int = MAX_MESSAGE,
    ) -> None:
        """``token``: a JWT, or a callable minting one (called for each connection; with one,
        an expired token (4004) is a reconnect, not a fatal error; one that raises, or a
        token that is not a str, fails the client with ``auth_failed``). Backoffs and
        ``healthy_after`` (how long a connection must stay up to reset the backoff) are
        seconds; ``max_message_size`` is the largest message accepted from the server.
        ``reconnect=False``: the first lost connection ends the client, with
        :class:`ConnectionLostError` from :meth:`run`, :meth:`events` and every request.

        ``event_buffer``: events (and resets) received and not yet taken from
        :meth:`events`. The connection is read whatever the application does with them, so
        replies keep coming: an event that finds the buffer full is left out and its rooms
        are resubscribed from their cursors once the application has taken half the buffer
        (the server replays what they missed, or resets them), each still once and in
        order (``counters.buffer_full``)."""
        self.url = url
        self._token = token
        self.reconnect = reconnect
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self.policy = ReconnectPolicy(min_backoff, max_backoff, healthy_after)
        self.request_timeout = request_timeout
        self.max_message_size = max_message_size
        self.rooms: dict[str, _Room] = {}
        self.counters = ClientStats()
        self.welcome: dict[str, Any] = {}
        self._ws: WebSocketConnection | None = None
        self._connected = trio.Event()
        self._pending: dict[int, _Pending] = {}
        self._next_id = 0
        self._send_events, self._receive_events = trio.open_memory_channel[_Taken](event_buffer)
        #: Set by :meth:`events` once the buffer is at most half full, while a resubscription
        #: waits for room (:meth:`_buffer_room`); None when none waits.
        self._room_in_buffer: trio.Event | None = None
        self._half_buffer = event_buffer // 2
        self._nursery: trio.Nursery | None = None
        self._fatal: ClientError | None = None
        #: The fatal close that ended :meth:`run` (``auth_failed``, ``token_expired``...).
        self._failure: ClientError | None = None
        #: Why the client stopped when the application did not stop it (a fatal close, a
        #: lost connection with reconnect off): what run() raised, and events() raises once
        #: drained (the same object: open_client's block raises it once, not as a group).
        self._lost: ClientError | None = None
        self._connected_once = False

    @property
    def failure(self) -> ClientError | None:
        """The fatal error that ended the client (``auth_failed``, ``token_expired`` with a
        fixed token, ``protocol_error``, ``wrong_role``: reconnecting cannot help), else None.
        :meth:`events` raises it once the events received before it are handed out; this
        says whether the client ended on such a refusal rather than being closed or cut off
        (with ``reconnect=False``: :class:`ConnectionLostError`, not kept here)."""
        return self._failure

    # -- connection -----------------------------------------------------------------------------

    def _current_token(self) -> str:
        """The token for a hello: a token callable that raised, or a token that is not a str
        (bytes, None, an ``async def``'s coroutine), is a fatal ``auth_failed``."""
        try:
            token: object = self._token() if callable(self._token) else self._token
        except Exception as exc:
            raise ClientError(
                "auth_failed", f"no token: the token callable raised {type(exc).__name__}: {exc}"
            ) from exc
        if isinstance(token, str):
            return token
        if inspect.iscoroutine(token):
            token.close()  # never awaited: closed, so no warning about it
            raise ClientError(
                "auth_failed", "the token callable is async: it must return a str (a JWT)"
            )
        raise ClientError(
            "auth_failed", f"the token must be a str (a JWT), not {type(token).__name__}"
        )

    async def run(self, *, task_status: trio.TaskStatus[Client] = trio.TASK_STATUS_IGNORED) -> None:
        """Stay connected until cancelled; ``started`` after the first successful hello.

        Raises :class:`ClientError` for a fatal close (``auth_failed``, ``protocol_error``,
        ``token_expired`` with a fixed token); with ``reconnect`` off,
        :class:`ConnectionLostError` when the connection is lost or the first one failed.
        The same error is raised by :meth:`events` and by requests."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                try:
                    while True:
                        problem = "the connection ended"
                        close_code: int | None = None
                        try:
                            await self._connect_once(task_status)
                        except ConnectionLostError as exc:
                            problem, close_code = exc.message, exc.close_code
                        except ClientError as exc:
                            self._fatal = self._failure = self._lost = exc
                            self._fail_pending(exc)
                            raise
                        except (
                            OSError,
                            HandshakeError,
                            ConnectionClosed,
                            trio.BrokenResourceError,
                        ) as exc:
                            problem = _problem(exc)
                        if not self.reconnect:
                            if not self._connected_once:
                                self._fatal = ConnectionLostError(f"could not connect: {problem}")
                                raise self._fatal
                            self._fatal = self._lost = ConnectionLostError(
                                f"disconnected (reconnect is off): {problem}", close_code
                            )
                            self._fail_pending(self._fatal)
                            raise self._fatal
                        self._fail_pending(ConnectionLostError())
                        delay = self.policy.next_delay(trio.current_time(), close_code)
                        stats = self.counters
                        stats.reconnects += 1
                        stats.last_delay = delay
                        stats.total_delay += delay
                        stats.last_problem = problem
                        level = logging.WARNING if close_code in RECURRING_CLOSE else logging.INFO
                        log.log(level, "not connected (%s); retrying in %.2f s", problem, delay)
                        await trio.sleep(delay)
                finally:
                    # Closed at once: the checkpoint of an `async with` on the channel, met
                    # while the application was leaving the block, raised Cancelled in place
                    # of a fatal error, which was lost (the block then exited normally).
                    self._send_events.close()
        finally:
            # Ended (left open_client, cancelled, a fatal close, reconnect off): a request in
            # flight or made from now on fails at once, not after waiting out request_timeout.
            if self._fatal is None:
                self._fatal = ConnectionLostError("the client is closed")
            self._fail_pending(self._fatal)
            self._connected.set()

    async def _connect_once(self, task_status: trio.TaskStatus[Client]) -> None:
        async with open_websocket_url(self.url, max_message_size=self.max_message_size) as ws:
            try:
                await ws.send_message(
                    orjson.dumps({"op": "hello", "id": 0, "token": self._current_token()}).decode()
                )
                reply = orjson.loads(await ws.get_message())
            except ConnectionClosed as exc:
                raise self._close_error(exc) from None
            if reply.get("type") != "reply":
                raise ClientError(reply.get("code", "protocol_error"), reply.get("message", ""))
            self.welcome = reply["result"]
            if self.welcome.get("max_message_size", 0) > self.max_message_size:
                log.warning(
                    "the server may send messages of %s bytes, over this client's limit of %s",
                    self.welcome["max_message_size"],
                    self.max_message_size,
                )
            self.counters.connects += 1
            self.policy.connected(trio.current_time())
            self._ws = ws
            self._connected.set()
            try:
                for room in self.rooms:
                    self._resync(room)
                if not self._connected_once:
                    self._connected_once = True
                    task_status.started(self)
                await self._read_loop(ws)
            finally:
                self._ws = None
                self._connected = trio.Event()

    def _close_error(self, exc: ConnectionClosed) -> ClientError:
        """A fatal close as its typed error; any other as :class:`ConnectionLostError`."""
        code = exc.reason.code if exc.reason is not None else 1006
        reason = (exc.reason.reason if exc.reason is not None else None) or _UNSAID.get(code, "")
        refreshable = code == 4004 and callable(self._token)  # the next hello gets a new one
        if code in FATAL_CLOSE and not refreshable:
            return ClientError(FATAL_CLOSE[code], f"closed with {code}: {reason}")
        return ConnectionLostError(f"closed with {code}: {reason}", close_code=code)

    async def _read_loop(self, ws: WebSocketConnection) -> None:
        while True:
            try:
                frame = await ws.get_message()
            except ConnectionClosed as exc:
                raise self._close_error(exc) from None
            message = orjson.loads(frame)
            if message.get("type") == "batch":
                for inner in message["messages"]:
                    self._dispatch(inner)
            else:
                self._dispatch(message)

    def _dispatch(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "event":
            self._on_event(message["event"])
        elif kind == "skipped":
            self._on_skipped(message)
        elif kind in ("reply", "error"):
            pending = self._pending.pop(message.get("id"), None)  # type: ignore[arg-type]
            if pending is None:
                log.warning("unexpected %s: %s", kind, message)
                return
            if kind == "error":
                pending.error = ClientError(message["code"], message["message"])
            else:
                pending.result = message["result"]
                if pending.on_reply is not None:
                    reset = pending.on_reply(pending.result)
                    if reset is not None:
                        # Before the events after the reply; _joined made sure of room.
                        state = self.rooms.get(reset.room)
                        self._send_events.send_nowait((reset, state, reset.cursor, None, None))
            pending.done.set()
        elif kind == "heartbeat":
            for room, head in message.get("heads", {}).items():
                state = self.rooms.get(room)
                if state is None or state.resyncing or state.cursor is None:
                    continue
                if head > state.cursor.seq:
                    self.counters.gaps += 1
                    self._resync(room)
        elif kind == "lagged":
            self.counters.lagged += 1
            for room in message.get("rooms", ()):
                if room in self.rooms:
                    self._resync(room)

    def _on_skipped(self, data: dict[str, Any]) -> None:
        """``count`` coalesced events, numbered from ``seq`` / ``user_seq``: advance over them
        like over events (a later event of the job supersedes them)."""
        count = data["count"]
        self.counters.skipped += count
        for room, first in (
            (f"job:{data['job_id']}", data["seq"]),
            (f"user:{data['user_id']}", data["user_seq"]),
        ):
            state = self.rooms.get(room)
            if state is None or state.resyncing or state.cursor is None:
                continue
            last = first + count - 1
            if last <= state.cursor.seq:
                continue
            if first <= state.cursor.seq + 1:
                state.cursor = RoomCursor(state.cursor.epoch, last)
            else:
                self.counters.gaps += 1
                self._resync(room)

    def _on_event(self, data: dict[str, Any]) -> None:
        """Take an event into the buffer if it is the next of a room it belongs to. Never
        waits: the read loop serves replies too, whatever the application does with events
        (it used to wait for room in a full buffer, and every request then timed out)."""
        # The rooms it is the next event of, and their cursors past it.
        advanced: list[tuple[_Room, RoomCursor]] = []
        handed_out = False
        for room, seq in (
            (f"job:{data['job_id']}", data["seq"]),
            (f"user:{data['user_id']}", data["user_seq"]),
        ):
            state = self.rooms.get(room)
            if state is None or state.cursor is None:
                continue
            if seq <= state.cursor.seq:
                # Handed out through this room (a resyncing one too: its numbers up to its
                # cursor stand) if it is past where the room became live on this server.
                if (
                    state.since is not None
                    and seq > state.since
                    and state.cursor.epoch == self.welcome.get("epoch")
                ):
                    handed_out = True
                continue
            if state.resyncing:
                continue
            if seq == state.cursor.seq + 1:
                advanced.append((state, RoomCursor(state.cursor.epoch, seq)))
            else:
                self.counters.gaps += 1
                self._resync(room)
        if handed_out or not advanced:
            # Not new to the application: a repeat in each room, or the replay of a room
            # resubscribed after the other room of the event handed it out.
            self.counters.duplicates += 1
            for state, cursor in advanced:
                state.cursor = cursor
            return
        try:
            # No checkpoint per event (a replay of thousands arrives in a few frames): the
            # reader yields once per frame, in get_message.
            first, cursor = advanced[0]
            second, then = advanced[1] if len(advanced) > 1 else (None, None)
            event = converter.structure(data, JobEvent)
            self._send_events.send_nowait((event, first, cursor, second, then))
        except trio.WouldBlock:
            # Left out, cursors unmoved: each room it was next in resubscribes from there
            # once the application has made room, and gets it again.
            self.counters.buffer_full += 1
            for room in (f"job:{data['job_id']}", f"user:{data['user_id']}"):
                if any(self.rooms.get(room) is state for state, _ in advanced):
                    self._resync(room)
            return
        self.counters.delivered += 1
        for state, cursor in advanced:
            state.cursor = cursor

    # -- requests -------------------------------------------------------------------------------

    async def request(self, op: str, **fields: Any) -> Any:
        """Send ``{"op": op, "id": ..., **fields}`` and return the reply's result; raises
        :class:`ClientError` for an error reply. ``id`` is the client's own: it routes the
        reply to this call."""
        if "id" in fields:
            # Sent, it replaced the request's id: the reply went to whichever call had that
            # id (or to none, and this one waited out request_timeout).
            raise ClientError(
                "invalid_input", f"{op}: 'id' is not a field: the client numbers its requests"
            )
        pending = _Pending()
        return await self._request(op, fields, pending)

    async def _request(self, op: str, fields: dict[str, Any], pending: _Pending) -> Any:
        with trio.fail_after(self.request_timeout):
            while self._ws is None:
                if self._fatal is not None:
                    raise self._fatal
                await self._connected.wait()
            ws = self._ws
            self._next_id += 1
            request_id = self._next_id
            try:
                frame = orjson.dumps({"op": op, "id": request_id, **fields}).decode()
            except TypeError as exc:
                # A value JSON cannot carry: a lone surrogate (an undecodable byte of a
                # command-line argument), a set, an object.
                raise ClientError("invalid_input", f"{op}: cannot be sent as JSON: {exc}") from None
            where = _not_finite(fields, "$") if "null" in frame else None
            if where is not None:
                raise ClientError(
                    "invalid_input",
                    f"{op}: {where} is NaN or infinity, which JSON cannot carry (it would be"
                    " sent as null)",
                )
            limit = self.welcome.get("max_frame_size")
            if isinstance(limit, int) and len(frame.encode()) > limit:
                # Sent, it would close the connection (1009) for every request in flight.
                raise ClientError(
                    "request_too_large",
                    f"{op}: the request is {len(frame.encode())} bytes, over the server's"
                    f" max_frame_size of {limit}",
                )
            self._pending[request_id] = pending
            try:
                await ws.send_message(frame)
            except ConnectionClosed:
                self._pending.pop(request_id, None)
                raise ConnectionLostError() from None
            await pending.done.wait()
        if pending.error is not None:
            raise pending.error
        return pending.result

    def _fail_pending(self, error: ClientError) -> None:
        pending, self._pending = self._pending, {}
        for slot in pending.values():
            slot.error = error
            slot.done.set()

    # -- rooms ----------------------------------------------------------------------------------

    async def subscribe(self, room: str, cursor: RoomCursor | None = None) -> Any:
        """Follow a room from ``cursor`` (None: from now). Survives reconnects.

        If the server refuses (an error reply, or the connection drops first), the error is
        raised and the room is not followed; a room already followed stays followed from
        where it was."""
        if cursor is not None and not isinstance(cursor, RoomCursor):
            raise ClientError(
                "invalid_input",
                f"subscribe: cursor must be a RoomCursor or None, not {type(cursor).__name__}",
            )
        previous = self.rooms.get(room)
        state = self.rooms[room] = _Room(cursor, cursor)
        try:
            return await self._join(room)
        except BaseException:
            if self.rooms.get(room) is state:
                if previous is None:
                    del self.rooms[room]
                else:
                    # Events that came meanwhile were ignored: resubscribing from its
                    # cursor replays them.
                    self.rooms[room] = previous
                    self._resync(room)
            raise

    async def unsubscribe(self, room: str) -> Any:
        self.rooms.pop(room, None)
        return await self.request("unsubscribe", room=room)

    def cursor(self, room: str) -> RoomCursor | None:
        """Where a new client should resume this room: just past the last event the
        application took from :meth:`events` (or the room's head when it joined)."""
        state = self.rooms.get(room)
        return None if state is None else state.consumed

    async def _join(self, room: str) -> Any:
        state = self.rooms[room]
        state.resyncing = True
        cursor = None if state.cursor is None else attrs.asdict(state.cursor)
        return await self._request(
            "subscribe",
            {"room": room, "cursor": cursor},
            _Pending(on_reply=lambda result: self._joined(room, result)),
        )

    def _joined(self, room: str, result: dict[str, Any]) -> Reset | None:
        """Runs in the read loop, before the replayed events that follow the reply; returns
        the reset to hand to :meth:`events` next, if the room was reset."""
        state = self.rooms.get(room)
        if state is None:
            return None
        if result.get("reset_reason") and self._buffer_is_full():
            # No room to hand the reset out: the room stays resyncing, and its resubscription
            # (once the application made room) gets the reset again, from the same cursor.
            self.counters.buffer_full += 1
            self._resync(room)
            return None
        head = RoomCursor(result["epoch"], result["head"])
        reset = None
        if result.get("reset_reason"):
            self.counters.resets += 1
            state.cursor = head
            reset = Reset(room, result["reset_reason"], result.get("snapshot"), head)
        elif state.cursor is None:
            state.cursor = head
        if state.consumed is None:  # a reset's head counts once the reset is taken
            state.consumed = state.cursor
        if state.since is None or result.get("reset_reason"):
            state.since = state.cursor.seq
        state.resyncing = False
        state.resync_failures = 0
        state.resync_error = None
        return reset

    def _resync(self, room: str) -> None:
        """Resubscribe ``room`` from its cursor: one task per room, retrying until answered."""
        state = self.rooms.get(room)
        if state is None:
            return
        state.resyncing = True
        if state.resync_pending or self._nursery is None:
            return  # the running task resubscribes; without a nursery, the next connection
        state.resync_pending = True
        self._nursery.start_soon(self._resync_task, room, state)

    async def _resync_task(self, room: str, state: _Room) -> None:
        """Resubscribe until the room is live again, unsubscribed, or the client failed.

        Every refusal (``rate_limited``, ``busy``, ``store_error``, ``internal``,
        ``runtime_closed``, a timeout, a lost connection) is retried after a backoff, but for
        the permanent ones (:data:`PERMANENT_REFUSALS`): the room is dropped and
        :meth:`events` hands out a :class:`RoomRefused` (retried, ``unknown_job`` from a
        server on another database was retried forever)."""
        backoff = ReconnectPolicy(self.min_backoff, self.max_backoff)
        try:
            # The condition is re-read after every answer with no await in between: a gap or
            # a `lagged` that arrived meanwhile set `resyncing` again and is served here.
            while self.rooms.get(room) is state and state.resyncing and self._fatal is None:
                # What the resubscription replays needs room in the buffer: with the buffer
                # over half full it waits for the application to take events (a room left out
                # of a full buffer would be left out again at once).
                await self._buffer_room()
                if not (self.rooms.get(room) is state and state.resyncing and self._fatal is None):
                    return
                try:
                    await self._join(room)
                except (ClientError, trio.TooSlowError) as exc:
                    if self._fatal is not None:
                        return
                    if isinstance(exc, ClientError) and exc.code in PERMANENT_REFUSALS:
                        if self.rooms.get(room) is state:
                            del self.rooms[room]
                            log.info("resubscribing to %s refused for good (%s)", room, exc)
                            epoch = self.welcome.get("epoch")
                            cursor = state.cursor or RoomCursor(str(epoch), 0)
                            refused = RoomRefused(room, exc.code, None, cursor, exc, epoch)
                            await self._send_events.send((refused, None, None, None, None))
                        return
                    state.resync_failures += 1
                    state.resync_error = str(exc) or "timed out"
                    self.counters.resync_failures += 1
                    delay = backoff.next_delay(trio.current_time())
                    log.info(
                        "resubscribing to %s refused (%s); retrying in %.2f s",
                        room,
                        state.resync_error,
                        delay,
                    )
                    await trio.sleep(delay)
                else:
                    backoff.succeeded()  # the room's state was settled by _joined
        finally:
            state.resync_pending = False

    def _buffer_is_full(self) -> bool:
        stats = self._send_events.statistics()
        return stats.current_buffer_used >= stats.max_buffer_size

    async def _buffer_room(self) -> None:
        """Return once the event buffer is at most half full (at once if it is)."""
        while self._receive_events.statistics().current_buffer_used > self._half_buffer:
            if self._room_in_buffer is None:
                self._room_in_buffer = trio.Event()
            await self._room_in_buffer.wait()

    async def events(self) -> AsyncIterator[JobEvent | Reset]:
        """Events of all subscribed rooms, each once and in order per room; and resets (a
        room refused for good among them: :class:`RoomRefused`).

        Once the events received are handed out, raises the error that ended the client
        when it will not recover: :class:`ClientError` for a fatal close (``auth_failed``,
        ``token_expired``...), :class:`ConnectionLostError` for a lost connection with
        ``reconnect=False`` (``close_code`` 1006: the server died or the network failed).
        Ends without an error when the application closed the client (left ``open_client``,
        cancelled :meth:`run`).

        Events already received are handed out without a checkpoint each, but for one in
        every 64 (a replay of thousands arrives at once: a scheduler round per event was a
        third of the client's time)."""
        receive = self._receive_events
        handed = 0
        while True:
            handed += 1
            if handed % 64 == 0:
                # Before an item is taken: a cancellation here loses none.
                await trio.lowlevel.checkpoint()
            taken: _Taken | None
            try:
                taken = receive.receive_nowait()
            except trio.WouldBlock:
                try:
                    taken = await receive.receive()
                except trio.EndOfChannel:
                    taken = None
            except trio.EndOfChannel:
                taken = None
            if taken is None:  # run() ended: every event it received was handed out
                if self._lost is not None:
                    raise self._lost
                return
            waiting = self._room_in_buffer
            if (
                waiting is not None
                and receive.statistics().current_buffer_used <= self._half_buffer
            ):
                self._room_in_buffer = None
                waiting.set()
            item, first, cursor, second, then = taken
            if first is not None:
                first.consumed = cursor
                if second is not None:
                    second.consumed = then
            yield item

    # -- one method per request -----------------------------------------------------------------

    async def ping(self) -> Any:
        return await self.request("ping")

    async def refresh(self, token: str) -> Any:
        """Replace the connection's token; once the server accepted it, it is also the token
        of the next connections. A refused one (an error reply, a lost connection) raises and
        changes nothing: the client keeps reconnecting with the token it had."""
        result = await self.request("refresh", token=token)
        self._token = token
        return result

    async def create(
        self,
        kind: str,
        input: Any,
        *,
        priority: int | None = None,
        delay: float | None = None,
        run_at: float | None = None,
        max_attempts: int | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - the job's per-attempt limit
        tags: Sequence[str] | None = None,
        parent_id: str | None = None,
        idempotency_key: str | None = None,
    ) -> Any:
        """Queue a job; returns it (``created``, or already ``running``). Options as in
        PROTOCOL.md's ``create``: ``priority`` 0..1000 (higher first), ``delay`` (seconds) or
        ``run_at`` (Unix seconds), ``max_attempts`` 1..100, ``timeout`` (seconds per attempt),
        ``tags``, ``parent_id`` (a job of yours), ``idempotency_key``.

        Without an ``idempotency_key`` one is generated for this call (:func:`new_key`). When
        the connection is lost before the reply, the create is sent again with the same key
        once the client has reconnected, so a create the server stored but could not answer
        returns that job instead of making a second one (until ``request_timeout`` has
        passed since the call, or for good when the client does not reconnect). Raises
        :class:`ClientError` (``invalid_input``, ``idempotency_conflict``, ...)."""
        fields: dict[str, Any] = {
            "kind": kind,
            "input": input,
            "idempotency_key": new_key() if idempotency_key is None else idempotency_key,
        }
        options = {
            "priority": priority,
            "delay": delay,
            "run_at": run_at,
            "max_attempts": max_attempts,
            "timeout": timeout,
            "tags": None if tags is None else list(tags),
            "parent_id": parent_id,
        }
        fields.update({name: value for name, value in options.items() if value is not None})
        with trio.fail_after(self.request_timeout):
            while True:
                try:
                    return await self._request("create", fields, _Pending())
                except ConnectionLostError:
                    if not self.reconnect or self._fatal is not None:
                        raise
                    self.counters.create_retries += 1
                    log.info("connection lost before create's reply; sending it again")

    async def get(self, job_id: str) -> Any:
        """The job; a payload that would not fit in one message is an omitted marker."""
        return await self.request("get", job_id=job_id)

    async def get_payload(self, job_id: str, field: str, seq: int | None = None) -> Any:
        """The value of a payload the server left out (see :func:`is_omitted`): the job's
        ``field`` (``input``, ``result``, ``checkpoint``, ``error``, ``step``), or with
        ``seq`` the ``field`` of that event's ``data``. Raises :class:`ClientError`
        ``payload_too_large`` for a value larger than the server's largest message."""
        fields: dict[str, Any] = {"job_id": job_id, "field": field}
        if seq is not None:
            fields["seq"] = seq
        return (await self.request("get_payload", **fields))["value"]

    async def list(
        self,
        *,
        state: str | None = None,
        kind: str | None = None,
        limit: int = 50,
        states: Sequence[str] | None = None,
        tag: str | None = None,
        parent_id: str | None = None,
        user_id: str | None = None,
    ) -> Any:
        """Your jobs, newest first: those in ``state`` (or any of ``states``), of ``kind``,
        with ``tag``, children of ``parent_id``, all filters together; at most ``limit``
        (1..500). Admins: ``user_id``'s jobs, or everyone's without it. ``states`` as a
        string is :class:`ClientError` ``invalid_input``, as the runtime's ``list_jobs`` says
        (read letter by letter, it was refused naming its first letter)."""
        if isinstance(states, str):
            raise ClientError(
                "invalid_input",
                f"list: states must be a list of states, not a string: [{shown(states)}] for one",
            )
        fields: dict[str, Any] = {
            "limit": limit,
            "state": state,
            "kind": kind,
            "states": None if states is None else list(states),
            "tag": tag,
            "parent_id": parent_id,
            "user_id": user_id,
        }
        return await self.request(
            "list", **{name: value for name, value in fields.items() if value is not None}
        )

    async def children(self, job_id: str, *, limit: int = 50) -> Any:
        """The jobs created with ``parent_id=job_id``, newest first (at most ``limit``)."""
        return await self.request("children", job_id=job_id, limit=limit)

    async def cancel(self, job_id: str) -> Any:
        return await self.request("cancel", job_id=job_id)

    async def pause(self, job_id: str) -> Any:
        return await self.request("pause", job_id=job_id)

    async def resume(self, job_id: str) -> Any:
        return await self.request("resume", job_id=job_id)

    async def restart(self, job_id: str, modifications: dict[str, Any] | None = None) -> Any:
        return await self.request("restart", job_id=job_id, modifications=modifications)

    async def recovery_options(self, job_id: str) -> Any:
        return await self.request("recovery_options", job_id=job_id)

    async def checkpoint_details(self, job_id: str) -> Any:
        return await self.request("checkpoint_details", job_id=job_id)

    async def stats(self) -> Any:
        return await self.request("stats")

    async def my_stats(self) -> Any:
        return await self.request("my_stats")

    async def queue_stats(self, user_id: str | None = None) -> Any:
        """``{waiting, ready, scheduled, running, waiting_by_kind, waiting_by_user,
        waiting_users}``: yours; an admin's: everyone's, or ``user_id``'s.
        ``waiting_by_user`` names the 100 users with the most waiting jobs at most."""
        fields = {} if user_id is None else {"user_id": user_id}
        return await self.request("queue_stats", **fields)

    async def prune(self, older_than: float | None = None, *, dry_run: bool = False) -> Any:
        """Admins: apply the retention policy now (``older_than`` seconds replacing every
        kind's age limit); ``{jobs, events, batches, dry_run}``."""
        return await self.request("prune", older_than=older_than, dry_run=dry_run)


@asynccontextmanager
async def open_client(
    url: str, token: str | Callable[[], str], **options: Any
) -> AsyncIterator[Client]:
    """Connect (waiting for the first hello to succeed), and disconnect on exit.

    When the client stops without the application stopping it (a fatal close: a
    :class:`ClientError`; with ``reconnect=False``, a lost connection:
    :class:`ConnectionLostError`), :meth:`Client.events` and requests raise the error, the
    block is cancelled and raises it (once, not in an exception group)."""
    client = Client(url, token, **options)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(client.run)
            try:
                yield client
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        raise _one_error(group, client._lost) from None


def _one_error(group: BaseExceptionGroup[BaseException], lost: ClientError | None) -> BaseException:
    """The one exception ``open_client`` raises for its nursery's ``group``: ``lost`` is why
    the client stopped on its own (``Client._lost``: a fatal close, a lost connection with
    reconnect off), which :meth:`Client.run` raises, and requests and ``events()`` raise too.
    The application's own exception wins over it: the application met the loss (a request
    raised it) and said what it means (a CLI command's ``connection_lost`` naming the
    idempotency key to run again with), or failed on its own, or was interrupted (Ctrl-C).
    The group stays only for several errors of the application's."""
    found = {id(e): e for e in leaves(group) if not isinstance(e, trio.Cancelled)}
    own = [e for e in found.values() if e is not lost]
    if len(own) == 1:
        return own[0]
    if not own and lost is not None:
        return lost
    return unwrap_group(group)
