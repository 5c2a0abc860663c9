"""A job the database still has running with no worker here stays watched until the stall
rule records it: after a stop whose follow-up write the database refused (a pause, a
timeout's failed attempt, a hand-back, the stall rule applied by hand), after a write refused
on a state an outage then voided, after a claim whose slot went away and whose re-queue the
database refused; and a decision about one attempt (an older attempt's
recovery, a cancel) never stops a newer attempt (mock clock, in-memory store)."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from actors import (
    IllegalTransitionError,
    JobContext,
    JobState,
    KindOptions,
    MemoryBackend,
    StoreError,
)

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
@pytest.mark.parametrize("stop", ["pause", "timeout", "hand_back", "recover"])
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
        elif stop == "recover":  # the stall rule applied by hand
            with pytest.raises(StoreError):
                await rt.recover_job(job.id)
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


class RefuseOutcome(CommitHooks, MemoryBackend):
    """Refuses (request-tied) the commits that store an outcome while ``refusing``."""

    refusing = True

    async def before_commit(self, commit: Commit) -> None:
        if self.refusing and any(j.state is S.COMPLETED for j in commit.jobs):
            raise RuntimeError("refused (test)")


async def test_an_older_attempts_recovery_never_stops_a_newer_attempt(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Attempt 1's outcome is not stored (watched for the stall rule); the user pauses and
    resumes the job, and attempt 2 runs. Attempt 1's deadline used to apply the stall rule to
    the job id: it stopped attempt 2, whose recovery was then fenced, and the job stayed
    running with no worker for good."""
    backend = RefuseOutcome()
    started = trio.Event()

    async def twice(ctx: JobContext, input: Any) -> Any:
        if ctx.attempt == 1:
            return "first"
        started.set()
        with ctx.keep_alive():
            await trio.sleep(10)
        return "second"

    async with memory_runtime({"k": twice}, backend, heartbeat_timeout=2.0) as rt:
        job = await rt.create_job("k", "u", {})
        await trio.sleep(0.1)
        assert job.id in rt.supervisor.orphans  # attempt 1: outcome not stored
        backend.refusing = False
        await rt.pause(job.id)
        await rt.resume(job.id)
        await started.wait()
        done = await wait_for_state(rt, job.id)
        assert rt.supervisor.orphans == {}
    assert (done.state, done.attempt, done.result) == (S.COMPLETED, 2, "second")


class Outage(CommitHooks, MemoryBackend):
    """Down (an ``OSError`` for every commit) while ``down``."""

    down = False

    async def before_commit(self, commit: Commit) -> None:
        if self.down:
            raise OSError("disk gone (test)")


async def test_a_write_refused_on_a_state_an_outage_voided_is_not_a_verdict(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A cancel is applied, then its commit fails for good (an outage past
    ``store_retry_timeout``); meanwhile the job's handler returned, and its completion was
    refused against the cancel that was never saved. That refusal used to stand: the worker
    took it as a newer decision and left, and the job stayed running with no worker."""
    backend = Outage()
    go = trio.Event()

    async def waits(ctx: JobContext, input: Any) -> Any:
        await go.wait()
        return "done"

    config = {"heartbeat_timeout": 2.0, "store_retry_timeout": 1.0}
    async with memory_runtime({"k": waits}, backend, **config) as rt:
        job = await rt.create_job("k", "u", {})
        await trio.sleep(0.1)
        backend.down = True
        async with trio.open_nursery() as nursery:

            async def cancel() -> None:
                with pytest.raises(StoreError):
                    await rt.cancel(job.id)

            nursery.start_soon(cancel)
            await trio.testing.wait_all_tasks_blocked()
            go.set()  # the completion is applied on top of the cancel
        backend.down = False
        recorded = await wait_for_state(rt, job.id, {S.PAUSED, S.COMPLETED, S.FAILED, S.CANCELLED})
    assert (recorded.state, recorded.pause_reason) == (S.PAUSED, "store_unavailable")


class FailBeatsOnce(CommitHooks, MemoryBackend):
    """Refuses (request-tied) the next commit that writes heartbeats and no job, once armed."""

    armed = False

    async def before_commit(self, commit: Commit) -> None:
        if self.armed and commit.heartbeats and not commit.jobs:
            self.armed = False
            raise RuntimeError("refused (test)")


async def test_a_refusal_judged_on_committed_state_stands_when_its_group_fails(
    autojump_clock: trio.abc.Clock,
) -> None:
    """The cancel of a finished job shares a group with nothing but a heartbeat, and that
    commit fails: the refusal was judged on committed state, so the caller gets it."""
    backend = FailBeatsOnce()

    async def quick(ctx: JobContext, input: Any) -> Any:
        return 1

    async def holds(ctx: JobContext, input: Any) -> Any:
        await trio.sleep_forever()

    async with memory_runtime({"q": quick, "h": holds}, backend) as rt:
        done = await rt.create_job("q", "u", {})
        await wait_for_state(rt, done.id)
        running = await rt.create_job("h", "u", {})
        await trio.sleep(0.1)
        rt.supervisor.store.heartbeat(running.id, 1)  # a heartbeat staged, to be written
        backend.armed = True
        with pytest.raises(IllegalTransitionError):
            await rt.cancel(done.id)
        assert not backend.armed  # the group did fail


async def test_a_cancel_never_stops_a_newer_attempt(autojump_clock: trio.abc.Clock) -> None:
    """A cancel is stored while a claim is in progress, and its stop waits for that claim;
    meanwhile the job is restarted and claimed again. The stop used to take the newer
    attempt for the cancelled one: it stopped it, and the job stayed running with no worker."""

    async def holds(ctx: JobContext, input: Any) -> Any:
        with ctx.keep_alive():
            await trio.sleep(30)
        return ctx.attempt

    async with memory_runtime({"k": holds}, heartbeat_timeout=2.0) as rt:
        job = await rt.create_job("k", "u", {})
        await trio.sleep(0.1)
        supervisor = rt.supervisor
        hold = supervisor.hold_launch()  # a claim in progress: the cancel's stop waits for it
        async with trio.open_nursery() as nursery:
            nursery.start_soon(rt.cancel, job.id)
            await trio.sleep(0.1)
            assert (await rt.get_job(job.id)).state is S.CANCELLED
            await rt.restart(job.id)
            await trio.sleep(0.5)
            assert supervisor.workers[job.id].attempt == 2
            supervisor.release_launch(hold)
        done = await wait_for_state(rt, job.id)
    assert (done.state, done.attempt, done.result) == (S.COMPLETED, 2, 2)


class Vanishing:
    """A placement with one slot for kind ``r`` until ``gone``; its handler holds."""

    gone = False

    def kinds(self) -> frozenset[str]:
        return frozenset({"r"})

    def slots(self, kind: str) -> int:
        return 1

    def serves(self, kind: str) -> bool:
        return kind == "r"

    def capacity(self, kind: str) -> int:
        return 0 if self.gone or kind != "r" else 1

    def free(self) -> int:
        return 0 if self.gone else 1

    def place(self, job: Any) -> Any:
        return forever


class VanishThenRefuse(CommitHooks, MemoryBackend):
    """The placement's slot goes away once a start commits; re-queues are refused while
    ``refusing`` (request-tied, or an outage)."""

    def __init__(self, placement: Vanishing, *, outage: bool) -> None:
        super().__init__()
        self.placement = placement
        self.outage = outage
        self.refusing = True
        self.refused = 0

    async def before_commit(self, commit: Commit) -> None:
        if self.refusing and any(j.attempt and j.state is S.CREATED for j in commit.jobs):
            self.refused += 1
            raise (OSError if self.outage else RuntimeError)("refused (test)")

    async def after_commit(self, commit: Commit) -> None:
        if any(j.state is S.RUNNING for j in commit.jobs):
            self.placement.gone = True


@pytest.mark.parametrize("outage", [False, True], ids=["refused", "outage"])
async def test_a_claim_whose_slot_went_away_is_requeued_once_the_database_takes_it(
    autojump_clock: trio.abc.Clock, outage: bool
) -> None:
    placement = Vanishing()
    backend = VanishThenRefuse(placement, outage=outage)
    config = {"heartbeat_timeout": 2.0, "store_retry_timeout": 0.5}
    async with memory_runtime({}, backend, **config) as rt:
        rt.supervisor.add_placement(placement)
        job = await rt.create_job("r", "u", {})
        await trio.sleep(1)
        assert backend.refused
        assert (await rt.get_job(job.id)).state is S.RUNNING  # started, with no worker
        backend.refusing = False
        back = await wait_for_state(rt, job.id, {S.CREATED})
    assert (back.attempt, back.failed_attempts) == (1, 0)  # no attempt counted
