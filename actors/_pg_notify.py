"""PostgreSQL ``LISTEN/NOTIFY`` for several nodes on one database (issue 11): the transport of
:mod:`._routing`'s controls, and queue wake-ups.

**Queue.** A commit that leaves a job waiting (create, resume, restart, re-queue, release)
sends ``NOTIFY`` on :data:`~._routing.QUEUE_CHANNEL` in its own transaction
(:meth:`~._postgres.PostgresBackend.commit`), delivered when it commits, so every listening
node's dispatcher claims at once instead of at its next renewal.

**Controls.** Each node listens on its own channel (:func:`node_channel` of its node id), where
others send it :class:`~._routing.Control` payloads (JSON); each is applied in a task of its
own, its failure logged (the asker has its bound). A control names the attempt and the
incarnation it is for, and the node applies it only while it is that incarnation with a
valid lease and the job runs that attempt (:func:`~._routing.refusal`), whoever hears it.

The channel is the node id's, not the incarnation's, on purpose: a node that registers again
(:mod:`._nodes`) keeps listening without a gap, so no control sent to its new incarnation is
lost between its registration and a new ``LISTEN``. A channel per incarnation would not make
the check at apply time unnecessary anyway: the notifications queued for a frozen process
reach it when it runs again, whatever it listens on by then.

**Driving LISTEN from Trio.** psycopg's sync ``Connection.notifies(timeout=…)`` on a dedicated
connection, in a worker thread, one wait of at most :data:`LISTEN_POLL` seconds per crossing
(so a cancelled wait ends within it). Sending uses a second connection (the listening one is
busy in its thread), opened again once at once if the server dropped it. A lost listening
connection is logged and opened again after :data:`RECONNECT_DELAY`; what was sent meanwhile
is lost: the dispatcher's own renewals absorb a lost queue wake-up, and an asker sends its
control again every :data:`~._routing.RESEND_INTERVAL` until the job has left the attempt
(the same control arriving while it is applied is applied once).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
import trio

from ._errors import shown
from ._nodes import node_of
from ._repeats import RepeatedFailure
from ._routing import QUEUE_CHANNEL, Control, RemoteControlError

__all__ = ["PgNotifier", "node_channel"]

log = logging.getLogger("jobspine.notify")

#: Longest wait for notifications per crossing into the listener's thread, in seconds.
LISTEN_POLL = 0.5
#: Seconds before a lost listening connection is opened again.
RECONNECT_DELAY = 1.0


def node_channel(node_id: str) -> str:
    """The ``LISTEN`` channel of the node ``node_id`` (an identifier of at most 63 bytes
    whatever the id's length). Per node id, not per incarnation: a node that registered again
    (:mod:`._nodes`) keeps its channel; which incarnation a control is for is in the control
    (see the module's docstring)."""
    return "jobspine_node_" + hashlib.sha256(node_id.encode()).hexdigest()[:32]


class PgNotifier:
    """Listens on :data:`QUEUE_CHANNEL` and this node's channel; sends notifications.

    ``on_queue()`` is called for every queue notification of another node's commit (never
    blocks); ``on_control`` is
    started in a task of the actor's nursery for every control sent to this node (its
    exceptions are logged: a control that fails here leaves the asker to its bound)."""

    def __init__(
        self,
        url: str,
        node_id: str,
        on_queue: Callable[[], None],
        on_control: Callable[[Control], Awaitable[object]],
        *,
        own_instance: str = "",
    ) -> None:
        self.url = url
        #: Queue notifications with this payload come from this node's own commits: its
        #: dispatcher knows of those already (a wake would only unsettle its fast path).
        self.own_instance = own_instance
        self.node_id = node_id
        self.channel = node_channel(node_id)
        self._on_queue = on_queue
        self._on_control = on_control
        self._sender: psycopg.Connection[Any] | None = None
        self._send_lock = trio.Lock()
        self._scope = trio.CancelScope()
        #: Controls received and applied (or failed) here, for tests and metrics.
        self.controls = 0
        #: Controls being applied here: the same one sent again meanwhile (the asker sends
        #: it again until the job leaves its attempt) is not applied twice.
        self._applying: set[Control] = set()

    def _connect(self) -> psycopg.Connection[Any]:
        return psycopg.connect(
            self.url, autocommit=True, connect_timeout=5, application_name="jobspine-notify"
        )

    def close(self) -> None:
        """Stop listening (:meth:`run` returns within :data:`LISTEN_POLL` seconds)."""
        self._scope.cancel()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen until :meth:`close`. Raises :class:`psycopg.Error` if the first connection
        cannot be made."""
        with self._scope:
            await self._serve(task_status)

    async def _serve(self, task_status: trio.TaskStatus[None]) -> None:
        async with trio.open_nursery() as nursery:
            listening = await trio.to_thread.run_sync(self._listen_on)
            try:
                task_status.started()
                while True:
                    try:
                        notes = await trio.to_thread.run_sync(_wait, listening)
                    except psycopg.Error as exc:
                        log.warning("notifications lost (%s); listening again", exc)
                        listening.close()
                        await trio.sleep(RECONNECT_DELAY)
                        listening = await self._reconnect()
                        continue
                    for channel, payload in notes:
                        self._dispatch(nursery, channel, payload)
            finally:
                with trio.move_on_after(LISTEN_POLL * 2, shield=True):
                    await trio.to_thread.run_sync(listening.close)
                    if self._sender is not None:
                        await trio.to_thread.run_sync(self._sender.close)

    def _listen_on(self) -> psycopg.Connection[Any]:
        conn = self._connect()
        conn.execute(f"LISTEN {QUEUE_CHANNEL}")
        conn.execute(f"LISTEN {self.channel}")
        return conn

    async def _reconnect(self) -> psycopg.Connection[Any]:
        # Tried every RECONNECT_DELAY for as long as the server is down: said once per cause.
        failures = RepeatedFailure()
        while True:
            try:
                return await trio.to_thread.run_sync(self._listen_on)
            except psycopg.Error as exc:
                level = failures.level(exc)
                log.log(level, "cannot listen for notifications (%s); trying again", exc)
                await trio.sleep(RECONNECT_DELAY)

    def _dispatch(self, nursery: trio.Nursery, channel: str, payload: str) -> None:
        if channel == QUEUE_CHANNEL:
            if payload != self.own_instance:
                self._on_queue()
            return
        try:
            control = Control.decode(payload)
        except ValueError as exc:
            log.warning("control ignored: %s", exc)
            return
        if control in self._applying:
            return
        self._applying.add(control)
        nursery.start_soon(self._apply, control)

    async def _apply(self, control: Control) -> None:
        try:
            await self._on_control(control)
        except Exception as exc:
            log.info("control %s of job %s not applied: %r", control.op, control.job_id, exc)
        finally:
            self._applying.discard(control)
            self.controls += 1

    async def send(self, owner: str, control: Control) -> None:
        """Send ``control`` to the node whose claims carry ``owner``. Raises
        :class:`RemoteControlError` if the database cannot be reached."""

        args = (node_channel(node_of(owner)[0]), control.encode())

        def fn() -> None:
            if self._sender is None or self._sender.closed:
                self._sender = self._connect()
            try:
                self._sender.execute("SELECT pg_notify(%s, %s)", args)
            except psycopg.Error:
                # A connection the server dropped (a restart, a pooler, idle_session_timeout)
                # shows only when used: sent again once on a new one. Sending twice is
                # harmless: a control names its attempt, applied once (see _dispatch).
                if not self._sender.broken and not self._sender.closed:
                    raise
                self._sender.close()
                self._sender = self._connect()
                self._sender.execute("SELECT pg_notify(%s, %s)", args)

        async with self._send_lock:
            try:
                await trio.to_thread.run_sync(fn)
            except psycopg.Error as exc:
                raise RemoteControlError(f"cannot reach node {shown(owner)}: {exc}") from None


def _wait(conn: psycopg.Connection[Any]) -> list[tuple[str, str]]:
    return [
        (note.channel, note.payload) for note in conn.notifies(timeout=LISTEN_POLL, stop_after=1)
    ]
