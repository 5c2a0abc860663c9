"""The assembled server: runtime + broadcaster + websocket server + HTTP port (health,
metrics, the dashboard)."""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio

from actors import (
    DEMO_HANDLERS,
    BroadcasterConfig,
    FanoutConfig,
    Handler,
    JobspineError,
    Runtime,
    RuntimeConfig,
    open_runtime,
)
from actors._errors import unwrap_group
from actors._ranges import check_port

from ._dashboard import dashboard_routes
from ._health import INERT_POLICY, Body, Request, serve_health
from ._server import Server, ServerConfig

__all__ = ["PortUnavailableError", "RunningServer", "open_server"]

log = logging.getLogger("jobspine.server")


@attrs.define
class RunningServer:
    """A server :func:`open_server` runs: ``started_at``, when it started (Unix seconds, the
    system's clock); :attr:`uptime` counts on a monotonic clock, which no setting of the
    system's clock moves."""

    runtime: Runtime
    server: Server
    health_port: int | None
    started_at: float
    _started: float = attrs.field(factory=time.monotonic, kw_only=True)

    @property
    def uptime(self) -> float:
        """Seconds since the server started (a monotonic clock's)."""
        return time.monotonic() - self._started

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def url(self) -> str:
        return f"ws://{self.server.config.host}:{self.server.port}"


@asynccontextmanager
async def open_server(
    database: str | os.PathLike[str],
    config: ServerConfig,
    *,
    handlers: Mapping[str, Handler] = DEMO_HANDLERS,
    runtime_config: RuntimeConfig | None = None,
    broadcast: BroadcasterConfig | None = None,
    health_port: int | None = None,
    fanout: FanoutConfig | None = None,
) -> AsyncIterator[RunningServer]:
    """Serve jobspine until the block exits; then shut down gracefully: stop accepting,
    checkpoint-pause running jobs (their events still reach connected clients), close every
    socket with 1001, flush the store. With ``fanout`` (cluster mode), clients get every
    node's events through Redis (see :class:`~actors.FanoutConfig`).

    Startup binds both ports before it opens the database, so a refusal changes nothing
    stored: :class:`PortUnavailableError` (a port in use or not bindable),
    :class:`~actors.DatabaseLockedError` (another process owns the database),
    :class:`~actors.StoreError` (the database cannot be opened). The health port answers
    from before the database opens: ``/healthz`` 200 ``{"status": "starting"}``,
    ``/readyz``, ``/metrics`` and ``/status`` 503, until the runtime is open.

    ``health_port``: the HTTP port (health, metrics, the dashboard), an integer in 0..65535
    (0: any free port), None: none. Any other value raises :class:`~actors.InvalidInputError`
    naming it before anything is bound or opened (the websocket port is
    ``config.port``, checked by :class:`ServerConfig`)."""
    if health_port is not None:
        check_port("health_port", health_port)
    runtime_config = runtime_config or RuntimeConfig()
    listeners: list[trio.SocketListener] = []
    try:
        ws_listeners = await _listen(config.host, config.port, "websocket")
        listeners += ws_listeners
        health_listeners = None
        if health_port is not None:
            health_listeners = await _listen(config.host, health_port, "health")
            listeners += health_listeners
        async with _unwrapped(), trio.open_nursery() as health:
            # The health port answers from here on: while the database opens (a schema
            # migration, the recovery of running jobs: minutes on a large database) a
            # supervisor's liveness probe gets 200 and its readiness probe 503, instead of a
            # port that takes connections and never answers them (and a restart that begins
            # the migration again). Once the runtime is open the routes become the server's.
            routes: dict[str, Any] = {}
            bound = None
            if health_listeners is not None:
                ws_port = ws_listeners[0].socket.getsockname()[1]
                routes.update(_starting_routes(ws_port, config.host))
                bound = await health.start(serve_health, config.host, 0, routes, health_listeners)
            async with open_runtime(
                database,
                handlers=handlers,
                config=runtime_config,
                broadcast=broadcast or BroadcasterConfig(),
                fanout=fanout,
            ) as runtime:
                server = Server(runtime, config)
                async with _unwrapped(), trio.open_nursery() as nursery:
                    await nursery.start(server.run, ws_listeners)
                    running = RunningServer(runtime, server, bound, time.time())
                    if bound is not None:
                        serving = _routes(running)
                        routes.clear()  # no await in between: a request sees one set
                        routes.update(serving)
                        server.http_port = bound
                    try:
                        yield running
                    finally:
                        with trio.move_on_after(runtime_config.shutdown_timeout, shield=True):
                            server.stop_accepting()
                            # Paused (or handed back to a shared database's other nodes)
                            # while the clients are still here to get the events.
                            await runtime.stop_jobs()
                            await runtime.broadcaster.drained()  # type: ignore[union-attr]
                            await server.close_all()
                        nursery.cancel_scope.cancel()
            health.cancel_scope.cancel()
    finally:
        # Serving closes them; these are the ones a failed start never served.
        for listener in listeners:
            listener.socket.close()


class PortUnavailableError(JobspineError):
    """A port of the server cannot be bound (in use, not permitted, no such address).

    ``host``, ``port``, ``role`` (``websocket`` or ``health``) and ``errno`` say which and why;
    nothing was opened or stored."""

    code = "port_unavailable"

    def __init__(self, host: str, port: int, role: str, error: OSError) -> None:
        if error.errno == errno.EADDRINUSE:
            why = f"port {port} on {host} is in use"
        else:
            why = f"cannot listen on {host}:{port}: {error.strerror or error}"
        super().__init__(f"{why} ({role} port)")
        self.host = host
        self.port = port
        self.role = role
        self.errno = error.errno


async def _listen(host: str, port: int, role: str) -> list[trio.SocketListener]:
    try:
        return await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        raise PortUnavailableError(host, port, role, exc) from None
    except (OverflowError, ValueError) as exc:  # a port outside 0-65535
        raise PortUnavailableError(host, port, role, OSError(None, str(exc))) from None


@asynccontextmanager
async def _unwrapped() -> AsyncIterator[None]:
    """At this public boundary an exception group of one error becomes that error."""
    try:
        yield
    except BaseExceptionGroup as group:
        raise unwrap_group(group) from None


def _starting_routes(websocket_port: int, host: str) -> dict[str, Any]:
    """The health port's routes while the runtime opens: alive, not ready."""
    began = time.monotonic()  # a duration: the system's clock may be set meanwhile

    def healthz(request: Request) -> tuple[int, dict[str, Any]]:
        return 200, {"status": "starting", "starting_for": time.monotonic() - began}

    def starting(request: Request) -> tuple[int, dict[str, Any]]:
        return 503, {
            "status": "starting: opening the database (a schema migration or the recovery"
            " of running jobs may take a while)",
            "starting_for": time.monotonic() - began,
        }

    return {
        **dashboard_routes(websocket_port, host),
        "/healthz": healthz,
        "/readyz": starting,
        "/metrics": starting,
        "/status": starting,
    }


def _routes(running: RunningServer) -> dict[str, Any]:
    def healthz(request: Request) -> tuple[int, dict[str, Any]]:
        return 200, {"status": "ok", "uptime": running.uptime}

    def readyz(request: Request) -> tuple[int, dict[str, Any]]:
        if not running.server.accepting:
            return 503, {"status": "not accepting connections"}
        health = running.runtime.store_health
        if health.corrupt is not None:
            return 503, {"status": "database corrupt", "reason": health.corrupt}
        if not health.ok:
            # Reads and subscriptions are still served; writes wait or fail.
            return 503, {"status": "store unavailable", "reason": health.reason}
        node = running.runtime.node
        if not node.healthy:
            # Fenced or lapsed: its jobs were abandoned; it registers again by itself.
            return 503, {"status": "node lease lapsed", "node": node.node_id}
        body: dict[str, Any] = {
            "status": "ready",
            "epoch": running.runtime.epoch,
            "node": node.node_id,
        }
        fanout = running.runtime.fanout
        if fanout is not None and fanout.config.redis is not None:
            redis = fanout.health
            # Redis down: still serving (events come from the log, later), so still ready.
            if not redis.ok:
                body["status"] = "ready, redis unavailable"
            body["redis"] = {"ok": redis.ok, "reason": redis.reason, "outages": redis.outages}
        return 200, body

    # Imported here, once the websocket port listens: prometheus-client takes a while to load.
    from ._metrics import CONTENT_TYPE, metrics_registry, render

    registry = metrics_registry(running)

    def metrics(request: Request) -> tuple[int, Body]:
        headers = (("cache-control", "no-store"), ("content-security-policy", INERT_POLICY))
        return 200, Body(CONTENT_TYPE, render(registry), headers)

    def status(request: Request) -> tuple[int, dict[str, Any]]:
        runtime = running.runtime
        broadcaster = running.server.broadcaster
        return 200, {
            "supervisor": attrs.asdict(runtime.status()),
            "store": {
                "commits": runtime.store_actor.commits,
                "committed_requests": runtime.store_actor.committed_requests,
                "healthy": runtime.store_health.ok,
                "outages": runtime.store_health.outages,
            },
            "broadcaster": {
                "published": broadcaster.published,
                "subscriptions": broadcaster.subscriber_count,
            },
            "connections": len(running.server.connections),
            # Connected workers (the ``/worker`` endpoint), by the name each hello gave.
            "workers": [
                {
                    "name": worker.name,
                    "kinds": sorted(worker.kinds),
                    "capacity": worker.capacity,
                    "running": len(worker.attempts),
                    "draining": worker.closed,
                }
                for worker in running.server.workers.workers
            ],
            "epoch": runtime.epoch,
            "node": {
                "id": runtime.node.node_id,
                "owner": runtime.node.owner,
                "lease_age": runtime.node.lease_age(),
                "healthy": runtime.node.healthy,
                "takeovers": runtime.node.takeovers,
                "fenced": runtime.node.fenced,
            },
        }

    return {
        **dashboard_routes(running.port, running.server.config.host),
        "/healthz": healthz,
        "/readyz": readyz,
        "/metrics": metrics,
        "/status": status,
    }
