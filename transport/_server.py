"""The websocket server: one connection actor per client, one shared ticker for all."""

from __future__ import annotations

import logging
import math
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any

import attrs
import orjson
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest

from actors import (
    Broadcaster,
    Cursor,
    InvalidInputError,
    Job,
    JobspineError,
    Outbox,
    Runtime,
    encode_batch,
    parse_room,
)
from actors._codec import converter
from actors._errors import shown
from actors._metrics import OutboxTotals
from actors._payloads import JOB_PAYLOAD_FIELDS, fit_job, inline_payloads
from actors._ranges import check_fields, check_port
from actors._remote import RemotePlacement

from ._auth import Principal, verify_token
from ._protocol import (
    CLOSE,
    MAX_QUEUE_USERS,
    PROTOCOL_VERSION,
    WORKER_HELLO_FIELDS,
    Children,
    Create,
    Hello,
    JobRef,
    ListJobs,
    PayloadRef,
    ProtocolError,
    Prune,
    QueueStatsRequest,
    Refresh,
    Request,
    RequestError,
    Restart,
    Subscribe,
    Unsubscribe,
    error_message,
    hello_fields,
    parse_request,
    read_request_id,
    reply_message,
)
from ._wire import GuardedStream, send_deadline, serve_websockets
from ._workers import MAX_WORKER_HELLO, WORKER_PATH, WorkerConnection

#: The close reason for a worker's hello (``kinds``, ``capacity``) on the client endpoint.
WORKER_HELLO_HERE = (
    "hello: kinds and capacity are a worker's: this is the client endpoint; workers connect"
    f" to ws://HOST:PORT{WORKER_PATH}"
)

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
    #: Largest message the server sends (bytes of one frame, a batch included). At least
    #: the largest storable payload (checkpoints and results: 1 MiB) plus ``envelope_margin``,
    #: so that ``get_payload`` can return any stored value. A client must accept this much.
    #: Also the bytes of queued replies past which a client's next request is not read.
    max_message_size: int = 2 * 1024 * 1024
    #: Room left in ``max_message_size`` for a reply's envelope and a batch's framing.
    envelope_margin: int = 64 * 1024
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
    #: Largest frame the server sends, in bytes, batch envelope included (a single larger
    #: message is sent alone).
    batch_bytes: int = 64 * 1024
    #: A frame the client does not take within this time (proportionally longer for a frame
    #: over ``batch_bytes``) drops the connection: it takes less than ``batch_bytes`` per
    #: ``send_timeout``.
    send_timeout: float = 10.0

    @property
    def worker_frame_size(self) -> int:
        """The largest frame the websocket layer reads (a larger one closes the connection
        with 1009): what a worker's hello reply announces as its ``max_frame_size`` (workers
        send checkpoints and results of up to 1 MiB)."""
        return max(self.max_frame_size, self.max_message_size)

    def __attrs_post_init__(self) -> None:
        """Refuse a setting that would break every connection, with
        :class:`~actors.InvalidInputError` naming it and its value: every float is a finite
        number of seconds (or requests/s) above 0, every int a count or size from 1
        (``envelope_margin`` from 0 and below ``max_message_size``), ``port`` an integer in
        0..65535 (0: any free port). A NaN or negative timeout failed each connection with a
        traceback, a heartbeat_interval of 0 spun the CPU, a limit or a request_burst of 0
        refused every request, a port of 70000 passed until it was bound."""
        check_fields(
            self,
            zero=("envelope_margin",),
            units={"request_rate": "requests per second"},
            skip=("port",),
        )
        check_port("port", self.port)
        if self.envelope_margin >= self.max_message_size:
            raise InvalidInputError(
                f"envelope_margin ({self.envelope_margin}) must be below max_message_size"
                f" ({self.max_message_size}): no reply would fit"
            )


class Connection:
    def __init__(self, server: Server, ws: WebSocketConnection, stream: GuardedStream) -> None:
        self.server = server
        self.ws = ws
        self.stream = stream
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
            server.closed_outboxes.add(self.outbox)
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
        """Close after the messages already queued are sent."""
        if self._close is None:
            self._close = (code, reason)
            self.outbox.close(reason)

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
        if _frame_size(frame, config.max_frame_size) > config.max_frame_size:
            await self.ws.aclose(CLOSE["too_big"], "hello over max_frame_size")
            return False
        try:
            try:
                request = parse_request(frame)
            except ProtocolError:
                fields = hello_fields(frame)
                if fields is not None and fields & WORKER_HELLO_FIELDS:
                    # A worker's hello: its URL names this endpoint (a path other than
                    # /worker). Naming the field refused ("unknown field 'batch'") left its
                    # operator guessing.
                    raise ProtocolError("protocol_error", WORKER_HELLO_HERE) from None
                raise
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
            if self.principal.role != "user":
                raise ProtocolError(
                    "wrong_role", f"a worker token connects to {WORKER_PATH}, not here"
                )
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
        self.stream.admit()
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
            "max_frame_size": self.server.config.max_frame_size,
            "max_message_size": self.server.config.max_message_size,
            "inline_payload_limit": self.server.broadcaster.config.inline_payload_limit,
            "http_port": self.server.http_port,
        }

    async def _sender(self, scope: trio.CancelScope) -> None:
        outbox = self.outbox
        config = self.server.config
        while True:
            await outbox.wait()
            # Let the rest of a burst reach the outbox first: one frame carries it all.
            await trio.lowlevel.cancel_shielded_checkpoint()
            messages = outbox.take(config.batch_bytes)
            if messages:
                frame = encode_batch(messages)
                # The timeout restarts with each frame and grows with a frame over the cap (a
                # single large message).
                timeout = send_deadline(len(frame), config.send_timeout, config.batch_bytes)
                with trio.move_on_after(timeout) as timer:
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
            if outbox.closed:
                # Everything queued before the close was sent.
                if self._close is None:
                    self._close = (CLOSE["slow_consumer"], outbox.close_reason or "")
                scope.cancel()
                return

    async def _reader(self, nursery: trio.Nursery) -> None:
        while True:
            # A client that does not read its replies sends no more requests (they wait in
            # its socket) while those queued hold over max_message_size: with the replies
            # of the requests in flight, that bounds what its requests make the server hold.
            await self.outbox.wait_control(self.server.config.max_message_size)
            try:
                frame = await self.ws.get_message()
            except ConnectionClosed:
                return
            if _frame_size(frame, self.server.config.max_frame_size) > (
                self.server.config.max_frame_size
            ):
                # The socket reads frames up to the worker endpoint's limit; a client's is
                # smaller (the websocket layer would close with the same code).
                self.close(CLOSE["too_big"], "frame over max_frame_size")
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
                self.outbox.push_control(self.reply(request.id, result))
        except ProtocolError as exc:
            self._reply_error(request.id, exc.code, exc.message)
        except JobspineError as exc:
            self._reply_error(request.id, exc.code, str(exc))
        except Exception:
            log.exception("request %s failed", request.op)
            self._reply_error(request.id, "internal", "internal error; the request was not applied")
        finally:
            self.inflight -= 1

    # -- payload sizes --------------------------------------------------------------------------

    @property
    def reply_budget(self) -> int:
        """Bytes a reply's result may take: the message limit less the envelope margin."""
        config = self.server.config
        return config.max_message_size - config.envelope_margin

    def jobs_value(self, jobs: list[Job]) -> list[dict[str, Any]]:
        """Jobs for a list or a snapshot: payloads over the inline limit left out, and every
        payload left out if the list would still not fit in one message."""
        limit = self.server.broadcaster.config.inline_payload_limit
        values: list[dict[str, Any]] = converter.unstructure(jobs)
        shrunk = [inline_payloads(job, limit, JOB_PAYLOAD_FIELDS) for job in values]
        if len(orjson.dumps(shrunk)) > self.reply_budget:
            shrunk = [inline_payloads(job, -1, JOB_PAYLOAD_FIELDS) for job in values]
        return shrunk

    def reply(self, request_id: str | int | None, result: Any) -> bytes:
        """The reply message. Raises :class:`ProtocolError` ``payload_too_large`` for a result
        that cannot fit in one message: the server never sends a frame over its own limit."""
        if isinstance(result, Job):
            # One job: payloads inline if the whole reply fits, else the largest left out.
            envelope = len(reply_message(request_id, None))
            result = fit_job(converter.unstructure(result), self.reply_budget - envelope)
        frame = reply_message(request_id, result)
        if len(frame) > self.reply_budget:
            raise ProtocolError(
                "payload_too_large",
                f"the reply would be {len(frame)} bytes, over the largest message"
                f" ({self.reply_budget} bytes and envelope); ask for less",
            )
        return frame

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
            raise ProtocolError("forbidden", f"room {shown(room)} belongs to another user")
        return kind, ident


def _frame_size(frame: str | bytes, limit: int) -> int:
    """Bytes of a frame as sent (UTF-8), computed only when it could be over ``limit``."""
    if isinstance(frame, bytes) or len(frame) * 4 <= limit:
        return len(frame)
    return len(frame.encode(errors="surrogatepass"))


_ALREADY_REPLIED = object()
Handler = Callable[[Connection, Request], Awaitable[Any]]


async def _ping(conn: Connection, request: Request) -> Any:
    return {"pong": time.time()}


async def _refresh(conn: Connection, request: Request) -> Any:
    body = request.body
    assert isinstance(body, Refresh)
    principal = verify_token(conn.server.config.secret, body.token)
    if principal.user_id != conn.user.user_id or principal.role != conn.user.role:
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
    try:
        reply = conn.reply(request.id, result)
    except ProtocolError:
        broadcaster.leave(outbox, body.room)  # refused: the room is not joined
        raise
    # The reply goes out before the replayed events; no await between the two.
    outbox.push_control(reply)
    broadcaster.finish_join(outbox, body.room)
    return _ALREADY_REPLIED


async def _snapshot(conn: Connection, kind: str, ident: str) -> Any:
    runtime = conn.server.runtime
    if kind == "job":
        return {"job": conn.jobs_value([await runtime.get_job(ident)])[0]}
    return {"jobs": conn.jobs_value(await runtime.list_jobs(ident, limit=100))}


async def _unsubscribe(conn: Connection, request: Request) -> Any:
    body = request.body
    assert isinstance(body, Unsubscribe)
    parse_room(body.room)
    conn.server.broadcaster.leave(conn.outbox, body.room)
    return {"room": body.room}


async def _create(conn: Connection, request: Request) -> Any:
    body = request.body
    assert isinstance(body, Create)
    return await conn.server.runtime.create_job(
        body.kind,
        conn.user.user_id,
        body.input,
        priority=0 if body.priority is None else body.priority,
        delay=body.delay,
        run_at=body.run_at,
        max_attempts=body.max_attempts,
        timeout=body.timeout,
        tags=body.tags or (),
        parent_id=body.parent_id,
        idempotency_key=body.idempotency_key,
    )


async def _get(conn: Connection, request: Request) -> Any:
    body = request.body
    assert isinstance(body, JobRef)
    return await conn.own_job(body.job_id)


def _whose(conn: Connection, user_id: str | None, what: str) -> str | None:
    """The user whose jobs a request reads: the caller's own; an admin names anyone's, or
    with None everyone's."""
    if user_id is not None and user_id != conn.user.user_id:
        if not conn.user.admin:
            raise ProtocolError("forbidden", f"only an admin may read another user's {what}")
        return user_id
    if conn.user.admin and user_id is None:
        return None
    return conn.user.user_id


async def _list(conn: Connection, request: Request) -> Any:
    body = request.body
    assert isinstance(body, ListJobs)
    # parse_request checked the limit's range and the states.
    jobs = await conn.server.runtime.list_jobs(
        _whose(conn, body.user_id, "jobs"),
        states=body.state_filter(),
        kind=body.kind,
        tag=body.tag,
        parent_id=body.parent_id,
        limit=body.limit,
    )
    return conn.jobs_value(jobs)


async def _children(conn: Connection, request: Request) -> Any:
    body = request.body
    assert isinstance(body, Children)
    parent = await conn.own_job(body.job_id)
    # Children have their parent's user (create checks it), so they are the caller's to see.
    jobs = await conn.server.runtime.list_jobs(
        parent.user_id, parent_id=parent.id, limit=body.limit
    )
    return conn.jobs_value(jobs)


async def _get_payload(conn: Connection, request: Request) -> Any:
    body = request.body
    assert isinstance(body, PayloadRef)
    job = await conn.own_job(body.job_id)
    if body.seq is None:
        if body.field not in JOB_PAYLOAD_FIELDS:
            raise ProtocolError(
                "invalid_input",
                f"get_payload: field must be one of {', '.join(JOB_PAYLOAD_FIELDS)}"
                " (or give the seq of an event)",
            )
        value = converter.unstructure(job)[body.field]
    else:
        if not 1 <= body.seq <= job.seq:
            raise ProtocolError(
                "invalid_input", f"get_payload: job {job.id} has events 1..{job.seq}"
            )
        events = await conn.server.runtime.read_events(job.id, body.seq - 1, 1)
        event = events[0] if events else None
        if event is None or body.field not in event.data:
            raise ProtocolError(
                "invalid_input",
                f"get_payload: event {body.seq} of job {job.id} has no field {shown(body.field)}",
            )
        value = event.data[body.field]
    size = len(orjson.dumps(value))
    if size > conn.reply_budget:
        raise ProtocolError(
            "payload_too_large",
            f"{shown(body.field)} of job {job.id} is {size} bytes, over the largest message"
            f" ({conn.reply_budget} bytes and envelope)",
        )
    return {"job_id": job.id, "field": body.field, "seq": body.seq, "size": size, "value": value}


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


async def _queue_stats(conn: Connection, request: Request) -> Any:
    body = request.body
    assert isinstance(body, QueueStatsRequest)
    stats = await conn.server.runtime.queue_stats(_whose(conn, body.user_id, "queue"))
    result = attrs.asdict(stats)
    by_user = stats.waiting_by_user
    most = sorted(by_user.items(), key=lambda item: (-item[1], item[0]))[:MAX_QUEUE_USERS]
    result["waiting_by_user"] = dict(most)
    result["waiting_users"] = len(by_user)
    return result


async def _prune(conn: Connection, request: Request) -> Any:
    body = request.body
    assert isinstance(body, Prune)
    if not conn.user.admin:
        raise ProtocolError("forbidden", "prune is for admins")
    older_than = body.older_than
    if older_than is not None and not (math.isfinite(older_than) and older_than >= 0):
        raise ProtocolError(
            "invalid_input", f"older_than must be a finite number of seconds >= 0: {older_than}"
        )
    report = await conn.server.runtime.prune(older_than=older_than, dry_run=body.dry_run)
    return {
        "jobs": report.jobs,
        "events": report.events,
        "batches": report.batches,
        "dry_run": report.dry_run,
    }


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
    "get_payload": _get_payload,
    "list": _list,
    "children": _children,
    "cancel": _job_action("cancel"),
    "pause": _job_action("pause"),
    "resume": _job_action("resume"),
    "restart": _restart,
    "recovery_options": _job_action("recovery_options"),
    "checkpoint_details": _job_action("checkpoint_details"),
    "stats": _stats,
    "my_stats": _my_stats,
    "queue_stats": _queue_stats,
    "prune": _prune,
}


def _limit_unsent(sock: trio.socket.SocketType, limit: int) -> None:
    """Keep at most about ``limit`` bytes not yet sent in the kernel (accepted connections
    inherit it from the listening socket). Otherwise a slow reader's backlog hides in a
    send buffer of megabytes, where it cannot be coalesced, ``lagged`` waits behind it, and a
    socket that is being read stays unwritable for long stretches (it becomes writable only
    once a third of that buffer has drained), which looks like a client taking no data."""
    option = getattr(socket, "TCP_NOTSENT_LOWAT", None)
    if option is not None:
        sock.setsockopt(socket.IPPROTO_TCP, option, limit)


class Server:
    """Serves the protocol for one runtime (which must have a broadcaster)."""

    def __init__(self, runtime: Runtime, config: ServerConfig) -> None:
        if runtime.broadcaster is None:
            raise ValueError("the runtime needs a broadcaster: open_runtime(broadcast=...)")
        self.runtime = runtime
        self.broadcaster: Broadcaster = runtime.broadcaster
        self.config = config
        self.connections: set[Connection] = set()
        #: Connected worker processes, placed before in-process handlers.
        self.workers = RemotePlacement(runtime.supervisor)
        runtime.supervisor.add_placement(self.workers)
        self.worker_connections: set[WorkerConnection] = set()
        self.per_user: dict[str, int] = {}
        #: Delivery counters of connections that have ended (for the metrics).
        self.closed_outboxes = OutboxTotals()
        self.port = 0
        #: The HTTP port (dashboard, health, metrics), announced in the hello's reply; None
        #: when the server has none.
        self.http_port: int | None = None
        self._listen_scope = trio.CancelScope()
        self._accepting = False
        self._closed_all = trio.Event()

    @property
    def accepting(self) -> bool:
        return self._accepting

    async def run(
        self,
        listeners: Sequence[trio.SocketListener] | None = None,
        *,
        task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept connections until :meth:`stop_accepting`; connections run until closed.

        ``listeners``: sockets bound already (closed when accepting stops); by default the
        server binds ``config.host:config.port`` itself."""
        if listeners is None:
            listeners = await trio.open_tcp_listeners(self.config.port, host=self.config.host)
        for each in listeners:
            _limit_unsent(each.socket, self.config.batch_bytes)
        async with trio.open_nursery() as connections:
            connections.start_soon(self._ticker)
            with self._listen_scope:
                async with trio.open_nursery() as listener:
                    # Connections may be queued on sockets bound before the runtime started:
                    # they are accepted from the first moment the server serves.
                    self.port = listeners[0].socket.getsockname()[1]
                    self._accepting = True
                    await listener.start(
                        partial(
                            serve_websockets,
                            self._handle,
                            list(listeners),
                            handler_nursery=connections,
                            max_message_size=self.config.worker_frame_size,
                            # The opening handshake (h11 reads at most 16 KiB of headers)
                            # and one hello frame.
                            unadmitted_bytes=self.config.max_frame_size + 32 * 1024,
                        )
                    )
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
        for worker in list(self.worker_connections):
            worker.close(code, reason)
        with trio.move_on_after(2):
            for conn in list(self.connections):
                await conn._done.wait()
            for worker in list(self.worker_connections):
                await worker.done.wait()
        self._closed_all.set()

    async def _handle(self, request: WebSocketRequest, stream: GuardedStream) -> None:
        if not self._accepting:
            await request.reject(503)
            return
        ws = await request.accept()
        stream.connection = ws  # so that a client's protocol error gets its close frame
        if request.path.partition("?")[0].rstrip("/") == WORKER_PATH:
            stream.bound(MAX_WORKER_HELLO)
            await WorkerConnection(self, ws, stream).run()
        else:
            await Connection(self, ws, stream).run()

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
