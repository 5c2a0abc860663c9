"""Nodes and leases (:mod:`actors._nodes`): the lease policy (plain, given ``now``); the node
methods of every backend (memory, SQLite, PostgreSQL); the node actor under a mock clock on a
shared in-memory database (takeover of a dead node exactly once, the start-up recovery that
leaves a live node's jobs alone, abandonment when fenced or lapsed); and, in real time on one
PostgreSQL database, two runtimes: a node that stops renewing is taken over within the lease
plus one second, and a node that leaves hands its jobs to the other at once."""

from __future__ import annotations

import inspect
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import orjson
import pytest
import trio

from actors import (
    Backend,
    ClaimLimits,
    ClaimRequest,
    EventType,
    Job,
    JobContext,
    JobEvent,
    JobState,
    JobStopped,
    KindOptions,
    LeasePolicy,
    MemoryBackend,
    NodeFencedError,
    NodeIdInUseError,
    NodeLease,
    PostgresBackend,
    RetryPolicy,
    RuntimeConfig,
    StaleWriteError,
    node_of,
    open_runtime,
)
from actors._errors import StoreUnavailableError
from actors._ops import checkpoint, create, start
from actors._options import CreateOptions

from .backends import Commit, CommitHooks
from .conftest import wait_for_state
from .test_cli import COMMAND


async def wait_until(
    check: Callable[[], Any],
    timeout: float = 30.0,  # noqa: ASYNC109 - a test helper's bound
) -> None:
    """Poll ``check`` (a function, sync or async) until it is true."""
    with trio.fail_after(timeout):
        while True:
            found = check()
            if inspect.isawaitable(found):
                found = await found
            if found:
                return
            await trio.sleep(0.01)


async def job_is(rt: Any, job_id: str, state: JobState, *, checkpointed: bool = False) -> bool:
    job = await rt.get_job(job_id)
    return bool(job.state is state and (not checkpointed or job.checkpoint_version > 0))


# -- the lease policy (no I/O) ------------------------------------------------------------------


def test_the_lease_policy_renews_scans_and_lapses_from_when_a_renewal_was_sent() -> None:
    policy = LeasePolicy(ttl=5, renew_interval=1)
    assert not policy.registered and not policy.lapsed(0)
    assert policy.next_wake() == -math.inf  # register at once
    policy.granted(sent=10)
    assert policy.registered and policy.valid_until == 15
    assert not policy.renew_due(10.9) and policy.renew_due(11)
    assert policy.scan_due(10) and not policy.scan_due(10.5) and policy.scan_due(11)
    assert policy.next_wake() == 11
    # Renewals fail (the database is unreachable): retried every interval, and the lease
    # lapses locally 5 s after the last renewal that was *sent* and granted.
    policy.failed(11)
    assert policy.next_wake() == 12
    assert not policy.lapsed(14.99) and policy.lapsed(15)
    policy.granted(sent=14)  # a late answer to a renewal sent at 14 extends it to 19 only
    assert policy.valid_until == 19
    policy.lost()
    assert not policy.registered and policy.next_wake() == -math.inf
    policy.failed(20)  # a registration that failed is tried again one interval later
    assert policy.next_wake() == 21
    with pytest.raises(ValueError):
        LeasePolicy(ttl=1, renew_interval=1)


def test_owners_name_the_node_and_its_incarnation() -> None:
    lease = NodeLease("n1", "inc", 0.0)
    assert lease.owner == "n1#inc" and node_of(lease.owner) == ("n1", "inc")
    assert node_of("a#b#c") == ("a#b", "c") and node_of("legacy") == ("legacy", None)
    with pytest.raises(ValueError, match="node_id"):
        RuntimeConfig(node_id="a#b")


# -- the node methods on every backend ------------------------------------------------------------


def running_job(job_id: str, owner: str, *, with_checkpoint: bool = False) -> list[Job]:
    """A job as stored after a start by ``owner`` (and a checkpoint): the states in order."""
    created, _ = create(job_id, "alice", "k", {}, time.time(), CreateOptions())
    claimed = attrs.evolve(created, owner=owner, lease_expires_at=time.time() + 60)
    started, _ = start(claimed, time.time(), owner, time.time() + 60)
    if not with_checkpoint:
        return [started]
    saved, _ = checkpoint(started, started.attempt, {"at": 1}, time.time(), 1 << 20)
    return [saved]


async def test_a_node_registers_renews_leaves_and_a_live_id_is_refused(backend: Backend) -> None:
    lease = await backend.register_node("n1", "i1", 30, "host-a", 111)
    assert (lease.node_id, lease.incarnation) == ("n1", "i1")
    assert lease.expires_at == pytest.approx(time.time() + 30, abs=5)
    assert await backend.node_alive("n1#i1")
    assert not await backend.node_alive("n1#other") and not await backend.node_alive("n1")
    with pytest.raises(NodeIdInUseError) as info:
        await backend.register_node("n1", "i2", 30, "host-b", 222)
    refused = info.value
    assert (refused.code, refused.incarnation, refused.host, refused.pid) == (
        "node_id_in_use",
        "i1",
        "host-a",
        111,
    )
    assert 25 < refused.expires_in <= 30
    renewed = await backend.renew_node(lease, 60, 7)
    assert renewed.expires_at > lease.expires_at
    (row,) = await backend.list_nodes()
    assert (row.state, row.running, row.host, row.pid) == ("alive", 7, "host-a", 111)
    await backend.leave_node(renewed)
    (row,) = await backend.list_nodes()
    assert row.state == "left" and not await backend.node_alive("n1#i1")
    with pytest.raises(NodeFencedError):
        await backend.renew_node(renewed, 30, 0)
    # The id is free again: a new incarnation; the left one stays listed.
    await backend.register_node("n1", "i3", 30, "host-a", 112)
    assert [(n.incarnation, n.state) for n in await backend.list_nodes()] == [
        ("i1", "left"),
        ("i3", "alive"),
    ]


async def test_an_expired_node_is_taken_over_exactly_once(backend: Backend) -> None:
    dead = await backend.register_node("dead", "d1", 0.05, "h", 1)
    alive = await backend.register_node("alive", "a1", 60, "h", 2)
    running = running_job("j1", dead.owner)
    waiting, _ = create("j2", "alice", "k", {}, time.time(), CreateOptions())
    claimed = attrs.evolve(waiting, owner=dead.owner, lease_expires_at=time.time() + 60)
    others = running_job("j3", alive.owner)
    await backend.commit([*running, claimed, *others], [], (), {})
    await trio.sleep(0.1)
    (expired,) = await backend.expired_nodes()
    assert expired.owner == dead.owner
    assert not await backend.node_alive(dead.owner)
    assert await backend.take_over(expired, alive.owner)
    assert not await backend.take_over(expired, "someone#else")  # exactly one winner
    assert await backend.expired_nodes() == []
    row = next(n for n in await backend.list_nodes() if n.node_id == "dead")
    assert (row.state, row.taken_over_by) == ("dead", alive.owner)
    # Its claimed job is back in the queue; its running job is the taker's to recover.
    back = await backend.load("j2")
    assert back is not None and (back.owner, back.lease_expires_at) == (None, None)
    assert [j.id for j in await backend.running_jobs_of(dead.owner)] == ["j1"]
    assert [j.id for j in await backend.running_jobs_of(alive.owner)] == ["j3"]
    with pytest.raises(NodeFencedError):
        await backend.renew_node(dead, 30, 0)


async def test_orphaned_owners_are_those_of_running_jobs_whose_node_is_not_alive(
    backend: Backend,
) -> None:
    dead = await backend.register_node("dead", "d1", 0.05, "h", 1)
    alive = await backend.register_node("alive", "a1", 60, "h", 2)
    expired = await backend.register_node("late", "l1", 0.05, "h", 3)
    await backend.commit(
        [
            *running_job("j1", dead.owner),
            *running_job("j2", alive.owner),
            *running_job("j3", "legacy"),  # claimed before nodes existed
            *running_job("j4", expired.owner),
        ],
        [],
        (),
        {},
    )
    await trio.sleep(0.1)
    (found,) = [n for n in await backend.expired_nodes() if n.node_id == "dead"]
    assert await backend.take_over(found, alive.owner)
    # Not "late": alive with its lease expired is the expired nodes' (not taken over yet).
    assert await backend.orphaned_owners() == [(dead.owner, alive.owner), ("legacy", None)]


async def test_a_newer_incarnation_fences_the_older_and_a_gone_process_is_replaced(
    backend: Backend,
) -> None:
    old = await backend.register_node("n", "old", 0.05, "h", 1)
    await trio.sleep(0.1)
    new = await backend.register_node("n", "new", 60, "h", 2)  # the old one expired
    with pytest.raises(NodeFencedError):
        await backend.renew_node(old, 60, 0)  # not alive again behind the new one's back
    await backend.renew_node(new, 60, 0)
    # Replacing a live incarnation known to be gone ends its lease at once (taken over next).
    newest = await backend.register_node("n", "newest", 60, "h", 3, replacing="new")
    assert {n.incarnation for n in await backend.expired_nodes()} == {"old", "new"}
    assert await backend.node_alive(newest.owner) and not await backend.node_alive(new.owner)


async def test_one_winner_among_concurrent_takers_on_postgresql(pg_url: str) -> None:
    backends = [PostgresBackend(pg_url) for _ in range(6)]
    async with backends[0].opened():
        dead = await backends[0].register_node("dead", "d", 0.05, "h", 1)
        await trio.sleep(0.1)
        (expired,) = await backends[0].expired_nodes()
        assert expired.owner == dead.owner
        won: list[str] = []

        async def taker(backend: PostgresBackend, name: str) -> None:
            async with backend.opened():
                if await backend.take_over(expired, name):
                    won.append(name)

        async with trio.open_nursery() as nursery:
            for i, backend in enumerate(backends[1:]):
                nursery.start_soon(taker, backend, f"t{i}#x")
        assert len(won) == 1


async def test_a_node_whose_lease_lapsed_claims_nothing_and_cannot_start_a_released_claim(
    pg_url: str,
) -> None:
    """On PostgreSQL a claim is fenced by its node: an owner whose lease expired claims
    nothing (it could start jobs nobody would renew or take over), and a job it marked before
    a takeover released the mark cannot be started by it (the start finds the mark gone)."""
    backend = PostgresBackend(pg_url)
    async with backend.opened():
        waiting = [
            create(f"j{n}", "alice", "k", {}, time.time(), CreateOptions())[0] for n in (1, 2)
        ]
        await backend.commit(waiting, [], (), {})
        node = await backend.register_node("x", "i1", 0.3, "h", 1)
        taker = await backend.register_node("y", "i2", 60, "h", 2)

        def request(owner: str) -> ClaimRequest:
            now = time.time()
            return ClaimRequest(owner, now, now + 60, ClaimLimits(max_running=1))

        (marked,) = (await backend.claim(request(node.owner))).jobs
        assert marked.owner == node.owner
        await trio.sleep(0.4)  # x's lease expires (the database's clock)
        assert (await backend.claim(request(node.owner))).jobs == []
        (expired,) = [n for n in await backend.expired_nodes() if n.node_id == "x"]
        assert await backend.take_over(expired, taker.owner)  # releases x's mark
        started, event = start(marked, time.time(), node.owner, time.time() + 60)
        with pytest.raises(StaleWriteError):
            await backend.commit([started], [event], (), {})
        stored = await backend.load(marked.id)
        assert stored is not None and (stored.state, stored.owner) == (JobState.CREATED, None)
        # A live node claims as before.
        (claimed,) = (await backend.claim(request(taker.owner))).jobs
        assert claimed.owner == taker.owner


# -- the node actor under a mock clock (a shared in-memory database) ------------------------------


class SharedMemory(MemoryBackend):
    """An in-memory database treated as shared by several nodes, on Trio's clock. With
    ``hang_renewals`` true, this node's renewals and registrations never answer (a database
    it cannot reach)."""

    shared = True
    hang_renewals = False

    def __init__(self) -> None:
        offset = time.time() - trio.current_time()
        super().__init__(clock=lambda: offset + trio.current_time())
        self.reachable = trio.Event()

    async def renew_node(self, lease: NodeLease, ttl: float, running: int) -> NodeLease:
        if self.hang_renewals:
            await self.reachable.wait()  # as on a database gone
        return await super().renew_node(lease, ttl, running)

    async def register_node(
        self,
        node_id: str,
        incarnation: str,
        ttl: float,
        host: str,
        pid: int,
        replacing: str | None = None,
    ) -> NodeLease:
        if self.hang_renewals:
            await self.reachable.wait()
        return await super().register_node(node_id, incarnation, ttl, host, pid, replacing)


async def hang(ctx: JobContext, input: Any) -> Any:
    if input.get("checkpoint"):
        await ctx.checkpoint({"at": 1})
    try:
        await trio.sleep_forever()
    finally:
        ABANDONED.append(ctx.job_id)


async def quick(ctx: JobContext, input: Any) -> Any:
    return "done"


ABANDONED: list[str] = []
HANDLERS = {"hang": hang, "again": hang, "quick": quick}
FAST = RuntimeConfig(lease_ttl=1.0, lease_renew_interval=0.2, heartbeat_timeout=3600)


def owned(
    job_id: str, kind: str, owner: str, at: float, *, ckpt: bool = False, attempts: int = 1
) -> list[Job]:
    created, _ = create(job_id, "alice", kind, {}, at, CreateOptions(max_attempts=attempts))
    started, _ = start(attrs.evolve(created, owner=owner), at, owner, at + 1)
    if ckpt:
        started, _ = checkpoint(started, started.attempt, {"at": 1}, at, 1 << 20)
    return [started]


@pytest.fixture
def clear_abandoned() -> Callable[[], list[str]]:
    ABANDONED.clear()
    return lambda: ABANDONED


async def test_a_dead_node_is_taken_over_once_within_its_lease_plus_one_second(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Another node ("dead") ran three jobs and claimed a fourth, then stopped renewing. The
    runtime starting meanwhile leaves them alone (their owner is alive), then takes the node
    over once its lease has expired: checkpointed → paused, a kind that re-queues → run again
    here, no checkpoint → failed, the claimed job → run here; the events say from whom."""
    backend = SharedMemory()
    dead = await backend.register_node("dead", "d1", 1.0, "elsewhere", 1)
    now = backend._clock()
    jobs = [
        *owned("j-ckpt", "hang", dead.owner, now, ckpt=True),
        *owned("j-requeue", "again", dead.owner, now, ckpt=True),
        *owned("j-none", "hang", dead.owner, now),
    ]
    waiting, _ = create("j-claimed", "alice", "quick", {}, now, CreateOptions())
    claimed = attrs.evolve(waiting, owner=dead.owner, lease_expires_at=now + 60)
    await backend.commit([*jobs, claimed], [], (), {})
    config = attrs.evolve(FAST, node_id="a", kinds={"again": KindOptions(requeue_stalled=True)})
    async with open_runtime(backend=backend, handlers=HANDLERS, config=config) as rt:
        assert (await rt.get_job("j-ckpt")).state is JobState.RUNNING  # its owner is alive
        await wait_until(lambda: job_is(rt, "j-none", JobState.FAILED), 5)
        taken_at = backend._clock()
        assert taken_at - dead.expires_at <= 1.0  # within the lease plus one second
        assert rt.node.takeovers == 1
        by = rt.node.owner
        assert by is not None and by.startswith("a#")
        for job_id, type_ in (
            ("j-ckpt", EventType.RECOVERY),
            ("j-requeue", EventType.RECOVERY),
            ("j-none", EventType.FAILED),
        ):
            (event,) = [e for e in await rt.read_events(job_id) if e.type is type_]
            assert (event.data["taken_over_from"], event.data["taken_over_by"]) == (
                dead.owner,
                by,
            )
            assert f"node {dead.owner} stopped renewing its lease" in str(event.data)
        paused = await rt.get_job("j-ckpt")
        assert (paused.state, paused.pause_reason) == (JobState.PAUSED, "recovery")
        await wait_until(lambda: job_is(rt, "j-claimed", JobState.COMPLETED), 5)
        await wait_until(lambda: job_is(rt, "j-requeue", JobState.RUNNING), 5)
        again = [e for e in await rt.read_events("j-requeue") if e.type is EventType.STARTED]
        assert [e.data["owner"] for e in again] == [by]  # the new attempt is this node's
        # Exactly once: more scans take over nothing more.
        await trio.sleep(5)
        assert rt.node.takeovers == 1
        # The metrics count them: 3 stalls, 2 recovered (paused, re-queued), 1 failed.
        status = rt.status()
        assert (status.stalls_detected, status.recoveries, status.failures) == (3, 2, 1)
        for job_id in ("j-ckpt", "j-none"):
            types = [e.type for e in await rt.read_events(job_id)]
            assert types.count(EventType.RECOVERY) + types.count(EventType.FAILED) == 1
        node = next(n for n in await backend.list_nodes() if n.node_id == "dead")
        assert (node.state, node.taken_over_by) == ("dead", by)


async def test_jobs_left_by_a_taker_that_died_mid_takeover_are_recovered_once(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Node "dead" was taken over by "taker", which died before recovering its jobs (and was
    taken over itself, by a node that did not know of them). A live node finds the orphaned
    running jobs and applies the stall rule to them exactly once; a job whose taker is alive
    is left to it."""
    backend = SharedMemory()
    config = attrs.evolve(FAST, node_id="a")
    async with open_runtime(backend=backend, handlers=HANDLERS, config=config) as rt:
        rows = {
            name: await backend.register_node(name, "i1", 3600.0, "elsewhere", pid)
            for pid, name in enumerate(("dead", "taker", "busy", "other"))
        }
        dead, taker, busy, other = rows.values()
        now = backend._clock()
        await backend.commit(
            [
                *owned("j-orphan", "hang", dead.owner, now, ckpt=True),
                *owned("j-busy", "hang", other.owner, now, ckpt=True),
            ],
            [],
            (),
            {},
        )
        # As the database is once "taker" took "dead" over and died before recovering its
        # jobs, and "busy" (alive) took over "taker" and "other" and is recovering the latter.
        for node, by in ((dead, taker), (taker, busy), (other, busy)):
            key = (node.node_id, node.incarnation)
            backend._nodes[key] = attrs.evolve(
                backend._nodes[key], state="dead", taken_over_by=by.owner
            )
        await wait_until(lambda: job_is(rt, "j-orphan", JobState.PAUSED), 10)
        (event,) = [e for e in await rt.read_events("j-orphan") if e.type is EventType.RECOVERY]
        assert event.data["taken_over_from"] == dead.owner
        assert event.data["taken_over_by"] == rt.node.owner
        await trio.sleep(10)  # more sweeps: nothing more
        types = [e.type for e in await rt.read_events("j-orphan")]
        assert types.count(EventType.RECOVERY) == 1
        assert (await rt.get_job("j-busy")).state is JobState.RUNNING  # its taker's to end


#: A kind that runs at once, retried 2 s after a failed attempt (no jitter).
RETRIED = {"quick": KindOptions(retry=RetryPolicy(initial_interval=2.0, jitter=0.0))}


async def test_a_job_taken_over_without_a_checkpoint_is_retried_while_attempts_are_left(
    autojump_clock: trio.abc.Clock,
) -> None:
    """The stall rule of a takeover is the supervisor's: a job of the dead node with no
    checkpoint and attempts left is a failed attempt of type ``Stalled``, back in the queue
    after its kind's backoff (a ``retrying`` event naming the takeover), then run here; one
    with no attempts left fails."""
    backend = SharedMemory()
    dead = await backend.register_node("dead", "d1", 1.0, "elsewhere", 1)
    now = backend._clock()
    jobs = [
        *owned("j-retry", "quick", dead.owner, now, attempts=3),
        *owned("j-spent", "quick", dead.owner, now),
    ]
    await backend.commit(jobs, [], (), {})
    config = attrs.evolve(FAST, node_id="a", kinds=RETRIED)
    async with open_runtime(backend=backend, handlers=HANDLERS, config=config) as rt:
        await wait_until(lambda: job_is(rt, "j-retry", JobState.COMPLETED), 10)
        by = rt.node.owner
        done = await rt.get_job("j-retry")
        assert (done.attempt, done.failed_attempts, done.recovery_attempts) == (2, 1, 1)
        events = await rt.read_events("j-retry")
        (retrying,) = [e for e in events if e.type is EventType.RETRYING]
        assert retrying.data["error"]["type"] == "Stalled"
        assert f"node {dead.owner} stopped renewing its lease" in retrying.data["error"]["message"]
        assert (retrying.data["failed_attempts"], retrying.data["delay"]) == (1, 2.0)
        assert (retrying.data["taken_over_from"], retrying.data["taken_over_by"]) == (
            dead.owner,
            by,
        )
        # The dead node's own events are not in this database: its start is not here.
        assert [e.data["owner"] for e in events if e.type is EventType.STARTED] == [by]
        spent = await rt.get_job("j-spent")
        assert (spent.state, spent.failed_attempts) == (JobState.FAILED, 1)
        assert spent.error is not None and spent.error.type == "Stalled"
        status = rt.status()
        assert (status.stalls_detected, status.recoveries, status.failures) == (2, 1, 1)


async def test_the_recovery_at_start_is_the_stall_rule_of_the_jobs_kind(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Jobs left running by a process that is gone: at start, one with no checkpoint and
    attempts left is retried after its kind's backoff, and a checkpointed one of a kind with
    ``requeue_stalled`` goes back to the queue (run again from its checkpoint), as a stall
    of a running runtime would."""
    backend = MemoryBackend()
    now = backend._clock()
    gone = "gone#i1"  # no node of that owner is alive
    jobs = [
        *owned("j-retry", "quick", gone, now, attempts=3),
        *owned("j-requeue", "again", gone, now, ckpt=True),
    ]
    await backend.commit(jobs, [], (), {})
    kinds = {**RETRIED, "again": KindOptions(requeue_stalled=True)}
    config = attrs.evolve(FAST, node_id="a", kinds=kinds)
    async with open_runtime(backend=backend, handlers=HANDLERS, config=config) as rt:
        await wait_until(lambda: job_is(rt, "j-retry", JobState.COMPLETED), 10)
        done = await rt.get_job("j-retry")
        assert (done.attempt, done.failed_attempts, done.recovery_attempts) == (2, 1, 1)
        types = [e.type.value for e in await rt.read_events("j-retry")]
        assert types == ["retrying", "started", "completed"]  # the dead process's are not here
        await wait_until(lambda: job_is(rt, "j-requeue", JobState.RUNNING), 10)
        events = await rt.read_events("j-requeue")
        (recovery,) = [e for e in events if e.type is EventType.RECOVERY]
        assert recovery.state is JobState.CREATED and recovery.data["requeued"] is True
        started = [e.data for e in events if e.type is EventType.STARTED]
        assert [d["resumed_from_checkpoint"] for d in started] == [1]


class FailingRecoveries(CommitHooks, SharedMemory):
    """Its commits of a recovery of ``job_id`` fail ``failures`` times (a write refused for
    a reason the store does not retry), then succeed."""

    def __init__(self, job_id: str, failures: int) -> None:
        super().__init__()
        self.job_id, self.failures = job_id, failures

    async def before_commit(self, commit: Commit) -> None:
        if self.failures and any(
            e.job_id == self.job_id and "taken_over_by" in e.data for e in commit.events
        ):
            self.failures -= 1
            raise ValueError("the database refused this write")


async def test_a_takeover_whose_recovery_write_failed_is_finished_by_its_taker(
    autojump_clock: trio.abc.Clock,
) -> None:
    """The taker's recovery of one of the dead node's jobs fails (twice): the job is not left
    running under the dead owner while the taker lives; a later orphan sweep of the taker
    recovers it, exactly once, and the dead node's other job is not touched again."""
    backend = FailingRecoveries("j-first", failures=2)
    dead = await backend.register_node("dead", "d1", 1.0, "elsewhere", 1)
    now = backend._clock()
    jobs = [
        *owned("j-first", "hang", dead.owner, now, ckpt=True),
        *owned("j-second", "hang", dead.owner, now, ckpt=True),
    ]
    await backend.commit(jobs, [], (), {})
    config = attrs.evolve(FAST, node_id="a")
    async with open_runtime(backend=backend, handlers=HANDLERS, config=config) as rt:
        await wait_until(lambda: job_is(rt, "j-second", JobState.PAUSED), 5)
        assert (await rt.get_job("j-first")).state is JobState.RUNNING  # its write failed
        await wait_until(lambda: job_is(rt, "j-first", JobState.PAUSED), 10)
        assert backend.failures == 0
        await trio.sleep(10)  # more sweeps: nothing more
        for job_id in ("j-first", "j-second"):
            types = [e.type for e in await rt.read_events(job_id)]
            assert types.count(EventType.RECOVERY) == 1, (job_id, types)
        assert rt.node.takeovers == 1


async def events_of(rt: Any, job_id: str) -> list[JobEvent]:
    return list(await rt.read_events(job_id))


async def test_a_fenced_node_abandons_its_jobs_writing_nothing_and_registers_again(
    autojump_clock: trio.abc.Clock, clear_abandoned: Callable[[], list[str]]
) -> None:
    """Another node took this one over (its row marked dead while it was paused): at its next
    renewal it cancels its handlers, writes nothing about its jobs, and carries on as a new
    incarnation; /readyz's ``healthy`` says so until then."""
    backend = SharedMemory()
    config = attrs.evolve(FAST, node_id="a")
    async with open_runtime(backend=backend, handlers=HANDLERS, config=config) as rt:
        job = await rt.create_job("hang", "alice", {"checkpoint": True})
        await wait_until(lambda: job_is(rt, job.id, JobState.RUNNING, checkpointed=True), 5)
        first = rt.node.owner
        assert first is not None and rt.node.healthy
        before = await events_of(rt, job.id)
        other = await backend.register_node("other", "x", 3600.0, "elsewhere", 2)
        key = node_of(first)
        row = backend._nodes[key[0], key[1] or ""]
        backend._nodes[row.node_id, row.incarnation] = attrs.evolve(
            row,
            state="dead",
            taken_over_by=other.owner,  # alive: it recovers the job
        )
        await wait_until(lambda: rt.node.fenced, 2)
        await trio.sleep(1)
        assert clear_abandoned() == [job.id]  # its handler was cancelled
        assert rt.supervisor.workers == {}
        assert await events_of(rt, job.id) == before  # nothing written
        assert (await rt.get_job(job.id)).state is JobState.RUNNING  # the taker's to recover
        assert rt.node.owner not in (None, first) and rt.node.healthy
        assert await backend.node_alive(rt.node.owner or "")


async def test_a_node_whose_renewals_hang_abandons_its_jobs_when_its_lease_lapses(
    autojump_clock: trio.abc.Clock, clear_abandoned: Callable[[], list[str]]
) -> None:
    """The database stops answering renewals (a partition): once ``lease_ttl`` has passed
    since the last renewal sent, the node drops its jobs (another node may take them over
    now) and registers again; it never writes past its lease."""
    backend = SharedMemory()
    config = attrs.evolve(FAST, node_id="a")
    async with open_runtime(backend=backend, handlers=HANDLERS, config=config) as rt:
        job = await rt.create_job("hang", "alice", {})
        await wait_until(lambda: rt.supervisor.workers, 5)
        first = rt.node.owner
        renewed = trio.current_time() - (rt.node.lease_age() or 0)
        backend.hang_renewals = True
        await wait_until(lambda: rt.node.fenced, 5)
        # Lapsed locally no later than ttl after the last renewal sent.
        assert trio.current_time() - renewed <= 1.0 + 1e-6
        assert clear_abandoned() == [job.id] and not rt.node.healthy
        backend.hang_renewals = False
        backend.reachable.set()
        await wait_until(lambda: rt.node.healthy, 5)
        assert rt.node.owner != first
        # The old incarnation, replaced, is taken over (by this very node, at once): its job
        # is recovered once, by the stall rule (no checkpoint: failed).
        await wait_until(lambda: job_is(rt, job.id, JobState.FAILED), 5)
        failed = [e for e in await events_of(rt, job.id) if e.type is EventType.FAILED]
        assert len(failed) == 1 and failed[0].data.get("taken_over_from") == first


def fence(backend: SharedMemory, owner: str, by: str) -> None:
    """Mark ``owner``'s row taken over by ``by``, as when its process was frozen past its
    lease."""
    node_id, incarnation = node_of(owner)
    row = backend._nodes[node_id, incarnation or ""]
    backend._nodes[node_id, incarnation or ""] = attrs.evolve(row, state="dead", taken_over_by=by)


async def test_a_fenced_node_whose_id_another_live_process_holds_stops_with_node_replaced(
    autojump_clock: trio.abc.Clock, clear_abandoned: Callable[[], list[str]]
) -> None:
    """Node ``a`` was frozen past its lease: another node took it over, and a new process
    started as ``a`` on the same host (its lease is valid, its process alive). When ``a``
    runs again it abandons its job (writing nothing) and, unable to register its id again
    while that process lives, stops: the runtime raises ``node_replaced`` naming the holder,
    instead of retrying its registration forever, half alive."""
    backend = SharedMemory()
    config = attrs.evolve(FAST, node_id="a")
    with pytest.raises(NodeIdInUseError) as info, trio.fail_after(60):
        async with open_runtime(backend=backend, handlers=HANDLERS, config=config) as rt:
            job = await rt.create_job("hang", "alice", {"checkpoint": True})
            await wait_until(lambda: job_is(rt, job.id, JobState.RUNNING, checkpointed=True), 5)
            first = rt.node.owner
            assert first is not None
            before = await rt.read_events(job.id)
            other = await backend.register_node("b", "b1", 3600.0, "elsewhere", 7)
            fence(backend, first, other.owner)
            newer = await backend.register_node("a", "a2", 3600.0, rt.node.host, os.getppid())
            await trio.sleep_forever()  # until the runtime stops
    error = info.value
    assert error.code == "node_replaced"
    assert (error.node_id, error.incarnation, error.pid) == ("a", "a2", os.getppid())
    assert f"node {first} lost its lease" in str(error) and "this process stops" in str(error)
    assert clear_abandoned() == [job.id]
    # Nothing written after it was fenced: the job is the taker's to recover.
    assert await backend.read_events(job.id, 0, 1000) == before
    assert (await backend.load(job.id)).state is JobState.RUNNING  # type: ignore[union-attr]
    assert await backend.node_alive(newer.owner)


class LostAnswers(SharedMemory):
    """Its next ``lose`` registrations are stored, and their answer lost (a connection that
    dropped after the commit)."""

    lose = 0

    async def register_node(
        self,
        node_id: str,
        incarnation: str,
        ttl: float,
        host: str,
        pid: int,
        replacing: str | None = None,
    ) -> NodeLease:
        lease = await super().register_node(node_id, incarnation, ttl, host, pid, replacing)
        if self.lose:
            self.lose -= 1
            raise ConnectionResetError("the answer was lost")
        return lease


async def test_a_registration_of_its_own_whose_answer_was_lost_is_replaced_at_once(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A fenced node's registration is stored but its answer lost: the incarnation holding
    the id is this process's own, not another process (no ``node_replaced``); the next try
    replaces it at once instead of waiting out its lease."""
    backend = LostAnswers()
    config = attrs.evolve(FAST, node_id="a", lease_ttl=3.0)
    async with open_runtime(backend=backend, handlers=HANDLERS, config=config) as rt:
        first = rt.node.owner
        assert first is not None
        other = await backend.register_node("b", "b1", 3600.0, "elsewhere", 7)
        backend.lose = 1
        fence(backend, first, other.owner)
        await wait_until(lambda: backend.lose == 0, 5)
        lost_at = trio.current_time()
        (ghost,) = [n for n in await backend.list_nodes() if n.node_id == "a" and n.owner != first]
        await wait_until(lambda: rt.node.healthy and rt.node.owner not in (first, ghost.owner))
        assert trio.current_time() - lost_at < 1.0  # its lease (3 s) was not waited out
        assert not await backend.node_alive(ghost.owner)
        assert await backend.node_alive(rt.node.owner or "")


async def test_sqlite_registers_its_node_without_renewing_and_takes_over_earlier_ones(
    tmp_path: Path,
) -> None:
    """One process owns a SQLite file: its node row is written at start (lease ending at
    once: nothing is renewed, an idle runtime stays idle), earlier incarnations are marked
    taken over, and a graceful shutdown marks it left."""
    db = tmp_path / "one.db"
    async with open_runtime(db, config=RuntimeConfig(node_id="solo")) as rt:
        first = rt.node.owner
        assert rt.node.healthy
    async with open_runtime(db, config=RuntimeConfig(node_id="solo")) as rt:
        nodes = await rt.node.store.list_nodes()
        assert [(n.owner, n.state) for n in nodes] == [
            (first, "left"),
            (rt.node.owner, "alive"),
        ]
        assert nodes[1].lease_expires_at == nodes[1].renewed_at  # a lease ending at once
        await trio.sleep(0.5)
        assert await rt.node.store.list_nodes() == nodes  # never renewed


async def test_jobspine_nodes_lists_the_nodes_of_a_database(pg_url: str) -> None:
    config = RuntimeConfig(node_id="lister", lease_ttl=2, lease_renew_interval=0.2)
    async with open_runtime(pg_url, config=config) as rt:
        table = await trio.run_process(
            [*COMMAND, "nodes", "--store", pg_url], capture_stdout=True, capture_stderr=True
        )
        lines = table.stdout.decode().splitlines()
        assert lines[0].split()[:4] == ["NODE", "HOST", "PID", "STATE"]
        assert lines[1].split()[0] == "lister" and " alive " in lines[1]
        shown = await trio.run_process(
            [*COMMAND, "nodes", "--store", pg_url, "--json"], capture_stdout=True
        )
        (node,) = orjson.loads(shown.stdout)
        assert (node["node_id"], node["owner"], node["state"]) == ("lister", rt.node.owner, "alive")
        assert 0 <= node["lease_age"] < 2 and node["running"] == 0


# -- two runtimes on one PostgreSQL database (real time) ----------------------------------------


async def work(ctx: JobContext, input: Any) -> Any:
    """Works until stopped, checkpointing every 0.1 s when asked to."""
    step = 0
    while True:
        if input.get("checkpoint"):
            step += 1
            await ctx.checkpoint({"step": step})
        if ctx.stopping:
            raise JobStopped
        await trio.sleep(0.1)


PG_HANDLERS = {"work": work, "again": work}
PG_FAST = RuntimeConfig(
    lease_ttl=1.0,
    lease_renew_interval=0.2,
    heartbeat_timeout=3600,
    stop_grace=1.0,
    kinds={"again": KindOptions(requeue_stalled=True)},
)


async def test_a_node_that_stops_renewing_is_taken_over_by_another_on_postgresql(
    pg_url: str,
) -> None:
    """Node a runs three jobs; its renewals stop reaching the database. It drops them when its
    lease lapses, writing nothing; node b takes its incarnation over once, within the lease
    plus one second of a's last renewal (by the database's clock): checkpointed → paused, a
    kind that re-queues → run again by b, none → failed. a's later incarnation is a new
    owner, and every event after the takeover is of b's attempts."""
    async with open_runtime(
        pg_url, handlers=PG_HANDLERS, config=attrs.evolve(PG_FAST, node_id="a")
    ) as a:
        jobs = {
            "paused": await a.create_job("work", "alice", {"checkpoint": True}),
            "requeued": await a.create_job("again", "alice", {"checkpoint": True}),
            "failed": await a.create_job("work", "alice", {}),
        }
        first = a.node.owner
        assert first is not None

        async def all_on_a() -> bool:
            found = [await a.get_job(j.id) for j in jobs.values()]
            return all(j.state is JobState.RUNNING and j.owner == first for j in found) and all(
                j.checkpoint_version > 0 for j in found[:2]
            )

        await wait_until(all_on_a)
        async with open_runtime(
            pg_url, handlers=PG_HANDLERS, config=attrs.evolve(PG_FAST, node_id="b")
        ) as b:
            # a's node calls stop reaching the database (a partition) until ``back`` is set.
            store, back = a.node.store, trio.Event()
            real_renew, real_register = store.renew_node, store.register_node

            async def renew(lease: NodeLease, ttl: float, running: int) -> NodeLease:
                await back.wait()
                return await real_renew(lease, ttl, running)

            async def register(*args: Any, **kwargs: Any) -> NodeLease:
                await back.wait()
                return await real_register(*args, **kwargs)

            store.renew_node = renew  # type: ignore[method-assign]
            store.register_node = register  # type: ignore[method-assign]

            async def failed() -> bool:
                return (await b.get_job(jobs["failed"].id)).state is JobState.FAILED

            await wait_until(failed)
            assert a.node.fenced == 1
            by = b.node.owner
            (old,) = [n for n in await b.store_actor.backend.list_nodes() if n.owner == first]
            assert (old.state, old.taken_over_by) == ("dead", by)
            for name, job in jobs.items():
                events = await b.read_events(job.id)
                ends = [e for e in events if e.type in (EventType.RECOVERY, EventType.FAILED)]
                assert len(ends) == 1, (name, ends)  # exactly once
                end = ends[0]
                assert (end.data["taken_over_from"], end.data["taken_over_by"]) == (first, by)
                # a wrote nothing more: whatever follows is a new attempt, b's.
                later = [e for e in events if e.seq > end.seq]
                if later:
                    assert later[0].type is EventType.STARTED and later[0].data["owner"] == by
                # Within the lease plus one second of a's last renewal (the database's
                # clock; one more second of slack for a loaded machine's scheduling).
                assert end.at - old.renewed_at <= PG_FAST.lease_ttl + 1.0 + 1.0
            assert (await b.get_job(jobs["paused"].id)).state is JobState.PAUSED

            async def requeued_on_b() -> bool:
                job = await b.get_job(jobs["requeued"].id)
                return job.state is JobState.RUNNING and job.owner == by

            await wait_until(requeued_on_b)
            back.set()  # a reaches the database again: a new incarnation
            await wait_until(lambda: a.node.healthy)
            assert a.node.owner not in (None, first)
            # a tells of the jobs it abandoned what the database holds (b's takeover), not
            # what a last wrote: it showed them running on its old incarnation, refused to
            # resume the paused one ("it is running already") and sent pauses and cancels
            # to that incarnation, failing each after 11 s, for as long as a ran.
            assert (await a.get_job(jobs["failed"].id)).state is JobState.FAILED
            paused = await a.get_job(jobs["paused"].id)
            assert (paused.state, paused.owner) == (JobState.PAUSED, None)
            assert (await a.resume(jobs["paused"].id)).state in (
                JobState.CREATED,
                JobState.RUNNING,
            )
            cancelled = await a.cancel(jobs["requeued"].id)
            assert cancelled.state is JobState.CANCELLED


async def test_a_node_leaving_hands_its_jobs_to_the_other_at_once_on_postgresql(
    pg_url: str,
) -> None:
    """a shuts down gracefully: its running job checkpoints within the grace, goes back to
    the queue (not paused) and b claims it at once, resuming from the checkpoint; a's node
    row says ``left``."""
    ready, leave, gone = trio.Event(), trio.Event(), trio.Event()
    found: dict[str, Any] = {}

    async def node_a() -> None:
        config = attrs.evolve(PG_FAST, node_id="a")
        async with open_runtime(pg_url, handlers=PG_HANDLERS, config=config) as a:
            job = await a.create_job("work", "alice", {"checkpoint": True})
            found.update(job=job, owner=a.node.owner)

            async def on_a() -> bool:
                stored = await a.get_job(job.id)
                return stored.owner == a.node.owner and stored.checkpoint_version > 0

            await wait_until(on_a)
            ready.set()
            await leave.wait()
        gone.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(node_a)
        await ready.wait()
        config = attrs.evolve(PG_FAST, node_id="b")
        async with open_runtime(pg_url, handlers=PG_HANDLERS, config=config) as b:
            job, a_owner = found["job"], found["owner"]
            leave.set()  # a leaves; b stays
            await gone.wait()
            left = trio.current_time()

            async def on_b() -> bool:
                stored = await b.get_job(job.id)
                return stored.state is JobState.RUNNING and stored.owner == b.node.owner

            await wait_until(on_b, timeout=10)
            assert trio.current_time() - left < PG_FAST.lease_ttl + 1.0  # not a takeover
            events = await b.read_events(job.id)
            handed = [e for e in events if e.type is EventType.RECOVERY]
            assert len(handed) == 1 and handed[0].data["requeued"] is True
            assert handed[0].data["reason"] == "shutdown"
            assert not [e for e in events if e.type is EventType.PAUSED]
            restarted = [e for e in events if e.type is EventType.STARTED][-1]
            assert restarted.data["owner"] == b.node.owner
            assert restarted.data["resumed_from_checkpoint"] == handed[0].data["checkpoint_version"]
            (row,) = [n for n in await b.store_actor.backend.list_nodes() if n.owner == a_owner]
            assert row.state == "left"
            assert b.node.takeovers == 0


async def test_jobspine_nodes_reads_a_sqlite_file_its_server_holds(tmp_path: Path) -> None:
    """A SQLite file's node holds the file's lock instead of a lease: it shows no lease (an
    old one would read as a dead node's; its lease metric is NaN, not an age that grows for
    ever) and counts the jobs it runs now (its row, never renewed, said 0)."""
    db = tmp_path / "served.db"
    async with open_runtime(
        db, handlers={"hang": hang}, config=RuntimeConfig(node_id="solo")
    ) as rt:
        job = await rt.create_job("hang", "alice", {})
        await wait_for_state(rt, job.id, {JobState.RUNNING})
        shown = await trio.run_process(
            [*COMMAND, "nodes", "--db", str(db), "--json"], capture_stdout=True
        )
        (node,) = orjson.loads(shown.stdout)
        # One process's file: never renewed, alive as recorded.
        assert (node["owner"], node["state"]) == (rt.node.owner, "alive")
        assert (node["lease_age"], node["lease_expires_in"], node["running"]) == (None, None, 1)
        assert rt.node.lease_age() is None
        table = await trio.run_process([*COMMAND, "nodes", "--db", str(db)], capture_stdout=True)
        assert " alive  - (file lock)  1 " in table.stdout.decode()
    missing = await trio.run_process(
        [*COMMAND, "nodes", "--db", str(tmp_path / "none.db")], capture_stderr=True, check=False
    )
    assert missing.returncode == 9 and b"no such file" in missing.stderr


class DownShared(SharedMemory):
    """A shared in-memory database that, while ``down``, refuses every call the nodes and the
    store make as a database that is gone does (:class:`StoreUnavailableError`: an outage)."""

    down = False

    def _check(self) -> None:
        if self.down:
            raise StoreUnavailableError("connection refused")

    async def renew_node(self, lease: NodeLease, ttl: float, running: int) -> NodeLease:
        self._check()
        return await super().renew_node(lease, ttl, running)

    async def register_node(self, *args: Any, **kwargs: Any) -> NodeLease:
        self._check()
        return await super().register_node(*args, **kwargs)

    async def expired_nodes(self) -> Any:
        self._check()
        return await super().expired_nodes()

    async def orphaned_owners(self) -> Any:
        self._check()
        return await super().orphaned_owners()

    async def count_by_state(self, *args: Any, **kwargs: Any) -> Any:
        self._check()
        return await super().count_by_state(*args, **kwargs)

    async def renew_leases(self, *args: Any, **kwargs: Any) -> Any:
        self._check()
        return await super().renew_leases(*args, **kwargs)

    async def claim(self, *args: Any, **kwargs: Any) -> Any:
        self._check()
        return await super().claim(*args, **kwargs)

    async def commit(self, *args: Any, **kwargs: Any) -> Any:
        self._check()
        return await super().commit(*args, **kwargs)

    async def ping(self) -> None:
        self._check()


async def test_a_long_outage_is_logged_once_per_cause_not_at_every_retry(
    autojump_clock: trio.abc.Clock,
    clear_abandoned: Callable[[], list[str]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A database down for ten minutes fails every renewal, registration and scan of a node,
    each interval: each was logged as a warning every time (a PostgreSQL server stopped for
    20 s gave about 50 lines per node, ten minutes thousands). Each is a warning once per
    cause; once the database is back and the node registered, the next outage is told
    again."""
    caplog.set_level(logging.DEBUG, logger="jobspine")
    backend = DownShared()
    config = attrs.evolve(FAST, node_id="a")
    async with open_runtime(backend=backend, handlers=HANDLERS, config=config) as rt:
        await rt.create_job("hang", "alice", {"checkpoint": True})
        await wait_until(lambda: rt.supervisor.workers, 5)

        def warnings() -> list[str]:
            return [
                r.getMessage()
                for r in caplog.records
                if r.levelno >= logging.WARNING
                and r.name in ("jobspine.nodes", "jobspine.dispatcher")
            ]

        for fenced in (1, 2):
            caplog.clear()
            backend.down = True
            await wait_until(lambda f=fenced: rt.node.fenced == f, 5)  # type: ignore[misc]
            await trio.sleep(600)
            told = warnings()
            assert len(told) == len(set(told)), told  # no line twice
            # Once each: the node's and the jobs' lease renewals, the dead-node and orphan
            # scans, the count of jobs, the fence, the registration.
            assert len(told) <= 7, told
            assert any("registration failed" in line for line in told), told
            # The retries went on, said at debug level.
            retried = [r for r in caplog.records if "registration failed" in r.getMessage()]
            assert len(retried) > 100
            backend.down = False
            await wait_until(lambda: rt.node.healthy, 5)
