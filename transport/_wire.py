"""Listening for websocket connections, with the close frame of a failed connection.

When a client breaks the websocket protocol itself (invalid UTF-8 in a text message, RFC 6455
section 8.1; a malformed frame), wsproto reports the close code (1007, 1002) but
trio-websocket then closes the TCP connection without sending the close frame: the client sees
an abnormal closure (1006) and cannot tell what it did wrong. :class:`GuardedStream` sits
between trio-websocket and the socket and sends that close frame before closing.

:func:`serve_websockets` is trio-websocket's ``serve_websocket`` built from its public
pieces (``wrap_server_stream``), so that each connection's stream can be guarded.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio
from trio_websocket import WebSocketConnection, WebSocketRequest, wrap_server_stream

from actors._errors import shown

from ._protocol import CLOSE

log = logging.getLogger("jobspine.server")

__all__ = ["GuardedStream", "Inbound", "loggable", "send_deadline", "serve_websockets"]


def loggable(text: str, limit: int = 300) -> str:
    """``text`` from the other side of a connection (a close reason, a refusal quoting what
    it sent) for one log line or message: as it is when printable and at most ``limit``
    characters, else quoted by :func:`~actors._errors.shown` (what is not printable escaped:
    a newline in it would forge a line; cut past ``limit``, saying its length)."""
    return text if len(text) <= limit and text.isprintable() else shown(text, limit)


#: Seconds a client has for the opening handshake, and the server for the closing one
#: (trio-websocket's defaults).
CONNECT_TIMEOUT = 60.0
DISCONNECT_TIMEOUT = 60.0
#: Seconds spent sending the close frame of a failed connection and reading what the client
#: still sends (closing a socket with unread data resets it, and the frame could be lost).
FAIL_TIMEOUT = 1.0
#: Close codes wsproto reports for a client's protocol error without sending them.
FAILURE_CODES = frozenset({CLOSE["websocket_protocol"], CLOSE["invalid_utf8"]})
_CLOSE_OPCODE = 0x88  # FIN + close: the first byte of a server's close frame


def send_deadline(size: int, send_timeout: float, batch_bytes: int) -> float:
    """Seconds a peer has to take a frame of ``size`` bytes: ``send_timeout``, longer in
    proportion for a frame over ``batch_bytes``. It measures progress: a peer that takes
    ``batch_bytes`` per ``send_timeout`` or faster is never cut off, and one that takes
    nothing is found within ``send_timeout`` of a frame of ordinary size."""
    return send_timeout * max(1.0, size / batch_bytes)


class Inbound:
    """Whether a peer sending frames is alive, from the bytes and frames that arrived from it
    (sans-I/O: the caller gives the times).

    Bytes arriving count as life, not only complete frames: a peer on a slow link uploading
    one large frame (a big checkpoint or result) for longer than ``timeout`` is making
    progress. It is stalled once nothing arrived for ``timeout``, or once the frame still
    arriving has taken longer than :func:`send_deadline` allows for the bytes of it that
    arrived (``batch_bytes`` per ``timeout``), counted from the end of the last complete frame:
    the deadline the sending side gives a frame, so that a peer trickling a byte now and then
    cannot hold a connection open without ever completing a frame."""

    def __init__(self, now: float, timeout: float, batch_bytes: int) -> None:
        self.timeout = timeout
        self.batch_bytes = batch_bytes
        #: Bytes received in all, and when the last of them arrived.
        self.received = 0
        self.last_byte = now
        #: When the last complete frame arrived (or the start), and ``received`` then.
        self.frame_end = now
        self._received_at_frame_end = 0

    def bytes_arrived(self, now: float, count: int) -> None:
        if count:
            self.received += count
            self.last_byte = now

    def frame_arrived(self, now: float) -> None:
        """A complete frame was read (its bytes arrived, whether or not they were counted).
        Bytes of the next frame read with it count as before it (at most one read's worth):
        that frame's deadline is the shorter for them."""
        self.frame_end = self.last_byte = now
        self._received_at_frame_end = self.received

    @property
    def partial(self) -> int:
        """Bytes of a frame that is still arriving (0 between frames)."""
        return self.received - self._received_at_frame_end

    def deadline(self) -> float:
        """When the peer is stalled unless more arrives; never earlier than before."""
        frame = send_deadline(self.partial, self.timeout, self.batch_bytes)
        return min(self.last_byte + self.timeout, self.frame_end + frame)

    def stalled(self, now: float) -> str | None:
        """Why the peer is stalled at ``now``, else None."""
        if now < self.deadline():
            return None
        if now >= self.last_byte + self.timeout:
            return f"nothing received for {self.timeout:g} s"
        return f"a frame arriving slower than {self.batch_bytes // 1024} KiB per {self.timeout:g} s"


def close_frame(code: int, reason: str) -> bytes:
    """An unmasked (server) close frame; the reason is cut to 123 bytes of whole characters."""
    text = reason.encode()[:123].decode(errors="ignore").encode()
    payload = code.to_bytes(2, "big") + text
    return bytes([_CLOSE_OPCODE, len(payload)]) + payload


class GuardedStream(trio.abc.Stream):
    """One accepted TCP stream. ``connection`` is set once the websocket is accepted; when it
    is failed for a client's protocol error and no close frame went out, :meth:`aclose`
    sends one, unless a send is under way or was interrupted mid-frame (the close frame
    would then be garbage in the middle of another frame).

    Until :meth:`admit` (its hello accepted), the stream reads at most ``unadmitted_bytes``
    (the handshake and the hello): past them it reads as closed, and :meth:`aclose` sends a
    1009 close frame. The websocket layer's message limit is the worker endpoint's (2 MiB),
    and nobody is known yet: without this, any socket could make the server buffer that
    much before it authenticates."""

    def __init__(self, stream: trio.SocketStream, unadmitted_bytes: int | None = None) -> None:
        self._stream = stream
        self._close_sent = False
        self._sending = False
        self._torn = False
        self._closed: trio.Event | None = None
        self._unadmitted_left = unadmitted_bytes
        self._over = False
        self.connection: WebSocketConnection | None = None
        #: Told of every byte read, when set (the worker endpoint's stall check).
        self.inbound: Inbound | None = None

    def admit(self) -> None:
        """The connection is authenticated: reads are no longer bounded here."""
        self._unadmitted_left = None

    def bound(self, more: int) -> None:
        """Until :meth:`admit`, read at most ``more`` bytes from now on (the hello of an
        endpoint that takes larger ones)."""
        if self._unadmitted_left is not None:
            self._unadmitted_left = more

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        # trio-websocket writes one wsproto event per call, so a frame starts each call.
        if data[:1] == bytes([_CLOSE_OPCODE]):
            self._close_sent = True
        self._sending = True
        sent = False
        try:
            await self._stream.send_all(data)
            sent = True
        finally:
            self._sending = False
            # Cancelled or failed: part of the frame may be out.
            self._torn = self._torn or not sent

    @property
    def torn(self) -> bool:
        """A send was cut off: part of a frame may be out, so no frame can follow."""
        return self._torn

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        left = self._unadmitted_left
        if left is None:
            data = await self._stream.receive_some(max_bytes)
        elif left <= 0:
            self._over = True
            return b""  # read as closed: the websocket layer stops reading
        else:
            size = left if max_bytes is None else min(left, max_bytes)
            data = await self._stream.receive_some(size)
            if self._unadmitted_left is not None:
                self._unadmitted_left -= len(data)
        if self.inbound is not None:
            self.inbound.bytes_arrived(trio.current_time(), len(data))
        return data

    async def aclose(self) -> None:
        if self._closed is not None:  # another task is closing: let it finish
            await self._closed.wait()
            return
        self._closed = trio.Event()
        try:
            reason = None if self.connection is None else self.connection.closed
            quiet = not (self._close_sent or self._sending or self._torn)
            if self._over and self.connection is not None and quiet:
                frame = close_frame(CLOSE["too_big"], "over max_frame_size before the hello")
                with trio.move_on_after(FAIL_TIMEOUT, shield=True):
                    await self._fail(frame)
            elif reason is not None and reason.code in FAILURE_CODES and quiet:
                with trio.move_on_after(FAIL_TIMEOUT, shield=True):
                    await self._fail(close_frame(reason.code, reason.reason or ""))
        finally:
            await self._stream.aclose()
            self._closed.set()

    async def _fail(self, frame: bytes) -> None:
        self._close_sent = True
        try:
            await self._stream.send_all(frame)
            await self._stream.send_eof()
            while await self._stream.receive_some(4096):
                pass  # until the client closes its side
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError):
            pass  # the client is gone or another task uses the socket: nothing more to say


Handler = Callable[[WebSocketRequest, GuardedStream], Awaitable[None]]


async def serve_websockets(
    handler: Handler,
    listeners: list[trio.SocketListener],
    *,
    handler_nursery: trio.Nursery,
    max_message_size: int,
    unadmitted_bytes: int | None = None,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept websocket connections on ``listeners`` until cancelled; each completed handshake
    runs ``handler(request, stream)`` in ``handler_nursery``. The handler accepts or rejects
    the request, sets ``stream.connection`` to the accepted websocket and calls
    ``stream.admit()`` once it knows who is connected; until then a connection reads at most
    ``unadmitted_bytes``."""

    async def connection(socket_stream: trio.SocketStream) -> None:
        stream = GuardedStream(socket_stream, unadmitted_bytes)
        async with trio.open_nursery() as nursery:
            request: WebSocketRequest | None = None
            with trio.move_on_after(CONNECT_TIMEOUT):
                request = await wrap_server_stream(
                    nursery, stream, max_message_size=max_message_size
                )
            try:
                if request is not None:
                    await handler(request, stream)
            except Exception:
                # A fault stays with its connection: it is closed, the server serves on.
                log.exception("a connection's handler failed; the connection is closed")
            finally:
                if stream.connection is not None:
                    with trio.move_on_after(DISCONNECT_TIMEOUT):
                        await stream.connection.aclose()
                await stream.aclose()
                nursery.cancel_scope.cancel()  # the websocket's reader task, if still reading

    await trio.serve_listeners(
        connection, listeners, handler_nursery=handler_nursery, task_status=task_status
    )
