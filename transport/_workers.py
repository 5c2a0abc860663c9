"""The worker endpoint (``ws://HOST:PORT/worker``): one connection actor per worker process.

A connection authenticates with a worker token, declares the kinds it serves and its
capacity, and becomes a :class:`~actors._remote.RemoteWorker` of the server's
:class:`~actors._remote.RemotePlacement`. Its reports are fenced here first (the job must be
assigned to this connection, with this attempt), then by the store (by attempt), so a stale
or foreign report changes nothing stored. The frames are documented in PROTOCOL.md, *Worker
protocol*.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import TYPE_CHECKING, Any

import attrs
import orjson
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from actors import InvalidInputError, JobError, JobspineError, KindOptions, encode_batch
from actors._codec import check_kind
from actors._errors import shown_names
from actors._options import options_from_wire
from actors._remote import RemoteAttempt, RemotePlacement, RemoteWorker

from ._auth import verify_token
from ._protocol import (
    CLOSE,
    PROTOCOL_VERSION,
    WORKER_HELLO_FIELDS,
    NoArgs,
    ProtocolError,
    Request,
    RequestError,
    error_message,
    hello_fields,
    parse_request,
    parse_requests,
    reply_message,
)
from ._wire import Inbound, loggable, send_deadline

if TYPE_CHECKING:
    from ._server import Server
    from ._wire import GuardedStream

__all__ = ["WORKER_OPS", "WORKER_PATH", "WorkerConnection"]

log = logging.getLogger("jobspine.workers")

WORKER_PATH = "/worker"
#: The close reason for a client's hello (no ``kinds``, no ``capacity``) on this endpoint.
CLIENT_HELLO_HERE = (
    "hello: no kinds or capacity: this is the worker endpoint (/worker); clients connect to"
    " the server's URL without /worker"
)
#: The close reason (1013) for a hello whose new kinds have no room now (the full reason is in
#: the server's log; a close reason has at most 123 bytes).
NO_ROOM_NOW = (
    "hello: no room now for this worker's new kinds (the known kinds are all held): try again later"
)
#: Kinds one worker may declare, and its largest capacity.
MAX_KINDS = 256
MAX_CAPACITY = 1000
MAX_NAME_LENGTH = 256
#: Bytes a worker may send before its hello is accepted: the handshake and a hello declaring
#: the most kinds of the longest names (256 of 1,024 characters), with room for their options.
MAX_WORKER_HELLO = 512 * 1024
#: Bytes queued for a worker that is not reading before it is disconnected as stalled.
MAX_QUEUED_BYTES = 32 * 1024 * 1024
#: The largest frame the server sends a worker: an assignment carries the input and the
#: checkpoint (1 MiB each at most).
MAX_ASSIGN_SIZE = 4 * 1024 * 1024
#: Seconds a drain's re-queues may wait for the store, past the grace period.
DRAIN_WRITE_TIMEOUT = 10.0
#: The reason a worker's drain re-queues its jobs with (recorded in their `recovery` event).
HANDED_BACK = "worker_shutdown"
#: Bytes of the frames a worker's waiting reports came in (see :class:`WaitingFrames`); past
#: it a report is refused with ``busy``.
MAX_WAITING_BYTES = 64 * 1024 * 1024
#: The bytes a batch frame adds to its messages (the envelope; a comma between two).
BATCH_OVERHEAD = len(b'{"type":"batch","messages":[]}')


@attrs.frozen
class WorkerHello:
    token: str
    kinds: list[str]
    capacity: int
    protocol: int = PROTOCOL_VERSION
    name: str | None = None
    #: kind -> its options (PROTOCOL.md section 9), read by :func:`declared_options`.
    options: dict[str, Any] | None = None
    #: The worker reads batch frames (``{"type": "batch", "messages": [...]}``): the server
    #: then sends what is queued for it together, in frames of up to ``batch_bytes``.
    batch: bool = False


@attrs.frozen
class AttemptRef:
    job_id: str
    attempt: int


@attrs.frozen
class Heartbeat:
    jobs: list[AttemptRef] = attrs.field(factory=list)


@attrs.frozen
class Progress:
    job_id: str
    attempt: int
    progress: float
    step: str | None = None


@attrs.frozen
class Checkpoint:
    job_id: str
    attempt: int
    data: Any


@attrs.frozen
class Complete:
    job_id: str
    attempt: int
    result: Any


@attrs.frozen
class ErrorBody:
    type: str
    message: str


@attrs.frozen
class Fail:
    job_id: str
    attempt: int
    error: ErrorBody
    #: The handler raised a ``PermanentError`` (or a subclass): the job is not retried.
    permanent: bool = False


#: The reports about one attempt: served in the order they came (see _serve_reports).
_REPORTS = (Progress, Checkpoint, Complete, Fail, AttemptRef)

WORKER_OPS: dict[str, type] = {
    "hello": WorkerHello,
    "heartbeat": Heartbeat,
    "progress": Progress,
    "checkpoint": Checkpoint,
    "complete": Complete,
    "fail": Fail,
    "stopped": AttemptRef,
    "drain": NoArgs,
}


@attrs.define(eq=False)
class Frame:
    """One frame a worker sent: its size, and how many of its reports wait to be served."""

    size: int
    waiting: int = 0


class WaitingFrames:
    """The bound on what a connection's waiting reports hold: the size of every frame that
    at least one of them came in, counted once however many of its reports wait.

    A waiting report is parsed from its frame, so its frame's size bounds what it holds. A
    report's share of its frame did not: a 2 MiB checkpoint sent with 999 heartbeats (served
    at once) counted 2 KiB, and the bound let 64 GiB wait behind a slow database."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        #: The sizes of the frames holding a waiting report.
        self.bytes = 0

    def hold(self, frame: Frame) -> bool:
        """One more report of ``frame`` waits; False (nothing counted) if its frame, not yet
        counted, would take the bytes past the limit."""
        if frame.waiting == 0:
            if self.bytes + frame.size > self.limit:
                return False
            self.bytes += frame.size
        frame.waiting += 1
        return True

    def release(self, frame: Frame) -> None:
        """A report of ``frame`` was served: its frame stops counting with its last one."""
        frame.waiting -= 1
        if frame.waiting == 0:
            self.bytes -= frame.size


def hello_problem(hello: WorkerHello) -> str | None:
    """What is wrong with a well-typed worker hello, else None."""
    if hello.protocol != PROTOCOL_VERSION:
        return f"protocol {hello.protocol} unsupported; use {PROTOCOL_VERSION}"
    if not 1 <= len(hello.kinds) <= MAX_KINDS:
        return f"kinds: declare 1 to {MAX_KINDS} kinds"
    if len(set(hello.kinds)) != len(hello.kinds):
        return "kinds: a kind is declared twice"
    for kind in hello.kinds:
        try:
            check_kind(kind)  # the names a create takes, as every registration checks them
        except InvalidInputError as exc:
            return f"kinds: {exc}"
    if not 1 <= hello.capacity <= MAX_CAPACITY:
        return f"capacity must be in 1..{MAX_CAPACITY}, not {hello.capacity}"
    if hello.name is not None and not 1 <= len(hello.name) <= MAX_NAME_LENGTH:
        return f"name has 1 to {MAX_NAME_LENGTH} characters"
    if hello.name is not None and not hello.name.isprintable():
        return "name must be printable (no control, format or line separator character)"
    try:
        declared_options(hello)
    except InvalidInputError as exc:
        return str(exc)
    return None


def declared_options(hello: WorkerHello) -> dict[str, KindOptions]:
    """Each declared kind's options: those the hello's ``options`` gives, else the defaults.
    Raises :class:`InvalidInputError` for a kind not declared or a bad value, naming it."""
    given = hello.options or {}
    for kind in given:
        if kind not in hello.kinds:
            raise InvalidInputError(f"options.{loggable(kind, 100)}: not one of the declared kinds")
    declared = {}
    for kind in hello.kinds:
        try:
            declared[kind] = options_from_wire(given.get(kind, {}))
        except InvalidInputError as exc:
            raise InvalidInputError(f"options.{kind}: {exc}") from None
    return declared


class WorkerConnection:
    """One worker's connection: implements :class:`~actors._remote.WorkerLink`."""

    def __init__(
        self, server: Server, ws: WebSocketConnection, stream: GuardedStream | None = None
    ) -> None:
        self.server = server
        self.ws = ws
        #: The connection's stream: once a send to it was cut off, nothing more is sent.
        self.stream = stream
        self.worker: RemoteWorker | None = None
        self._queue: deque[bytes] = deque()
        self._queued_bytes = 0
        #: The worker reads batch frames (its hello said so).
        self._batches = False
        #: Per job, its reports (each with its frame) in the order they came: the first is
        #: being served, the others wait for it (see _serve_reports).
        self._reports: dict[str, deque[tuple[Request, Frame]]] = {}
        #: The frames of every report in ``_reports``, bounded by MAX_WAITING_BYTES.
        self._waiting = WaitingFrames(MAX_WAITING_BYTES)
        self._wake = trio.Event()
        self._close: tuple[int, str] | None = None
        #: What arrived from the worker, read by the watchdog (bytes count as life).
        self._inbound = Inbound(
            trio.current_time(),
            self._supervisor_config.heartbeat_timeout,
            server.config.batch_bytes,
        )
        if stream is not None:
            stream.inbound = self._inbound
        #: The ends of the last two complete frames (trio time): the older one is when the
        #: last complete frame began, the newer one when the frame arriving now began.
        self._frame_ends: deque[float] = deque([self._inbound.frame_end] * 2, maxlen=2)
        #: Per attempt this worker runs, when a report last named it (trio time; when the
        #: watchdog first saw it, until one does).
        self._named: dict[str, float] = {}
        self._scope = trio.CancelScope()
        self.done = trio.Event()

    @property
    def _supervisor_config(self) -> Any:
        return self.server.runtime.supervisor.config

    # -- WorkerLink ----------------------------------------------------------------------------

    def send(self, message: dict[str, Any]) -> None:
        self._push(orjson.dumps(message))

    def _push(self, frame: bytes) -> None:
        if self._close is not None:
            return
        self._queue.append(frame)
        self._queued_bytes += len(frame)
        self._wake.set()
        if self._queued_bytes > MAX_QUEUED_BYTES:
            self.close(CLOSE["worker_stalled"], "worker stalled: it does not read its frames")

    def close(self, code: int, reason: str) -> None:
        if self._close is None:
            self._close = (code, reason)
        self._scope.cancel()

    # -- lifecycle -----------------------------------------------------------------------------

    async def run(self) -> None:
        placement = self.server.workers
        try:
            if not await self._hello():
                return
            self.server.worker_connections.add(self)
            with self._scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._sender)
                    nursery.start_soon(self._watchdog)
                    await self._reader(nursery)
                    nursery.cancel_scope.cancel()
        finally:
            self.server.worker_connections.discard(self)
            if self.worker is not None:
                self._disconnected(placement)
            code, reason = self._close or (CLOSE["normal"], "")
            with trio.move_on_after(1, shield=True):
                if self.stream is not None and self.stream.torn:
                    # A frame was cut off (a worker that stopped reading): what followed it
                    # would be garbage to the worker, which sees the connection drop instead.
                    await self.stream.aclose()
                else:
                    await self._flush()
                    await self.ws.aclose(code, reason[:120])
            self.done.set()

    def _disconnected(self, placement: RemotePlacement) -> None:
        """Hand the worker's running attempts to the stall rule (those it never named back to
        the queue), and say so in the log: a warning when attempts were lost with it (each
        job's own events say what became of it), else a line like the one its connection
        made."""
        worker = self.worker
        assert worker is not None
        running = [attempt for attempt in worker.attempts.values() if not attempt.ended]
        lost = sum(1 for attempt in running if attempt.started)
        requeued = len(running) - lost
        how = self._how_closed()
        closed = "the worker's connection closed" + (f" with {how}" if how else "")
        placement.disconnect(worker, closed)
        why = f"closed with {how}" if how else "connection closed"
        if running:
            parts = [
                f"{count} {what}{'' if count == 1 else 's'} {fate}"
                for count, what, fate in (
                    (lost, "running attempt", "lost, handled as stalls"),
                    (requeued, "attempt", "not started yet, back in the queue"),
                )
                if count
            ]
            log.warning("worker %s disconnected (%s): %s", worker.name, why, "; ".join(parts))
        else:
            log.info("worker %s disconnected (%s)", worker.name, why)

    def _how_closed(self) -> str | None:
        """How the connection closed (None: not known), for the log and the lost attempts'
        error: the code and the reason, the server's (its own close, or its websocket
        layer's: 1009 for a frame over ``max_frame_size``, 1007, 1002) or the worker's.
        "connection closed" alone did not tell a 1009 from a worker that left."""
        if self._close is not None:
            code, reason = self._close
        else:
            closed = self.ws.closed
            if closed is None:
                return None
            code, reason = closed.code, loggable(closed.reason or "", 120)
        how = f"{code}" + (f": {reason}" if reason else "")
        if code == CLOSE["too_big"]:
            limit = self.server.config.worker_frame_size  # the websocket layer's limit
            how += f" (the worker sent a frame over max_frame_size, {limit:,} bytes)"
        return how

    async def _hello(self) -> str | int | bool | None:
        """The hello's id once accepted, else False (the connection is closed)."""
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
        self._inbound.frame_arrived(trio.current_time())
        try:
            try:
                request = parse_request(frame, WORKER_OPS)
            except RequestError as exc:
                fields = hello_fields(frame)
                if fields is not None and not fields & WORKER_HELLO_FIELDS:
                    # A client's hello: its URL names this endpoint. Naming the first field
                    # it lacks ("required field missing @ $.kinds") left its user guessing.
                    raise ProtocolError("protocol_error", CLIENT_HELLO_HERE) from None
                raise ProtocolError("protocol_error", exc.message) from None
            if request.op != "hello":
                raise ProtocolError("protocol_error", "the first frame must be a hello")
            hello = request.body
            assert isinstance(hello, WorkerHello)
            principal = verify_token(config.secret, hello.token)
            if principal.role != "worker":
                raise ProtocolError(
                    "wrong_role", "a user's token cannot connect to /worker; use a worker token"
                )
            problem = hello_problem(hello)
            options = declared_options(hello) if problem is None else {}
            supervisor = self.server.runtime.supervisor
            if problem is None:  # a conflict is for good, so it is told before a lack of room
                problem = supervisor.options_conflict(options)
            no_room = supervisor.declaration_room(options) if problem is None else None
            if no_room is not None:
                # Passing: the kinds holding the table are let go as their workers leave and
                # their attempts end. A 4002 made jobspine worker exit for good.
                log.warning(
                    "refused a worker's hello for now (%s): %s; it may try again later",
                    principal.user_id,
                    loggable(no_room),
                )
                raise ProtocolError("try_again_later", NO_ROOM_NOW)
            if problem is not None:
                # Authenticated, so an operator's mistake (a worker of other code), not noise.
                log.warning(
                    "refused a worker's hello (%s): %s", principal.user_id, loggable(problem)
                )
                raise ProtocolError("protocol_error", f"hello: {problem}")
        except ProtocolError as exc:
            await self.ws.aclose(CLOSE.get(exc.code, CLOSE["protocol_error"]), exc.message[:120])
            return False
        if self.stream is not None:
            self.stream.admit()
        name = hello.name or principal.user_id
        self._batches = hello.batch
        placement = self.server.workers
        # Registered at once (its declaration counts from now), but with no slot until the
        # reply is out: sent here, alone, before anything can be queued for the worker (an
        # attempt placed on it meanwhile would have gone out first, or in one batch with it).
        self.worker = placement.connect(name, hello.kinds, hello.capacity, self, options)
        supervisor = self._supervisor_config
        welcome = reply_message(
            request.id,
            {
                "protocol": PROTOCOL_VERSION,
                "name": name,
                "heartbeat_timeout": supervisor.heartbeat_timeout,
                "heartbeat_interval": heartbeat_interval(supervisor.heartbeat_timeout),
                "stop_grace": supervisor.stop_grace,
                "max_frame_size": self.server.config.worker_frame_size,
                "max_message_size": MAX_ASSIGN_SIZE,
                # A checkpoint over it is refused (checkpoint_too_large): the worker checks
                # before sending, as a handler in the server is checked.
                "checkpoint_limit": self.server.runtime.config.checkpoint_limit,
                # This server reads batch frames of requests (PROTOCOL.md section 9).
                "batch": True,
            },
        )
        with trio.move_on_after(config.send_timeout) as timer:
            try:
                await self.ws.send_message(welcome.decode())
            except ConnectionClosed:
                return False
        if timer.cancelled_caught:
            self._close = (CLOSE["worker_stalled"], "worker stalled: a send timed out")
            return False
        placement.open(self.worker)
        log.info(
            "worker %s connected: kinds %s, capacity %d",
            name,
            shown_names(hello.kinds, 8),
            hello.capacity,
        )
        return True

    async def _flush(self) -> None:
        """Send what is queued before the close; a worker that has gone has nothing to read."""
        try:
            while self._queue:
                await self.ws.send_message(self._take().decode())
        except ConnectionClosed:
            self._queue.clear()

    def _take(self) -> bytes:
        """The next frame: the first queued message, with those after it that fit in one
        batch of ``batch_bytes`` when the worker reads batches (one send, one wake of the
        worker for a burst of replies)."""
        queue = self._queue
        messages = [queue.popleft()]
        size = len(messages[0])
        if self._batches:
            limit = self.server.config.batch_bytes - BATCH_OVERHEAD
            while queue and size + len(queue[0]) + 1 <= limit:
                size += len(queue[0]) + 1
                messages.append(queue.popleft())
        self._queued_bytes -= sum(len(message) for message in messages)
        return encode_batch(messages)

    async def _sender(self) -> None:
        config = self.server.config
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            while self._queue:
                frame = self._take()
                # As for a client: an assignment of megabytes (its input and checkpoint) may
                # take many send timeouts to reach a worker that reads steadily on a slow
                # link; one send_timeout for any frame closed it as stalled in mid-frame.
                timeout = send_deadline(len(frame), config.send_timeout, config.batch_bytes)
                with trio.move_on_after(timeout) as timer:
                    try:
                        await self.ws.send_message(frame.decode())
                    except ConnectionClosed:
                        self.close(CLOSE["normal"], "")
                        return
                if timer.cancelled_caught:
                    self.close(CLOSE["worker_stalled"], "worker stalled: a send timed out")
                    return

    async def _watchdog(self) -> None:
        """Close a connection that sent nothing for ``heartbeat_timeout`` (a stopped or
        hung process whose socket is still open), or whose frame arrives slower than
        :class:`~._wire.Inbound` allows: its attempts are lost at once.

        Bytes arriving count as life: a worker on a slow link uploading one large frame (a
        checkpoint or a result of megabytes) for longer than ``heartbeat_timeout`` was
        closed as stalled, its attempt lost. Its heartbeats wait behind that frame on the
        same connection, so while a frame is arriving its attempts are kept alive too: each
        ``heartbeat_interval`` in which bytes of it came beats them, as a heartbeat frame
        naming them would (for at most the frame's deadline). Only those a report named
        within ``heartbeat_timeout`` before the last complete frame began, though: a heartbeat
        may wait behind two large frames, not more. Beating every attempt kept a hung one
        running for as long as the worker uploaded another's checkpoints, frame after frame."""
        inbound = self._inbound
        interval = heartbeat_interval(inbound.timeout)
        seen = inbound.received
        while True:
            now = trio.current_time()
            why = inbound.stalled(now)
            if why is not None:
                self.close(CLOSE["worker_stalled"], f"worker stalled: {why}")
                return
            if self.worker is not None:
                attempts, named = self.worker.attempts, self._named
                for job_id in [job_id for job_id in named if job_id not in attempts]:
                    del named[job_id]  # ended: bounded by the worker's capacity
                if inbound.partial and inbound.received > seen:
                    since = self._frame_ends[0] - inbound.timeout
                    for job_id, attempt in list(attempts.items()):
                        if named.setdefault(job_id, now) >= since:
                            attempt.beat()
                else:
                    for job_id in attempts:
                        named.setdefault(job_id, now)
            seen = inbound.received
            await trio.sleep_until(min(inbound.deadline(), now + interval))

    # -- frames --------------------------------------------------------------------------------

    async def _reader(self, nursery: trio.Nursery) -> None:
        while True:
            try:
                frame = await self.ws.get_message()
            except ConnectionClosed:
                return
            self._inbound.frame_arrived(trio.current_time())
            self._frame_ends.append(self._inbound.frame_end)
            try:
                requests = parse_requests(frame, WORKER_OPS)
            except RequestError as exc:
                requests = [exc]
            sent = Frame(len(frame))
            for request in requests:  # in order, each as if it came in a frame of its own
                if isinstance(request, RequestError):
                    self._push(error_message(request.request_id, request.code, request.message))
                else:
                    self._serve_now(request, nursery, sent)

    def _serve_now(self, request: Request, nursery: trio.Nursery, frame: Frame) -> None:
        body = request.body
        try:
            if isinstance(body, Heartbeat):
                capacity = self.worker.capacity if self.worker is not None else 0
                if len(body.jobs) > capacity:
                    # It runs at most its capacity: more is no heartbeat, and would cost an
                    # error reply per entry (40,000 from one frame stalled the server).
                    raise ProtocolError(
                        "bad_request",
                        f"heartbeat: {len(body.jobs)} jobs, more than this worker's capacity"
                        f" ({capacity})",
                    )
                refused: list[ProtocolError] = []
                for ref in body.jobs:  # each entry on its own: one refusal skips no other
                    try:
                        self._attempt(ref.job_id, ref.attempt).beat()
                    except ProtocolError as exc:
                        refused.append(exc)
                if refused:
                    # One error per heartbeat, however many entries it refused: a batch of
                    # heartbeats naming unknown jobs made 63,000 error replies from one frame.
                    first = refused[0]
                    more = f" (and {len(refused) - 1} more refused)" if len(refused) > 1 else ""
                    self._push(error_message(request.id, first.code, first.message + more))
                return
            if isinstance(body, _REPORTS):
                queued = self._reports.get(body.job_id)
                if queued is None and isinstance(body, AttemptRef):
                    self._end(body)  # nothing of this job waits: served at once
                else:
                    # A complete or fail is answered once its outcome is stored: the job's
                    # later reports wait behind it, in order, like behind a checkpoint.
                    if queued is None:
                        self._attempt(body.job_id, body.attempt)  # refused at once
                    if not self._waiting.hold(frame):
                        raise ProtocolError(
                            "busy",
                            f"the frames of this worker's reports waiting to be served hold"
                            f" over {self._waiting.limit // 2**20} MiB: wait for their replies",
                        )
                    if queued is None:
                        queued = self._reports[body.job_id] = deque()
                        nursery.start_soon(self._serve_reports, body.job_id)
                    queued.append((request, frame))  # after the report of this job served now
                    return
            elif isinstance(body, NoArgs):  # drain
                assert self.worker is not None
                if not self.worker.closed:
                    # Once: a drain already hands back every attempt (the worker gets no new
                    # one), so a repeated drain is answered alike and starts nothing (each
                    # one stopped every attempt again: a batch of drains made a log line and
                    # a hand-back per drain and attempt).
                    self.worker.closed = True
                    nursery.start_soon(self._drain)
            else:
                raise ProtocolError("bad_request", "hello: already connected")
            self._push(reply_message(request.id, {"ok": True}))
        except ProtocolError as exc:
            self._push(error_message(request.id, exc.code, exc.message))

    async def _serve_reports(self, job_id: str) -> None:
        """Serve ``job_id``'s reports in the order they came, each once the one before it is
        answered (a progress once the store ordered it, a checkpoint once durable): a
        checkpoint and then ``stopped``, in one batch or pipelined, reach the store in that
        order. Other jobs' reports do not wait for these."""
        queue = self._reports[job_id]
        try:
            while queue:
                request, frame = queue[0]
                body = request.body
                try:
                    attempt = self._attempt(body.job_id, body.attempt)  # it may have ended
                    if isinstance(body, Progress | Checkpoint):
                        await self._write(request, attempt)  # answers it
                    else:
                        self._end(body)
                        if isinstance(body, Complete | Fail):
                            await self._answer_outcome(request.id, attempt)
                        else:
                            self._push(reply_message(request.id, {"ok": True}))
                except ProtocolError as exc:
                    self._push(error_message(request.id, exc.code, exc.message))
                queue.popleft()
                self._waiting.release(frame)
        finally:
            del self._reports[job_id]

    async def _answer_outcome(self, request_id: str | int | None, attempt: RemoteAttempt) -> None:
        """Answer a ``complete`` or ``fail`` once its outcome is durable (a worker may let go
        of what the job did once it has the reply), or say why it was not stored."""
        outcome = await attempt.recorded()
        if outcome == "not_stored":
            message = (
                f"job {attempt.job_id}: the database refused the outcome; the job is recovered"
                " as a lost attempt (the stall rule)"
            )
            self._push(error_message(request_id, "store_error", message))
        elif outcome in ("stopped", "fenced"):
            # A pause, a cancel, a timeout or a shutdown ended the attempt as the report
            # came: its decision was stored, not the report.
            message = (
                f"job {attempt.job_id}: the attempt was ended (paused, cancelled, timed out or"
                " handed back) before its outcome was stored; that decision stands"
            )
            self._push(error_message(request_id, "not_assigned", message))
        else:
            self._push(reply_message(request_id, {"ok": True}))

    def _end(self, body: Complete | Fail | AttemptRef) -> None:
        """The end of an attempt the worker reports: its outcome, or ``stopped``."""
        if isinstance(body, Complete):
            self._attempt(body.job_id, body.attempt).complete(body.result)
        elif isinstance(body, Fail):
            error = JobError(body.error.type, body.error.message)
            self._attempt(body.job_id, body.attempt).fail(error, body.permanent)
        else:
            attempt = self._attempt(body.job_id, body.attempt)
            if attempt.ctx is None or not attempt.ctx.stopping:
                raise ProtocolError(
                    "not_stopping",
                    f"job {body.job_id}: stopped without a stop request (send complete or"
                    " fail, or drain to hand every job back)",
                )
            attempt.stopped()

    def _attempt(self, job_id: str, attempt: int) -> RemoteAttempt:
        """The live attempt this connection runs for ``job_id``; refuses another worker's
        job, an ended attempt (``not_assigned``) and an older or newer attempt
        (``stale_attempt``)."""
        assert self.worker is not None
        found = self.worker.attempts.get(job_id)
        if found is None or found.ctx is None:
            raise ProtocolError(
                "not_assigned", f"job {loggable(job_id, 100)} is not running on this worker"
            )
        if found.attempt != attempt:
            raise ProtocolError(
                "stale_attempt",
                f"job {loggable(job_id, 100)}: attempt {attempt} is not the current one"
                f" ({found.attempt})",
            )
        self._named[job_id] = trio.current_time()
        found.started = True  # named by the worker: its handler may have run
        return found

    async def _write(self, request: Request, attempt: RemoteAttempt) -> None:
        body = request.body
        ctx = attempt.ctx
        assert ctx is not None
        try:
            if isinstance(body, Progress):
                await ctx.progress(body.progress, body.step)
            else:
                await ctx.checkpoint(body.data)
        except JobspineError as exc:
            self._push(error_message(request.id, exc.code, str(exc)))
            return
        self._push(reply_message(request.id, {"ok": True}))

    async def _drain(self) -> None:
        """The worker is shutting down (its ``closed`` set: no new attempts): each running
        one is stopped with the grace period and goes back to the queue (``worker_shutdown``),
        to resume from its checkpoint on the next worker that serves its kind."""
        worker = self.worker
        assert worker is not None
        log.info("worker %s drains: handing back %d jobs", worker.name, len(worker.attempts))
        supervisor = self.server.runtime.supervisor
        # Shielded: the worker closes its connection once its handlers stopped, which must
        # not cancel the re-queues (else the jobs would be lost, not handed back).
        bound = self._supervisor_config.stop_grace + DRAIN_WRITE_TIMEOUT
        with trio.move_on_after(bound, shield=True):
            async with trio.open_nursery() as nursery:
                for job_id in list(worker.attempts):
                    nursery.start_soon(supervisor.hand_back, job_id, HANDED_BACK)


def heartbeat_interval(heartbeat_timeout: float) -> float:
    """Seconds between a worker's heartbeat frames: well within the deadline, at most 1 s."""
    return min(1.0, heartbeat_timeout / 4)
