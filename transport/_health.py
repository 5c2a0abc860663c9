"""Health, readiness and metrics over plain HTTP (h11), on a port of their own.

trio-websocket cannot answer a plain HTTP request, so process supervisors and load balancers
get this small server: ``GET /healthz`` (the process is up), ``GET /readyz`` (accepting
websocket connections: 503 while starting or shutting down), ``GET /metrics`` (Prometheus text
format) and ``GET /status`` (a JSON summary). A route returns a JSON-able body or a
:class:`Body` with its own content type.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

import attrs
import h11
import orjson
import trio

__all__ = ["Body", "serve_health"]

log = logging.getLogger("jobspine.health")

MAX_REQUEST = 8192


#: A route: () -> (HTTP status, a JSON-able body or a :class:`Body`).
Route = Callable[[], tuple[int, Any]]


@attrs.frozen
class Body:
    """A response body that is not JSON."""

    content_type: str
    data: bytes


async def _handle(stream: trio.SocketStream, routes: dict[str, Route]) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST)
    with trio.move_on_after(5):
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(MAX_REQUEST)
                conn.receive_data(data)
                if not data:
                    return
                continue
            break
        if not isinstance(event, h11.Request):
            return
        target = event.target.decode("ascii", "replace").split("?")[0]
        route = routes.get(target)
        if event.method != b"GET" or route is None:
            status, body = 404, {"error": f"no such endpoint; try {', '.join(sorted(routes))}"}
        else:
            status, body = route()
        if isinstance(body, Body):
            content_type, payload = body.content_type, body.data
        else:
            content_type, payload = "application/json", orjson.dumps(body)
        headers = [
            ("content-type", content_type),
            ("content-length", str(len(payload))),
            ("connection", "close"),
        ]
        response = h11.Response(
            status_code=status, headers=headers, reason=HTTPStatus(status).phrase.encode()
        )
        await stream.send_all(conn.send(response) or b"")
        await stream.send_all(conn.send(h11.Data(data=payload)) or b"")
        await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
    with trio.move_on_after(1, shield=True):
        await stream.aclose()


async def serve_health(
    host: str,
    port: int,
    routes: dict[str, Route],
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``routes`` (path -> :data:`Route`) until cancelled."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()[1]

    async def handle(stream: trio.SocketStream) -> None:
        try:
            await _handle(stream, routes)
        except (h11.RemoteProtocolError, trio.BrokenResourceError) as exc:
            log.debug("health request dropped: %s", exc)

    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handle, listeners)
        task_status.started(bound)
        await trio.sleep_forever()
