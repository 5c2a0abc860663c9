"""Health, readiness and metrics over plain HTTP (h11), on a port of their own.

trio-websocket cannot answer a plain HTTP request, so process supervisors and load balancers
get this small server: ``GET /healthz`` (the process is up), ``GET /readyz`` (accepting
websocket connections: 503 while starting or shutting down) and ``GET /metrics`` (JSON).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import h11
import orjson
import trio

__all__ = ["serve_health"]

log = logging.getLogger("jobspine.health")

MAX_REQUEST = 8192


async def _handle(
    stream: trio.SocketStream, routes: dict[str, Callable[[], tuple[int, dict[str, Any]]]]
) -> None:
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
        payload = orjson.dumps(body)
        headers = [
            ("content-type", "application/json"),
            ("content-length", str(len(payload))),
            ("connection", "close"),
        ]
        await stream.send_all(conn.send(h11.Response(status_code=status, headers=headers)) or b"")
        await stream.send_all(conn.send(h11.Data(data=payload)) or b"")
        await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
    with trio.move_on_after(1, shield=True):
        await stream.aclose()


async def serve_health(
    host: str,
    port: int,
    routes: dict[str, Callable[[], tuple[int, dict[str, Any]]]],
    listeners: list[trio.SocketListener] | None = None,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``routes`` (path -> () -> (status, JSON body)) until cancelled, on ``listeners``
    if given (bound already), else on ``host:port``."""
    if listeners is None:
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
