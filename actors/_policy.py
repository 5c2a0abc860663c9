"""Sans-I/O decision logic: stall detection and the recovery rule.

Nothing here awaits or reads a clock: callers pass ``now`` (``trio.current_time()`` in the
runtime), so every rule is unit-testable without Trio.
"""

from __future__ import annotations

import heapq
import math

import attrs

from ._job import Job
from ._states import JobState

__all__ = ["RecoveryDecision", "RecoveryPolicy", "StallDetector"]


@attrs.frozen
class RecoveryDecision:
    to_state: JobState
    reason: str
    recovery_attempts: int


@attrs.frozen
class RecoveryPolicy:
    """Checkpoint -> paused (resumable), none -> failed; past the limit -> failed for good.
    With ``requeue`` (the kind's ``requeue_stalled``), checkpoint -> created: back in the
    queue, resumed from the checkpoint by the next claim."""

    max_recovery_attempts: int = 3

    def decide(self, job: Job, cause: str, *, requeue: bool = False) -> RecoveryDecision:
        attempts = job.recovery_attempts + 1
        if attempts > self.max_recovery_attempts:
            return RecoveryDecision(
                JobState.FAILED,
                f"{cause}; recovery attempts exhausted ({attempts} > {self.max_recovery_attempts})",
                attempts,
            )
        if job.checkpoint_version > 0 and requeue:
            return RecoveryDecision(
                JobState.CREATED,
                f"{cause}; re-queued at checkpoint v{job.checkpoint_version}",
                attempts,
            )
        if job.checkpoint_version > 0:
            return RecoveryDecision(
                JobState.PAUSED,
                f"{cause}; paused at checkpoint v{job.checkpoint_version}",
                attempts,
            )
        return RecoveryDecision(JobState.FAILED, f"{cause}; no checkpoint to resume from", attempts)


class StallDetector:
    """Deadlines of watched jobs: ``beat`` is O(1), expiry is found at the earliest deadline.

    Invariant: a watched job has exactly one live heap entry (its generation matches), whose
    deadline is at most the job's real deadline; an entry found early is re-armed with the real
    deadline (lazy re-arming), so a heartbeat never touches the heap.
    """

    def __init__(self) -> None:
        # job id -> [deadline, timeout, generation]
        self._slots: dict[str, list[float]] = {}
        self._heap: list[tuple[float, int, str]] = []
        self._generation = 0

    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._slots

    def watch(self, job_id: str, now: float, timeout: float) -> None:
        self._generation += 1
        self._slots[job_id] = [now + timeout, timeout, self._generation]
        heapq.heappush(self._heap, (now + timeout, self._generation, job_id))

    def beat(self, job_id: str, now: float) -> None:
        slot = self._slots.get(job_id)
        if slot is not None:
            slot[0] = now + slot[1]

    def unwatch(self, job_id: str) -> None:
        self._slots.pop(job_id, None)

    def shift(self, delta: float) -> None:
        """Move every deadline ``delta`` seconds later (time that must not count: the whole
        process was not running). Adding one constant keeps the heap ordered."""
        for slot in self._slots.values():
            slot[0] += delta
        self._heap = [(deadline + delta, gen, job_id) for deadline, gen, job_id in self._heap]

    def deadline_of(self, job_id: str) -> float | None:
        slot = self._slots.get(job_id)
        return None if slot is None else slot[0]

    def _live(self, generation: int, job_id: str) -> list[float] | None:
        slot = self._slots.get(job_id)
        return slot if slot is not None and slot[2] == generation else None

    def next_deadline(self) -> float:
        """The earliest heap entry (``inf`` when nothing is watched); may be early, never late."""
        while self._heap and self._live(self._heap[0][1], self._heap[0][2]) is None:
            heapq.heappop(self._heap)
        return self._heap[0][0] if self._heap else math.inf

    def pop_expired(self, now: float) -> list[str]:
        """Jobs whose deadline is ``<= now``, earliest first; they are no longer watched."""
        expired: list[str] = []
        while self._heap and self._heap[0][0] <= now:
            _, generation, job_id = heapq.heappop(self._heap)
            slot = self._live(generation, job_id)
            if slot is None:
                continue
            if slot[0] <= now:
                expired.append(job_id)
                del self._slots[job_id]
            else:
                heapq.heappush(self._heap, (slot[0], generation, job_id))
        return expired
