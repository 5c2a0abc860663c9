"""The dispatcher actor: claims waiting jobs when capacity is free and hands them to the
supervisor.

One task, woken by an event (a create, resume, restart or re-queue; a worker's end; a worker
process that connects or frees a slot: ``Supervisor.capacity_listeners``) or by the
earliest known ``run_at`` (one sleep, no timer per job), and by its own lease renewal. A create
for later only moves that sleep (no claim). Every claim takes at most the free capacity
(:meth:`StoreClient.claim`, planned by :class:`ClaimPlanner` under the runtime's limits), so
wakes that come together cost one claim.

Placements (:mod:`actors._placement`) bound the claim per kind: the free slots of the
connected worker processes serving a kind become that kind's limit, and a kind that no
placement can run now is not claimed at all (its jobs wait, they are not refused). A claimed
job whose slot went away before its start was stored goes back to waiting
(:meth:`Supervisor.launch`).

Fair share keeps a memory here: the order in which this runtime gave users slots
(:class:`ServedOrder`, at most ``SERVED_BOUND`` users), passed to every claim, so that users
tied on running jobs take slots in turn (see :mod:`._scheduling`). A user is served when a
claim's starts are committed (the jobs it returns, in claim order) or a create's fast start
is (:meth:`Dispatcher.committed`); a claim applied again after a void commit plans with the
same order. The memory is this runtime's: on a database several nodes share, each node takes
turns among the users it serves, as it counts its own running jobs; no turn is shared.

It is also the store's :class:`~._fast_start.FastStarter`: when the last claim left nothing
claimable, a create whose group has capacity is started in its own commit (admitted here,
counted as running from then on) and launched by this task once committed.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Callable, Mapping, Sequence

import attrs
import trio

from ._backend import ClaimRequest
from ._clock import trio_time_of, wall_time
from ._errors import JobspineError, RuntimeClosedError
from ._job import Job
from ._joblog import job_fields
from ._repeats import RepeatedFailure
from ._scheduling import ClaimLimits, ClaimPlanner, ServedOrder
from ._store import StoreClient
from ._supervisor import Supervisor

__all__ = ["Dispatcher", "WallClock"]

log = logging.getLogger("jobspine.dispatcher")

#: Seconds before a claim is tried again after the store refused one.
RETRY_AFTER = 1.0

#: Seconds past the store's retry time that a stopping dispatcher waits for the commits of
#: the jobs it admitted (a commit already running takes up to one attempt more).
SETTLE_MARGIN = 5.0


#: Seconds a dispatcher waiting for a job's ``run_at`` sleeps at most before it reads the
#: wall clock again: set forward meanwhile (see :mod:`._clock`), the job may be due already.
WALL_RECHECK = 1.0


class WallClock:
    """The runtime's wall clock (:func:`._clock.wall_time`: ``run_at`` and leases are Unix
    seconds, and under a mock clock, in tests, they move when Trio's time jumps)."""

    def __call__(self) -> float:
        return wall_time()

    def trio_time(self, wall: float) -> float:
        """The Trio time at which this clock will read ``wall`` unless it is set meanwhile."""
        return trio_time_of(wall)


class Dispatcher:
    def __init__(
        self,
        store: StoreClient,
        supervisor: Supervisor,
        limits: ClaimLimits,
        *,
        node_id: str,
        clock: Callable[[], float],
        to_trio: Callable[[float], float],
        lease_ttl: float,
        lease_renew_interval: float,
        may_claim: Callable[[], bool] = lambda: True,
    ) -> None:
        """``may_claim()``: whether this node may claim now (False while its node lease has
        lapsed, see :mod:`._nodes`; :meth:`wake` it when that changes)."""
        self.store = store
        self._may_claim = may_claim
        self.supervisor = supervisor
        self.limits = limits
        self.node_id = node_id
        self._clock = clock
        self._to_trio = to_trio
        self._lease_ttl = lease_ttl
        self._renew_interval = lease_renew_interval
        self._wake = trio.Event()
        self._next_run_at: float | None = None  # wall clock
        self._due = False  # a claim may find something now
        self._scope: trio.CancelScope | None = None
        #: Set once :meth:`run` has returned (after :meth:`close`, no claim is in progress).
        self.stopped = trio.Event()
        #: Claims made, jobs started (fast starts included), since the dispatcher started.
        self.claims = 0
        self._last_claim_error: str | None = None
        # Failed renewals of the running jobs' leases, logged once per cause.
        self._renewing = RepeatedFailure()
        self.dispatched = 0
        #: Jobs started in their create's commit.
        self.fast_started = 0
        self._closing = False
        # Admitted by the fast path, or started by the claim in progress, and not launched
        # yet: counted as running by every claim and admission, so capacity is never given
        # twice.
        self._admitted: dict[str, Job] = {}
        self._holds: dict[str, trio.Event] = {}  # admitted jobs not launched yet
        self._claimed: dict[str, Job] = {}
        # The kinds the last claim could run: a handler registered since may make waiting
        # jobs claimable.
        self._claim_kinds: frozenset[str] | None = None
        self._to_launch: list[Job] = []  # admitted and committed
        #: The order in which users got slots here, for the round-robin among users tied on
        #: running jobs. Changed only once starts are committed, never while a claim plans.
        self.served = ServedOrder()
        self._settled = trio.Event()  # set when an admitted job is committed or voided
        #: Whether freed capacity can make a waiting job claimable: only where per-user or
        #: per-kind limits can close a group (else a claim that left slots free left no
        #: ready job at all).
        self._capacity_matters = bool(
            limits.max_running_per_user is not None or limits.max_running_per_kind
        )

    def wake(self, run_at: float | None = None) -> None:
        """Claim again soon (never blocks): capacity freed or a job became claimable.
        ``run_at`` (Unix seconds), a job's not-before time: in the future, it only moves the
        dispatcher's one sleep earlier if it comes before the earliest known."""
        if run_at is None or run_at <= self._clock():
            self._due = True
            if self._capacity_matters:
                # Capacity freed may open a group the limits closed: no create starts at
                # once until the claim has looked. (A job that became claimable did so in
                # the store, which unsettled the verdict then.)
                self.store.unsettle()
        elif self._next_run_at is None or run_at < self._next_run_at:
            self._next_run_at = run_at
        else:
            return
        self._wake.set()

    def close(self) -> None:
        """Stop claiming; :meth:`run` returns (once the jobs started at their create are
        launched)."""
        self._closing = True
        if self._scope is not None:
            self._scope.cancel()

    # -- the fast path (FastStarter, called in the store actor's task) -------------------------

    def admit(self, job: Job, settled_until: float) -> tuple[str, float] | None:
        now = self._clock()
        if (
            self._closing
            or now >= settled_until
            or not self.supervisor.in_process_only()
            or not self._claiming_allowed()
        ):
            # Worker slots come and go with their connections: with a worker connected, every
            # start goes through a claim, which reads their free slots when it runs.
            return None
        if job.run_at is not None and job.run_at > now:
            return None
        running, by_user, by_kind = self._capacity()
        kinds, limits = self.placeable(running, by_kind)
        if kinds != self._claim_kinds:
            return None
        planner = ClaimPlanner(limits, running, by_user, by_kind, kinds)
        if not planner.slots() or not planner.group_open((job.priority, job.user_id, job.kind)):
            return None
        self._admitted[job.id] = job
        # Until it is launched, a cancel, pause or fail of the job waits (Supervisor.settled).
        self._holds[job.id] = self.supervisor.hold_launch()
        return self.node_id, now + self._lease_ttl

    def committed(self, jobs: Sequence[Job]) -> None:
        self.served.served(job.user_id for job in jobs)
        self._to_launch += jobs
        self._settled.set()
        self._wake.set()

    def voided(self, jobs: Sequence[Job]) -> None:
        for job in jobs:
            self._admitted.pop(job.id, None)
            self._release(job.id)
        self._settled.set()

    def claiming(self, request: ClaimRequest) -> ClaimRequest:
        # Jobs admitted since the request was made count too. A claim is applied again when
        # its group was void: the jobs its first run started were never stored as running.
        # The limits are planned again with the counts, at the same instant: a worker's slot
        # frees with its report, its attempt leaves the running count once its outcome is
        # ordered, and a plan made between the two, run after the second, counted that slot
        # twice (one job too many, back to the queue as worker_gone at its launch).
        self._claimed.clear()
        running, by_user, by_kind = self._capacity()
        kinds, limits = self.placeable(running, by_kind)
        self._claim_kinds = kinds
        return attrs.evolve(
            request,
            limits=limits,
            kinds=kinds,
            running=running,
            by_user=by_user,
            by_kind=by_kind,
            served=self.served.snapshot(),
        )

    def claimed(self, jobs: Sequence[Job]) -> None:
        self._claimed.update((job.id, job) for job in jobs)

    def _release(self, job_id: str) -> None:
        hold = self._holds.pop(job_id, None)
        if hold is not None:
            self.supervisor.release_launch(hold)

    def _capacity(self) -> tuple[int, dict[str, int], dict[str, int]]:
        """What this runtime runs: the supervisor's workers, the jobs admitted and those the
        claim in progress started."""
        running, by_user, by_kind = self.supervisor.running_counts()
        for job in (*self._admitted.values(), *self._claimed.values()):
            running += 1
            by_user[job.user_id] = by_user.get(job.user_id, 0) + 1
            by_kind[job.kind] = by_kind.get(job.kind, 0) + 1
        return running, by_user, by_kind

    async def _launch_admitted(self) -> None:
        # Shielded: a job stored as running is launched (or handed back), never left with no
        # worker.
        with trio.CancelScope(shield=True):
            while self._to_launch:
                job = self._to_launch.pop(0)
                try:
                    launched = await self._launch(job)
                finally:
                    self._release(job.id)
                self._admitted.pop(job.id, None)
                self.fast_started += launched

    async def _launch_remaining(self) -> None:
        """At the end: launch (or, the supervisor stopping, hand back) every admitted job once
        its commit is decided. The store decides each within its retry time (a commit waits
        out an outage that long), and voids what it still holds when it stops: a job whose
        start commits after this gave up would be left running with no worker."""
        with trio.move_on_after(self.store.retry_timeout + SETTLE_MARGIN, shield=True):
            while self._admitted:
                await self._launch_admitted()
                if self._admitted:
                    self._settled = trio.Event()
                    await self._settled.wait()

    async def run(
        self, *, task_status: trio.TaskStatus[Dispatcher] = trio.TASK_STATUS_IGNORED
    ) -> None:
        try:
            # The store client stays open until the last job claimed is launched or handed
            # back: a hand-back is written with it (the supervisor's may be closed by then).
            async with self.store:
                try:
                    await self._serve(task_status)
                finally:
                    self._closing = True
                    await self._launch_remaining()
        finally:
            self.stopped.set()

    async def _serve(self, task_status: trio.TaskStatus[Dispatcher]) -> None:
        self.store.set_fast_starter(self, capacity_matters=self._capacity_matters)
        with trio.CancelScope() as self._scope:
            # What waited while no runtime ran is claimed before the runtime is handed
            # to its caller.
            await self._dispatch()
            task_status.started(self)
            renew_at = trio.current_time() + self._renew_interval
            while True:
                # Leases are renewed only while this runtime holds claims: an idle
                # runtime does not wake (nor touch the database) at all.
                wake_at = renew_at if self.supervisor.workers else math.inf
                if self._next_run_at is not None:
                    # Read again at least every WALL_RECHECK: the wall clock may be set.
                    wake_at = min(
                        wake_at,
                        self._to_trio(self._next_run_at),
                        trio.current_time() + WALL_RECHECK,
                    )
                with trio.move_on_at(wake_at):
                    await self._wake.wait()
                self._wake = trio.Event()
                await self._launch_admitted()
                if trio.current_time() >= renew_at:
                    renew_at = trio.current_time() + self._renew_interval
                    if self.supervisor.workers:
                        await self._renew()
                at = self._next_run_at
                if self._due or (at is not None and self._clock() >= at):
                    self._due = False
                    await self._dispatch()

    async def _renew(self) -> None:
        try:
            await self.store.renew_leases(self.node_id, self._clock() + self._lease_ttl)
        except RuntimeClosedError:
            raise
        except JobspineError as exc:
            level = self._renewing.level(exc)
            log.log(level, "lease renewal failed (retried next interval): %s", exc)
        else:
            self._renewing.succeeded()

    def _claiming_allowed(self) -> bool:
        """Whether a job may be claimed now: not once the supervisor's shutdown began (it
        would start no attempt: every job claimed would only be handed back), nor while the
        node may not claim."""
        return self.supervisor.stopping is None and self._may_claim()

    async def _dispatch(self) -> None:
        if not self._claiming_allowed():
            self._next_run_at = None  # woken when the node may claim again
            return
        running, by_user, by_kind = self._capacity()
        limits = self.limits
        if running >= limits.max_running:
            # An end wakes the dispatcher, and its claim learns the next run_at again.
            self._next_run_at = None
            return
        kinds, limits = self.placeable(running, by_kind)
        if not kinds:
            # Nothing can run now; a worker that connects or a slot that frees wakes us.
            self._next_run_at = None
            return
        now = self._clock()
        request = ClaimRequest(
            self.node_id,
            now,
            now + self._lease_ttl,
            limits,
            running,
            by_user,
            by_kind,
            kinds,
            self.served.snapshot(),
        )
        # Wakes for later jobs while the claim runs lower this again; the claim may not see
        # their jobs, committed after it read.
        self._next_run_at = None
        # Shielded: a job claimed and started in the store is launched, never left running
        # with no worker.
        try:
            with trio.CancelScope(shield=True), self.supervisor.claiming():
                await self._claim_and_launch(request)
        finally:
            self._claimed.clear()

    def placeable(
        self, running: int, by_kind: Mapping[str, int]
    ) -> tuple[frozenset[str], ClaimLimits]:
        """The kinds a claim may take now and the limits it runs under: a kind is claimable
        when a placement has a free slot for it (a connected worker serving it, or its handler
        in this process); a kind served by workers only is limited per kind to what it runs
        plus their free slots (``by_kind``: running now per kind), within the configured
        ``max_running_per_kind``. Kinds not claimable wait in the queue. With no handler in
        this process, the total is bounded by the workers' free slots too (``running`` plus
        them): a worker serving several kinds offers each slot to every one of them."""
        supervisor = self.supervisor
        per_kind = dict(self.limits.max_running_per_kind)
        kinds = set()
        for kind in supervisor.known_kinds():
            free = supervisor.capacity(kind)
            if free <= 0:
                continue
            kinds.add(kind)
            if free < sys.maxsize:  # bounded: worker slots only
                bound = by_kind.get(kind, 0) + free
                per_kind[kind] = min(per_kind.get(kind, bound), bound)
        free = supervisor.free_slots()
        total = self.limits.max_running
        if free < sys.maxsize:
            total = min(total, running + free)
        limits = attrs.evolve(self.limits, max_running=total, max_running_per_kind=per_kind)
        return frozenset(kinds), limits

    async def _claim_and_launch(self, request: ClaimRequest) -> None:
        try:
            jobs, later = await self.store.claim(request)
        except RuntimeClosedError:
            raise
        except JobspineError as exc:
            # Once per cause: a claim that keeps failing the same way is retried quietly.
            level = logging.DEBUG if str(exc) == self._last_claim_error else logging.WARNING
            self._last_claim_error = str(exc)
            log.log(level, "claim failed (retried in %g s): %s", RETRY_AFTER, exc)
            self._next_run_at = request.now + RETRY_AFTER
            return
        if later is not None and (self._next_run_at is None or later < self._next_run_at):
            self._next_run_at = later
        self.claims += 1
        self._last_claim_error = None
        # Committed as running, in the plan's order: the last user picked was served last.
        self.served.served(job.user_id for job in jobs)
        for job in jobs:
            await self._launch(job)
            self._claimed.pop(job.id, None)

    async def _launch(self, job: Job) -> bool:
        """Launch ``job``, stored as running by a claim or a create; returns False if it was
        handed back instead (the supervisor is stopping)."""
        try:
            launched = await self.supervisor.launch(job, job.checkpoint)
        except JobspineError as exc:
            # Stored as running: the stall rule recovers it like any lost worker.
            log.warning(
                "job %s claimed but not launched: %s",
                job.id,
                exc,
                extra=job_fields(job.id, job.user_id, job.attempt, "launch_failed"),
            )
            launched = True
        if not launched:
            await self._hand_back(job)
            return False
        self.dispatched += 1
        return True

    async def _hand_back(self, job: Job) -> None:
        """The supervisor is stopping and started no attempt for ``job``: its handler never
        ran, so it goes back to the queue, nothing counted (:func:`~._policy.shutdown_state`),
        written with this dispatcher's own store client. A claim answered after the shutdown
        began (one that waited behind a locked database) ends here."""
        reason = self.supervisor.stopping or "shutdown"
        try:
            await self.store.requeue(job.id, job.attempt, reason)
        except JobspineError as exc:
            # The database refused it too (or a newer decision stands): the job stays as
            # stored, and the next start recovers a job left running.
            log.warning(
                "job %s claimed during the shutdown, not re-queued: %s",
                job.id,
                exc,
                extra=job_fields(job.id, job.user_id, job.attempt, "not_requeued"),
            )
            return
        log.info(
            "job %s claimed during the shutdown: back in the queue, not run",
            job.id,
            extra=job_fields(job.id, job.user_id, job.attempt, "recovery"),
        )
