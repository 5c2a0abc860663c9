"""Starting a new job in its create's commit, when the dispatcher's claim would pick it next.

The normal path costs two commits before a job runs: the create's, then the claim's start.
The fast path starts a create in the same commit group (``created`` then ``started``, owner
and lease set) when that is exactly what the next claim would do:

* the last claim took fewer jobs than the free capacity allowed, so every ready waiting job
  it saw is in a (user, kind) group closed by the limits, and
* nothing changed that since, in the store's order of requests: no job became claimable
  (a create, resume, restart, retry or re-queue; a later ``run_at`` only bounds the verdict
  in time) and no running job ended or was released (capacity frees: a closed group may
  open), and no commit failed; and
* the new job is ready now and its group is open under the runtime's limits, counting the
  jobs claimed but not yet launched.

Then no waiting job is passed over: the new job's group holds no other ready job (else it
would be closed), and nothing else is claimable. :class:`QueueVerdict` keeps that verdict
(sans-I/O, in the store actor's order); the dispatcher checks the capacity
(:class:`FastStarter`) and launches what was committed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

import attrs

from ._backend import ClaimRequest
from ._job import Job
from ._states import JobState

__all__ = ["FastStarter", "QueueVerdict"]


class FastStarter(Protocol):
    """The dispatcher's side of the fast path (called in the store actor's task, never
    awaiting)."""

    def admit(self, job: Job, settled_until: float) -> tuple[str, float] | None:
        """Reserve a slot for the new ``job`` if the claim would take it now (ready, its
        group open, before ``settled_until``, Unix seconds): returns ``(owner,
        lease_expires_at)``, or None to leave it to the dispatcher."""
        ...

    def committed(self, jobs: Sequence[Job]) -> None:
        """Jobs admitted are stored as running: launch them."""
        ...

    def voided(self, jobs: Sequence[Job]) -> None:
        """Jobs admitted whose commit failed: release their slots (a replayed create asks
        :meth:`admit` again)."""
        ...

    def claiming(self, request: ClaimRequest) -> ClaimRequest:
        """``request`` with what the runtime runs now (jobs admitted since it was made).
        Called at each application of the claim: a replay (its group was void) forgets the
        jobs its earlier run reported to :meth:`claimed`."""
        ...

    def claimed(self, jobs: Sequence[Job]) -> None:
        """The claim in progress started ``jobs``: they count as running until launched."""
        ...


@attrs.define
class QueueVerdict:
    """Whether the last claim left nothing claimable and nothing became claimable since.

    ``until``: the earliest known ``run_at`` of a waiting job (Unix seconds), when the verdict
    lapses. ``epoch`` counts :meth:`unsettle` calls, so that a claim in progress does not
    settle over a change it did not see."""

    settled: bool = False
    until: float = math.inf
    epoch: int = 0
    #: Whether a running job's end unsettles (per-user or per-kind limits may have closed
    #: a group that it opens).
    capacity_matters: bool = True

    def unsettle(self) -> None:
        self.settled = False
        self.epoch += 1

    def claimed(self, epoch: int, taken: int, slots: int, next_run_at: float | None) -> None:
        """A claim that began at ``epoch`` took ``taken`` of ``slots`` free slots."""
        self.settled = epoch == self.epoch and taken < slots
        self.until = math.inf if next_run_at is None else next_run_at

    def staged(self, old: JobState | None, job: Job) -> None:
        """A change staged by anything but the fast path (``old``: None for a create)."""
        if job.state is JobState.CREATED:
            if job.run_at is None:
                self.unsettle()
            else:
                # A run_at already past ends the verdict at once: the claim must see it.
                self.until = min(self.until, job.run_at)
        if self.capacity_matters and old is JobState.RUNNING and job.state is not old:
            self.unsettle()  # capacity freed: a closed group may open
