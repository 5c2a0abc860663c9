"""The supervisor actor: runs one worker per running job and handles stalls.

Workers report liveness through a bounded memory channel; a beat is queued at most once per
worker until the supervisor takes it (coalesced, never blocking). Stalls are found by a
deadline heap (:class:`StallDetector`), so the one watch loop wakes exactly at the earliest
deadline instead of polling, and sleeps with no timer per job.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import random
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import attrs
import trio

from ._clock import wall_time
from ._declared import DeclaredKinds
from ._errors import (
    InvalidInputError,
    JobspineError,
    StoreError,
    StoreUnavailableError,
    UnknownKindError,
    shown,
)
from ._job import Job, JobError
from ._joblog import job_fields
from ._options import KindOptions, options_of
from ._placement import InProcessPlacement, Placement
from ._policy import RecoveryDecision, RecoveryPolicy, StallDetector, shutdown_state
from ._ranges import check_fields
from ._scheduling import RetryDecision, decide_retry
from ._states import JobState
from ._store import StoreClient
from ._worker import NOT_STARTED, Handler, Worker, check_input

__all__ = [
    "MAX_DECLARED_KINDS",
    "WORKER_GONE",
    "Supervisor",
    "SupervisorConfig",
    "SupervisorStatus",
    "recovery_event",
    "recovery_outcome",
]

#: The reason a claimed job goes back to the queue when no placement has its slot anymore.
WORKER_GONE = "worker_gone"

#: Kinds known from workers' declarations at once: past it, a declaration forgets the least
#: recently used kinds that nothing holds (see :class:`~._declared.DeclaredKinds`).
MAX_DECLARED_KINDS = 4096

log = logging.getLogger("jobspine.supervisor")

#: Seconds: the stall watcher wakes at least this often, and a wake later than planned by
#: more than this is a freeze of the whole process, whose time no job is charged for.
FREEZE_GAP = 1.0


@attrs.frozen
class SupervisorConfig:
    heartbeat_timeout: float = 30.0
    max_recovery_attempts: int = 3
    stop_grace: float = 5.0
    beat_queue: int = 4096
    #: False: registered handlers only check input; every attempt runs in a placement added
    #: with :meth:`Supervisor.add_placement` (connected workers).
    in_process: bool = True

    def __attrs_post_init__(self) -> None:
        """Refuse, with :class:`InvalidInputError` naming it and its value, a number out of
        range: ``heartbeat_timeout`` finite seconds above 0, ``stop_grace`` from 0,
        ``max_recovery_attempts`` an integer from 0, ``beat_queue`` from 1."""
        check_fields(self, zero=("stop_grace", "max_recovery_attempts"))


@attrs.frozen
class SupervisorStatus:
    watched: int
    stalls_detected: int
    recoveries: int
    failures: int
    running: int
    #: Jobs whose outcome the store refused, awaiting a stored recovery.
    orphans: int


class Supervisor:
    def __init__(
        self,
        store: StoreClient,
        handlers: Mapping[str, Handler],
        config: SupervisorConfig | None = None,
        kinds: Mapping[str, KindOptions] | None = None,
        *,
        clock: Callable[[], float] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.store = store
        self.handlers = handlers
        self._clock = clock
        self._rng = rng or random.Random()
        # Per-attempt timeouts: one deadline heap, checked by the watch loop (no timer per job).
        self.timeouts = StallDetector()
        # Options given per kind (register, RuntimeConfig.kinds); else the handler's own.
        self._kinds: dict[str, KindOptions] = dict(kinds or {})
        #: Kinds connected workers declared, with the options the last accepted declaration
        #: gave (the defaults when none): a declared kind stays known while no worker serves
        #: it (its jobs wait) until the table is full and it is the least recently used of
        #: those nothing holds, and runs with these options unless the server has its own
        #: (given, or a handler registered here).
        self._declared = DeclaredKinds(MAX_DECLARED_KINDS)
        self.config = config or SupervisorConfig()
        self.policy = RecoveryPolicy(self.config.max_recovery_attempts)
        #: Asked in order; in-process handlers come last (see :meth:`add_placement`).
        self.placements: list[Placement] = [
            InProcessPlacement(handlers, enabled=self.config.in_process)
        ]
        #: Called (no arguments, never awaited) whenever a slot may have freed or appeared, or
        #: a job went back to the queue: an attempt ended, a worker connected, a retry or a
        #: re-queue was stored. The queue's dispatcher listens here.
        self.capacity_listeners: list[Callable[[], None]] = []
        self.detector = StallDetector()
        self.workers: dict[str, Worker] = {}
        # Jobs whose worker ended but whose outcome or recovery the store refused: still
        # "running" in the database, watched until a recovery is stored.
        self.orphans: dict[str, Worker] = {}
        self._per_user: dict[str, int] = {}
        self._per_kind: dict[str, int] = {}
        #: Workers whose outcome is ordered in the store but not yet durable: their handler
        #: has returned, so they hold no slot (a claim fills it meanwhile, its starts often
        #: committed with that outcome), though they stay in ``workers`` until they exit.
        self._finishing: set[Worker] = set()
        #: Per job, its superseded attempts whose handler has not returned yet (a newer
        #: attempt's handler waits for them, see :meth:`launch`); each leaves at its exit.
        self._unwinding: dict[str, set[Worker]] = {}
        self._beats_send, self._beats_receive = trio.open_memory_channel[Worker](
            self.config.beat_queue
        )
        self._nursery: trio.Nursery | None = None
        #: Why no attempt starts here any more (the shutdown's reason), None until then: set
        #: when the shutdown begins, or at :meth:`close`, and never cleared. A launch is
        #: refused from then on, so the shutdown's stop of every worker misses none.
        self.stopping: str | None = None
        # Set before the nursery can close (at close(), or when run() is left otherwise):
        # from then on nothing outside it starts a task in it (see _spawn).
        self._closed = False
        # Set while the dispatcher's claim and the launches of what it claimed are under way.
        self._launch_holds: set[trio.Event] = set()
        self._stalls = 0
        #: Seconds this process was found not running (see :data:`FREEZE_GAP`).
        self.frozen_seconds = 0.0
        self._recoveries = 0
        self._failures = 0

    # -- lifecycle ------------------------------------------------------------------------------

    async def run(
        self, *, task_status: trio.TaskStatus[Supervisor] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Watch for stalls and host the workers until :meth:`close`."""
        async with (
            self.store,
            self._beats_send,
            self._beats_receive,
            trio.open_nursery() as nursery,
        ):
            self._nursery = nursery
            task_status.started(self)
            try:
                await self._watch()
            finally:
                # The nursery closes once its tasks end: marked first (cancelled from outside,
                # the runtime failing, as much as by close()), so that no launch or spawn
                # from another task meets a closed nursery.
                self._close()

    def close(self) -> None:
        """Cancel the watch loop and any worker still running (call :meth:`shutdown` first
        for a graceful stop); :meth:`run` then returns. No attempt starts from now on."""
        self._close()
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    def _close(self) -> None:
        self._closed = True
        if self.stopping is None:
            self.stopping = "shutdown"

    async def _watch(self) -> None:
        receive = self._beats_receive
        detector = self.detector
        while True:
            # Awake at least every FREEZE_GAP: a wake that comes later than planned by more
            # than that means this process was not running (SIGSTOP, a paused VM): no
            # heartbeat could arrive meanwhile, so that time does not count against the jobs
            # (a node paused for less than its lease keeps them; longer, it is taken over).
            # With nothing watched there is nothing a freeze could make late, and it sleeps
            # until a worker's beat (each start and orphan beats once): an idle runtime
            # under a test's virtual clock let a virtual hour pass in 3,600 wakes.
            planned = min(detector.next_deadline(), self.timeouts.next_deadline())
            if planned != math.inf:
                planned = min(planned, trio.current_time() + FREEZE_GAP)
            with trio.move_on_at(planned):
                worker = await receive.receive()
                while True:
                    last, persist = worker.take_beat()
                    if self.workers.get(worker.job_id) is worker:
                        detector.beat(worker.job_id, last)
                        if persist:
                            self.store.heartbeat(worker.job_id, worker.attempt)
                    try:
                        worker = receive.receive_nowait()
                    except trio.WouldBlock:
                        break
            now = trio.current_time()
            late = now - planned
            if late > FREEZE_GAP:
                detector.shift(late)
                self.frozen_seconds += late
                log.warning("this process did not run for %.1f s: stall deadlines moved", late)
            for job_id in self.timeouts.pop_expired(now):
                if job_id in self.workers:
                    self._spawn(self._time_out, self.workers[job_id])
            for job_id in detector.pop_expired(now):
                worker = self.workers.get(job_id) or self.orphans[job_id]
                # A beat may still be queued, or the job may be inside keep_alive().
                if worker.keep_alive or worker.last_beat + self.config.heartbeat_timeout > now:
                    last = now if worker.keep_alive else worker.last_beat
                    detector.watch(job_id, last, self.config.heartbeat_timeout)
                    self.store.heartbeat(job_id, worker.attempt)
                    continue
                self._stalls += 1
                self._spawn(
                    self._recover,
                    worker,
                    f"stalled: no heartbeat or progress for {self.config.heartbeat_timeout:g} s",
                )

    def _spawn(self, fn: Any, *args: Any) -> None:
        """Start ``fn(*args)`` in the supervisor's nursery while it is open. Once the
        supervisor is closed nothing joins it (a task there would only be cancelled, and
        one started after the nursery closed would crash the runtime): what the task was
        for (a stall's or a timeout's record, a re-queue tried again) is left with the job
        still marked running, which the next start recovers."""
        if self._closed:
            log.info("supervisor closed: %s not run", getattr(fn, "__name__", fn))
            return
        assert self._nursery is not None
        self._nursery.start_soon(fn, *args)

    # -- workers --------------------------------------------------------------------------------

    def running_counts(self) -> tuple[int, dict[str, int], dict[str, int]]:
        """Jobs this runtime runs now: in all, per user, per kind (the dispatcher's input). An
        attempt whose outcome is ordered in the store is no longer counted."""
        running = len(self.workers) - len(self._finishing)
        return running, dict(self._per_user), dict(self._per_kind)

    def add_placement(self, placement: Placement) -> None:
        """Run attempts in ``placement`` first when it has a free slot for their kind."""
        self.placements.insert(0, placement)

    def capacity_changed(self) -> None:
        for listener in self.capacity_listeners:
            listener()

    def capacity(self, kind: str) -> int:
        """Attempts of ``kind`` that can start now (free slots of every placement)."""
        return min(sys.maxsize, sum(p.capacity(kind) for p in self.placements))

    def free_slots(self) -> int:
        """Attempts of any kinds that can start now together (a worker's slot that serves
        several kinds counted once); ``sys.maxsize`` while in-process handlers run."""
        return min(sys.maxsize, sum(p.free() for p in self.placements))

    def check_known(self, kind: str) -> None:
        """Raise :class:`UnknownKindError` unless a handler is registered for ``kind``, a
        placement serves it, or a worker declared it (and it was not forgotten since, see
        :meth:`declaration_conflict`). A known kind with no free slot, or no worker connected
        now, is no error: its jobs wait. A declared kind asked for counts as used. A kind
        that is no string (a list, a dict: unhashable) is unknown too."""
        if not isinstance(kind, str):
            raise UnknownKindError(kind, self.known_kinds())
        if kind in self.handlers:
            return
        if kind in self._declared:
            self._declared.use((kind,))
            return
        if not any(p.serves(kind) for p in self.placements):
            raise UnknownKindError(kind, self.known_kinds())

    def known_kinds(self) -> list[str]:
        return sorted(set(self.handlers).union(*(p.kinds() for p in self.placements)))

    def set_clock(self, clock: Callable[[], float]) -> None:
        """The wall clock retry times are computed with (Unix seconds)."""
        self._clock = clock

    def now(self) -> float:
        """Wall-clock seconds by the runtime's clock (it moves with Trio's)."""
        return self._clock() if self._clock is not None else wall_time()

    def declaration_room(self, declared: Mapping[str, KindOptions]) -> str | None:
        """Why there is no room now for a worker declaring ``declared`` (kind -> its options):
        more kinds than :data:`MAX_DECLARED_KINDS` would be known from declarations even with
        every kind nothing holds forgotten (see :meth:`_held_kinds`); else None. A passing
        condition: the same declaration fits once the kinds holding the table are let go."""
        if self._room_for(declared) is None:
            new = sum(1 for kind in declared if kind not in self._declared)
            return (
                f"kinds: {new} new kinds would make more than {self._declared.limit:,} known"
                " from workers' declarations, and the others are held by connected workers or"
                " running jobs"
            )
        return None

    def declaration_conflict(self, declared: Mapping[str, KindOptions]) -> str | None:
        """Why a worker declaring ``declared`` (kind -> its options) must be refused: no room
        for its kinds now (:meth:`declaration_room`), or options in conflict
        (:meth:`options_conflict`); else None."""
        return self.declaration_room(declared) or self.options_conflict(declared)

    def options_conflict(self, declared: Mapping[str, KindOptions]) -> str | None:
        """Why ``declared`` can never be accepted while the workers connected now stay: a kind
        without options of the server's own whose options differ from those of a worker
        serving it now (one kind, one behaviour); else None."""
        for kind, options in declared.items():
            if kind in self._kinds or kind in self.handlers:
                continue
            known = self._declared.get(kind)
            if (
                known is not None
                and options != known
                and any(p.serves(kind) for p in self.placements)
            ):
                return (
                    f"options.{kind} differ from those a connected worker declared for it;"
                    " one kind runs with one set of options"
                )
        return None

    def declare(self, declared: Mapping[str, KindOptions]) -> None:
        """A worker connected serving ``declared``'s kinds with these options (after
        :meth:`declaration_conflict` found none, with no await since): the kinds are known,
        and run with these options where the server has none of its own. Kinds nothing holds
        are forgotten to make room when the table is full, the least recently used first."""
        forget = self._room_for(declared)
        assert forget is not None, "declaration_conflict() found no room for these kinds"
        if forget:
            log.info(
                "forgot %d kinds no connected worker serves, to make room for a worker's"
                " declaration (a create of one is unknown_kind until a worker declares it"
                " again; its jobs wait): %s",
                len(forget),
                ", ".join(kind[:64] for kind in forget[:8]) + (" ..." if len(forget) > 8 else ""),
            )
        self._declared.declare(declared, forget)

    def kinds_used(self, kinds: Iterable[str]) -> None:
        """``kinds`` were used now (their last worker left): the last declared kinds to be
        forgotten."""
        self._declared.use(kinds)

    def _room_for(self, declared: Mapping[str, KindOptions]) -> list[str] | None:
        held = functools.cache(self._held_kinds)  # built only if the table is full
        return self._declared.room_for(declared, lambda kind: kind in held())

    def _held_kinds(self) -> set[str]:
        """Kinds that are never forgotten: run by a handler here or a connected worker
        (registered at its hello, before it has slots), given options here (the operator's
        configuration, bounded), or with an attempt this runtime runs
        or must still record (running, unwinding, or whose outcome the store refused): the
        retry and stall decisions of those read the kind's options, so forgetting them could
        change what becomes of a job. Jobs of a forgotten kind waiting in the queue stay
        there, claimed once a worker declares it again."""
        held = set(self.handlers).union(self._kinds, *(p.kinds() for p in self.placements))
        held.update(worker.kind for worker in self.workers.values())
        held.update(worker.kind for worker in self.orphans.values())
        for unwinding in self._unwinding.values():
            held.update(worker.kind for worker in unwinding)
        return held

    def set_kind_options(self, kind: str, options: KindOptions | None) -> None:
        """Raises :class:`InvalidInputError` for ``options`` that are no :class:`KindOptions`
        (as ``RuntimeConfig.kinds`` does), having changed nothing."""
        if options is not None and not isinstance(options, KindOptions):
            raise InvalidInputError(f"options of kind {shown(kind)} must be a KindOptions")
        if options is not None:
            self._kinds[kind] = options

    def options_for(self, kind: str) -> KindOptions:
        """The kind's options: given (register, config), else its handler's
        :func:`kind_options`, else those its workers declared (:meth:`declare`), else the
        defaults. Raises :class:`UnknownKindError`."""
        self.check_known(kind)
        return self._options(kind)

    def _options(self, kind: str) -> KindOptions:
        handler = self.handlers.get(kind)
        given = self._kinds.get(kind)
        if given is not None:
            return given
        if handler is not None:
            return options_of(handler)
        declared = self._declared.get(kind)
        return KindOptions() if declared is None else declared

    def check_input(self, kind: str, input: Any) -> None:
        """Refuse ``input`` for ``kind`` before it is stored: :meth:`check_known`'s error, or
        the :class:`InvalidInputError` of the handler's input check (see ``validates``) when
        the kind has a handler registered here."""
        self.check_known(kind)
        handler = self.handlers.get(kind)
        if handler is not None:
            check_input(handler, kind, input)

    async def launch(self, job: Job, resumed_from: Any = None) -> bool:
        """Run ``job`` (already stored as running, with its attempt) in a new worker, in the
        first placement with a free slot. With none (the slot the claim counted on went away
        while the start was stored), the job goes back to the queue (:meth:`requeue`).

        Returns False, having done nothing, once the supervisor is :attr:`stopping`: no
        attempt starts during a shutdown (a claim answered late, behind a locked database, is
        one), and the caller puts the job back in the queue with its own store client (this
        supervisor's closes with it; see :func:`~._policy.shutdown_state`)."""
        if self._nursery is None:
            raise RuntimeError("the supervisor is not running")
        if self.stopping is not None:
            return False
        handler = self._place(job)
        if handler is None:
            # The free slot the claim counted on is gone (its worker disconnected or began to
            # drain while the start was stored): the job waits again, nothing counted.
            await self.requeue(job.id, job.attempt, WORKER_GONE)
            return True
        options = self._options(job.kind)
        worker = Worker(
            job,
            handler,
            self.store,
            self._beats_send,
            resumed_from,
            self._retry_decider(options),
            options.non_retryable,
        )
        old = self.workers.pop(job.id, None)
        if old is not None:
            # An older attempt still unwinding is fenced out already; make sure it stops, and
            # let this one's handler start once it has (never two handlers of a job at once;
            # one whose outcome is ordered has returned already).
            if not old.finished.is_set() and old not in self._finishing:
                self._unwinding.setdefault(job.id, set()).add(old)
            self._release_slot(old)
            old.request_stop("superseded")
            old.scope.cancel()
        # Every superseded attempt still unwinding: a newer one superseded in turn (a cancel
        # while it waited) leaves its own wait to this one.
        unwinding = self._unwinding.get(job.id)
        if unwinding:
            worker.unwound = ([w.finished for w in unwinding], self.config.stop_grace)
        # An older attempt whose outcome was not stored is moot: the job was claimed again,
        # so the database moved on from that attempt (and its recovery would stop this one).
        self.orphans.pop(job.id, None)
        self.workers[job.id] = worker
        worker.on_ordered = self._outcome_ordered
        worker.on_started = self._handler_started
        self._per_user[job.user_id] = self._per_user.get(job.user_id, 0) + 1
        self._per_kind[job.kind] = self._per_kind.get(job.kind, 0) + 1
        self.detector.watch(job.id, trio.current_time(), self.config.heartbeat_timeout)
        worker.beat()  # wakes the watch loop, which may be sleeping until a later deadline
        # No await since ``stopping`` was found None: the nursery is open (it closes only
        # after ``stopping`` is set), and the shutdown, if it begins now, finds this worker.
        await self._nursery.start(worker.run, self._worker_exited)
        return True

    def _handler_started(self, worker: Worker) -> None:
        """The attempt's timeout counts from its handler's start (not from a wait for the
        attempt it superseded)."""
        if worker.timeout is not None and self.workers.get(worker.job_id) is worker:
            self.timeouts.watch(worker.job_id, trio.current_time(), worker.timeout)

    def _place(self, job: Job) -> Handler | None:
        for placement in self.placements:
            if placement.capacity(job.kind) > 0:
                return placement.place(job)
        return None

    async def requeue(self, job_id: str, attempt: int, reason: str) -> None:
        """Put ``attempt``'s job back in the queue, no attempt counted (its place went away,
        see :func:`ops.requeue`); a newer decision stands. Wakes the dispatcher. If the
        database refuses it, it is tried again every ``heartbeat_timeout`` (nothing runs the
        job meanwhile, and no stall deadline watches a job that never had a worker)."""
        try:
            await self.store.requeue(job_id, attempt, reason)
        except StoreError as exc:
            if self.stopping is not None:
                # Nothing here outlives the shutdown to try again.
                log.warning(
                    "job %s not re-queued (%s): %s; the next start recovers it",
                    job_id,
                    reason,
                    exc,
                )
                return
            log.warning("job %s not re-queued (%s), tried again: %s", job_id, reason, exc)
            self._spawn(self._requeue_later, job_id, attempt, reason)
            return
        except JobspineError as exc:
            log.info("job %s not re-queued (%s): %s", job_id, reason, exc)
            return
        self.capacity_changed()

    async def _requeue_later(self, job_id: str, attempt: int, reason: str) -> None:
        while True:
            await trio.sleep(self.config.heartbeat_timeout)
            try:
                await self.store.requeue(job_id, attempt, reason)
            except StoreError:
                continue
            except JobspineError as exc:
                log.info("job %s not re-queued (%s): %s", job_id, reason, exc)
                return
            self.capacity_changed()
            return

    async def hand_back(self, job_id: str, reason: str) -> None:
        """Stop a running attempt with the grace period (its handler checkpoints) and put the
        job back in the queue (:meth:`requeue`): a worker that drains hands its jobs back.
        An attempt that ended by itself meanwhile keeps its own outcome."""
        worker = await self.stop(job_id, reason)
        if worker is not None:
            await self._put_back(worker, reason)

    async def _put_back(self, worker: Worker, reason: str) -> None:
        """Re-queue the job of ``worker``, stopped, unless its attempt ended by itself."""
        job_id = worker.job_id
        if worker.outcome not in ("stopped", NOT_STARTED):
            return
        try:
            await self.store.requeue(job_id, worker.attempt, reason)
        except StoreError as exc:
            self.unrecorded(worker, exc)
            log.warning("job %s not re-queued (%s): %s", job_id, reason, exc)
            return
        except JobspineError as exc:
            log.info("job %s not re-queued (%s): %s", job_id, reason, exc)
            return
        self.capacity_changed()

    def unrecorded(self, worker: Worker, exc: StoreError) -> None:
        """The database refused the write that was to follow ``worker``'s stop (a pause, a
        timeout's failed attempt, a hand-back, a recovery by hand): the job is still running
        there, with no worker. It is watched as if its outcome had not been stored, so the
        stall rule records it (paused at its last checkpoint if the database was
        unavailable) once the database takes writes again. Nothing if a newer attempt runs
        it or it is watched."""
        watched = self.orphans.get(worker.job_id)
        if self.workers.get(worker.job_id) is not None or (
            watched is not None and watched.attempt >= worker.attempt
        ):
            return
        if isinstance(exc, StoreUnavailableError):
            worker.store_unavailable = True
        self._orphan(worker)

    def lose(self, job_id: str, attempt: int, cause: str, *, started: bool = True) -> None:
        """The attempt cannot go on (its worker's connection closed): apply the stall rule
        to it now instead of at its deadline (counted in ``stalls_detected``); or, if it was
        not ``started`` (its worker never named it: its handler never ran, as far as can be
        known), put its job back in the queue with nothing counted (``worker_gone``). A
        newer attempt is left alone."""
        worker = self.workers.get(job_id)
        if worker is None or worker.attempt != attempt:
            return
        self.detector.unwatch(job_id)
        if not started:
            self._spawn(self._requeue_unstarted, worker)
            return
        self._stalls += 1
        self._spawn(self._recover, worker, cause)

    async def _requeue_unstarted(self, worker: Worker) -> None:
        """:meth:`lose` of an attempt its worker never started: ended here, then re-queued
        (:meth:`requeue`: a database outage is retried; a newer decision stands)."""
        if self.workers.get(worker.job_id) is worker:
            self.kill(worker.job_id, WORKER_GONE)  # never a newer attempt of the same job
        # The orphans are left alone: this attempt wrote no outcome, so it never becomes one;
        # an entry there belongs to a stall recovery under way, whose deadline needs it.
        await self.requeue(worker.job_id, worker.attempt, WORKER_GONE)

    def _worker_exited(self, worker: Worker) -> None:
        self.capacity_changed()
        unwinding = self._unwinding.get(worker.job_id)
        if unwinding is not None:
            unwinding.discard(worker)
            if not unwinding:
                del self._unwinding[worker.job_id]
        if self.workers.get(worker.job_id) is worker:
            del self.workers[worker.job_id]
            self._release_slot(worker)
            if not worker.outcome_stored:
                self._orphan(worker)
            elif worker.job_id not in self.orphans:
                self.detector.unwatch(worker.job_id)

    def _outcome_ordered(self, worker: Worker) -> None:
        """``worker``'s outcome is ordered in the store: its slot is free for the next claim
        now, one commit earlier than its exit (which waits for the outcome to be durable)."""
        if self.workers.get(worker.job_id) is worker and worker not in self._finishing:
            self._finishing.add(worker)
            self._release(worker)
            self.capacity_changed()

    def _release_slot(self, worker: Worker) -> None:
        """Free ``worker``'s slot unless its ordered outcome freed it already."""
        if worker in self._finishing:
            self._finishing.discard(worker)
        else:
            self._release(worker)

    def _release(self, worker: Worker) -> None:
        self.timeouts.unwatch(worker.job_id)
        for counts, key in ((self._per_user, worker.user_id), (self._per_kind, worker.kind)):
            left = counts[key] - 1
            if left:
                counts[key] = left
            else:
                del counts[key]

    def _retry_decider(
        self, options: KindOptions
    ) -> Callable[[Job, JobError, bool], RetryDecision]:
        """How a failed attempt of a kind with ``options`` is decided: given the job as
        stored, the error and whether it is permanent; the delay's jitter comes from this
        supervisor's ``rng``."""
        # A partial, not a closure: one per running job, and smaller.
        return functools.partial(self._decide_retry, options)

    def _decide_retry(
        self, options: KindOptions, stored: Job, error: JobError, permanent: bool
    ) -> RetryDecision:
        return decide_retry(
            options,
            stored.failed_attempts,
            stored.max_attempts,
            error.type,
            permanent,
            self.now(),
            self._rng,
        )

    async def _time_out(self, worker: Worker) -> None:
        """Stop an attempt past its timeout (with the grace period, as for a pause) and count
        it as failed with error type ``JobTimeout``: retried or failed by the retry rule."""
        timeout = worker.timeout or 0.0
        stopped = await self.stop(worker.job_id, "timeout")
        if stopped is None or stopped.outcome != "stopped":
            return  # it ended by itself meanwhile: its own outcome stands
        error = JobError("JobTimeout", f"the attempt ran longer than its timeout ({timeout:g} s)")
        try:
            job = await self.store.retry(
                worker.job_id, worker.attempt, error, lambda j: worker.decide(j, error, False)
            )
        except JobspineError as exc:
            # Refused by the database: left to the stall rule; else a newer decision stands.
            refused = isinstance(exc, StoreError)
            if isinstance(exc, StoreError):
                self.unrecorded(worker, exc)
            log.log(
                logging.WARNING if refused else logging.INFO,
                "job %s: timeout not recorded%s: %s",
                worker.job_id,
                ", left to the stall rule" if refused else "",
                exc,
                extra=job_fields(worker.job_id, worker.user_id, worker.attempt, "timeout"),
            )
            return
        if job.state is JobState.CREATED:
            self.capacity_changed()

    def _orphan(self, worker: Worker) -> None:
        self.orphans[worker.job_id] = worker
        self.detector.watch(worker.job_id, trio.current_time(), self.config.heartbeat_timeout)
        worker.beat()  # wakes the watch loop, which may be sleeping until a later deadline

    def hold_launch(self) -> trio.Event:
        """Mark a start stored (or being stored) but not launched yet; :meth:`settled` waits
        until :meth:`release_launch` is called with the returned hold."""
        hold = trio.Event()
        self._launch_holds.add(hold)
        return hold

    def release_launch(self, hold: trio.Event) -> None:
        self._launch_holds.discard(hold)
        hold.set()

    @contextlib.contextmanager
    def claiming(self) -> Iterator[None]:
        """Held by the dispatcher from before it sends a claim until it has launched every job
        the claim started (see :meth:`settled`)."""
        hold = self.hold_launch()
        try:
            yield
        finally:
            self.release_launch(hold)

    async def settled(self) -> None:
        """Wait until every start stored before this call has been launched: a claim in
        progress, or a job started at its create. A caller that has just stopped a job in the
        store (cancel, pause, fail) calls it before :meth:`kill` or :meth:`stop`: a start
        committed before that write has no worker here to stop until it is launched. Holds
        taken after the call are not waited for (a stream of creates cannot starve it)."""
        for hold in list(self._launch_holds):
            await hold.wait()

    def in_process_only(self) -> bool:
        """True while every kind this runtime can start now runs in this process (no
        connected worker serves any kind)."""
        return all(
            isinstance(placement, InProcessPlacement) or not placement.kinds()
            for placement in self.placements
        )

    async def stop(self, job_id: str, reason: str, attempt: int | None = None) -> Worker | None:
        """Ask a running worker to stop, give it the grace period, then cancel it. ``attempt``:
        only if it runs that attempt (a control addressed to one attempt).

        Returns the worker once its task has ended, or ``stop_grace`` after its cancellation
        if its handler ignores it (shielded, or blocked in a thread): the caller records the
        attempt's outcome then, and a cancelled attempt records nothing of its own (its late
        result, or a write, is refused: the attempt has ended). None if the job has no worker
        here.
        """
        worker = self.workers.get(job_id)
        if worker is None or (attempt is not None and worker.attempt != attempt):
            return None
        self.detector.unwatch(job_id)  # a stop in progress is not a stall
        worker.request_stop(reason)
        with trio.move_on_after(self.config.stop_grace):
            await worker.finished.wait()
        worker.scope.cancel()
        with trio.move_on_after(self.config.stop_grace):
            await worker.finished.wait()
        if worker.recording:
            # It returned in time and its outcome is on its way to the database (bounded by
            # the store's retry timeout): that outcome stands, never raced by the caller's.
            await worker.finished.wait()
        return worker

    def kill(self, job_id: str, reason: str, attempt: int | None = None) -> Worker | None:
        """Cancel a worker at once (no grace): for cancellation and stalls. ``attempt``: only
        if it runs that attempt (a decision about one attempt never stops a newer one, which
        a restart and a claim may have started meanwhile)."""
        worker = self.workers.get(job_id)
        if worker is not None and attempt is not None and worker.attempt != attempt:
            return None
        if worker is not None:
            self.detector.unwatch(job_id)
            worker.request_stop(reason)
            worker.scope.cancel()
        return worker

    def abandon_all(self) -> int:
        """Drop every attempt this runtime runs, writing nothing: this node lost its lease
        (:mod:`._nodes`), so another node owns these jobs now (or will take them over). Each
        handler is cancelled at once (a remote attempt with it); jobs whose outcome the store
        refused are no longer watched. Returns how many attempts were dropped."""
        count = len(self.workers) + len(self.orphans)
        for job_id in list(self.workers):
            self.kill(job_id, "abandoned: this node lost its lease")
        for job_id in list(self.orphans):
            self.detector.unwatch(job_id)
        self.orphans.clear()
        return count

    # -- recovery -------------------------------------------------------------------------------

    async def _recover(self, worker: Worker, cause: str) -> None:
        if self.workers.get(worker.job_id) is worker:
            self.kill(worker.job_id, "stall")  # never a newer attempt of the same job
        try:
            if worker.store_unavailable:
                # Left running because the database was unavailable: not the job's fault, so
                # no recovery attempt is counted; paused at its last acknowledged checkpoint.
                job = await self.store.pause(
                    worker.job_id, worker.attempt, "system", "store_unavailable"
                )
            else:
                job = await self.store.recover(
                    worker.job_id, worker.attempt, self.recovery_rule(cause)
                )
        except StoreError as exc:
            log.warning(
                "job %s: recovery not stored (%s); retrying at the next deadline",
                worker.job_id,
                exc,
                extra=job_fields(worker.job_id, worker.user_id, worker.attempt, "stalled"),
            )
            self._orphan(worker)
            return
        except JobspineError as exc:
            log.info(
                "job %s: stall not recorded, a newer decision stands: %s",
                worker.job_id,
                exc,
                extra=job_fields(worker.job_id, worker.user_id, worker.attempt, "stalled"),
            )
            self.orphans.pop(worker.job_id, None)
            return
        self.orphans.pop(worker.job_id, None)
        self._count(job)
        if job.state is JobState.CREATED:
            self.capacity_changed()
        log.warning(
            "job %s %s: %s",
            job.id,
            recovery_outcome(job),
            cause,
            extra=job_fields(job.id, job.user_id, worker.attempt, recovery_event(job)),
        )

    def count_recovery(self, job: Job) -> None:
        """Count a stall rule applied outside this supervisor's watch (a job whose process
        was gone at start, or whose node was taken over) as :meth:`trigger_recovery` does:
        a stall, and a recovery or a failure by the state ``job`` reached."""
        self._stalls += 1
        self._count(job)

    def _count(self, job: Job) -> None:
        if job.state is not JobState.FAILED:
            self._recoveries += 1
        else:
            self._failures += 1

    async def trigger_recovery(
        self, job_id: str, cause: str = "manual recovery", *, attempt: int | None = None
    ) -> Job:
        """Apply the stall rule to a running job now, as if its deadline had passed.
        ``attempt``: only to that attempt (a control addressed to it): another attempt's
        worker is left alone, and the store refuses the write (:class:`StaleAttemptError`)."""
        await self.settled()
        worker = self.kill(job_id, "stall", attempt)
        if attempt is None and worker is not None:
            attempt = worker.attempt
        try:
            job = await self.store.recover(job_id, attempt, self.recovery_rule(cause))
        except StoreError as exc:
            if worker is not None:
                self.unrecorded(worker, exc)
            raise
        self.count_recovery(job)
        if job.state is JobState.CREATED:
            self.capacity_changed()
        return job

    def decide_recovery(self, job: Job, cause: str) -> RecoveryDecision:
        """The stall rule (:meth:`RecoveryPolicy.decide`) for running ``job`` as stored, with
        its kind's options as this runtime knows them (the defaults for a kind it does not
        know): re-queue at a checkpoint, retry backoff, non-retryable types. A retry's time is
        by this runtime's clock (:meth:`now`), its jitter from this supervisor's ``rng``."""
        return self.policy.decide(job, cause, self._options(job.kind), self.now(), self._rng)

    def recovery_rule(self, cause: str) -> Callable[[Job], RecoveryDecision]:
        """:meth:`decide_recovery` for ``cause``, as :meth:`StoreClient.recover` takes it.
        Every recovery goes through it, so one rule decides them all: a stall or a lost
        worker here, a manual recovery, a node's takeover, the recovery at start."""
        return functools.partial(self.decide_recovery, cause=cause)

    def status(self) -> SupervisorStatus:
        return SupervisorStatus(
            watched=len(self.detector),
            stalls_detected=self._stalls,
            recoveries=self._recoveries,
            failures=self._failures,
            running=len(self.workers),
            orphans=len(self.orphans),
        )

    async def shutdown(self, reason: str = "shutdown", *, hand_back: bool = False) -> None:
        """Start no attempt from now on (:meth:`launch` refuses), stop every worker with the
        grace period and record each stopped job as :func:`~._policy.shutdown_state` says:
        paused, or with ``hand_back`` (a shared database) re-queued (state ``created``, the
        attempt ended, no attempt counted) for another node to claim at once; a job whose
        handler never started is re-queued either way."""
        if self.stopping is None:
            self.stopping = reason
        async with trio.open_nursery() as nursery:
            for job_id in list(self.workers):
                nursery.start_soon(self._stop_at_shutdown, job_id, reason, hand_back)

    async def _stop_at_shutdown(self, job_id: str, reason: str, shared: bool) -> None:
        worker = await self.stop(job_id, reason)
        if worker is None:
            return
        started = worker.outcome != NOT_STARTED
        if shutdown_state(handler_started=started, shared=shared) is JobState.CREATED:
            await self._put_back(worker, reason)
            return
        try:
            await self.store.pause(job_id, worker.attempt, "system", reason)
        except JobspineError as exc:
            if isinstance(exc, StoreError):
                self.unrecorded(worker, exc)
            log.info(
                "job %s not paused at %s: %s",
                job_id,
                reason,
                exc,
                extra=job_fields(job_id, worker.user_id, worker.attempt, "paused"),
            )


def recovery_outcome(job: Job) -> str:
    """What a stored recovery decision did, from the job it left: ``failed``, ``paused``,
    ``retrying`` (a failed attempt back in the queue) or ``re-queued`` (at its checkpoint)."""
    if job.state is not JobState.CREATED:
        return job.state.value
    # A retry waits for its backoff (``run_at`` set to its next attempt); a re-queue at a
    # checkpoint is ready at once (``run_at`` cleared).
    return "retrying" if job.run_at is not None else "re-queued"


def recovery_event(job: Job) -> str:
    """The type of the event a stored recovery decision emitted, from the job it left."""
    outcome = recovery_outcome(job)
    return outcome if outcome in ("failed", "retrying") else "recovery"
