"""Adversarial inputs and sequences against the queue's semantics (session h3), through the
embedding API under the mock clock on the in-memory store."""

from __future__ import annotations

from typing import Any

import trio

from actors import JobContext, JobState
from actors._backend import JobQuery

from .conftest import memory_runtime, wait_for_state

S = JobState


async def quick(ctx: JobContext, input: Any) -> Any:
    return input


async def hold(ctx: JobContext, input: Any) -> Any:
    with ctx.keep_alive():
        await trio.sleep(3600)
    return "held"


async def test_an_idempotent_create_sent_again_after_its_finished_parent_was_deleted(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A create with a parent and a key, sent again (its reply was lost) after the finished
    parent was deleted, gets its job back: it raised ``UnknownJobError`` naming the parent
    (the check for a cancelled parent read a job that is gone), so a client's resend of a
    create that had worked was told the job does not exist."""
    async with memory_runtime({"quick": quick}) as rt:
        parent = await rt.create_job("quick", "alice", {})
        assert (await wait_for_state(rt, parent.id)).state is S.COMPLETED
        options: dict[str, Any] = {"parent_id": parent.id, "delay": 3600, "idempotency_key": "k"}
        child = await rt.create_job("quick", "alice", {"n": 1}, **options)
        await rt.delete_job(parent.id)
        again = await rt.create_job("quick", "alice", {"n": 1}, **options)
        assert (again.id, again.state) == (child.id, S.CREATED)
        assert (await wait_for_state(rt, child.id, timeout=4000)).state is S.COMPLETED


async def test_a_parents_cancel_is_not_failed_by_a_child_deleted_during_it(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Cancelling a running parent while another client deletes its waiting child (after the
    cancel listed the children, before it cancelled them) cancels the parent and returns it:
    it raised ``UnknownJobError`` naming the child, the parent cancelled all the same, so
    the caller was told its cancel failed (a child that finished meanwhile was skipped)."""
    async with memory_runtime({"hold": hold, "quick": quick}) as rt:
        parent = await rt.create_job("hold", "alice", {})
        await wait_for_state(rt, parent.id, {S.RUNNING})
        child = await rt.create_job("quick", "alice", {}, parent_id=parent.id, delay=3600)
        store = rt._store
        listed = store.list_jobs

        async def list_then_delete(query: JobQuery) -> Any:
            jobs = await listed(query)
            if query.parent_ids and any(job.id == child.id for job in jobs):
                await rt.delete_job(child.id)  # another client's delete lands here
            return jobs

        store.list_jobs = list_then_delete  # type: ignore[method-assign]
        cancelled = await rt.cancel(parent.id)
        assert (cancelled.id, cancelled.state) == (parent.id, S.CANCELLED)
        assert [job.id for job in await rt.list_jobs()] == [parent.id]


async def test_a_job_created_under_a_cancelled_parent_never_runs(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A job created under a cancelled parent is cancelled at once (PROTOCOL.md, ``parent_id``)
    and its handler never runs: it was stored created, the fast path started it in its
    create's commit, and the cancel that followed came after a quick handler completed (a
    trade placed for a tree its user had cancelled); create_job returned it ``created``."""
    ran: list[Any] = []

    async def record(ctx: JobContext, input: Any) -> Any:
        ran.append(input)
        return input

    async with memory_runtime({"record": record}) as rt:
        parent = await rt.create_job("record", "alice", {"parent": True}, delay=3600)
        await rt.cancel(parent.id)
        child = await rt.create_job("record", "alice", {"child": True}, parent_id=parent.id)
        assert child.state is S.CANCELLED
        await trio.sleep(10)
        assert ran == []
        assert (await rt.get_job(child.id)).state is S.CANCELLED
        events = [(e.type.value, e.actor) for e in await rt.read_events(child.id)]
        assert events == [("created", None), ("cancelled", "system")]
        assert await rt.list_jobs("alice", states=["created"]) == []
