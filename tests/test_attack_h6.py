"""Attacks on retention, idempotency keys and the queue's scheduling inputs (helper h6)."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from actors import JobState, RetentionPolicy, RetentionRule, UnknownJobError
from actors._backend import Backend
from actors._clock import wall_time
from actors._options import CreateOptions

from .backends import new_backend
from .conftest import memory_runtime, wait_for_state
from .test_retention import open_store

TRADE = {"symbol": "X", "side": "buy", "quantity": 1}


@pytest.fixture(params=["memory", "sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    return new_backend(request, tmp_path / "h6.db")


async def test_a_key_still_kept_survives_a_prune_of_its_job(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A trade created with a key, finished and pruned at once (``prune --older-than 0``, or a
    kind's ``max_count``) while its key was kept: the client whose reply was lost sent the
    create again with the key and got a second trade. The job is kept while its key is."""
    async with memory_runtime() as rt:
        keyed = await rt.create_job("trade", "alice", TRADE, idempotency_key="k1")
        plain = await rt.create_job("trade", "alice", TRADE)
        for job in (keyed, plain):
            assert (await wait_for_state(rt, job.id)).state is JobState.COMPLETED
        assert (await rt.prune(older_than=0.0, dry_run=True)).job_ids == (plain.id,)
        report = await rt.prune(older_than=0.0)
        assert report.job_ids == (plain.id,)
        again = await rt.create_job("trade", "alice", TRADE, idempotency_key="k1")
        assert again.id == keyed.id
        with pytest.raises(UnknownJobError):
            await rt.get_job(plain.id)
        # Once its key has lapsed, the job goes like any other.
        await trio.sleep(rt.config.idempotency_window + 1)
        assert (await rt.prune(older_than=0.0)).job_ids == (keyed.id,)


async def test_each_backend_keeps_a_finished_job_while_its_key_is_kept(backend: Backend) -> None:
    async with open_store(backend) as store:
        now = wall_time()
        ids = []
        for key in ("k1", None):
            job = await store.create("alice", "trade", {}, CreateOptions(idempotency_key=key))
            await store.cancel(job.id, None)
            ids.append(job.id)
        keyed, plain = ids
        policy = RetentionPolicy(RetentionRule(0.0))
        assert (await store.prune(policy, now + 10, 10)).job_ids == (plain,)
        assert (await store.get(keyed)).state is JobState.CANCELLED
        # A count limit leaves it too; past the window it is due.
        count = RetentionPolicy(RetentionRule(None, max_count=0))
        assert (await store.prune(count, now + 10, 10)).job_ids == ()
        pruned = await store.prune(count, now + 10, 10, idempotency_window=5.0)
        assert pruned.job_ids == (keyed,)


async def test_jobs_kept_at_the_head_of_a_kind_hide_no_due_job_behind_them(
    autojump_clock: trio.abc.Clock,
) -> None:
    """More kept jobs (keyed, parents) at the head of a kind than a batch holds: the due jobs
    behind them still go, and a tree whole in one run (each batch a level, from the leaves
    up; a short batch does not end the run)."""
    # Applied at start (nothing is finished then), and next a year later.
    policy = RetentionPolicy(batch_size=2, interval=365 * 86_400.0)
    async with memory_runtime(retention=policy) as rt:
        keyed = [
            await rt.create_job("trade", "alice", TRADE, idempotency_key=f"k{n}") for n in range(3)
        ]
        parents = [await rt.create_job("trade", "alice", TRADE) for _ in range(3)]
        for job in (*keyed, *parents):
            await wait_for_state(rt, job.id)
        children = [await rt.create_job("trade", "alice", TRADE, parent_id=p.id) for p in parents]
        for job in children:
            await wait_for_state(rt, job.id)
        report = await rt.prune(older_than=0.0)
        assert sorted(report.job_ids) == sorted(job.id for job in (*parents, *children))
        assert report.job_ids[:3] != tuple(job.id for job in parents)  # the children first


async def test_a_finished_job_is_kept_while_a_job_below_it_is_stored(
    autojump_clock: trio.abc.Clock,
) -> None:
    """R waits; C, its child, completed; G, C's child, waits. Retention removed C (finished),
    and with it the only link from R to G: cancelling R no longer cancelled G (README:
    cancelling a job cancels its children, and theirs), which then ran. A finished job is
    kept while it has children; it goes at a prune after they are gone."""
    async with memory_runtime() as rt:
        root = await rt.create_job("trade", "alice", TRADE, delay=3600)
        child = await rt.create_job("trade", "alice", TRADE, parent_id=root.id)
        assert (await wait_for_state(rt, child.id)).state is JobState.COMPLETED
        grandchild = await rt.create_job("trade", "alice", TRADE, parent_id=child.id, delay=3600)
        assert (await rt.prune(older_than=0.0)).job_ids == ()
        await rt.cancel(root.id)
        assert (await rt.get_job(grandchild.id)).state is JobState.CANCELLED
        # The tree goes from its leaves up: all three in one run.
        assert sorted((await rt.prune(older_than=0.0)).job_ids) == sorted(
            [root.id, child.id, grandchild.id]
        )


async def test_each_backend_removes_a_tree_from_its_leaves_up(backend: Backend) -> None:
    async with open_store(backend) as store:
        parent = await store.create("alice", "trade", {})
        child = await store.create("alice", "trade", {}, CreateOptions(parent_id=parent.id))
        for job in (parent, child):
            await store.cancel(job.id, None)
        policy = RetentionPolicy(RetentionRule(0.0))
        later = wall_time() + 10
        assert (await store.prune(policy, later, 10)).job_ids == (child.id,)
        assert (await store.prune(policy, later, 10)).job_ids == (parent.id,)
