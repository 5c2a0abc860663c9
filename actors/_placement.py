"""Placements: where the supervisor runs a job's attempt.

A placement owns worker slots per kind. The supervisor asks each of its placements in order
(connected remote workers first, then in-process handlers) and runs the attempt in the first
one with a free slot; the handler a placement returns is run by an ordinary
:class:`~actors._worker.Worker` under the supervisor, so stall detection, stop with grace,
cancellation, recovery and events are the same wherever the code runs.

This is the seam the queue's dispatcher claims through: ``Supervisor.capacity(kind)`` (free
slots over all placements) bounds its claim per kind, a kind with no free slot anywhere is not
claimed (its jobs wait), and each claimed job goes to ``Supervisor.launch``.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Protocol

from ._job import Job
from ._worker import Handler

__all__ = ["InProcessPlacement", "Placement"]


class Placement(Protocol):
    def kinds(self) -> frozenset[str]:
        """The kinds this placement runs."""
        ...

    def slots(self, kind: str) -> int:
        """All slots for ``kind``, taken or free."""
        ...

    def serves(self, kind: str) -> bool:
        """Whether this placement can run ``kind`` at all (now or once a slot frees)."""
        ...

    def capacity(self, kind: str) -> int:
        """Free slots for ``kind`` now (0 when it does not serve it)."""
        ...

    def free(self) -> int:
        """Free slots now over every kind, each slot counted once (a slot may serve several
        kinds, so this can be less than the sum of :meth:`capacity` over the kinds)."""
        ...

    def place(self, job: Job) -> Handler:
        """Take one slot for the attempt ``job`` (state running, its attempt set): the
        returned handler runs it and frees the slot when it returns. Called only when
        :meth:`capacity` is at least 1, with no await in between."""
        ...


class InProcessPlacement:
    """Handlers in the server's own event loop: unbounded slots for every registered kind.

    ``enabled=False`` keeps the handlers for their input checks only (``jobspine serve
    --worker-processes``: every attempt runs in a worker process)."""

    def __init__(self, handlers: Mapping[str, Handler], *, enabled: bool = True) -> None:
        self.handlers = handlers
        self.enabled = enabled

    def kinds(self) -> frozenset[str]:
        return frozenset(self.handlers) if self.enabled else frozenset()

    def slots(self, kind: str) -> int:
        return self.capacity(kind)

    def serves(self, kind: str) -> bool:
        return self.enabled and kind in self.handlers

    def capacity(self, kind: str) -> int:
        return sys.maxsize if self.serves(kind) else 0

    def free(self) -> int:
        return sys.maxsize if self.enabled and self.handlers else 0

    def place(self, job: Job) -> Handler:
        return self.handlers[job.kind]
