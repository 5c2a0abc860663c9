"""The websocket server: one connection actor per client, one shared ticker for all."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import attrs
import orjson
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest

from actors import (
    Broadcaster,
    Cursor,
    JobspineError,
    JobState,
    Outbox,
    Runtime,
    parse_room,
)
from actors._codec import converter

from ._auth import Principal, verify_token
from ._protocol import (
    CLOSE,
    PROTOCOL_VERSION,
    Create,
    Hello,
    JobRef,
    ListJobs,
    ProtocolError,
    Refresh,
    Request,
    RequestError,
    Restart,
    Subscribe,
    Unsubscribe,
    error_message,
    parse_request,
    read_request_id,
    reply_message,
)
from ._wire import GuardedStream, serve_websockets

__all__ = ["Server", "ServerConfig"]

log = logging.getLogger("jobspine.server")


@attrs.frozen
class ServerConfig:
    secret: str
    host: str = "127.0.0.1"
    port: int = 8765
    #: Seconds a new connection has to send its hello.
    hello_timeout: float = 5.0
    #: Seconds between server heartbeats (each carries the head of every subscribed room).
    heartbeat_interval: float = 15.0
    #: Largest client frame; a larger one closes the connection with 1009.
    max_frame_size: int = 64 * 1024
    #: Requests per second per connection (token bucket), and the bucket's size.
    request_rate: float = 50.0
    request_burst: int = 100
    #: Requests refused for rate in a row before the connection is closed with 4029.
    flood_limit: int = 200
    #: Requests of one connection being served at once.
    max_inflight: int = 16
    max_subscriptions: int = 256
    #: Connections one user may hold open at once.
    max_connections_per_user: int = 32
    #: A frame the client does not take within this time closes it with 4008.
    send_timeout: float = 10.0


class Connection:
    def __init__(self, server: Server, ws: WebSocketConnection) -> None:
        self.server = server
        self.ws = ws
        self.outbox = Outbox(server.broadcaster.config)
        self.principal: Principal | None = None
        self.inflight = 0
        self.next_heartbeat = 0.0
        self._tokens = float(server.config.request_burst)
        self._refill_at = trio.current_time()
        self._refused = 0
        self._close: tuple[int, str] | None = None
        self._done = trio.Event()

    # -- lifecycle ------------------------------------------------------------------------------

    async def run(self) -> None:
        server = self.server
        try:
            if not await self._hello():
                return
            server.connections.add(self)
            user = self.user.user_id
            server.per_user[user] = server.per_user.get(user, 0) + 1
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._sender, nursery.cancel_scope)
                await self._reader(nursery)
                nursery.cancel_scope.cancel()
        finally:
            server.broadcaster.leave_all(self.outbox)
            if self in server.connections:
                server.connections.discard(self)
                user = self.user.user_id
                server.per_user[user] -= 1
                if not server.per_user[user]:
                    del server.per_user[user]
            code, reason = self._close or (CLOSE["normal"], "")
            with trio.move_on_after(1, shield=True):
                await self.ws.aclose(code, reason)
            self._done.set()

    def close(self, code: int, reason: str) -> None:
        """Close after the frames already queued are sent."""
        if self._close is None:
            self._close = (code, reason)
            self.outbox.close_reason = reason
            self.outbox.push_control(b"")

    async def _hello(self) -> bool:
        config = self.server.config
        frame: str | bytes | None = None
        with trio.move_on_after(config.hello_timeout):
            try:
                frame = await self.ws.get_message()
            except ConnectionClosed:
                return False
        if frame is None:
            await self.ws.aclose(
                CLOSE["hello_timeout"], f"no hello within {config.hello_timeout:g} s"
            )
            return False
        try:
            request = parse_request(frame)
            if request.op != "hello":
                raise ProtocolError("protocol_error", "the first frame must be a hello")
            hello = request.body
            assert isinstance(hello, Hello)
            if hello.protocol != PROTOCOL_VERSION:
                raise ProtocolError(
                    "protocol_error",
                    f"protocol {hello.protocol} unsupported; use {PROTOCOL_VERSION}",
                )
            self.principal = verify_token(config.secret, hello.token)
            user = self.principal.user_id
            if self.server.per_user.get(user, 0) >= config.max_connections_per_user:
                raise ProtocolError(
                    "too_many_connections",
                    f"at most {config.max_connections_per_user} connections per user",
                )
        except ProtocolError as exc:
            code = CLOSE.get(exc.code, CLOSE["protocol_error"])
            await self.ws.aclose(code, exc.message[:120])
            return False
        self.next_heartbeat = trio.current_time() + config.heartbeat_interval
        self.outbox.push_control(reply_message(request.id, self._welcome()))
        return True

    def _welcome(self) -> dict[str, Any]:
        assert self.principal is not None
        return {
            "protocol": PROTOCOL_VERSION,
            "user_id": self.principal.user_id,
            "admin": self.principal.admin,
            "expires_at": self.principal.expires_at,
            "epoch": self.server.broadcaster.epoch,
            "heartbeat_interval": self.server.config.heartbeat_interval,
        }

    async def _sender(self, scope: trio.CancelScope) -> None:
        outbox = self.outbox
        config = self.server.config
        while True:
            await outbox.wait()
            # Let the rest of a burst reach the outbox first: one frame carries it all.
            await trio.lowlevel.cancel_shielded_checkpoint()
            items, skipped = outbox.take()
            items = [item for item in items if item]
            if items or skipped:
                if len(items) == 1 and not skipped:
                    frame = items[0]
                else:
                    frame = b'{"type":"batch","messages":[' + b",".join(items) + b"]"
                    if skipped:
                        frame += b',"skipped":' + orjson.dumps(skipped)
                    frame += b"}"
                with trio.move_on_after(config.send_timeout) as timer:
                    try:
                        await self.ws.send_message(frame.decode())
                    except ConnectionClosed:
                        scope.cancel()
                        return
                if timer.cancelled_caught:
                    # The socket is mid-frame: the client will see the connection drop rather
                    # than a clean close frame (documented in PROTOCOL.md).
                    self._close = (CLOSE["slow_consumer"], "slow consumer: a send timed out")
                    scope.cancel()
                    return
            if outbox.close_reason is not None:
                if self._close is None:
                    self._close = (CLOSE["slow_consumer"], outbox.close_reason)
                scope.cancel()
                return

    async def _reader(self, nursery: trio.Nursery) -> None:
        while True:
            try:
                frame = await self.ws.get_message()
            except ConnectionClosed:
                return
            if not self._take_token():
                self._refused += 1
                if self._refused > self.server.config.flood_limit:
                    self.close(CLOSE["flood"], "request flood")
                    return
                self._reply_error(
                    read_request_id(frame), "rate_limited", "too many requests; slow down"
                )
                continue
            self._refused = 0
            try:
                request = parse_request(frame)
            except RequestError as exc:
                self._reply_error(exc.request_id, exc.code, exc.message)
                continue
            if self.inflight >= self.server.config.max_inflight:
                self._reply_error(request.id, "busy", "too many requests in flight")
                continue
            self.inflight += 1
            nursery.start_soon(self._serve, request)

    def _take_token(self) -> bool:
        config = self.server.config
        now = trio.current_time()
        self._tokens = min(
            config.request_burst, self._tokens + (now - self._refill_at) * config.request_rate
        )
        self._refill_at = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True

    def _reply_error(self, request_id: str | int | None, code: str, message: str) -> None:
        self.outbox.push_control(error_message(request_id, code, message))

    # -- requests -------------------------------------------------------------------------------

    async def _serve(self, request: Request) -> None:
        try:
            handler = HANDLERS[request.op]
            result = await handler(self, request)
            if result is not _ALREADY_REPLIED:
                self.outbox.push_control(reply_message(request.id, result))
        except ProtocolError as exc:
            self._reply_error(request.id, exc.code, exc.message)
        except JobspineError as exc:
            self._reply_error(request.id, exc.code, str(exc))
        except Exception:
            log.exception("request %s failed", request.op)
            self._reply_error(request.id, "internal", "internal error; the request was not applied")
        finally:
            self.inflight -= 1

    @property
    def user(self) -> Principal:
        assert self.principal is not None
        return self.principal

    async def own_job(self, job_id: str) -> Any:
        job = await self.server.runtime.get_job(job_id)
        if job.user_id != self.user.user_id and not self.user.admin:
            raise ProtocolError("forbidden", f"job {job_id} belongs to another user")
        return job

    def check_room(self, room: str) -> tuple[str, str]:
        kind, ident = parse_room(room)
        if kind == "user" and ident != self.user.user_id and not self.user.admin:
            raise ProtocolError("forbidden", f"room {room} belongs to another user")
        return kind, ident


_ALREADY_REPLIED = object()
Handler = Callable[[Connection, Request], Awaitable[Any]]


async def _ping(conn: Connection, request: Request) -> Any:
    return {"pong": time.time()}


async def _refresh(conn: Connection, request: Request) -> Any:
    body = request.body
    assert isinstance(body, Refresh)
    principal = verify_token(conn.server.config.secret, body.token)
    if principal.user_id != conn.user.user_id:
        raise ProtocolError("forbidden", "a refreshed token must be for the same user")
    conn.principal = principal
    return {"expires_at": principal.expires_at}


async def _subscribe(conn: Connection, request: Request) -> Any:
    body = request.body
    assert isinstance(body, Subscribe)
    kind, ident = conn.check_room(body.room)
    if kind == "job":
        await conn.own_job(ident)
    outbox = conn.outbox
    if body.room not in outbox.subscriptions and (
        len(outbox.subscriptions) >= conn.server.config.max_subscriptions
    ):
        raise ProtocolError("too_many_subscriptions", "subscription limit reached")
    broadcaster = conn.server.broadcaster
    cursor = None if body.cursor is None else Cursor(body.cursor.epoch, body.cursor.seq)
    joined = await broadcaster.join(outbox, body.room, cursor)
    result: dict[str, Any] = converter.unstructure(joined)
    if joined.reset_reason is not None:
        result["snapshot"] = await _snapshot(conn, kind, ident)
    # The reply goes out before the replayed events; no await between the two.
    outbox.push_control(reply_message(request.id, result))
    broadcaster.finish_join(outbox, body.room)
    return _ALREADY_REPLIED


async def _snapshot(conn: Connection, kind: str, ident: str) -> Any:
    runtime = conn.server.runtime
    if kind == "job":
        return {"job": converter.unstructure(await runtime.get_job(ident))}
    jobs = await runtime.list_jobs(ident, limit=100)
    return {"jobs": converter.unstructure(jobs)}


async def _unsubscribe(conn: Connection, request: Request) -> Any:
    body = request.body
    assert isinstance(body, Unsubscribe)
    parse_room(body.room)
    conn.server.broadcaster.leave(conn.outbox, body.room)
    return {"room": body.room}


async def _create(conn: Connection, request: Request) -> Any:
    body = request.body
    assert isinstance(body, Create)
    return await conn.server.runtime.create_job(body.kind, conn.user.user_id, body.input)


async def _get(conn: Connection, request: Request) -> Any:
    body = request.body
    assert isinstance(body, JobRef)
    return await conn.own_job(body.job_id)


async def _list(conn: Connection, request: Request) -> Any:
    body = request.body
    assert isinstance(body, ListJobs)
    user_id: str | None = conn.user.user_id
    if body.user_id is not None and body.user_id != user_id:
        if not conn.user.admin:
            raise ProtocolError("forbidden", "only an admin may list another user's jobs")
        user_id = body.user_id
    if conn.user.admin and body.user_id is None:
        user_id = None
    # parse_request checked the limit's range and that the state is one.
    states = None if body.state is None else [JobState(body.state)]
    return await conn.server.runtime.list_jobs(
        user_id, states=states, kind=body.kind, limit=body.limit
    )


def _job_action(name: str) -> Handler:
    async def handle(conn: Connection, request: Request) -> Any:
        body = request.body
        assert isinstance(body, JobRef)
        await conn.own_job(body.job_id)
        runtime = conn.server.runtime
        by = conn.user.user_id
        if name == "cancel":
            return await runtime.cancel(body.job_id, by=by)
        if name == "pause":
            return await runtime.pause(body.job_id, by=by)
        if name == "resume":
            return await runtime.resume(body.job_id, by=by)
        if name == "recovery_options":
            return await runtime.get_recovery_options(body.job_id)
        return await runtime.get_checkpoint_details(body.job_id)

    return handle


async def _restart(conn: Connection, request: Request) -> Any:
    body = request.body
    assert isinstance(body, Restart)
    await conn.own_job(body.job_id)
    return await conn.server.runtime.restart(body.job_id, body.modifications, by=conn.user.user_id)


async def _stats(conn: Connection, request: Request) -> Any:
    if not conn.user.admin:
        raise ProtocolError("forbidden", "global stats are for admins; use my_stats")
    return await conn.server.runtime.get_stats()


async def _my_stats(conn: Connection, request: Request) -> Any:
    return await conn.server.runtime.get_user_stats(conn.user.user_id)


async def _hello_again(conn: Connection, request: Request) -> Any:
    raise ProtocolError("bad_request", "already authenticated; use refresh for a new token")


HANDLERS: dict[str, Handler] = {
    "hello": _hello_again,
    "refresh": _refresh,
    "ping": _ping,
    "subscribe": _subscribe,
    "unsubscribe": _unsubscribe,
    "create": _create,
    "get": _get,
    "list": _list,
    "cancel": _job_action("cancel"),
    "pause": _job_action("pause"),
    "resume": _job_action("resume"),
    "restart": _restart,
    "recovery_options": _job_action("recovery_options"),
    "checkpoint_details": _job_action("checkpoint_details"),
    "stats": _stats,
    "my_stats": _my_stats,
}


class Server:
    """Serves the protocol for one runtime (which must have a broadcaster)."""

    def __init__(self, runtime: Runtime, config: ServerConfig) -> None:
        if runtime.broadcaster is None:
            raise ValueError("the runtime needs a broadcaster: open_runtime(broadcast=...)")
        self.runtime = runtime
        self.broadcaster: Broadcaster = runtime.broadcaster
        self.config = config
        self.connections: set[Connection] = set()
        self.per_user: dict[str, int] = {}
        self.port = 0
        self._listen_scope = trio.CancelScope()
        self._accepting = False
        self._closed_all = trio.Event()

    @property
    def accepting(self) -> bool:
        return self._accepting

    async def run(self, *, task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept connections until :meth:`stop_accepting`; connections run until closed."""
        async with trio.open_nursery() as connections:
            connections.start_soon(self._ticker)
            with self._listen_scope:
                async with trio.open_nursery() as listener:
                    listeners = await listener.start(
                        partial(
                            serve_websockets,
                            self._handle,
                            self.config.host,
                            self.config.port,
                            handler_nursery=connections,
                            max_message_size=self.config.max_frame_size,
                        )
                    )
                    self.port = listeners[0].socket.getsockname()[1]
                    self._accepting = True
                    task_status.started(self)
            self._accepting = False
            await self._closed_all.wait()
            connections.cancel_scope.cancel()

    def stop_accepting(self) -> None:
        self._listen_scope.cancel()

    async def close_all(
        self, code: int = CLOSE["going_away"], reason: str = "server shutdown"
    ) -> None:
        """Close every connection once its queued frames are sent (bounded)."""
        self.stop_accepting()
        for conn in list(self.connections):
            conn.close(code, reason)
        with trio.move_on_after(2):
            for conn in list(self.connections):
                await conn._done.wait()
        self._closed_all.set()

    async def _handle(self, request: WebSocketRequest, stream: GuardedStream) -> None:
        if not self._accepting:
            await request.reject(503)
            return
        ws = await request.accept()
        stream.connection = ws  # so that a client's protocol error gets its close frame
        await Connection(self, ws).run()

    async def _ticker(self) -> None:
        """One timer for all connections: heartbeats with room heads, token expiry."""
        while True:
            await trio.sleep(min(1.0, self.config.heartbeat_interval))
            now = trio.current_time()
            wall = time.time()
            for conn in list(self.connections):
                if conn.principal is not None and conn.principal.expires_at <= wall:
                    conn.close(
                        CLOSE["token_expired"], "the token expired; reconnect with a new one"
                    )
                    continue
                if now >= conn.next_heartbeat:
                    conn.next_heartbeat = now + self.config.heartbeat_interval
                    heads = self.broadcaster.heads_for(conn.outbox)
                    conn.outbox.push_control(
                        orjson.dumps(
                            {
                                "type": "heartbeat",
                                "time": wall,
                                "epoch": self.broadcaster.epoch,
                                "heads": heads,
                            }
                        )
                    )
