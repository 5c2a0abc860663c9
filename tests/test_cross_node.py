"""Controls across nodes on one PostgreSQL database (issue 11): a pause, cancel or recovery asked
on one runtime of a job running on another acts where the job runs; a create on one wakes the
other's dispatcher. Two real runtimes, each with its own backend (two nodes),
in real time with generous bounds (threads: the connections and the listener)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import attrs
import psycopg
import pytest
import trio

from actors import (
    EventType,
    IllegalTransitionError,
    JobContext,
    JobState,
    JobStopped,
    PostgresBackend,
    RemoteControlError,
    Runtime,
    RuntimeConfig,
    open_runtime,
)
from actors._nodes import node_of
from actors._ops import create, pause, resume, start
from actors._options import CreateOptions
from actors._pg_notify import PgNotifier, node_channel
from actors._routing import QUEUE_CHANNEL, Control, refusal

#: Set by the handler when it starts, per job id.
started: dict[str, trio.Event] = {}


async def polite(ctx: JobContext, input: Any) -> Any:
    """Runs until stopped; checkpoints when asked to stop (a pause)."""
    started.setdefault(ctx.job_id, trio.Event()).set()
    await ctx.wait_stopping()
    await ctx.checkpoint({"stopped_at": "pause"})
    raise JobStopped


HANDLERS = {"polite": polite}


@asynccontextmanager
async def node(pg_url: str, node_id: str, **config: Any) -> AsyncIterator[Runtime]:
    settings = RuntimeConfig(node_id=node_id, stop_grace=2.0, **config)
    async with open_runtime(
        backend=PostgresBackend(pg_url), handlers=HANDLERS, config=settings
    ) as rt:
        yield rt


@asynccontextmanager
async def two_nodes(pg_url: str) -> AsyncIterator[tuple[Runtime, Runtime]]:
    """A runs jobs; B has no worker for them (every attempt would need a worker process)."""
    async with node(pg_url, "node-a") as a, node(pg_url, "node-b", in_process_handlers=False) as b:
        yield a, b


async def running_on(rt: Runtime, kind: str = "polite") -> str:
    job = await rt.create_job(kind, "alice", {})
    with trio.fail_after(20):
        await started.setdefault(job.id, trio.Event()).wait()
    stored = await rt.get_job(job.id)
    assert stored.state is JobState.RUNNING and node_of(stored.owner or "")[0] == "node-a"
    return job.id


async def test_pause_from_another_node_checkpoints_where_the_job_runs(pg_url: str) -> None:
    """B pauses a job running on A: A's handler is asked to stop and checkpoints within the
    grace; B's reply is the job paused with that checkpoint; the log has one ``paused``."""
    async with two_nodes(pg_url) as (a, b):
        job_id = await running_on(a)
        with trio.fail_after(20):
            paused = await b.pause(job_id, by="bob")
        assert paused.state is JobState.PAUSED
        assert paused.checkpoint == {"stopped_at": "pause"}
        assert a.store_actor.metrics.failed_commits == 0  # applied on A, not raced from B
        events = await b.read_events(job_id)
        types = [e.type for e in events]
        assert types.count(EventType.PAUSED) == 1 and types[-1] is EventType.PAUSED
        assert [e.seq for e in events] == list(range(1, len(events) + 1))
        assert next(e for e in events if e.type is EventType.PAUSED).actor == "bob"


async def test_cancel_from_another_node_stops_the_handler_there(pg_url: str) -> None:
    """B cancels a job running on A: A stops its worker; B's reply is the job cancelled;
    exactly one ``cancelled`` event and no write of the stopped attempt after it."""
    async with two_nodes(pg_url) as (a, b):
        job_id = await running_on(a)
        with trio.fail_after(20):
            cancelled = await b.cancel(job_id, by="bob")
        assert cancelled.state is JobState.CANCELLED
        for _ in range(200):  # the worker on A stops within its grace
            if not a.status().running:
                break
            await trio.sleep(0.05)
        assert a.status().running == 0
        events = await a.read_events(job_id)
        assert [e.type for e in events].count(EventType.CANCELLED) == 1
        assert events[-1].type is EventType.CANCELLED


async def test_recover_from_another_node_applies_the_rule_there(pg_url: str) -> None:
    """B asks recovery of a job running on A: the stall rule is applied by A (its worker
    stopped): no checkpoint, so failed; B gets the job as it became."""
    async with two_nodes(pg_url) as (a, b):
        job_id = await running_on(a)
        with trio.fail_after(20):
            recovered = await b.recover_job(job_id)
        assert recovered.state is not JobState.RUNNING
        assert (await a.get_job(job_id)).state is recovered.state


async def test_a_control_for_a_gone_node_fails_clearly_within_its_bound(pg_url: str) -> None:
    """A job left running by a node that no longer listens: the asker gets
    :class:`RemoteControlError` after stop grace + lease TTL + margin, not a hang."""
    async with two_nodes(pg_url) as (a, b):
        job_id = await running_on(a)
        assert b.remote is not None
        b.remote.owner = lambda: "node-b"  # b routes; a is made deaf below
        a_notifier_channel = node_channel("node-a")
        assert a_notifier_channel.startswith("jobspine_node_") and len(a_notifier_channel) < 64
        b.remote.bound = 1.0
        sent: list[Control] = []

        async def into_the_void(owner: str, control: Control) -> None:
            sent.append(control)

        b.remote._send = into_the_void
        start = time.monotonic()
        with pytest.raises(RemoteControlError, match="did not pause it within 1 s"):
            await b.pause(job_id)
        assert 0.9 < time.monotonic() - start < 10
        running = await a.get_job(job_id)
        # Sent again every RESEND_INTERVAL until the bound: the same control each time.
        assert set(sent) == {Control("pause", job_id, running.attempt, running.owner or "")}
        assert (await a.get_job(job_id)).state is JobState.RUNNING


async def test_a_create_on_one_node_wakes_the_others_dispatcher(pg_url: str) -> None:
    """A renews (and so wakes by itself) only every 20 s; B has no worker. A job created on
    B starts on A within seconds: the commit's NOTIFY woke A's dispatcher."""
    async with (
        node(pg_url, "node-a", lease_ttl=60.0, lease_renew_interval=20.0) as a,
        node(pg_url, "node-b", in_process_handlers=False) as b,
    ):
        await trio.sleep(0.5)  # both dispatchers idle, asleep until their next renewal
        job = await b.create_job("polite", "alice", {})
        start = time.monotonic()
        with trio.fail_after(10):
            await started.setdefault(job.id, trio.Event()).wait()
        assert time.monotonic() - start < 5
        assert node_of((await a.get_job(job.id)).owner or "")[0] == "node-a"
        assert a.status().running == 1 and b.status().running == 0


def test_controls_encode_and_bad_payloads_are_refused() -> None:
    control = Control("cancel", "J1", 3, "node-a#i1", "bob", "user")
    assert Control.decode(control.encode()) == control
    for bad in (
        "nope",
        "[]",
        '{"op": "delete", "job_id": "J"}',
        '{"op": "pause"}',
        # As sent before controls were addressed: no attempt, no owner.
        '{"op": "cancel", "job_id": "J", "by": null, "reason": "user"}',
        '{"op": "cancel", "job_id": "J", "attempt": true, "owner": "node-a#i1"}',
        '{"op": "cancel", "job_id": "J", "attempt": 1, "owner": null}',
    ):
        with pytest.raises(ValueError, match="control"):
            Control.decode(bad)


def test_a_control_applies_to_its_attempt_under_its_incarnation_with_a_valid_lease() -> None:
    """The decision of a node that receives a control (:func:`refusal`): apply it only to
    the attempt it was sent for, held by this incarnation, while its lease is valid."""
    created, _ = create("J", "alice", "polite", {}, 1.0, CreateOptions())
    running, _ = start(created, 2.0, "node-a#i1", 60.0)
    control = Control.of("pause", running, "bob")
    assert (control.attempt, control.owner, control.by) == (1, "node-a#i1", "bob")
    assert refusal(control, running, "node-a#i1") is None
    # No valid lease (fenced, lapsed, or frozen past it and not told yet): nothing applied.
    assert refusal(control, running, None) == "this node holds no valid lease"
    # Registered again since: another incarnation, which never held the attempt.
    assert (
        refusal(control, running, "node-a#i2") == "addressed to node-a#i1, this node is node-a#i2"
    )
    # The attempt ended (a takeover paused it), or the next one runs, wherever it runs.
    paused, _ = pause(running, 1, 3.0, None, "recovery")
    assert refusal(control, paused, "node-a#i1") == "attempt 1 ended: the job is paused (attempt 1)"
    queued, _ = resume(paused, 4.0, None)
    again, _ = start(queued, 5.0, "node-a#i1", 60.0)
    assert refusal(control, again, "node-a#i1") == "attempt 1 ended: the job is running (attempt 2)"
    other = attrs.evolve(running, owner="node-b#x")
    assert refusal(control, other, "node-a#i1") == "attempt 1 is held by node-b#x, not node-a#i1"


async def test_a_node_ignores_the_queue_notifications_of_its_own_commits() -> None:
    """Its own commits' wake-ups would only unsettle its fast path: ignored; another
    node's wake it."""
    wakes: list[None] = []

    async def no_control(control: Control) -> None:
        raise AssertionError(control)

    notifier = PgNotifier(
        "postgresql://unused", "node-a", lambda: wakes.append(None), no_control, own_instance="me"
    )
    async with trio.open_nursery() as nursery:
        notifier._dispatch(nursery, QUEUE_CHANNEL, "me")
        assert wakes == []
        notifier._dispatch(nursery, QUEUE_CHANNEL, "another")
        assert wakes == [None]
        notifier._dispatch(nursery, notifier.channel, "not a control")  # logged, dropped
    assert notifier.controls == 0


def terminate_notify_sessions(url: str) -> int:
    """End every node's notification sessions (listening and sending), as a restart of the
    server, a pooler or ``idle_session_timeout`` would."""
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name = 'jobspine-notify'"
        ).fetchall()
    return len(rows)


async def test_controls_go_through_after_the_notification_sessions_dropped(
    pg_url: str,
) -> None:
    """The server drops every notification session (the sender's and the listener's): B's
    cancel of a job on A still goes through, sent on a new connection and again once A
    listens again. Before, it failed at once (``cannot reach node``, the dropped connection
    found on use) or, sent while A's listener reconnected, was lost and waited out the bound
    with A alive."""
    async with two_nodes(pg_url) as (a, b):
        job_id = await running_on(a)
        await b.pause(await running_on(a))  # B's sending connection exists
        assert await trio.to_thread.run_sync(terminate_notify_sessions, pg_url) >= 2
        with trio.fail_after(20):
            cancelled = await b.cancel(job_id, by="bob")
        assert cancelled.state is JobState.CANCELLED


def lose_the_first_control(rt: Runtime) -> list[Control]:
    """``rt``'s first control sent is lost (its node dies before applying it, say); the next
    ones are delivered. Returns the list of the lost ones."""
    assert rt.remote is not None
    deliver = rt.remote._send
    lost: list[Control] = []

    async def send(owner: str, control: Control) -> None:
        if not lost:
            lost.append(control)
            return
        await deliver(owner, control)

    rt.remote._send = send
    return lost


async def once_lost(lost: list[Control], then: Callable[[], Awaitable[object]]) -> None:
    """``then()`` once the first control is lost (sent by the asker's task)."""
    while not lost:  # noqa: ASYNC110 - no event for a control sent
        await trio.sleep(0.01)
    await then()


async def test_a_cancel_whose_attempt_ended_otherwise_cancels_the_job(pg_url: str) -> None:
    """B's cancel of a job running on A is lost on the way, and the attempt ends otherwise (a
    pause on A here; a takeover's requeue or pause the same): B's cancel is applied to the job
    as it is now, and its reply is the job cancelled. Before, the reply was the job paused
    (any state the attempt ended in), with the cancel never applied."""
    async with two_nodes(pg_url) as (a, b):
        job_id = await running_on(a)
        lost = lose_the_first_control(b)
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(once_lost, lost, lambda: a.pause(job_id))
                cancelled = await b.cancel(job_id, by="bob")
        assert cancelled.state is JobState.CANCELLED
        assert (await a.get_job(job_id)).state is JobState.CANCELLED
        types = [e.type for e in await a.read_events(job_id)]
        assert types[-2:] == [EventType.PAUSED, EventType.CANCELLED]


async def test_a_pause_whose_attempt_ended_otherwise_pauses_the_job_as_it_is_now(
    pg_url: str,
) -> None:
    """B's pause of a job running on A is lost on the way, and the job is paused and resumed
    on A (a new attempt, as a takeover's requeue starts one): B reads it again and pauses the
    job as it is then: the new attempt, which checkpoints, or (B reading between A's pause and
    its resume, as a loaded machine lets it) the job paused by A. Before, B's reply was the
    job running, not paused."""
    async with two_nodes(pg_url) as (a, b):
        job_id = await running_on(a)
        lost = lose_the_first_control(b)
        with trio.fail_after(30):

            async def pause_and_resume_on_a() -> None:
                await a.pause(job_id)
                started.pop(job_id)
                await a.resume(job_id)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(once_lost, lost, pause_and_resume_on_a)
                paused = await b.pause(job_id, by="bob")
        assert paused.state is JobState.PAUSED
        if paused.attempt == 2:
            assert paused.checkpoint == {"stopped_at": "pause"}
            assert (await a.get_job(job_id)).state is JobState.PAUSED
        else:  # as A paused it, before its resume ran it again
            assert paused.attempt == 1


async def test_a_pause_of_a_job_that_finished_meanwhile_is_refused(pg_url: str) -> None:
    """B's pause is lost on the way and the job is cancelled on A meanwhile: B's pause is
    refused as a pause of a finished job is (``illegal_transition``), not answered with the
    cancelled job as if paused."""
    async with two_nodes(pg_url) as (a, b):
        job_id = await running_on(a)
        lost = lose_the_first_control(b)
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(once_lost, lost, lambda: a.cancel(job_id))
                with pytest.raises(IllegalTransitionError, match="cancelled"):
                    await b.pause(job_id, by="bob")
        assert (await a.get_job(job_id)).state is JobState.CANCELLED
