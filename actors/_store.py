"""The store actor: the one task that touches the database, and its request/reply client.

Requests are queued on a bounded channel. The actor takes every request waiting (up to
``max_batch``), applies them in order to an overlay of pending changes, commits the whole group
in one transaction (group commit) and only then answers each caller and publishes the events.
So a reply means durable, and a failed commit answers every write of the group with
:class:`StoreError` and changes nothing. ``get`` and ``user_head`` read committed state and
are answered at once (a failing write elsewhere does not fail them); queries are barriers:
pending writes are committed before a query reads the database.

Heartbeats are state, not requests: ``heartbeat()`` records the latest one per job without
awaiting, and the actor writes them with the next commit or after ``heartbeat_flush_interval``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import attrs
import trio

from . import _ops as ops
from ._backend import Backend, JobQuery
from ._errors import (
    JobspineError,
    RuntimeClosedError,
    StoreError,
    UnknownJobError,
)
from ._events import EventHub, EventType, JobEvent
from ._ids import new_id
from ._job import Job, JobError
from ._metrics import StoreMetrics, move
from ._policy import RecoveryPolicy
from ._states import TERMINAL_STATES, JobState, check_transition
from ._tracing import span

__all__ = ["StoreActor", "StoreClient", "StoreConfig"]

log = logging.getLogger("jobspine.store")
T = TypeVar("T")


@attrs.frozen
class StoreConfig:
    checkpoint_limit: int = 1024 * 1024
    max_batch: int = 512
    queue_size: int = 1024
    heartbeat_flush_interval: float = 1.0


WRITE, READ, BARRIER = "write", "read", "barrier"


class _Request:
    """``WRITE``: applied, then answered after its group commits. ``READ``: of committed state
    only, answered at once. ``BARRIER``: runs after every earlier write has committed."""

    __slots__ = ("done", "error", "fn", "mode", "value")

    def __init__(self, fn: Callable[[], Awaitable[Any]], mode: str) -> None:
        self.fn = fn
        self.mode = mode
        self.done = trio.Event()
        self.value: Any = None
        self.error: Exception | None = None


@attrs.define(eq=False)
class _Group:
    """Requests applied together and committed in one transaction."""

    generation: int
    requests: list[_Request] = attrs.field(factory=list)
    jobs: dict[str, Job] = attrs.field(factory=dict)
    events: list[JobEvent] = attrs.field(factory=list)
    deleted: set[str] = attrs.field(factory=set)
    beats: dict[str, tuple[int, float]] = attrs.field(factory=dict)
    #: Jobs per state gained (lost, if negative) by this group, for the metrics.
    moves: dict[JobState, int] = attrs.field(factory=dict)

    def __bool__(self) -> bool:
        return bool(self.requests or self.writes)

    @property
    def writes(self) -> bool:
        return bool(self.jobs or self.events or self.deleted or self.beats)


class StoreActor:
    """Owns a :class:`Backend`; serves :class:`StoreClient` requests until every client closes.

    Commits are pipelined one deep: while one group commits (in the database's thread), the
    next is applied in this task, reading through the overlays of both. A failed commit fails
    every group built on top of it and drops every cached state, which is reloaded from the
    database.
    """

    def __init__(self, backend: Backend, hub: EventHub, config: StoreConfig | None = None) -> None:
        self.backend = backend
        self.hub = hub
        self.config = config or StoreConfig()
        self._send, self._receive = trio.open_memory_channel[_Request](self.config.queue_size)
        self._cache: dict[str, Job] = {}  # committed state of every non-terminal job written
        self._inflight: list[_Group] = []  # handed to the committer, oldest first
        self._generation = 0  # bumped by a failed commit: older groups are void
        self._group = _Group(0)  # being applied
        self._beats: dict[str, tuple[int, float]] = {}
        self._user_heads: dict[str, int] = {}  # includes staged, uncommitted events
        self._idle = trio.Event()
        self._idle.set()
        self.commits = 0
        self.committed_requests = 0
        self.metrics = StoreMetrics()

    def client(self) -> StoreClient:
        """A new client owning its own clone of the request channel; close it when done.

        Make the first clients before :meth:`run` (it serves until the last client closes);
        later ones come from :meth:`StoreClient.clone`."""
        return StoreClient(self, self._send.clone())

    async def run(
        self, *, task_status: trio.TaskStatus[StoreActor] = trio.TASK_STATUS_IGNORED
    ) -> None:
        async with self._receive, self.backend.opened(), trio.open_nursery() as nursery:
            # Only clients hold send ends: the loop ends when the last client closes.
            self._send.close()
            self.metrics.load(await self.backend.count_by_state(None))
            to_committer, from_actor = trio.open_memory_channel[_Group](0)
            nursery.start_soon(self._committer, from_actor)
            task_status.started(self)
            async with to_committer:
                self._handoff = to_committer
                try:
                    await self._serve()
                finally:
                    with trio.move_on_after(5, shield=True):
                        await self._drain()

    async def _serve(self) -> None:
        receive = self._receive
        while True:
            # Wake at least every flush interval: heartbeats arrive without a request.
            first: _Request | None = None
            try:
                with trio.move_on_after(self.config.heartbeat_flush_interval):
                    first = await receive.receive()
            except trio.EndOfChannel:
                return
            if first is None:
                if self._beats:
                    await self._cut()
                continue
            # Let every task that is ready to send a request do so before the group is cut.
            await trio.lowlevel.cancel_shielded_checkpoint()
            batch = [first]
            while len(batch) < self.config.max_batch:
                try:
                    batch.append(receive.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            await self._process(batch)

    async def _process(self, batch: list[_Request]) -> None:
        for request in batch:
            if request.mode is BARRIER:
                await self._drain()
            try:
                request.value = await request.fn()
            except JobspineError as exc:
                request.error = exc
            except Exception as exc:
                log.exception("store request failed")
                request.error = StoreError(f"store request failed: {exc!r}")
            if request.mode is WRITE:
                self._group.requests.append(request)
            else:
                request.done.set()
        await self._cut()

    async def _cut(self) -> None:
        """Hand the group being applied to the committer (waits while it is busy)."""
        group, self._group = self._group, _Group(self._generation)
        group.beats, self._beats = self._beats, {}
        if not group:
            return
        self._inflight.append(group)
        self._idle = trio.Event()
        await self._handoff.send(group)

    async def _drain(self) -> None:
        """Commit everything applied so far and wait until it is done."""
        await self._cut()
        await self._idle.wait()

    async def _committer(self, groups: trio.MemoryReceiveChannel[_Group]) -> None:
        async with groups:
            async for group in groups:
                try:
                    await self._commit(group)
                finally:
                    self._inflight.remove(group)
                    if not self._inflight:
                        self._idle.set()
                    for request in group.requests:
                        request.done.set()

    async def _commit(self, group: _Group) -> None:
        if group.generation != self._generation:
            error: Exception = StoreError("an earlier write failed; nothing of this was saved")
        elif not group.writes:
            return  # reads only: answered in order, after the writes before them
        else:
            started = time.perf_counter()
            try:
                with span(
                    "jobspine.store.commit",
                    {"requests": len(group.requests), "events": len(group.events)},
                ):
                    await self.backend.commit(
                        group.jobs.values(), group.events, group.deleted, group.beats
                    )
            except Exception as exc:
                self.metrics.failed_commits += 1
                log.exception("commit of %d requests failed", len(group.requests))
                # Every group applied on top of this one is void; cached state is reloaded.
                self._generation += 1
                self._cache.clear()
                self._user_heads.clear()
                if not self._group:  # nothing applied on the void state yet
                    self._group.generation = self._generation
                error = StoreError(f"database write failed, nothing was saved: {exc}")
            else:
                self.metrics.committed(
                    len(group.requests), group.events, group.moves, time.perf_counter() - started
                )
                self._committed(group)
                return
        for request in group.requests:
            if request.error is None:
                request.error = error
                request.value = None

    def _committed(self, group: _Group) -> None:
        self.commits += 1
        self.committed_requests += len(group.requests)
        cache = self._cache
        for job_id, (attempt, at) in group.beats.items():
            cached = cache.get(job_id)
            if cached and cached.state is JobState.RUNNING and cached.attempt == attempt:
                cache[job_id] = attrs.evolve(cached, last_heartbeat_at=at)
        for job in group.jobs.values():
            if job.state in TERMINAL_STATES:
                cache.pop(job.id, None)
            else:
                cache[job.id] = job
        for job_id in group.deleted:
            cache.pop(job_id, None)
        self.hub.publish(group.events)

    # -- helpers used by request functions (run inside the actor task) -------------------------

    async def _job(self, job_id: str) -> Job:
        for group in (self._group, *reversed(self._inflight)):
            if job_id in group.deleted:
                raise UnknownJobError(job_id)
            job = group.jobs.get(job_id)
            if job is not None:
                return job
        job = self._cache.get(job_id)
        if job is None:
            job = await self.backend.load(job_id)
            if job is None:
                raise UnknownJobError(job_id)
        return job

    async def _committed_job(self, job_id: str) -> Job:
        job = self._cache.get(job_id) or await self.backend.load(job_id)
        if job is None or any(job_id in group.deleted for group in self._inflight):
            raise UnknownJobError(job_id)
        return job

    async def _user_head(self, user_id: str) -> int:
        head = self._user_heads.get(user_id)
        if head is None:
            head = self._user_heads[user_id] = await self.backend.user_head(user_id)
        return head

    async def _stage(self, change: ops.Change) -> Job:
        job, event = change
        user_seq = await self._user_head(job.user_id) + 1
        self._user_heads[job.user_id] = user_seq
        self._group.jobs[job.id] = job
        self._group.events.append(
            JobEvent(
                event.job_id,
                event.user_id,
                event.seq,
                event.type,
                event.state,
                event.at,
                event.data,
                event.actor,
                user_seq,
            )
        )
        return job

    async def _change(self, job_id: str, fn: Callable[[Job, float], ops.Change]) -> Job:
        old = await self._job(job_id)
        job = await self._stage(fn(old, time.time()))
        if job.state is not old.state:
            move(self._group.moves, old.state, job.state)
        return job


class StoreClient:
    """Request/reply access to the store actor. Every method returns after the commit."""

    def __init__(self, actor: StoreActor, send: trio.MemorySendChannel[_Request]) -> None:
        self._actor = actor
        self._send = send

    async def __aenter__(self) -> StoreClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._send.aclose()

    def clone(self) -> StoreClient:
        return StoreClient(self._actor, self._send.clone())

    @property
    def epoch(self) -> str:
        return self._actor.backend.epoch

    @property
    def checkpoint_limit(self) -> int:
        return self._actor.config.checkpoint_limit

    async def _call(self, fn: Callable[[], Awaitable[T]], mode: str = WRITE) -> T:
        request = _Request(fn, mode)
        try:
            await self._send.send(request)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise RuntimeClosedError("the store is closed") from None
        await request.done.wait()
        if request.error is not None:
            raise request.error
        value: T = request.value
        return value

    # -- writes ---------------------------------------------------------------------------------

    async def create(self, user_id: str, kind: str, input: Any) -> Job:
        actor = self._actor

        async def fn() -> Job:
            job = await actor._stage(ops.create(new_id(), user_id, kind, input, time.time()))
            move(actor._group.moves, None, job.state)
            return job

        return await self._call(fn)

    async def get(self, job_id: str) -> Job:
        """The job as last committed (a failing write elsewhere does not affect it)."""
        return await self._call(lambda: self._actor._committed_job(job_id), READ)

    async def start(self, job_id: str) -> Job:
        return await self._call(lambda: self._actor._change(job_id, ops.start))

    async def resume(self, job_id: str, actor: str | None) -> Job:
        return await self._call(
            lambda: self._actor._change(job_id, lambda job, now: ops.resume(job, now, actor))
        )

    async def set_progress(self, job_id: str, attempt: int, pct: float, step: str | None) -> Job:
        return await self._call(
            lambda: self._actor._change(
                job_id, lambda job, now: ops.progress(job, attempt, pct, step, now)
            )
        )

    async def checkpoint(self, job_id: str, attempt: int, data: Any) -> Job:
        limit = self.checkpoint_limit
        return await self._call(
            lambda: self._actor._change(
                job_id, lambda job, now: ops.checkpoint(job, attempt, data, now, limit)
            )
        )

    async def complete(self, job_id: str, attempt: int, result: Any) -> Job:
        return await self._call(
            lambda: self._actor._change(
                job_id, lambda job, now: ops.complete(job, attempt, result, now)
            )
        )

    async def fail(
        self, job_id: str, attempt: int | None, error: JobError, actor: str | None = None
    ) -> Job:
        return await self._call(
            lambda: self._actor._change(
                job_id, lambda job, now: ops.fail(job, attempt, error, now, actor)
            )
        )

    async def cancel(self, job_id: str, actor: str | None) -> Job:
        return await self._call(
            lambda: self._actor._change(job_id, lambda job, now: ops.cancel(job, now, actor))
        )

    async def pause(
        self, job_id: str, attempt: int | None, actor: str | None, reason: str = "user"
    ) -> Job:
        return await self._call(
            lambda: self._actor._change(
                job_id, lambda job, now: ops.pause(job, attempt, now, actor, reason)
            )
        )

    async def recover(
        self, job_id: str, attempt: int | None, policy: RecoveryPolicy, cause: str
    ) -> Job:
        """Apply the recovery rule to a running job, atomically with reading it."""
        return await self._call(
            lambda: self._actor._change(
                job_id,
                lambda job, now: ops.recover(job, attempt, policy.decide(job, cause), now),
            )
        )

    async def restart(
        self, job_id: str, actor: str | None, modifications: Mapping[str, Any] | None = None
    ) -> Job:
        return await self._call(
            lambda: self._actor._change(
                job_id, lambda job, now: ops.restart(job, now, actor, modifications)
            )
        )

    async def reset_recovery_attempts(self, job_id: str, actor: str | None) -> Job:
        return await self._call(
            lambda: self._actor._change(
                job_id, lambda job, now: ops.reset_recovery(job, now, actor)
            )
        )

    async def set_state(self, job_id: str, state: JobState, actor: str | None = None) -> Job:
        """Move a job to ``state`` by the one operation that leads there without a payload."""
        job = await self.get(job_id)
        if state is JobState.RUNNING:
            if job.state is JobState.PAUSED:
                return await self.resume(job_id, actor)
            return await self.start(job_id)
        if state is JobState.PAUSED:
            return await self.pause(job_id, None, actor)
        if state is JobState.CANCELLED:
            return await self.cancel(job_id, actor)
        if state is JobState.CREATED:
            return await self.restart(job_id, actor)
        if state is JobState.FAILED:
            return await self.fail(job_id, None, JobError("Failed", "set failed"), actor)
        check_transition(job_id, job.state, JobState.COMPLETED)
        return await self.complete(job_id, job.attempt, None)

    async def delete(self, job_id: str, actor: str | None = None) -> None:
        """Remove a job that is not running. Its event log stays, closed by a ``deleted``
        event, so that cursors on the job's and its user's rooms never see a gap."""
        store = self._actor

        async def fn() -> None:
            job, event = ops.delete(await store._job(job_id), time.time(), actor)
            await store._stage((job, event))
            move(store._group.moves, job.state, None)
            del store._group.jobs[job_id]
            store._group.deleted.add(job_id)

        await self._call(fn)

    def heartbeat(self, job_id: str, attempt: int) -> None:
        """Record a heartbeat; written with the next commit. Never blocks."""
        self._actor._beats[job_id] = (attempt, time.time())

    # -- queries (barriers) ---------------------------------------------------------------------

    async def list_jobs(self, query: JobQuery) -> list[Job]:
        return await self._call(lambda: self._actor.backend.query(query), BARRIER)

    async def find_running(self) -> list[Job]:
        return await self.list_jobs(JobQuery(states=frozenset({JobState.RUNNING})))

    async def find_stale_running(self, older_than: float) -> list[Job]:
        """Running jobs whose last heartbeat is more than ``older_than`` seconds ago."""
        cutoff = time.time() - older_than
        return await self.list_jobs(
            JobQuery(states=frozenset({JobState.RUNNING}), heartbeat_before=cutoff)
        )

    async def find_resumable(self, user_id: str | None = None) -> list[Job]:
        return await self.list_jobs(JobQuery(user_id=user_id, states=frozenset({JobState.PAUSED})))

    async def get_stats(self, user_id: str | None = None) -> dict[str, int]:
        counts = await self._call(lambda: self._actor.backend.count_by_state(user_id), BARRIER)
        stats = {state.value: counts.get(state.value, 0) for state in JobState}
        stats["total"] = sum(counts.values())
        return stats

    async def user_head(self, user_id: str) -> int:
        """The ``user_seq`` of the user's latest event (0 if none)."""
        return await self._call(lambda: self._actor._user_head(user_id), READ)

    async def read_user_events(
        self, user_id: str, after_seq: int = 0, limit: int = 1000
    ) -> list[JobEvent]:
        """Events of all the user's jobs with ``user_seq > after_seq``, in order."""
        return await self._call(
            lambda: self._actor.backend.read_user_events(user_id, after_seq, limit), BARRIER
        )

    async def read_events(
        self,
        job_id: str,
        after_seq: int = 0,
        limit: int = 1000,
        types: frozenset[EventType] | None = None,
    ) -> list[JobEvent]:
        return await self._call(
            lambda: self._actor.backend.read_events(job_id, after_seq, limit, types), BARRIER
        )
