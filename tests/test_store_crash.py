"""A fault inside the store actor ends the runtime with one typed error, never a hang.

A request waiting for the store when the actor fails must be answered (``StoreError``): the
dispatcher waits for its claims shielded (a job claimed is always launched), so a claim left
unanswered kept the runtime's nursery, and the application, waiting forever.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
import trio
import trio.testing

from actors import JobContext, JobState, RuntimeCrashedError
from actors._store import StoreActor

from .conftest import memory_runtime


async def quick(ctx: JobContext, input: Any) -> Any:
    return "done"


def run_guarded(scenario: Any, seconds: float = 20) -> Exception | None:
    """Run ``scenario`` under an autojump clock in a daemon thread: a runtime that hangs
    behind a shielded wait (which no Trio timeout can break) fails the test instead of
    hanging the suite. Returns what it raised."""
    outcome: list[Exception | None] = []

    def target() -> None:
        try:
            trio.run(scenario, clock=trio.testing.MockClock(autojump_threshold=0))
            outcome.append(None)
        except Exception as exc:
            outcome.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "the runtime hung after its store actor failed"
    return outcome[0] if outcome else None


def test_a_store_actor_that_fails_under_a_waiting_claim_crashes_the_runtime(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    committed = StoreActor._committed
    armed = False

    def failing(self: StoreActor, group: Any) -> None:
        # The first commit holding a completion fails in the actor itself (a bug, not the
        # database): the claim its freed slot sent waits behind that commit.
        if armed and any(job.state is JobState.COMPLETED for job in group.jobs.values()):
            raise RuntimeError("a fault in the store actor")
        committed(self, group)

    monkeypatch.setattr(StoreActor, "_committed", failing)

    async def scenario() -> None:
        nonlocal armed
        async with memory_runtime({"quick": quick}, max_running=1) as rt:
            armed = True
            for _ in range(3):
                await rt.create_job("quick", "alice", {})
            await trio.sleep_forever()

    error = run_guarded(scenario)
    assert isinstance(error, RuntimeCrashedError)
    assert "a fault in the store actor" in repr(error.__cause__)
