"""The server's HTTP port (h11): health, readiness, metrics and the dashboard's files.

trio-websocket cannot answer a plain HTTP request, so process supervisors, load balancers and
browsers get this small server: ``GET /healthz`` (the process is up), ``GET /readyz``
(accepting websocket connections: 503 while starting or shutting down), ``GET /metrics``
(Prometheus text format), ``GET /status`` (a JSON summary) and the dashboard
(:mod:`transport._dashboard`). A route takes the :class:`Request` and returns a JSON-able body
or a :class:`Body` with its own content type and headers. ``HEAD`` gets the headers of a
``GET`` and no body; other methods get 405, a websocket upgrade (websockets have a port of
their own) 404, another upgrade (``h2c``) is declined by answering in HTTP/1.1; a request
that cannot be parsed gets 400 (431 for a header over 8 KiB) rather than a dropped
connection, and a route that raises 500 (logged), the port serving on. Every answer ends
with a close that does not reset the connection (what the client still sends is read and
dropped), so it arrives whole. A full port closes a connection for a new one
(:class:`Admission`).
"""

from __future__ import annotations

import errno
import logging
import math
from collections.abc import Callable
from http import HTTPStatus
from typing import Any, Generic, TypeVar

import attrs
import h11
import orjson
import trio

from ._wire import loggable

__all__ = ["INERT_POLICY", "Body", "Request", "serve_health"]

T = TypeVar("T")

log = logging.getLogger("jobspine.health")

MAX_REQUEST = 8192

#: Connections the port holds open at once. Unbounded, a flood of idle connections took every
#: file descriptor, and a server still opening its database could not open its files.
MAX_CONNECTIONS = 64

#: Seconds a connection has to send its request and take the answer.
REQUEST_TIMEOUT = 5.0

#: Seconds a new connection keeps its slot on a full port before it may be closed for
#: another one, if its request has not come (:class:`Admission`).
ADMISSION_GRACE = 0.25

#: Seconds an answer being sent keeps its slot on a full port where no connection waits for
#: its request: past them, the client that has not taken it may be closed for another one.
ANSWER_GRACE = 0.5

#: Seconds an answered connection reads and drops what its client still sends before it is
#: closed (:func:`_finish`).
LINGER = 1.0

#: accept() errors that mean "no resources now" (trio.serve_listeners' list): retried.
_ACCEPT_CAPACITY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}


@attrs.frozen
class Request:
    """What a route sees of a GET or HEAD request: the path (no query) and the ``Host``
    header."""

    path: str
    host: str


#: A route: (request) -> (HTTP status, a JSON-able body or a :class:`Body`).
Route = Callable[[Request], tuple[int, Any]]

#: The policy of every answer that is not a page (JSON, metrics, errors): nothing in it may
#: run, load anything or be framed, even in a browser that would take it for a page of this
#: origin (where the dashboard keeps its token).
INERT_POLICY = "default-src 'none'; frame-ancestors 'none'"

#: JSON answers are computed per request: never cached.
_JSON_HEADERS = (("cache-control", "no-store"), ("content-security-policy", INERT_POLICY))


@attrs.frozen
class Body:
    """A response body that is not JSON, with extra response headers (name, value)."""

    content_type: str
    data: bytes
    headers: tuple[tuple[str, str], ...] = ()


class Admission(Generic[T]):
    """Which open connection gives way when the port is full (sans-I/O).

    At most ``limit`` connections are open. When the port is full, the connection that has
    waited longest for its request is closed to make room for a new one, once it has had
    ``grace`` seconds to send it. So connections that send nothing, or a request's head
    without its end, delay a prompt client (a supervisor's probe, a scrape) by about
    ``grace``: they held every slot for :data:`REQUEST_TIMEOUT` each, and a probe queued
    behind them timed out (a liveness probe then restarted a healthy server). The grace
    keeps a burst of prompt clients from closing each other before their requests are
    read. A connection being answered is chosen only when none waits for its request, the
    one answered longest once it has had ``answer_grace`` seconds: an answer usually ends
    in a moment, but a client that does not take it (a large file asked for, then nothing
    read) held its slot for :data:`REQUEST_TIMEOUT` too, and 64 of them delayed a probe as
    long."""

    def __init__(self, limit: int, grace: float, answer_grace: float) -> None:
        self.limit = limit
        self.grace = grace
        self.answer_grace = answer_grace
        self.open = 0
        #: Connections still waiting for their request, oldest first (a dict keeps order),
        #: with when each was opened.
        self._waiting: dict[T, float] = {}
        #: Connections being answered, oldest first, with when their request came.
        self._answering: dict[T, float] = {}

    def opened(self, key: T, now: float) -> None:
        self.open += 1
        self._waiting[key] = now

    def answering(self, key: T, now: float) -> None:
        """Its request arrived at ``now``: it is being answered (unless already chosen)."""
        if self._waiting.pop(key, None) is not None:
            self._answering[key] = now

    def closed(self, key: T) -> None:
        self.open -= 1
        self._waiting.pop(key, None)
        self._answering.pop(key, None)

    def to_close(self, now: float) -> T | None:
        """While the port is full: the connection to close for a new one (each chosen once),
        or None: none has waited out its grace (see :meth:`next_choice`), or none is open
        (wait for one to close)."""
        if self.open < self.limit:
            return None
        queue, grace = self._queue()
        if not queue:
            return None
        key, since = next(iter(queue.items()))
        if now - since < grace:
            return None
        del queue[key]
        return key

    def next_choice(self) -> float:
        """When :meth:`to_close` may next choose one (inf: once one closes)."""
        queue, grace = self._queue()
        return next(iter(queue.values()), math.inf) + grace

    def _queue(self) -> tuple[dict[T, float], float]:
        """Where the next one is chosen: the connections waiting for their request, or if
        there are none the ones being answered; and their grace."""
        if self._waiting:
            return self._waiting, self.grace
        return self._answering, self.answer_grace


def request_path(target: str) -> str:
    """The path of a request target: without its query, and without the scheme and host of
    the absolute form (``GET http://host:8766/healthz``, which HTTP/1.1 servers must accept
    and some proxies and probes send: it was a 404)."""
    path = target.split("?")[0].split("#")[0]
    scheme, sep, rest = path.partition("://")
    if sep and scheme.lower() in ("http", "https"):
        path = "/" + rest.partition("/")[2]
    return path


def _asks_websocket(upgrade: bytes) -> bool:
    """Whether an ``Upgrade`` header offers a websocket: such a request is refused (404),
    websockets have a port of their own. Another offer (``h2c``, which ``curl --http2``
    sends) is declined by answering in HTTP/1.1, as a server may: refusing it made a probe
    of an existing path a 404."""
    offers = (offer.strip().split(b"/")[0].lower() for offer in upgrade.split(b","))
    return b"websocket" in offers


async def _handle(
    stream: trio.SocketStream, routes: dict[str, Route], answering: Callable[[], None]
) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST)
    with trio.move_on_after(REQUEST_TIMEOUT):
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                await _refuse(stream, exc.error_status_hint, loggable(str(exc), 200))
                return
            if event is h11.NEED_DATA:
                data = await stream.receive_some(MAX_REQUEST)
                conn.receive_data(data)
                if not data:
                    return
                continue
            break
        if not isinstance(event, h11.Request):
            return
        answering()
        target = request_path(event.target.decode("ascii", "replace"))
        fields = {name.lower(): value for name, value in event.headers}
        route = routes.get(target)
        if route is None or _asks_websocket(fields.get(b"upgrade", b"")):
            error = f"no such endpoint; try {', '.join(sorted(routes))}"
            response, payload = _response(404, {"error": error})
        elif event.method not in (b"GET", b"HEAD"):
            method = loggable(event.method.decode("ascii", "replace"), 32)
            error = f"{method} {target}: only GET and HEAD are served"
            response, payload = _response(405, {"error": error}, (("allow", "GET, HEAD"),))
        else:
            host = fields.get(b"host", b"").decode("ascii", "replace")
            try:
                # The answer is built here too: a body or status that cannot be sent is the
                # route's fault as much as an exception.
                response, payload = _response(*route(Request(target, host)))
            except Exception:
                # A fault of one route fails that request only, never the port.
                log.exception("health port: %s %s failed", event.method.decode(), target)
                error = f"{target}: internal error (see the server log)"
                response, payload = _response(500, {"error": error})
        await stream.send_all(conn.send(response) or b"")
        if event.method != b"HEAD":  # a HEAD answer has the headers of a GET and no body
            await stream.send_all(conn.send(h11.Data(data=payload)) or b"")
        await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
        await _finish(stream)


def _response(
    status: int, body: Any, more: tuple[tuple[str, str], ...] = ()
) -> tuple[h11.Response, bytes]:
    """The response head and payload of an answer: ``body`` a :class:`Body` or JSON-able (sent
    as ``application/json``), ``more`` extra headers. Raises (TypeError, ValueError,
    h11.LocalProtocolError) for a body that is not JSON, a status HTTP does not define, or a
    header that cannot be sent."""
    if isinstance(body, Body):
        content_type, payload, extra = body.content_type, body.data, body.headers
    else:
        content_type, payload, extra = "application/json", orjson.dumps(body), _JSON_HEADERS
    headers = [
        ("content-type", content_type),
        ("content-length", str(len(payload))),
        ("connection", "close"),
        # Every answer's type is final: a browser never sniffs JSON or text into a page.
        ("x-content-type-options", "nosniff"),
        *extra,
        *more,
    ]
    reason = HTTPStatus(status).phrase.encode()
    return h11.Response(status_code=status, headers=headers, reason=reason), payload


async def _refuse(stream: trio.SocketStream, status: int, why: str) -> None:
    """Answers a request h11 cannot parse (a malformed line, a header over
    :data:`MAX_REQUEST`: 400 or 431) with a JSON error, then closes without resetting
    (:func:`_finish`)."""
    payload = orjson.dumps({"error": f"bad request: {why}"})
    head = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(payload)}\r\nconnection: close\r\ncache-control: no-store\r\n"
        f"x-content-type-options: nosniff\r\ncontent-security-policy: {INERT_POLICY}\r\n\r\n"
    )
    await stream.send_all(head.encode() + payload)
    await _finish(stream)


async def _finish(stream: trio.SocketStream) -> None:
    """Ends a connection whose answer is sent, without resetting it: the end of the answer is
    signalled (the client reads to it and closes), then what the client still sends (a body
    the port does not read, a pipelined request) is read and dropped until it closes, for at
    most :data:`LINGER` seconds. A socket closed with data unread is reset by the kernel, and
    the reset destroys the answer on its way: a ``POST`` with a body got ``Connection reset
    by peer`` instead of its 405."""
    await stream.send_eof()
    with trio.move_on_after(LINGER):
        while await stream.receive_some(MAX_REQUEST):
            pass


async def serve_health(
    host: str,
    port: int,
    routes: dict[str, Route],
    listeners: list[trio.SocketListener] | None = None,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``routes`` (path -> :data:`Route`) until cancelled, on ``listeners``
    if given (bound already), else on ``host:port``."""
    if listeners is None:
        listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()[1]

    admission: Admission[trio.CancelScope] = Admission(
        MAX_CONNECTIONS, ADMISSION_GRACE, ANSWER_GRACE
    )
    closed = trio.lowlevel.ParkingLot()

    async def serve(stream: trio.SocketStream, scope: trio.CancelScope) -> None:
        try:
            with scope:
                await _handle(
                    stream, routes, lambda: admission.answering(scope, trio.current_time())
                )
        except (h11.ProtocolError, trio.BrokenResourceError) as exc:
            # Whatever one request does wrong ends that request only, never the server.
            log.debug("health request dropped: %s", loggable(str(exc), 200))
        except Exception:
            # A fault of this port's own on one connection ends that connection only: the
            # port (and with it the server, whose nursery it shares) serves on.
            log.exception("health port: a connection failed")
        finally:
            with trio.move_on_after(1, shield=True):
                await stream.aclose()
            admission.closed(scope)
            closed.unpark_all()

    async def accept(listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        async with listener:
            while True:
                # Room first: a full port closes its longest-waiting connection.
                while admission.open >= admission.limit:
                    waiting = admission.to_close(trio.current_time())
                    if waiting is not None:
                        waiting.cancel()
                        await closed.park()
                        continue
                    with trio.move_on_at(admission.next_choice()):
                        await closed.park()
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                        raise
                    log.warning("health port: accept failed (%s); retrying in 0.1 s", exc)
                    await trio.sleep(0.1)
                    continue
                scope = trio.CancelScope()
                admission.opened(scope, trio.current_time())
                nursery.start_soon(serve, stream, scope)

    async with trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(accept, listener, nursery)
        task_status.started(bound)
        await trio.sleep_forever()
