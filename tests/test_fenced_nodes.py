"""What a node that lost its lease does with what it held (issue 11, review findings F2, F3).

A control (pause, cancel, recovery) is addressed to one attempt held by one incarnation: a
node applies it only while the job still runs that attempt under its own incarnation and
its lease is valid. Controls reach every process listening on the node id's channel, late
too (a node frozen past its lease gets them queued when it runs again): each test sends one
that must not be applied, as ``pg_notify`` would deliver it, and checks that the job's newer
attempt (or the state its takeover left) stands. And a fenced node whose node id another live
process holds by then stops with ``node_replaced`` (``jobspine serve``: exit status 7) rather
than run on half alive, retrying its registration forever.

Real PostgreSQL in real time with short leases (the runtime's threads are involved); real
``jobspine serve`` processes (SIGSTOP, SIGCONT) for the frozen node. The node actor's side
of a replaced node, under the mock clock, is in ``test_nodes.py``."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest
import trio

from actors import (
    EventType,
    JobContext,
    JobState,
    JobStopped,
    NodeIdInUseError,
    PostgresBackend,
    Runtime,
    RuntimeConfig,
    kind_options,
    node_of,
    open_runtime,
)
from actors._pg_notify import node_channel
from bench.cluster import cluster_supported
from transport import ClientError, open_client

from .cluster import cluster_of, create_jobs, owner_node, read_events, read_jobs, token
from .test_cli import serve_process
from .test_nodes import wait_until

#: Set when attempt ``(job id, attempt)`` has checkpointed and runs.
STARTED: dict[tuple[str, int], trio.Event] = {}


@kind_options(requeue_stalled=True)
async def held(ctx: JobContext, input: Any) -> Any:
    """Checkpoints, then runs until asked to stop (a takeover re-queues it at that
    checkpoint; a pause checkpoints again within the grace)."""
    await ctx.checkpoint({"attempt": ctx.attempt})
    STARTED.setdefault((ctx.job_id, ctx.attempt), trio.Event()).set()
    await ctx.wait_stopping()
    await ctx.checkpoint({"stopped": ctx.attempt})
    raise JobStopped


def notify(url: str, node_id: str, control: dict[str, Any]) -> None:
    """Deliver ``control`` to the processes of ``node_id`` as another node sends it."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "SELECT pg_notify(%s, %s)", (node_channel(node_id), orjson.dumps(control).decode())
        )


def addressed(op: str, job_id: str, attempt: int, owner: str) -> dict[str, Any]:
    """A control's payload as a node sends it (``Control.encode``)."""
    return {
        "op": op,
        "job_id": job_id,
        "attempt": attempt,
        "owner": owner,
        "by": "bob",
        "reason": "user",
    }


@asynccontextmanager
async def pg_node(pg_url: str, **config: Any) -> AsyncIterator[Runtime]:
    settings = RuntimeConfig(node_id="node-a", stop_grace=1.0, heartbeat_timeout=3600, **config)
    async with open_runtime(
        backend=PostgresBackend(pg_url), handlers={"held": held}, config=settings
    ) as rt:
        yield rt


async def started(rt: Runtime, job_id: str, attempt: int) -> None:
    with trio.fail_after(20):
        await STARTED.setdefault((job_id, attempt), trio.Event()).wait()
    job = await rt.get_job(job_id)
    assert (job.state, job.attempt) == (JobState.RUNNING, attempt)


async def dropped_or_applied(
    rt: Runtime, job_id: str, caplog: pytest.LogCaptureFixture, attempt: int
) -> None:
    """Wait until this node has dropped the control of ``job_id`` or the job has left
    ``attempt`` (the control applied to it: the fault)."""

    async def done() -> bool:
        if any("dropped" in r.getMessage() and job_id in r.getMessage() for r in caplog.records):
            return True
        job = await rt.get_job(job_id)
        return job.state is not JobState.RUNNING or job.attempt != attempt

    await wait_until(done, 10)


async def test_a_control_of_an_attempt_that_ended_is_not_applied_to_the_next(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A cancel addressed to attempt 1 arrives once the job runs attempt 2 on the same
    node (paused and resumed meanwhile): dropped; attempt 2 runs on, nothing written."""
    async with pg_node(pg_url) as a:
        job = await a.create_job("held", "alice", {})
        await started(a, job.id, 1)
        first = await a.get_job(job.id)
        assert (await a.pause(job.id)).state is JobState.PAUSED
        await a.resume(job.id)
        await started(a, job.id, 2)
        before = await a.read_events(job.id)
        with caplog.at_level(logging.INFO, logger="jobspine.notify"):
            await trio.to_thread.run_sync(
                notify, pg_url, "node-a", addressed("cancel", job.id, 1, first.owner or "")
            )
            await dropped_or_applied(a, job.id, caplog, 2)
        now = await a.get_job(job.id)
        assert (now.state, now.attempt, now.owner) == (JobState.RUNNING, 2, first.owner)
        assert await a.read_events(job.id) == before
        assert "attempt 1 ended" in caplog.text


async def test_a_control_of_a_fenced_incarnation_is_not_applied_to_the_jobs_next_attempt(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The node's incarnation is taken from it (its row marked dead, as when it was frozen
    past its lease): it abandons its job and registers again; the job is re-queued at its
    checkpoint and its attempt 2 runs under the new incarnation. A cancel addressed to
    attempt 1 of the old incarnation, delivered late (queued while it was frozen), is
    dropped: the node no longer is that incarnation, nor the job at that attempt."""
    async with pg_node(pg_url, lease_ttl=2.0, lease_renew_interval=0.25) as a:
        job = await a.create_job("held", "alice", {})
        await started(a, job.id, 1)
        first = await a.get_job(job.id)
        assert first.owner is not None and first.owner == a.node.owner
        node_id, incarnation = node_of(first.owner)
        with psycopg.connect(pg_url, autocommit=True) as conn:
            # Taken over by a node that died before recovering it: the job is recovered by
            # the next orphan sweep (of this very node, registered again by then).
            conn.execute(
                "UPDATE nodes SET state = 'dead', taken_over_by = NULL"
                " WHERE node_id = %s AND incarnation = %s",
                (node_id, incarnation),
            )
        await wait_until(lambda: a.node.healthy and a.node.owner != first.owner, 10)
        await started(a, job.id, 2)
        second = await a.get_job(job.id)
        assert second.owner == a.node.owner
        before = await a.read_events(job.id)
        with caplog.at_level(logging.INFO, logger="jobspine.notify"):
            await trio.to_thread.run_sync(
                notify, pg_url, "node-a", addressed("cancel", job.id, 1, first.owner)
            )
            await dropped_or_applied(a, job.id, caplog, 2)
        now = await a.get_job(job.id)
        assert (now.state, now.attempt, now.owner) == (JobState.RUNNING, 2, second.owner)
        assert await a.read_events(job.id) == before
        assert f"addressed to {first.owner}, this node is {second.owner}" in caplog.text


# -- real processes ---------------------------------------------------------------------------


async def test_serve_stops_with_status_7_when_a_newer_process_took_its_node_id(
    pg_url: str, tmp_path: Path
) -> None:
    """``jobspine serve --node-id a`` is frozen (SIGSTOP) past its lease; another process
    registers as ``a`` (allowed: the lease expired); the old one, continued, exits with status
    7 and one line naming the process that holds its id."""
    lease = ("--lease-ttl", "1", "--lease-renew-interval", "0.25")
    async with serve_process(
        tmp_path / "data", extra=("--store", pg_url, "--node-id", "a", *lease)
    ) as served:
        served.process.send_signal(signal.SIGSTOP)
        backend, host = PostgresBackend(pg_url), socket.gethostname()
        async with backend.opened():
            with trio.fail_after(20):
                while True:
                    try:
                        await backend.register_node("a", "newer", 60.0, host, os.getpid())
                        break
                    except NodeIdInUseError:
                        await trio.sleep(0.1)  # the frozen one's lease has not expired yet
            served.process.send_signal(signal.SIGCONT)
            with trio.fail_after(15):
                status = await served.process.wait()
        log = (tmp_path / "data" / "serve.log").read_text()
    assert status == 7, log[-2000:]
    errors = [line for line in log.splitlines() if line.startswith("jobspine: error:")]
    assert len(errors) == 1, log[-2000:]
    assert f"node id 'a' is now held by process {os.getpid()} on" in errors[0]
    assert "registration failed (retried)" not in log


@pytest.mark.slow
async def test_a_node_frozen_past_its_lease_applies_no_control_queued_for_it(
    tmp_path: Path,
) -> None:
    """The reviewer's scenario: n1 runs jobs and is frozen (SIGSTOP); a client cancels and
    pauses them through n0, which sends the controls to n1 (queued: n1 does not run); n0 takes
    n1 over (re-queued jobs run their attempt 2 on n0, a checkpointed one is paused). n1 gets
    SIGCONT and its queued controls: it applies none (its lease lapsed, its attempts ended),
    so no ``cancelled`` or ``paused`` is written onto the attempts n0 runs, nor onto the job
    the takeover paused."""
    if not cluster_supported():
        pytest.skip("no cluster")
    ttl = 3.0
    async with cluster_of(tmp_path, 2, lease_ttl=ttl) as cluster:
        slow = {"n": 600, "delay": 0.1}
        specs = [("alice", "requeued", slow), ("alice", "requeued", slow), ("alice", "steps", slow)]
        # Through n1: a create starts on the node that received it when it has a free slot.
        jobs = [j["id"] for j in await create_jobs(cluster, specs, on=["n1"])]

        def rows() -> dict[str, dict[str, Any]]:
            return read_jobs(cluster.store)

        async def all_on_n1() -> bool:
            found = await trio.to_thread.run_sync(rows)
            return all(
                found[j]["state"] == "running"
                and owner_node(found[j]["owner"]) == "n1"
                and found[j]["checkpoint_version"] > 0
                for j in jobs
            )

        await wait_until(all_on_n1, 30)
        cluster.signal("n1", signal.SIGSTOP)
        frozen_at = time.time()

        async def control(op: str, job_id: str) -> None:
            async with open_client(cluster.url("n0"), token("alice")) as client:
                # What the reply says is the asker's business, not this test's.
                with contextlib.suppress(ClientError):
                    await client.request(op, job_id=job_id)

        async with trio.open_nursery() as nursery:
            for op, job_id in zip(("cancel", "pause", "cancel"), jobs, strict=True):
                nursery.start_soon(control, op, job_id)
            # Sent (queued for n1), then the askers leave: had they waited, n0 would apply
            # each control to the job as the takeover leaves it. Only n1's queued copies are
            # left, for attempts that will have ended.
            await trio.sleep(1.0)
            nursery.cancel_scope.cancel()

        async def taken_over() -> bool:
            found = await trio.to_thread.run_sync(rows)
            return found[jobs[2]]["state"] == "paused" and all(
                found[j]["state"] == "running" and owner_node(found[j]["owner"]) == "n0"
                for j in jobs[:2]
            )

        await wait_until(taken_over, 30)
        cluster.signal("n1", signal.SIGCONT)

        def alive_n1() -> bool:
            with psycopg.connect(cluster.store) as conn:
                return bool(
                    conn.execute(
                        "SELECT 1 FROM nodes WHERE node_id = 'n1' AND state = 'alive'"
                        " AND started_at > %s",
                        (frozen_at,),
                    ).fetchone()
                )

        # n1 runs again: it got its queued controls and registered again.
        await wait_until(lambda: trio.to_thread.run_sync(alive_n1), 30)
        await trio.sleep(2)
        found = await trio.to_thread.run_sync(rows)
        events = await trio.to_thread.run_sync(read_events, cluster.store)
    after = {
        j: [e["type"] for e in events if e["job_id"] == j and e["at"] >= frozen_at] for j in jobs
    }
    for job_id in jobs[:2]:
        assert found[job_id]["state"] == "running", (found[job_id]["state"], after[job_id])
        assert owner_node(found[job_id]["owner"]) == "n0"
        assert found[job_id]["attempt"] == 2
    assert found[jobs[2]]["state"] == "paused" and found[jobs[2]]["pause_reason"] == "recovery"
    for job_id in jobs:
        assert EventType.CANCELLED.value not in after[job_id], after[job_id]
        assert EventType.PAUSED.value not in after[job_id], after[job_id]
