"""A claim for worker slots reads the running counts and the workers' free slots at one
instant: a slot a worker's report frees before the runtime orders the attempt's outcome is
never counted twice (mock clock, in-memory store, a worker connection seen as its link)."""

from __future__ import annotations

from typing import Any

import trio

from actors import JobState, MemoryBackend
from actors._backend import ClaimRequest
from actors._remote import RemotePlacement

from .backends import Commit, CommitHooks
from .conftest import memory_runtime, wait_for_state


class SlowCommits(CommitHooks, MemoryBackend):
    """Every commit takes 10 ms: requests queue in the store behind it, as on a disk."""

    async def before_commit(self, commit: Commit) -> None:
        await trio.sleep(0.01)


async def test_a_slot_freed_by_a_report_is_claimed_once(autojump_clock: trio.abc.Clock) -> None:
    """End to end: two worker slots, 30 jobs waiting, each completed by the worker in turn
    (out of step), commits taking 10 ms: every job runs as attempt 1, none sent back to the
    queue as ``worker_gone`` at its launch (what a new user saw once: a slot counted twice,
    see the next test)."""
    assigned: list[tuple[str, int]] = []

    class Link:
        def send(self, message: dict[str, Any]) -> None:
            if message["type"] == "assign":
                assigned.append((message["job_id"], message["attempt"]))

    async with memory_runtime({}, SlowCommits()) as rt:
        placement = RemotePlacement(rt.supervisor)
        rt.supervisor.add_placement(placement)
        worker = placement.connect("w", {"r"}, 2, Link())
        placement.open(worker)
        jobs = [await rt.create_job("r", "u", {"n": n}) for n in range(30)]
        done = 0
        with trio.fail_after(60):
            while done < len(jobs):
                await trio.sleep(0.003)
                for attempt in list(worker.attempts.values()):
                    if attempt.ctx is not None and not attempt.ended:
                        attempt.complete({"ok": True})  # one at a time: out of step
                        done += 1
                        break
        ended = [await wait_for_state(rt, job.id, {JobState.COMPLETED}) for job in jobs]
    assert [job.attempt for job in ended] == [1] * len(jobs), [j.attempt for j in ended]
    assert len(assigned) == len(jobs)


async def test_a_claim_plans_its_limits_with_the_counts_it_runs_with(
    autojump_clock: trio.abc.Clock,
) -> None:
    """The exact step: a claim planned once the worker's report freed its slot (the attempt
    still counted as running), run once the attempt's outcome was ordered (no longer
    counted). It may take one job, not two."""

    class Link:
        def send(self, message: dict[str, Any]) -> None:
            pass

    async with memory_runtime({}) as rt:
        placement = RemotePlacement(rt.supervisor)
        rt.supervisor.add_placement(placement)
        worker = placement.connect("w", {"r"}, 1, Link())
        placement.open(worker)
        job = await rt.create_job("r", "u", {})
        await wait_for_state(rt, job.id, {JobState.RUNNING})
        supervisor, dispatcher = rt.supervisor, rt.dispatcher
        assert dispatcher is not None
        running = supervisor.workers[job.id]
        worker.attempts[job.id].complete({"ok": True})  # the report: the slot is free
        counts = dispatcher._capacity()
        kinds, limits = dispatcher.placeable(counts[0], counts[2])
        planned = ClaimRequest("n", 0.0, 1.0, limits, *counts, kinds)
        supervisor._outcome_ordered(running)  # the outcome ordered before the claim runs
        assert dispatcher.claiming(planned).planner().slots() == 1
