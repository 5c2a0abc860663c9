"""Remote worker actors: attempts that run in a worker process connected over the wire.

:class:`RemotePlacement` is a :class:`~actors._placement.Placement` holding the connected
:class:`RemoteWorker` s. Placing an attempt returns a :class:`RemoteAttempt`, the handler the
supervisor's ordinary :class:`~actors._worker.Worker` runs: it sends the assignment, turns
the worker's reports into the same :class:`~actors.JobContext` calls an in-process handler
makes (so fencing, stall detection and events are the same code), forwards a stop request
(pause, shutdown, timeout) as a ``stop`` frame with the grace period, and a cancellation as a
``cancel`` frame. The connection itself (frames, authentication) is
:mod:`transport._workers`; this module only sees a :class:`WorkerLink`.

A worker's connection that closes loses its attempts at once (:meth:`Supervisor.lose`):
every report of a remote attempt travels on its connection, so once it is closed nothing from
that attempt can arrive, and waiting for the deadline would only keep the job away from the
next worker for ``heartbeat_timeout``. An attempt the worker named (in a heartbeat or a
report: :attr:`RemoteAttempt.started`) gets the stall rule now; one it never named goes back
to the queue with nothing counted (``worker_gone``), as a claim whose worker left before the
start does: as far as the server can know, its handler never ran, and a worker that
connects and drops at once would otherwise fail every job it was handed.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import attrs
import trio

from ._errors import JobStopped
from ._job import Job, JobError
from ._options import KindOptions
from ._worker import HandlerFailure, JobContext, Worker

if TYPE_CHECKING:
    from ._supervisor import Supervisor

__all__ = ["RemoteAttempt", "RemotePlacement", "RemoteWorker", "WorkerLink"]


class WorkerLink(Protocol):
    """The connection to one worker process, as the runtime sees it."""

    def send(self, message: dict[str, Any]) -> None:
        """Queue one frame for the worker; never blocks (a worker that does not read is
        disconnected by the connection, which then calls :meth:`RemotePlacement.disconnect`)."""
        ...


@attrs.define(eq=False)
class RemoteWorker:
    """One connected worker: the kinds it declared, its capacity, its attempts by job id."""

    name: str
    kinds: frozenset[str]
    capacity: int
    link: WorkerLink
    attempts: dict[str, RemoteAttempt] = attrs.field(factory=dict)
    #: Set by :meth:`RemotePlacement.open` once the worker has the hello's reply: until
    #: then it takes no attempt (an assignment queued before the reply was sent could reach
    #: the worker first, or in one batch with it).
    ready: bool = False
    #: Set by a drain (the worker is shutting down) and at disconnection: no new attempts.
    closed: bool = False

    @property
    def free(self) -> int:
        if self.closed or not self.ready:
            return 0
        return max(0, self.capacity - len(self.attempts))


class RemoteAttempt:
    """The server's half of one attempt running in a remote worker (a handler)."""

    def __init__(self, supervisor: Supervisor, worker: RemoteWorker, job: Job) -> None:
        self.supervisor = supervisor
        self.worker = worker
        self.job_id = job.id
        self.attempt = job.attempt
        self.kind = job.kind
        self.ctx: JobContext | None = None
        self._done = trio.Event()
        self._result: Any = None
        self._error: JobError | None = None
        self._permanent = False
        self._stopped = False
        self._lost: str | None = None
        #: Set once the worker has named this attempt (a heartbeat entry or a report): its
        #: handler may have run. ``jobspine worker`` names it just before the handler starts.
        self.started = False

    # -- reports from the worker (the connection calls these) ----------------------------------

    def complete(self, result: Any) -> None:
        self._finish()
        self._result = result

    def fail(self, error: JobError, permanent: bool = False) -> None:
        """The handler raised there; ``permanent``: a ``PermanentError`` (no retry)."""
        self._finish()
        self._error = error
        self._permanent = permanent

    def stopped(self) -> None:
        """The worker's handler acknowledged a stop (raised ``JobStopped``)."""
        self._finish()
        self._stopped = True

    def lose(self, cause: str) -> None:
        """The connection closed: the attempt is lost (the stall rule applies now)."""
        if not self._done.is_set():
            self._lost = cause
            self._done.set()

    def beat(self) -> None:
        """A heartbeat from the worker (persisted like ``ctx.heartbeat()``)."""
        if self.ctx is not None:
            self.ctx._worker.beat(persist=True)

    def _finish(self) -> None:
        # The attempt's slot frees with its last report: nothing more is accepted from it.
        self.worker.attempts.pop(self.job_id, None)
        self._done.set()
        self.supervisor.capacity_changed()

    @property
    def ended(self) -> bool:
        return self._done.is_set()

    async def recorded(self) -> str:
        """Wait until the runtime has stored the outcome this attempt reported (after
        :meth:`complete` or :meth:`fail`): durable, as every outcome write is. Returns how
        the attempt ended (``Worker.outcome``): completed, failed, retrying, fenced (the job
        had moved on: the newer decision stands), stopped (cancelled meanwhile: whoever
        cancelled it recorded that) or not_stored (the database refused it: the stall rule
        recovers the job)."""
        assert self.ctx is not None, "an attempt reports only once assigned"
        worker = self.ctx._worker
        assert isinstance(worker, Worker), "a remote attempt runs as a handler in a Worker"
        await worker.finished.wait()
        return worker.outcome

    # -- the handler ---------------------------------------------------------------------------

    async def __call__(self, ctx: JobContext, input: Any) -> Any:
        self.ctx = ctx
        self.worker.link.send(
            {
                "type": "assign",
                "job_id": self.job_id,
                "attempt": self.attempt,
                "kind": self.kind,
                "user_id": ctx.user_id,
                "input": input,
                "checkpoint": ctx.resumed_from,
                "heartbeat_timeout": self.supervisor.config.heartbeat_timeout,
                "stop_grace": self.supervisor.config.stop_grace,
            }
        )
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._forward_stop, ctx)
                await self._done.wait()
                nursery.cancel_scope.cancel()
        finally:
            if not self._done.is_set():
                # Cancelled (a cancel, a stall, the end of the grace period): the worker drops
                # the attempt; whatever it still sends for it is refused.
                self.worker.attempts.pop(self.job_id, None)
                self.worker.link.send(
                    {"type": "cancel", "job_id": self.job_id, "attempt": self.attempt}
                )
        if self._lost is not None:
            self.worker.attempts.pop(self.job_id, None)
            self.supervisor.lose(self.job_id, self.attempt, self._lost, started=self.started)
            await trio.sleep_forever()  # the recovery (or the re-queue) cancels this attempt
        if self._stopped:
            raise JobStopped
        if self._error is not None:
            raise HandlerFailure(self._error, self._permanent)
        return self._result

    async def _forward_stop(self, ctx: JobContext) -> None:
        await ctx.wait_stopping()
        self.worker.link.send(
            {
                "type": "stop",
                "job_id": self.job_id,
                "attempt": self.attempt,
                "grace": self.supervisor.config.stop_grace,
            }
        )


class RemotePlacement:
    """Connected workers as a placement: slots per kind are the declared capacities."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor
        self.workers: list[RemoteWorker] = []

    def connect(
        self,
        name: str,
        kinds: Collection[str],
        capacity: int,
        link: WorkerLink,
        options: Mapping[str, KindOptions] | None = None,
    ) -> RemoteWorker:
        """A worker serving ``kinds``; ``options``: those it declared for them (checked by
        :meth:`Supervisor.declaration_conflict` first), the defaults for a kind left out.
        Its slots open with :meth:`open`, once it has the hello's reply."""
        self.supervisor.declare({kind: (options or {}).get(kind, KindOptions()) for kind in kinds})
        worker = RemoteWorker(name, frozenset(kinds), capacity, link)
        self.workers.append(worker)
        return worker

    def open(self, worker: RemoteWorker) -> None:
        """``worker`` has the hello's reply: attempts may be placed on it from now on."""
        worker.ready = True
        self.supervisor.capacity_changed()

    def disconnect(self, worker: RemoteWorker, cause: str) -> None:
        """The worker's connection closed: its attempts are lost now."""
        worker.closed = True
        if worker in self.workers:
            self.workers.remove(worker)
        # Its kinds were in use until now: the last of those nothing holds to be forgotten.
        self.supervisor.kinds_used(worker.kinds)
        for attempt in list(worker.attempts.values()):
            attempt.lose(cause)

    # -- Placement -----------------------------------------------------------------------------

    def kinds(self) -> frozenset[str]:
        return frozenset().union(*(w.kinds for w in self.workers))

    def slots(self, kind: str) -> int:
        return sum(w.capacity for w in self.workers if kind in w.kinds)

    def serves(self, kind: str) -> bool:
        return any(kind in w.kinds for w in self.workers)

    def capacity(self, kind: str) -> int:
        return sum(w.free for w in self.workers if kind in w.kinds)

    def free(self) -> int:
        return sum(w.free for w in self.workers)

    def place(self, job: Job) -> RemoteAttempt:
        # The worker with the most free slots: spreads attempts over the processes.
        worker = max((w for w in self.workers if job.kind in w.kinds), key=lambda w: w.free)
        attempt = RemoteAttempt(self.supervisor, worker, job)
        worker.attempts[job.id] = attempt
        return attempt
