"""``jobspine worker``: runs handlers in this process for a server it connects to.

The same ``async def handler(ctx, input)`` functions run here with the same
:class:`~actors.JobContext` (backed by the connection instead of the store): ``progress`` and
``checkpoint`` return once the server stored them, ``heartbeat`` and ``keep_alive`` are
reported in the periodic heartbeat frame, ``stopping`` is set by the server's ``stop``. The
connection is re-established with backoff (:class:`ReconnectPolicy`); attempts running when it
drops are dropped too (the server has already recovered them). :meth:`WorkerProcess.drain`
(SIGTERM) asks the server to hand every job back: each gets its grace period to checkpoint,
then the process exits.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import orjson
import trio
from trio_websocket import (
    CloseReason,
    ConnectionClosed,
    ConnectionRejected,
    HandshakeError,
    WebSocketConnection,
    open_websocket_url,
)

from actors import (
    CheckpointTooLargeError,
    InvalidInputError,
    Job,
    JobContext,
    JobspineError,
    JobState,
    NotSerializableError,
    ResultTooLargeError,
)
from actors._codec import (
    MAX_STEP_LENGTH,
    check_text,
    dumps_json_value,
    sanitize_text,
)
from actors._endings import Ending, judge_exit
from actors._errors import shown
from actors._ops import progress_value
from actors._options import options_of, options_to_wire
from actors._worker import Handler, call_handler, check_handler, check_input

from ._protocol import MAX_BATCH_REQUESTS
from ._reconnect import FATAL_CLOSE, ReconnectPolicy
from ._wire import loggable, send_deadline
from ._workers import MAX_WORKER_HELLO

__all__ = ["WorkerFatalError", "WorkerProcess", "WorkerRequestError"]

log = logging.getLogger("jobspine.worker")

#: The largest frame accepted from the server (an assignment: input and checkpoint).
MAX_MESSAGE = 4 * 1024 * 1024
#: Seconds past the grace period a drain waits for the server's cancels.
DRAIN_MARGIN = 5.0

CLOSE_TOO_BIG = 1009
#: The largest frame a server takes from a worker until its hello's reply says (PROTOCOL.md).
MAX_FRAME_SIZE = 2 * 1024 * 1024
#: What the server's close codes mean for a worker (PROTOCOL.md section 9), for its log.
CLOSE_MEANINGS: Mapping[int, str] = {
    1000: "normal closure",
    1001: "the server is shutting down",
    1002: "a malformed websocket frame",
    1006: "the connection dropped without a close frame (the server stopped or the network failed)",
    1007: "a text frame that is not valid UTF-8",
    1011: "the server failed",
    1013: "the server has no room for this worker's kinds now: try again later",
    4001: "no hello within the server's deadline",
    4011: "the server found this worker stalled: it sent nothing for heartbeat_timeout, or a"
    " frame too slowly, or did not read its frames",
}
#: Closes logged as information, not as a warning: nothing is wrong with this worker.
QUIET_CLOSE = frozenset({1000, 1001})


_ERRORS: Mapping[str, type[JobspineError]] = {
    "invalid_input": InvalidInputError,
    "not_serializable": NotSerializableError,
}
#: The limit in the server's ``checkpoint_too_large`` refusal (CheckpointTooLargeError's words).
#: What bounds a report's value when it is the server's frame size, for its error.
_FRAME_SETTING = "the server's max_frame_size, less the report's envelope"


class _OverFrame(Exception):  # noqa: N818 - a report's refusal, turned into its typed error
    """A report whose frame would be over the server's ``max_frame_size``: never sent (the
    server's websocket layer would close the connection with 1009, losing every attempt
    running on it)."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"a frame of {size} bytes, over the server's max_frame_size ({limit})")
        self.size = size
        self.limit = limit

    def room(self, value_size: int) -> int:
        """The bytes the report's value, of ``value_size`` in this frame, may take in one."""
        return self.limit - (self.size - value_size)


#: A report's refusals that say the job moved on from its attempt (PROTOCOL.md section 9).
FENCED_OUT = frozenset({"stale_attempt", "not_assigned"})


class WorkerRequestError(JobspineError):
    """The server refused a report (``code`` as documented in PROTOCOL.md)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class WorkerFatalError(JobspineError):
    """Reconnecting cannot help: the token or the hello is refused (4002, 4003, 4004, 4010;
    ``code`` names it), the URL answers HTTP but is no jobspine endpoint, or a websocket
    whose first frame is not the hello's reply (``not_jobspine``), or no first connection
    was made within the connect timeout (``unreachable``)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class _Attempt:
    """One attempt running here: the :class:`~actors._worker.ContextBacking` of its context."""

    def __init__(self, session: _Session, message: dict[str, Any]) -> None:
        self.session = session
        self.job_id: str = message["job_id"]
        self.attempt: int = message["attempt"]
        self.kind: str = message["kind"]
        self.input = message["input"]
        job = Job(
            self.job_id,
            message["user_id"],
            self.kind,
            JobState.RUNNING,
            self.input,
            0.0,
            0.0,
            attempt=self.attempt,
        )
        self.keep_alive = 0
        self.beat_pending = True
        #: A heartbeat may name it: its handler is about to start (or ran), or it waited for
        #: an older attempt past half ``heartbeat_timeout`` (see _Session._wait_unwound).
        #: Until then no frame names it, so a connection that ends puts its job back in the
        #: queue uncounted: the server applies the stall rule to every attempt it heard of.
        self.named = False
        #: Seconds the server waits for word of this attempt before it finds it stalled (an
        #: assignment without it: none, the attempt is named at once when it waits).
        self.heartbeat_timeout: float = message.get("heartbeat_timeout", 0.0)
        #: The server has let go of this attempt: its outcome is on its way (the server
        #: takes the attempt off this worker when it reads it), or the server cancelled it
        #: (its handler may still be unwinding). A heartbeat no longer names it: the server
        #: would refuse the entry, and, with the next assignment running, the whole
        #: heartbeat as naming more jobs than this worker's capacity.
        self.dropped = False
        self.scope = trio.CancelScope()
        #: Seconds a stop gives the attempt: also how long its handler waits for an older
        #: attempt of its job still unwinding here.
        self.stop_grace: float = message.get("stop_grace", 0.0)
        #: Set once its handler has ended here (returned, raised or unwound a cancel).
        self.finished = trio.Event()
        #: The older attempts of its job still unwinding here when it came: its handler
        #: starts once they have ended (see _Session._run).
        self.older: list[_Attempt] = []
        self.ctx = JobContext(self, job, message.get("checkpoint"))

    @property
    def store(self) -> _Session:
        return self.session

    def beat(self, *, persist: bool = False) -> None:
        self.beat_pending = True

    def alive(self) -> None:
        self.beat_pending = True


#: The largest batch frame a worker sends (a single larger message goes alone).
BATCH_BYTES = 64 * 1024
#: Seconds a frame may take to go out before the connection is given up: longer in
#: proportion for a frame over ``BATCH_BYTES`` (:func:`~._wire.send_deadline`).
SEND_TIMEOUT = 10.0
_BATCH_HEAD = b'{"op":"batch","requests":['
_BATCH_TAIL = b"]}"


def _batch_frame(outgoing: list[bytes], limit: int = BATCH_BYTES) -> tuple[str, int]:
    """The next frame of ``outgoing`` (encoded requests, oldest first, each within the
    server's frame limit) and how many of them it carries: the first alone when it is the
    only one or they do not fit together, else a batch of those that fit in ``limit`` (at
    most ``BATCH_BYTES``; less when the server's ``max_frame_size`` is smaller)."""
    limit = min(limit, BATCH_BYTES)
    size = len(_BATCH_HEAD) + len(_BATCH_TAIL) + len(outgoing[0])
    count = 1
    while count < len(outgoing) and count < MAX_BATCH_REQUESTS:
        size += len(outgoing[count]) + 1
        if size > limit:
            break
        count += 1
    if count == 1:
        return outgoing[0].decode(), 1
    return (_BATCH_HEAD + b",".join(outgoing[:count]) + _BATCH_TAIL).decode(), count


class _Session:
    """One connection to the server (the :class:`~actors._worker.ContextStore` of its
    attempts)."""

    def __init__(self, process: WorkerProcess, ws: WebSocketConnection) -> None:
        self.process = process
        self.ws = ws
        self.attempts: dict[str, _Attempt] = {}
        self.heartbeat_interval = 1.0
        self.stop_grace = 5.0
        #: The largest frame the server takes (its hello's reply): no report goes over it.
        self.max_frame_size = MAX_FRAME_SIZE
        #: The server's largest checkpoint in bytes of JSON (its hello's reply; None: it did
        #: not say, and only its refusal tells).
        self.checkpoint_limit: int | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, trio.MemorySendChannel[dict[str, Any]]] = {}
        self._send_lock = trio.Lock()
        #: The server reads batch frames (its welcome said so): requests made while a frame
        #: is being sent go out together in the next one.
        self.batch = False
        self._outgoing: list[tuple[int, bytes]] = []  # (number, message), oldest first
        self._queued = 0  # the number of the last message queued
        self._sent = 0  # the number of the last message sent
        #: Why the connection failed, once a frame could not be sent.
        self._closed: CloseReason | None = None
        #: Set (and replaced) each time an attempt ends.
        self.ended = trio.Event()

    def encode(self, message: dict[str, Any]) -> bytes:
        """``message`` as a frame; raises :class:`_OverFrame` when it is over the server's
        ``max_frame_size`` (its hello's reply): the server would close the connection with
        1009, and every attempt running here would be lost with it, not just this one."""
        data = orjson.dumps(message)
        limit = self.max_frame_size
        if len(data) > limit:
            raise _OverFrame(len(data), limit)
        return data

    async def send(self, message: dict[str, Any] | bytes) -> None:
        """Send ``message`` (or the frame :meth:`encode` made of it); returns once it is sent
        (raises ``ConnectionClosed``, or :class:`_OverFrame` before anything is queued). With
        batches, whoever holds the send lock sends every message queued so far in one frame
        (at most ``BATCH_BYTES`` and the server's ``max_frame_size``, a larger message
        alone), so a burst of reports from many attempts costs the server one frame, not one
        each. A caller cancelled before its message was taken into a frame takes it back: it
        is never sent."""
        data = message if isinstance(message, bytes) else self.encode(message)
        if not self.batch:
            async with self._send_lock:
                await self._send_frame(data.decode())
            return
        self._queued += 1
        mine = self._queued
        entry = (mine, data)
        self._outgoing.append(entry)
        try:
            async with self._send_lock:
                # Numbered in order: every message up to the last one sent is out (or was
                # taken back). An earlier holder may have sent this one already.
                while self._sent < mine:
                    if self._closed is not None:  # a frame failed: so would this one
                        raise ConnectionClosed(self._closed)
                    frame, count = _batch_frame(
                        [each for _, each in self._outgoing], self.max_frame_size
                    )
                    taken = self._outgoing[:count]
                    del self._outgoing[:count]  # its callers can no longer take them back
                    try:
                        await self._send_frame(frame)
                    except ConnectionClosed as exc:
                        self._closed = exc.reason
                        raise
                    self._sent = taken[-1][0]
        finally:
            if self._sent < mine and entry in self._outgoing:
                self._outgoing.remove(entry)  # cancelled before a frame took it

    async def _send_frame(self, frame: str) -> None:
        # Shielded: a caller cancelled mid-frame (its attempt cancelled) would cut the other
        # attempts' reports it carries and break the connection for all of them. Bounded: a
        # server that takes nothing for SEND_TIMEOUT seconds is treated as gone; a large
        # frame (a checkpoint or result of megabytes) may take SEND_TIMEOUT per BATCH_BYTES,
        # as the server allows its frames to a worker and from it (one SEND_TIMEOUT for any
        # frame gave up on an honest upload over a slow link, losing the worker's attempts).
        timeout = send_deadline(len(frame.encode()), SEND_TIMEOUT, BATCH_BYTES)
        with trio.move_on_after(timeout, shield=True) as timer:
            await self.ws.send_message(frame)
        if timer.cancelled_caught:
            with trio.move_on_after(1, shield=True):
                await self.ws.aclose(1011, "a send to the server timed out")
            raise ConnectionClosed(CloseReason(1006, "a send to the server timed out"))

    async def request(self, op: str, **fields: Any) -> Any:
        request_id = next(self._ids)
        send, receive = trio.open_memory_channel[dict[str, Any]](1)
        self._pending[request_id] = send
        try:
            await self.send({"op": op, "id": request_id, **fields})
            answer = await receive.receive()
        finally:
            del self._pending[request_id]
        if answer["type"] == "error":
            error = _ERRORS.get(answer["code"])
            if error is not None:
                raise error(answer["message"])
            raise WorkerRequestError(answer["code"], answer["message"])
        return answer["result"]

    # -- ContextStore --------------------------------------------------------------------------

    async def set_progress(
        self, job_id: str, attempt: int, pct: float, step: str | None, *, durable: bool = True
    ) -> None:
        # As the server's store.
        check_text(step, "step", optional=True, limit=MAX_STEP_LENGTH, max_bytes=None)
        # As the server's ops: a float subclass (numpy's float64) goes as its plain value,
        # which orjson can write (the handler got orjson's TypeError), and a value that is no
        # number in 0..100 (an object, NaN) raises InvalidInputError, not a TypeError or the
        # server's bad_request.
        pct = progress_value(pct)
        # The server's own JobContext decides when it answers (see JobContext.progress).
        try:
            await self.request("progress", job_id=job_id, attempt=attempt, progress=pct, step=step)
        except _OverFrame as exc:
            raise InvalidInputError(
                f"job {job_id}: a progress report of {exc.size} bytes is over the server's"
                f" max_frame_size ({exc.limit} bytes)"
            ) from None

    async def checkpoint(self, job_id: str, attempt: int, data: Any) -> None:
        # Refused here, as in the server, before sending: a value JSON cannot carry, a size
        # over the server's checkpoint_limit (the error a handler gets in the server).
        size = len(dumps_json_value(data, "checkpoint"))
        limit = self.checkpoint_limit
        if limit is not None and size > limit:
            raise CheckpointTooLargeError(job_id, size, limit)
        try:
            await self.request("checkpoint", job_id=job_id, attempt=attempt, data=data)
        except _OverFrame as exc:
            raise CheckpointTooLargeError(job_id, size, exc.room(size)) from None
        except WorkerRequestError as exc:
            if exc.code != "checkpoint_too_large":
                raise
            # A server that did not announce its limit: its message says it, not a field.
            raise InvalidInputError(str(exc)) from None

    # -- running -------------------------------------------------------------------------------

    async def serve(self, first: Sequence[dict[str, Any]] = ()) -> CloseReason | None:
        """Serve ``first`` (messages that came in one batch with the hello's reply), then
        until the connection closes; its close code and reason (None: not known). The
        attempts still running end with it: the server has lost them already."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._heartbeats)
            for message in first:
                self._receive(message, nursery)
            while True:
                try:
                    frame = await self.ws.get_message()
                except ConnectionClosed as exc:
                    nursery.cancel_scope.cancel()
                    self._log_lost()
                    return exc.reason
                message = orjson.loads(frame)
                if message.get("type") == "batch":
                    for each in message["messages"]:
                        self._receive(each, nursery)
                else:
                    self._receive(message, nursery)

    def _log_lost(self) -> None:
        """Say what becomes of the attempts running here when the connection ends: the
        operator saw only the close and "reconnecting" (a new user's trial). They stop here;
        the server handles each it heard of (:attr:`_Attempt.named`) as a stall, and puts
        the others, whose handlers had not started, back in the queue (README, *Where
        handlers run*)."""
        live = [a for a in self.attempts.values() if not a.dropped]
        for named, what, fate in (
            (
                True,
                "running here",
                "the server handles each as a stall (its kind's stall rule: paused at its"
                " checkpoint, back in the queue, or failed)",
            ),
            (False, "not started here yet", "the server puts each back in the queue"),
        ):
            jobs = sorted(a.job_id for a in live if a.named is named)
            if not jobs:
                continue
            shown = ", ".join(jobs[:10]) + (f" and {len(jobs) - 10} more" if len(jobs) > 10 else "")
            log.warning(
                "worker%s: the connection ended with %d job%s %s (%s): stopped here; %s",
                f" {self.process.name}" if self.process.name else "",
                len(jobs),
                "" if len(jobs) == 1 else "s",
                what,
                shown,
                fate,
            )

    def _receive(self, message: dict[str, Any], nursery: trio.Nursery) -> None:
        kind = message.get("type")
        if kind in ("reply", "error") and message.get("id") in self._pending:
            self._pending[message["id"]].send_nowait(message)
        elif kind == "error":
            log.info("server: %s: %s", message["code"], message["message"])
        elif kind == "assign":
            attempt = _Attempt(self, message)
            older = self.attempts.get(attempt.job_id)
            if older is not None:  # and those it waited for: a cancel ends its wait, not theirs
                chain = [older, *older.older]
                attempt.older = [each for each in chain if not each.finished.is_set()]
            self.attempts[attempt.job_id] = attempt
            nursery.start_soon(self._run, attempt)
        elif kind in ("stop", "cancel"):
            found = self.attempts.get(message["job_id"])
            if found is not None and found.attempt == message["attempt"]:
                found.ctx._request_stop()
                if kind == "cancel":
                    found.dropped = True
                    found.scope.cancel()

    async def _heartbeats(self) -> None:
        while True:
            await trio.sleep(self.heartbeat_interval)
            frames = _heartbeat_frames(self.heartbeat_jobs(), self.max_frame_size)
            try:
                for frame in frames:
                    await self.send(frame)
            except ConnectionClosed:
                return  # the reader sees the close too

    def heartbeat_jobs(self) -> list[dict[str, Any]]:
        """The attempts the next heartbeat names: those alive since the last one, or inside
        a write or ``keep_alive()``, started (:attr:`_Attempt.named`) and still the server's
        (not :attr:`_Attempt.dropped`): at most this worker's capacity, as the server
        requires."""
        jobs = []
        for attempt in self.attempts.values():
            if (
                attempt.named
                and not attempt.dropped
                and (attempt.beat_pending or attempt.keep_alive)
            ):
                attempt.beat_pending = False
                jobs.append({"job_id": attempt.job_id, "attempt": attempt.attempt})
        return jobs

    async def _outcome(
        self, handler: Handler, attempt: _Attempt, ref: dict[str, Any]
    ) -> dict[str, Any]:
        """The attempt's report: its input checked, then its handler run."""
        try:
            # The server has no code of a worker-only kind: its input check runs here,
            # before the handler, and a refusal fails the job at once (no retry can fix it).
            check_input(handler, attempt.kind, attempt.input)
        except InvalidInputError as exc:
            return _failure(ref, type(exc).__name__, str(exc), permanent=True)
        ending: Ending | None = None
        result: Any = None
        try:
            result = await call_handler(handler, attempt.kind, attempt.ctx, attempt.input)
        except BaseException as raised:
            # Judged as in the server (a group is one typed error, an unasked JobStopped a
            # failure, a SystemExit or a stray Cancelled the handler's own); the runtime's
            # (the Cancelled of a cancel, an interrupt) propagate.
            ending, theirs = judge_exit(
                raised,
                job_id=attempt.job_id,
                attempt=attempt.attempt,
                stop_asked=attempt.ctx.stopping,
                non_retryable=options_of(handler).non_retryable,
            )
            if ending is not None:
                cause = ending.cause
                if isinstance(cause, WorkerRequestError) and cause.code in FENCED_OUT:
                    # The job moved on from this attempt (a user cancelled, paused or
                    # restarted it): an expected race, one line; the report below is
                    # refused the same way.
                    log.info("job %s attempt %d ended: %s", attempt.job_id, attempt.attempt, cause)
                elif ending.error is not None:
                    log.info("job %s raised %s", attempt.job_id, ending.error.type, exc_info=cause)
            if theirs is raised:
                raise
            if theirs is not None:
                raise theirs from None
        if ending is not None:
            if ending.how == "stopped":
                return {"op": "stopped", **ref}
            assert ending.error is not None, "every ending but stopped has its error"
            return _failure(ref, ending.error.type, ending.error.message, ending.permanent)
        try:
            dumps_json_value(result, "job result")
        except NotSerializableError as exc:
            # Not retried, as in the server: the same result would be refused again.
            return _failure(ref, type(exc).__name__, str(exc), permanent=True)
        return {"op": "complete", **ref, "result": result}

    def _report(self, outcome: dict[str, Any]) -> bytes:
        """The frame reporting ``outcome``, within the server's ``max_frame_size``: a result
        too large for one fails its job with :class:`ResultTooLargeError`, not retried (as
        the server fails a result over its ``result_limit``), and a failure's text is cut
        until it fits (a failure is always recorded). The connection, and every other
        attempt on it, carries on: a frame over the limit closed it with 1009."""
        report = {**outcome, "id": next(self._ids)}
        try:
            return self.encode(report)
        except _OverFrame as exc:
            over = exc
        if report["op"] == "complete":
            size = over.size - len(orjson.dumps({**report, "result": None})) + len(b"null")
            error = ResultTooLargeError(report["job_id"], size, over.room(size), _FRAME_SETTING)
            log.info("job %s attempt %d: %s", report["job_id"], report["attempt"], error)
            ref = {"job_id": report["job_id"], "attempt": report["attempt"]}
            report = {**_failure(ref, type(error).__name__, str(error), True), "id": report["id"]}
        error_body = report["error"]
        while True:
            try:
                return self.encode(report)
            except _OverFrame:
                # Only for a max_frame_size below the server's own message bounds (16,384
                # characters of type and of message, as it cuts them).
                field = "message" if error_body["message"] else "type"
                if not error_body[field]:
                    raise
                error_body[field] = error_body[field][: len(error_body[field]) // 2]

    async def _run(self, attempt: _Attempt) -> None:
        """Run ``attempt``: once the older attempts of its job still unwinding here (cancelled,
        a handler blocked in a thread) have ended, or after ``stop_grace``, as the server
        starts its own handlers (the server does not wait for a worker's attempt to unwind, so
        two ran here at once)."""
        ref = {"job_id": attempt.job_id, "attempt": attempt.attempt}
        handler: Handler | None = self.process.handlers.get(attempt.kind)
        outcome: dict[str, Any]
        try:
            with attempt.scope:
                if attempt.older:
                    await self._wait_unwound(attempt)
                if handler is None:
                    raise LookupError(f"no handler for kind {shown(attempt.kind)} in this worker")
                try:
                    # Named before its handler starts: an attempt the server never heard of
                    # when the connection ends goes back to the queue, nothing counted; one
                    # named gets the stall rule (its handler may have done its work).
                    attempt.named = True
                    await self.send(_heartbeat_frames([ref], self.max_frame_size)[0])
                except ConnectionClosed:
                    return  # never started here: the server puts its job back in the queue
                outcome = await self._outcome(handler, attempt, ref)
            if attempt.scope.cancelled_caught:
                return  # cancelled by the server: it recorded the outcome
            attempt.dropped = True
            try:
                await self.send(self._report(outcome))
            except ConnectionClosed:
                return  # the server recovers the attempt by the stall rule
            except _OverFrame as exc:  # not even an empty failure fits: the stall rule too
                log.warning("job %s: its outcome cannot be reported: %s", attempt.job_id, exc)
        finally:
            if self.attempts.get(attempt.job_id) is attempt:
                unwinding = [older for older in attempt.older if not older.finished.is_set()]
                if unwinding:  # cancelled while it waited: the job's next attempt waits too
                    self.attempts[attempt.job_id] = unwinding[0]
                else:
                    del self.attempts[attempt.job_id]
            attempt.ctx._request_stop()  # a context kept past its attempt says it is over
            attempt.finished.set()
            self.ended.set()
            self.ended = trio.Event()

    async def _wait_unwound(self, attempt: _Attempt) -> None:
        """Wait for ``attempt.older`` to end, up to its grace period. Past half the server's
        ``heartbeat_timeout``, ``attempt`` counts as alive (its heartbeats name it: the wait
        is no stall of it); before, nothing names it (its handler has not started)."""
        log.info(
            "job %s attempt %d waits for attempt %s to unwind here (at most %g s)",
            attempt.job_id,
            attempt.attempt,
            ", ".join(str(older.attempt) for older in attempt.older),
            attempt.stop_grace,
        )
        with trio.move_on_after(attempt.stop_grace):
            # Not named while the server's stall deadline, from the assignment, leaves room
            # (half of it: the heartbeat has its way to make): its handler has not started,
            # so a connection that ends meanwhile puts the job back in the queue uncounted.
            with trio.move_on_after(attempt.heartbeat_timeout / 2) as room:
                await _finished(attempt.older)
            if room.cancelled_caught:
                # Waiting longer: its heartbeats name it, or the server would find it stalled.
                attempt.named = True
                attempt.keep_alive += 1
                try:
                    await _finished(attempt.older)
                finally:
                    attempt.keep_alive -= 1
        attempt.beat()


async def _finished(attempts: list[_Attempt]) -> None:
    for attempt in attempts:
        await attempt.finished.wait()


_HEARTBEAT_HEAD = b'{"op":"heartbeat","jobs":['
_HEARTBEAT_TAIL = b"]}"


def _heartbeat_frames(jobs: list[dict[str, Any]], limit: int) -> list[bytes]:
    """The heartbeat naming ``jobs``, as frames of at most ``limit`` bytes (the server's
    ``max_frame_size``): one frame, unless the server's limit is too small for every
    attempt of a large capacity (1,000 attempts take about 50 KB). Before, that one frame
    was refused as over the limit, and the refusal ended the worker's run: every attempt on
    it lost. An entry that fits in no frame (a limit below some 80 bytes) is left out: the
    server finds its attempt stalled, as it would with the frame refused."""
    frames: list[bytes] = []
    empty = len(_HEARTBEAT_HEAD) + len(_HEARTBEAT_TAIL)
    entries: list[bytes] = []
    size = empty
    for job in jobs:
        entry = orjson.dumps(job)
        if empty + len(entry) > limit:
            log.warning("heartbeat: %s cannot fit in a frame of %d bytes", job, limit)
            continue
        if entries and size + 1 + len(entry) > limit:
            frames.append(_HEARTBEAT_HEAD + b",".join(entries) + _HEARTBEAT_TAIL)
            entries, size = [], empty
        size += len(entry) + (1 if entries else 0)
        entries.append(entry)
    if entries or not frames:
        frames.append(_HEARTBEAT_HEAD + b",".join(entries) + _HEARTBEAT_TAIL)
    return frames


def _failure(ref: dict[str, Any], kind: str, message: str, permanent: bool) -> dict[str, Any]:
    """A ``fail`` report of error ``kind`` with ``message``: each cut and escaped as the server
    records them (:func:`~actors._codec.sanitize_text`), so that no text a handler raised (of
    megabytes, or with a lone surrogate orjson cannot encode) keeps its failure from being
    reported."""
    error = {"type": sanitize_text(kind), "message": sanitize_text(message)}
    report: dict[str, Any] = {"op": "fail", **ref, "error": error}
    if permanent:
        report["permanent"] = True
    return report


def _welcome(frame: str | bytes) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The hello reply's ``result`` from the server's first frame, and the messages that came
    after it in the same batch (this server sends the reply alone; an older one could batch
    it with the first assignments). Raises :class:`WorkerFatalError` (``not_jobspine``) for
    any other frame."""
    try:
        message = orjson.loads(frame)
    except orjson.JSONDecodeError:
        message = None
    rest: list[dict[str, Any]] = []
    if isinstance(message, dict) and message.get("type") == "batch":
        messages = message.get("messages")
        if isinstance(messages, list) and messages and isinstance(messages[0], dict):
            message, rest = messages[0], messages[1:]
    result = message.get("result") if isinstance(message, dict) else None
    if (
        isinstance(message, dict)
        and message.get("type") == "reply"
        and isinstance(result, dict)
        and all(
            isinstance(result.get(f), int | float) for f in ("heartbeat_interval", "stop_grace")
        )
    ):
        return result, rest
    text = frame if isinstance(frame, str) else frame.decode(errors="replace")
    raise WorkerFatalError(
        "not_jobspine", f"the server's first frame is not the hello's reply: {shown(text, 200)}"
    )


class WorkerProcess:
    """Connects to ``url`` (the server's ``/worker`` endpoint is added unless given) with
    ``token`` (a worker token), serves ``handlers`` with ``concurrency`` slots, reconnects
    with backoff.

    :meth:`run` returns after :meth:`drain` once every job was handed back; raises
    :class:`WorkerFatalError` when the server refuses the hello (4002, 4003, 4004, 4010).
    A kind of ``handlers`` the server would refuse (see :func:`actors._codec.check_kind`), or a
    handler that cannot be called, raises :class:`~actors.InvalidInputError` naming it here,
    before any connection."""

    def __init__(
        self,
        url: str,
        token: str,
        handlers: Mapping[str, Handler],
        *,
        concurrency: int = 4,
        name: str | None = None,
        policy: ReconnectPolicy | None = None,
        connect_timeout: float = math.inf,
    ) -> None:
        for kind, handler in handlers.items():
            check_handler(kind, handler)
        # The server's URL, or its worker endpoint's (what this process's log names).
        base = url.rstrip("/")
        self.url = base if base.endswith("/worker") else base + "/worker"
        #: Seconds the first connection is retried before :meth:`run` gives up; once
        #: connected, it reconnects for as long as it runs (servers restart).
        self.connect_timeout = connect_timeout
        self.token = token
        self.handlers = handlers
        self.concurrency = concurrency
        self.name = name
        self.policy = policy or ReconnectPolicy()
        self.session: _Session | None = None
        self._draining = trio.Event()
        #: Connections made (tests: a reconnect happened).
        self.connections = 0
        #: The largest frame the server takes (its hello's reply says; PROTOCOL.md's default
        #: until then), named when it closes a connection with 1009.
        self.max_frame_size = MAX_FRAME_SIZE
        #: The last connection closed at its hello (refused), not after it.
        self._refused = False
        self._hello = self._hello_frame()
        if len(self._hello.encode()) > MAX_WORKER_HELLO:
            # The server closes a larger hello with 1009 before reading it, a close retried
            # for ever: no later hello of these kinds is any smaller.
            raise InvalidInputError(
                f"the hello of these {len(handlers)} kinds (their names and options) takes"
                f" {len(self._hello.encode()):,} bytes, over the {MAX_WORKER_HELLO:,} a server"
                " reads: serve fewer kinds, or shorter names, per worker"
            )

    def _hello_frame(self) -> str:
        """The hello this worker opens each connection with (PROTOCOL.md section 9)."""
        hello: dict[str, Any] = {
            "op": "hello",
            "id": 0,
            "token": self.token,
            "kinds": sorted(self.handlers),
            "capacity": self.concurrency,
            "options": {
                kind: options_to_wire(options_of(handler))
                for kind, handler in self.handlers.items()
            },
        }
        if self.name is not None:
            hello["name"] = self.name
        hello["batch"] = True  # this worker reads batch frames
        return orjson.dumps(hello).decode()

    def drain(self) -> None:
        """Hand every job back to the server (each checkpoints within its grace), then stop."""
        self._draining.set()

    async def run(self) -> None:
        give_up_at = trio.current_time() + self.connect_timeout
        while not self._draining.is_set():
            closed: CloseReason | None = None
            problem = None
            try:
                closed = await self._connect_once()
            except ConnectionRejected as exc:
                raise WorkerFatalError(
                    "not_jobspine",
                    f"{self.url} answered HTTP {exc.status_code}: it is not a jobspine"
                    " server's websocket port (the health port?)",
                ) from None
            except (OSError, HandshakeError, ConnectionClosed) as exc:
                # trio-websocket's HandshakeError says nothing itself: its cause does.
                cause = exc.__cause__ or exc.__context__ or exc
                problem = str(cause) or repr(cause)
            if self._draining.is_set():
                return
            if not self.connections and trio.current_time() >= give_up_at:
                raise WorkerFatalError(
                    "unreachable",
                    f"cannot connect to {self.url} within {self.connect_timeout:g} s"
                    f" ({problem or 'no answer'}); is the server running?"
                    " (--connect-timeout, JOBSPINE_CONNECT_TIMEOUT)",
                )
            code = None if closed is None else closed.code
            if code in FATAL_CLOSE:
                assert closed is not None
                raise WorkerFatalError(FATAL_CLOSE[code], self.describe_close(closed))
            delay = self.policy.next_delay(trio.current_time(), code)
            if not self.connections:  # the next try or the give-up, not past the timeout
                delay = min(delay, max(0.0, give_up_at - trio.current_time()))
            if problem is not None:
                # Named and timed as a close is: with --worker-processes N, N workers logged
                # the same "worker: connection to URL failed" line, and none said when next.
                log.info(
                    "worker%s: connection to %s failed: %s; reconnecting in %.2f s",
                    f" {self.name}" if self.name else "",
                    self.url,
                    problem,
                    delay,
                )
            if closed is not None:
                # Each close said what it was: "connection closed" alone left an operator
                # guessing (a 1009 was a report over the server's frame limit).
                log.log(
                    logging.INFO if code in QUIET_CLOSE else logging.WARNING,
                    "worker%s: %s %s: %s; reconnecting in %.2f s",
                    f" {self.name}" if self.name else "",
                    self.url,
                    "refused the hello" if self._refused else "closed the connection",
                    self.describe_close(closed),
                    delay,
                )
            with trio.move_on_after(delay):
                await self._draining.wait()

    def describe_close(self, closed: CloseReason) -> str:
        """A close the server sent (or the connection's end, 1006) for the log: its code, its
        reason (the server's words, or what the code means when it gave none) and what the
        code means here, with the limit a 1009 is about."""
        reason = loggable(closed.reason or "")
        meaning = CLOSE_MEANINGS.get(closed.code, "")
        if closed.code == CLOSE_TOO_BIG and self._refused:
            meaning = "the hello was over what the server reads before accepting one (512 KiB)"
        elif closed.code == CLOSE_TOO_BIG:
            meaning = (
                "a frame over a size limit: the server takes frames of up to"
                f" {self.max_frame_size:,} bytes (its max_frame_size; a larger frame closes the"
                f" connection: this worker refuses a report over it, failing its own call or"
                f" job only), this worker up to {MAX_MESSAGE:,}"
            )
        if not reason:
            return f"{closed.code} ({meaning or 'no reason given'})"
        return f"{closed.code} ({reason})" + (f": {meaning}" if meaning else "")

    async def _connect_once(self) -> CloseReason | None:
        """One connection, served until it closes: how it closed (None: not known). Raises
        :class:`WorkerFatalError` for a refused hello that reconnecting cannot help."""
        self._refused = False
        async with open_websocket_url(self.url, max_message_size=MAX_MESSAGE) as ws:
            await ws.send_message(self._hello)
            try:
                first = await ws.get_message()
            except ConnectionClosed as exc:
                if exc.reason is None:
                    return None
                refused = exc.reason.code
                if refused in FATAL_CLOSE:  # the server's reason, as it gave it
                    reason = exc.reason.reason or f"the server closed with {refused}"
                    raise WorkerFatalError(FATAL_CLOSE[refused], reason) from None
                # Passing (1013: no room for its kinds now; 1009, 4001, a shutdown's 1001):
                # reconnect with the backoff.
                self._refused = True
                return exc.reason
            welcome, after = _welcome(first)
            limit = welcome.get("max_frame_size")
            if isinstance(limit, int) and not isinstance(limit, bool):
                self.max_frame_size = limit
            session = _Session(self, ws)
            session.heartbeat_interval = welcome["heartbeat_interval"]
            session.stop_grace = welcome["stop_grace"]
            session.max_frame_size = self.max_frame_size
            checkpoint_limit = welcome.get("checkpoint_limit")
            if isinstance(checkpoint_limit, int) and not isinstance(checkpoint_limit, bool):
                session.checkpoint_limit = checkpoint_limit
            session.batch = welcome.get("batch", False) is True
            self.session = session
            self.connections += 1
            self.policy.connected(trio.current_time())
            named = f" {self.name}" if self.name else ""
            log.info("worker%s connected to %s: kinds %s", named, self.url, sorted(self.handlers))
            closed: CloseReason | None = None
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._drain_when_asked, session, nursery.cancel_scope)
                    closed = await session.serve(after)
                    nursery.cancel_scope.cancel()
            finally:
                self.session = None
            return closed

    async def _drain_when_asked(self, session: _Session, scope: trio.CancelScope) -> None:
        await self._draining.wait()
        try:
            await session.request("drain")
        except ConnectionClosed:
            return
        with trio.move_on_after(session.stop_grace + DRAIN_MARGIN):
            while session.attempts:
                await session.ended.wait()
        scope.cancel()
