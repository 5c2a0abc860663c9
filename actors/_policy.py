"""Sans-I/O decision logic: stall detection and the recovery rule.

Nothing here awaits or reads a clock: callers pass ``now`` (``trio.current_time()`` in the
runtime, or the wall clock a retry's time is computed with), so every rule is unit-testable
without Trio.
"""

from __future__ import annotations

import heapq
import math
import random

import attrs

from ._job import Job
from ._options import KindOptions
from ._scheduling import RetryDecision, decide_retry
from ._states import JobState

__all__ = ["STALLED", "RecoveryDecision", "RecoveryPolicy", "StallDetector", "shutdown_state"]

#: The error type of a stall counted as a failed attempt (a kind may list it in
#: ``non_retryable`` to fail such a stall at once).
STALLED = "Stalled"


@attrs.frozen
class RecoveryDecision:
    """What the stall rule does with a running job: ``to_state`` (paused, created or failed),
    ``reason`` (the ``recovery`` event's, or the message of the ``Stalled`` error), and
    ``recovery_attempts`` counting this stall.

    ``failed_attempt``: the stall counted as a failed attempt of error type ``Stalled``, as
    the retry rule decided it (its ``retry`` is true exactly when ``to_state`` is created);
    set whenever the job is retried or failed, None when it is paused or re-queued at its
    checkpoint (that attempt is not counted as failed)."""

    to_state: JobState
    reason: str
    recovery_attempts: int
    failed_attempt: RetryDecision | None = None


@attrs.frozen
class RecoveryPolicy:
    """The stall rule (see :meth:`decide`); ``max_recovery_attempts``: stalls a job may have
    before the next one fails it for good (until an operator resets the count)."""

    max_recovery_attempts: int = 3

    def decide(
        self, job: Job, cause: str, options: KindOptions, now: float, rng: random.Random
    ) -> RecoveryDecision:
        """Decide a stall of running ``job`` (as stored), ``cause`` saying what happened.

        Every stall counts a recovery attempt. Past ``max_recovery_attempts`` the job fails.
        Else, with a checkpoint, it is re-queued (``options.requeue_stalled``: resumed from
        the checkpoint by the next claim) or paused there (resumable). Without one, the stall
        is a failed attempt of error type ``Stalled`` under the retry rule
        (:func:`decide_retry`: ``job.max_attempts``, ``options.retry``'s backoff and
        ``options.non_retryable``): back in the queue at ``now`` (Unix seconds) plus the
        backoff (jitter drawn from ``rng``) while attempts are left, else failed. A failing
        stall counts a failed attempt too.
        """
        attempts = job.recovery_attempts + 1
        if attempts > self.max_recovery_attempts:
            # The crash-loop guard: a job that stalls (or kills its node) again and again
            # ends, whatever attempts or checkpoint it has left.
            return RecoveryDecision(
                JobState.FAILED,
                f"{cause}; recovery attempts exhausted ({attempts} > {self.max_recovery_attempts})",
                attempts,
                RetryDecision(False, job.failed_attempts + 1),
            )
        if job.checkpoint_version > 0 and options.requeue_stalled:
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
        retry = decide_retry(
            options, job.failed_attempts, job.max_attempts, STALLED, False, now, rng
        )
        reason = f"{cause}; no checkpoint to resume from"
        if retry.retry:
            return RecoveryDecision(JobState.CREATED, reason, attempts, retry)
        if STALLED in options.non_retryable:
            reason += f" ({STALLED} is not retried for this kind)"
        else:
            reason += f", no attempts left ({retry.failed_attempts} of {job.max_attempts} failed)"
        return RecoveryDecision(JobState.FAILED, reason, attempts, retry)


def shutdown_state(*, handler_started: bool, shared: bool) -> JobState:
    """What a graceful shutdown records for a job this runtime holds as running, once its
    attempt is stopped (or, claimed as the shutdown began, never launched):

    * its handler never started: ``created``, back in the queue with nothing counted (no
      failed attempt, no recovery): it ran nowhere, so there is nothing to resume and nothing
      to charge it with, and the next claim runs it (on any database, whatever
      ``resume_on_start`` says);
    * its handler ran, on a database other nodes share: ``created`` too, for them to take at
      once (resuming from its checkpoint);
    * its handler ran, on one process's database: ``paused`` (reason ``shutdown``), resumed
      by the next runtime on it when ``resume_on_start``.
    """
    if shared or not handler_started:
        return JobState.CREATED
    return JobState.PAUSED


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
