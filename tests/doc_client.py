"""A client written from transport/PROTOCOL.md's rules alone, applied literally, frame by frame.

It uses a raw websocket (no ``transport.client``) so that a rule the document leaves out, or
states ambiguously, shows up as a lost or duplicated event in the tests that drive it.
:class:`DocRules` is the sans-I/O part (section 4's client rules); :class:`DocClient` adds the
connection: hello, subscribe, a deliberately slow reader, and reconnecting after a close.
"""

from __future__ import annotations

import socket
from collections import defaultdict
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import attrs
import orjson
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, wrap_client_stream


@attrs.define
class DocRoom:
    #: The last number processed (section 4: the cursor); None until the room was live once.
    cursor: int | None = None
    #: Live from the reply to its subscribe until a gap, ``lagged`` or heartbeat says otherwise.
    live: bool = False


class DocRules:
    """Section 4's client rules: which messages are new, which are duplicates, which rooms
    must be subscribed again."""

    def __init__(self) -> None:
        self.rooms: dict[str, DocRoom] = {}
        #: Per room, the numbers processed from events and from skipped markers, in order.
        self.events: dict[str, list[int]] = defaultdict(list)
        self.skipped: dict[str, list[int]] = defaultdict(list)
        #: Events new to the client (the next one in at least one room), in order.
        self.new: list[dict[str, Any]] = []
        self.lagged = 0

    def follow(self, room: str) -> None:
        self.rooms.setdefault(room, DocRoom())

    def joined(self, room: str, result: dict[str, Any], sent_cursor: int | None) -> None:
        """The reply to a subscribe: the room is live from here."""
        state = self.rooms[room]
        if result["recovered"] and sent_cursor is not None:
            state.cursor = sent_cursor
        else:
            state.cursor = result["head"]
        state.live = True

    def apply(self, message: dict[str, Any]) -> list[str]:
        """Process one message (not a batch); return the rooms to subscribe again."""
        kind = message["type"]
        again: list[str] = []
        if kind == "heartbeat":
            for room, head in message["heads"].items():
                state = self.rooms.get(room)
                live = state is not None and state.live and state.cursor is not None
                if live and head > state.cursor:  # type: ignore[union-attr]
                    again.append(room)
        elif kind == "lagged":
            self.lagged += 1
            again = [room for room in message["rooms"] if self._live(room)]
        elif kind in ("event", "skipped"):
            data = message["event"] if kind == "event" else message
            count = 1 if kind == "event" else data["count"]
            new = False
            for room, first in (
                (f"job:{data['job_id']}", data["seq"]),
                (f"user:{data['user_id']}", data["user_seq"]),
            ):
                state = self.rooms.get(room)
                if state is None or not state.live or state.cursor is None:
                    continue
                last = first + count - 1
                if last <= state.cursor:
                    continue
                if first <= state.cursor + 1:
                    numbers = range(state.cursor + 1, last + 1)
                    (self.events if kind == "event" else self.skipped)[room].extend(numbers)
                    state.cursor = last
                    new = True
                else:
                    again.append(room)
            if new and kind == "event":
                self.new.append(data)
        for room in again:
            self.rooms[room].live = False  # its messages are ignored until the reply
        return again

    def _live(self, room: str) -> bool:
        state = self.rooms.get(room)
        return state is not None and state.live


@attrs.define
class Timeline:
    """What a :class:`DocClient` saw, in seconds since it started reading."""

    frames: int = 0
    largest_frame: int = 0
    bytes: int = 0
    lagged_at: list[float] = attrs.field(factory=list)
    #: (seconds, close code) of every close the client saw; 1006 is an abnormal closure.
    closes: list[tuple[float, int]] = attrs.field(factory=list)
    refused: list[str] = attrs.field(factory=list)


class DocClient:
    """Follows ``rooms`` (room -> cursor, None: from now) with :class:`DocRules`, reading at
    most ``rate`` bytes per second, until ``done(rules)``; reconnects (resubscribing from its
    cursors) after a slow-consumer close."""

    def __init__(
        self, url: str, token: str, rooms: dict[str, int | None], rate: float | None
    ) -> None:
        self.url = url
        self.token = token
        self.rate = rate
        self.rules = DocRules()
        for room, cursor in rooms.items():
            self.rules.follow(room)
            self.rules.rooms[room].cursor = cursor
        self.timeline = Timeline()
        self._pending: dict[int, tuple[str, int | None]] = {}
        self._next_id = 0
        self._start = 0.0
        self.epoch = ""

    async def run(self, done: Callable[[DocRules], bool]) -> None:
        self._start = trio.current_time()
        while not done(self.rules):
            code = await self._connection(done)
            if code is not None:
                self.timeline.closes.append((self._now(), code))
                if code != 4008:
                    return  # only a slow-consumer close is worth reconnecting after here

    def _now(self) -> float:
        return trio.current_time() - self._start

    async def _connection(self, done: Callable[[DocRules], bool]) -> int | None:
        """One connection until ``done`` (None) or until the server closes it (its code)."""
        url = urlsplit(self.url)
        assert url.hostname is not None and url.port is not None
        async with trio.open_nursery() as nursery:
            stream = await trio.open_tcp_stream(url.hostname, url.port)
            # A small receive buffer, as over a real network: what the reader does not take
            # stays on the server, where the protocol's slow-consumer rules apply.
            stream.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
            ws = await wrap_client_stream(
                nursery, stream, url.hostname, "/", max_message_size=16 * 1024 * 1024
            )
            try:
                await self._session(ws, done)
            except ConnectionClosed as exc:
                return exc.reason.code if exc.reason is not None else 1006
            finally:
                await ws.aclose()
        return None

    async def _session(self, ws: WebSocketConnection, done: Callable[[DocRules], bool]) -> None:
        self._pending.clear()
        await ws.send_message(
            orjson.dumps({"op": "hello", "id": 0, "token": self.token, "protocol": 1}).decode()
        )
        for state in self.rules.rooms.values():
            state.live = False
        while not done(self.rules):
            frame = await ws.get_message()
            await self._frame(ws, frame)

    async def _frame(self, ws: WebSocketConnection, frame: str | bytes) -> None:
        size = len(frame)
        timeline = self.timeline
        timeline.frames += 1
        timeline.bytes += size
        timeline.largest_frame = max(timeline.largest_frame, size)
        message = orjson.loads(frame)
        inner = message["messages"] if message["type"] == "batch" else [message]
        again: list[str] = []
        for item in inner:
            if item["type"] in ("reply", "error"):
                await self._reply(ws, item)
                continue
            if item["type"] == "lagged":
                timeline.lagged_at.append(self._now())
            again.extend(self.rules.apply(item))
        for room in dict.fromkeys(again):
            await self._subscribe(ws, room)
        if self.rate is not None:
            await trio.sleep(size / self.rate)  # the deliberately slow reader

    async def _reply(self, ws: WebSocketConnection, item: dict[str, Any]) -> None:
        if item["id"] == 0:
            assert item["type"] == "reply", item
            self.epoch = item["result"]["epoch"]
            for room in self.rules.rooms:
                await self._subscribe(ws, room)
            return
        room, sent = self._pending.pop(item["id"])
        if item["type"] == "reply":
            self.rules.joined(room, item["result"], sent)
        else:
            self.timeline.refused.append(item["code"])
            await trio.sleep(0.05)
            await self._subscribe(ws, room)

    async def _subscribe(self, ws: WebSocketConnection, room: str) -> None:
        if any(pending_room == room for pending_room, _ in self._pending.values()):
            return  # a subscribe is already on its way; its reply makes the room live
        self._next_id += 1
        cursor = self.rules.rooms[room].cursor
        self._pending[self._next_id] = (room, cursor)
        request: dict[str, Any] = {"op": "subscribe", "id": self._next_id, "room": room}
        if cursor is not None:
            request["cursor"] = {"epoch": self.epoch, "seq": cursor}
        await ws.send_message(orjson.dumps(request).decode())
