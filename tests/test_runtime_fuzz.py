"""Seeded random runs of the whole runtime against a database that fails (mock clock,
in-memory store): commits refused (a request-tied failure) or an outage, short or past
``store_retry_timeout``; limits in all, per user and per kind; retries with no delay,
permanent failures, results over ``result_limit``, timeouts; pauses, resumes, cancels,
restarts and the stall rule applied by hand, racing it all. Every run checks that no more
handlers run at once than the limits allow, that no job runs twice at once, that every job
ends recorded (none left running with no one on it) once the database is back, and that
nothing stays counted. ``JOBSPINE_FUZZ_SEEDS`` (default 30) seeds per mode."""

from __future__ import annotations

import contextlib
import os
import random
from typing import Any

import pytest
import trio

from actors import (
    Handler,
    JobContext,
    JobspineError,
    JobState,
    KindOptions,
    MemoryBackend,
    PermanentError,
    RetryPolicy,
)

from .backends import Commit, CommitHooks
from .conftest import memory_runtime

S = JobState
SEEDS = int(os.environ.get("JOBSPINE_FUZZ_SEEDS", "30"))
ENDED = {S.COMPLETED, S.FAILED, S.CANCELLED}


class Flaky(CommitHooks, MemoryBackend):
    """Each commit takes 0 to 50 ms; while ``failing``, a share of them is refused (``tied``)
    or meets an outage (``outage``)."""

    def __init__(self, rng: random.Random, tied: float, outage: float) -> None:
        super().__init__()
        self.rng = rng
        self.tied = tied
        self.outage = outage
        self.failing = True

    async def before_commit(self, commit: Commit) -> None:
        await trio.sleep(self.rng.choice([0, 0, 0.001, 0.01, 0.05]))
        if not self.failing:
            return
        draw = self.rng.random()
        if draw < self.tied:
            raise RuntimeError("refused (test)")
        if draw < self.tied + self.outage:
            raise OSError("outage (test)")


class Limits:
    """Handlers running now, against the runtime's limits; what broke them."""

    def __init__(self, total: int, per_user: int | None, per_kind: dict[str, int]) -> None:
        self.total, self.per_user, self.per_kind = total, per_user, per_kind
        self.jobs: dict[str, int] = {}
        self.users: dict[str, int] = {}
        self.kinds: dict[str, int] = {}
        self.broken: list[str] = []

    def enter(self, ctx: JobContext) -> None:
        if ctx.job_id in self.jobs:
            self.broken.append(f"{ctx.job_id} runs twice at once")
        for counts, key in ((self.jobs, ctx.job_id), (self.users, ctx.user_id)):
            counts[key] = counts.get(key, 0) + 1
        self.kinds[ctx.kind] = self.kinds.get(ctx.kind, 0) + 1
        if sum(self.jobs.values()) > self.total:
            self.broken.append(f"{sum(self.jobs.values())} running > max_running {self.total}")
        if self.per_user is not None and self.users[ctx.user_id] > self.per_user:
            self.broken.append(f"user {ctx.user_id}: {self.users[ctx.user_id]} running")
        if self.kinds[ctx.kind] > self.per_kind.get(ctx.kind, self.total):
            self.broken.append(f"kind {ctx.kind}: {self.kinds[ctx.kind]} running")

    def leave(self, ctx: JobContext) -> None:
        for counts, key in (
            (self.jobs, ctx.job_id),
            (self.users, ctx.user_id),
            (self.kinds, ctx.kind),
        ):
            counts[key] -= 1
            if not counts[key]:
                del counts[key]


def handler(limits: Limits, rng: random.Random) -> Handler:
    async def run(ctx: JobContext, input: Any) -> Any:
        limits.enter(ctx)
        try:
            for _ in range(rng.randint(0, 3)):
                await trio.sleep(rng.choice([0, 0.001, 0.02, 0.2]))
                if rng.random() < 0.3:
                    await ctx.progress(rng.random() * 100)
            draw = rng.random()
            if draw < 0.15:
                raise RuntimeError("transient (test)")
            if draw < 0.22:
                raise PermanentError("permanent (test)")
            if draw < 0.28:
                return "x" * 5000  # over result_limit: failed, then retried
            return {"attempt": ctx.attempt}
        finally:
            limits.leave(ctx)

    return run


async def fuzz(seed: int, tied: float, outage: float) -> None:
    rng = random.Random(seed)
    per_user = rng.choice([None, 1, 2])
    per_kind = rng.choice([{}, {"a": 1}, {"a": 2, "b": 1}])
    limits = Limits(rng.choice([1, 2, 3]), per_user, per_kind)
    backend = Flaky(rng, tied, outage)
    options = KindOptions(
        max_attempts=3,
        retry=RetryPolicy(initial_interval=1e-6, maximum_interval=1e-6, jitter=0),
        timeout=rng.choice([None, 0.1, 1.0]),
    )
    config: dict[str, Any] = {
        "max_running": limits.total,
        "max_running_per_user": per_user,
        "max_running_per_kind": per_kind,
        "kinds": {"a": options, "b": options},
        "result_limit": 1000,
        "store_retry_timeout": rng.choice([0.01, 0.5, 5.0]),
        "stop_grace": 0.05,
        "heartbeat_timeout": 2.0,
    }
    handlers = {"a": handler(limits, rng), "b": handler(limits, rng)}
    async with memory_runtime(handlers, backend, **config) as rt:
        ids: list[str] = []

        async def create() -> None:
            for _ in range(40):
                with contextlib.suppress(JobspineError):
                    job = await rt.create_job(rng.choice("ab"), rng.choice(["u1", "u2", "u3"]), {})
                    ids.append(job.id)
                await trio.sleep(rng.choice([0, 0, 0.001, 0.05]))

        async def control() -> None:
            for _ in range(60):
                await trio.sleep(rng.choice([0.001, 0.01, 0.05]))
                if ids:
                    ops = ["pause", "resume", "cancel", "restart", "recover_job"]
                    op = getattr(rt, rng.choice(ops))
                    with contextlib.suppress(JobspineError):
                        await op(rng.choice(ids))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(create)
            nursery.start_soon(control)
        backend.failing = False
        # Once the database is back, every job ends: the paused ones once resumed.
        with trio.fail_after(600):
            while True:
                await trio.sleep(5)
                jobs = [await rt.get_job(job_id) for job_id in ids]
                if all(job.state in ENDED for job in jobs):
                    break
                for job in jobs:
                    if job.state is S.PAUSED:
                        with contextlib.suppress(JobspineError):
                            await rt.resume(job.id)
        await trio.sleep(5)
        supervisor = rt.supervisor
        assert limits.broken == []
        assert supervisor.running_counts() == (0, {}, {})
        assert (supervisor.workers, supervisor.orphans) == ({}, {})


@pytest.mark.parametrize("seed", range(SEEDS))
@pytest.mark.parametrize(
    ("tied", "outage"), [(0.0, 0.0), (0.15, 0.0), (0.1, 0.1)], ids=["healthy", "refused", "both"]
)
async def test_limits_hold_and_every_job_ends_recorded(
    autojump_clock: trio.abc.Clock, tied: float, outage: float, seed: int
) -> None:
    await fuzz(seed, tied, outage)
