"""A stop whose follow-up write the database refuses (a pause, a timeout's failed attempt, a
hand-back) leaves the job running in the database with no worker: it stays watched, and the
stall rule records it once the database takes writes (mock clock, in-memory store)."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from actors import JobContext, JobState, KindOptions, MemoryBackend, StoreError

from .backends import Commit, CommitHooks
from .conftest import memory_runtime, wait_for_state

S = JobState


class RefuseEnds(CommitHooks, MemoryBackend):
    """Refuses every commit that moves a started job off running, while ``refusing``: as a
    request-tied failure (the group, then each request alone, are refused) or as an outage
    (``outage``: an ``OSError``, retried by the store until ``store_retry_timeout``)."""

    def __init__(self, *, outage: bool) -> None:
        super().__init__()
        self.outage = outage
        self.refusing = True
        self.refused = 0

    async def before_commit(self, commit: Commit) -> None:
        if self.refusing and any(j.attempt and j.state is not S.RUNNING for j in commit.jobs):
            self.refused += 1
            raise (OSError if self.outage else RuntimeError)("refused (test)")


async def forever(ctx: JobContext, input: Any) -> Any:
    await ctx.checkpoint({"at": 1})
    await trio.sleep_forever()


@pytest.mark.parametrize("outage", [False, True], ids=["refused", "outage"])
@pytest.mark.parametrize("stop", ["pause", "timeout", "hand_back"])
async def test_a_stop_whose_write_is_refused_leaves_the_job_to_the_stall_rule(
    autojump_clock: trio.abc.Clock, stop: str, outage: bool
) -> None:
    backend = RefuseEnds(outage=outage)
    kinds = {"k": KindOptions(timeout=1.0)} if stop == "timeout" else {}
    config: dict[str, Any] = {"heartbeat_timeout": 2.0, "stop_grace": 0.1}
    async with memory_runtime(
        {"k": forever}, backend, kinds=kinds, store_retry_timeout=0.5, **config
    ) as rt:
        job = await rt.create_job("k", "u", {})
        await trio.sleep(0.5)
        if stop == "pause":
            with pytest.raises(StoreError):
                await rt.pause(job.id)
        elif stop == "hand_back":
            await rt.supervisor.hand_back(job.id, "drain")
        else:
            await trio.sleep(2)  # past the timeout and its grace
        assert backend.refused
        assert (await rt.get_job(job.id)).state is S.RUNNING
        assert job.id not in rt.supervisor.workers
        assert job.id in rt.supervisor.orphans  # watched: not left running for good
        backend.refusing = False
        recovered = await wait_for_state(rt, job.id, {S.PAUSED, S.CREATED, S.FAILED})
        assert rt.supervisor.orphans == {}
    # Paused at its checkpoint: as the database was unavailable (not the job's fault), or by
    # the stall rule for a write the database refused.
    assert (recovered.state, recovered.checkpoint) == (S.PAUSED, {"at": 1})
    assert (recovered.pause_reason == "store_unavailable") is outage
