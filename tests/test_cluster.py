"""Three real nodes on one PostgreSQL database and one Redis (issue 11), under faults: a kill
loop, a node stopped past its lease, Redis and PostgreSQL outages, a graceful shutdown.

Every node is a ``jobspine serve`` process (:mod:`bench.cluster`); the invariants are read
from the durable log (:func:`tests.cluster.check_log`) and from what each client received.
The kill loop is brief by default; ``JOBSPINE_CLUSTER_CYCLES=50`` for long. With one node
(``nodes=1``) the same loop runs on today's single-owner PostgreSQL store; the multi-node
cases need ``serve --node-id/--redis`` and are skipped, saying so, on a tree without them.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest
import trio

from bench.cluster import Cluster, cluster_supported

from .cluster import (
    USERS,
    caught_up,
    check_deliveries,
    check_log,
    cluster_of,
    create_jobs,
    cycles,
    merged_acks,
    move_off,
    node_pg_backends,
    owner_node,
    read_events,
    read_jobs,
    resume_paused,
    settle,
    start_followers,
    terminate_backends,
)

needs_cluster = pytest.mark.skipif(
    not cluster_supported(), reason="jobspine serve has no --node-id/--redis (issue 11 not merged)"
)


def mixed_load(jobs: int, n: int = 20, delay: float = 0.05) -> list[tuple[str, str, Any]]:
    """Checkpointing, requeued, plain and flaky jobs, spread over the users."""
    kinds = ["steps", "requeued", "plain", "steps", "flaky"]
    specs = []
    for i in range(jobs):
        kind = kinds[i % len(kinds)]
        input = {"steps": 10} if kind == "flaky" else {"n": n, "delay": delay}
        specs.append((USERS[i % len(USERS)], kind, input))
    return specs


def owned_by(cluster: Cluster, node: str) -> dict[str, dict[str, Any]]:
    """The jobs running under a claim of ``node`` now."""
    return {
        job_id: job
        for job_id, job in read_jobs(cluster.store).items()
        if job["state"] == "running" and job.get("owner") and owner_node(job["owner"]) == node
    }


def left_running(events: list[dict[str, Any]], job_id: str, since: float) -> dict[str, Any]:
    """The first event of ``job_id`` written after ``since`` (wall clock) that left the
    running state: a takeover or hand-back (events of the run in flight are running)."""
    return next(
        e for e in events if e["job_id"] == job_id and e["at"] >= since and e["state"] != "running"
    )


async def wait_owning(cluster: Cluster, node: str, at_least: int, seconds: float = 30) -> None:
    with trio.fail_after(seconds):
        while len(await trio.to_thread.run_sync(owned_by, cluster, node)) < at_least:  # noqa: ASYNC110
            await trio.sleep(0.1)


def nodes_listing(cluster: Cluster) -> list[dict[str, Any]]:
    """``jobspine nodes --store URL --json``: one object per node incarnation (``node_id``,
    ``state``...)."""
    result = subprocess.run(
        [sys.executable, "-m", "transport._cli", "nodes", "--store", cluster.store, "--json"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    listing: list[dict[str, Any]] = orjson.loads(result.stdout)
    return listing


@pytest.mark.slow
@pytest.mark.parametrize(
    "nodes", [1, pytest.param(3, marks=needs_cluster)], ids=["one-node", "three-nodes"]
)
async def test_kill_loop(tmp_path: Path, nodes: int) -> None:
    """A random node is SIGKILLed under load again and again, and restarted (after a pause
    shorter or longer than the lease, so sometimes it recovers its own jobs at its start,
    sometimes the others have taken them over by then); clients on it move to another node
    with their cursors. Nothing lost, nothing run twice at once, every event delivered once."""
    rng = random.Random(11)
    ttl = 3.0
    async with cluster_of(tmp_path, nodes, lease_ttl=ttl) as cluster, trio.open_nursery() as n:
        followers = await start_followers(n, cluster)
        specs = mixed_load(240 if nodes > 1 else 120)
        created = {job["id"] for job in await create_jobs(cluster, specs)}
        kills = 0
        for _ in range(cycles(3)):
            await trio.sleep(rng.uniform(0.5, 1.5))
            victim = rng.choice(sorted(node.name for node in cluster.alive()))
            if nodes > 1:
                move_off(cluster, followers, victim)
            await cluster.kill(victim)
            kills += 1
            check_log(cluster.store, created, merged_acks(followers))
            await trio.sleep(rng.uniform(0.2, 1.5 * ttl))
            await cluster.start(victim)
            await resume_paused(cluster)
        await settle(cluster, created)
        summary = check_log(cluster.store, created, merged_acks(followers), settled=True)
        await caught_up(followers, summary.heads)
        n.cancel_scope.cancel()
    check_deliveries(followers, summary.heads)
    assert summary.retries > 0  # flaky's retries waited in the queue and were claimed again
    assert summary.recoveries > 0  # the kills left running jobs that were recovered
    if nodes > 1:
        # Jobs ran on every node, and some job's attempts ran on two different nodes.
        ran_on = {owner_node(o) for owners in summary.owners.values() for o in owners}
        assert ran_on == set(cluster.nodes), ran_on
        assert any(len({owner_node(o) for o in owners}) > 1 for owners in summary.owners.values())
        assert summary.takeovers > 0  # a dead node's jobs were taken over (by whom: recorded)
    print(
        f"cluster kill loop: {nodes} nodes, {kills} kills, {len(created)} jobs,"
        f" {summary.events} events checked, {summary.retries} retries,"
        f" {summary.recoveries} recoveries, {summary.takeovers} takeovers,"
        f" states {dict(summary.states)}"
    )


@pytest.mark.slow
@needs_cluster
async def test_a_stopped_node_is_fenced_and_its_jobs_are_taken_over(tmp_path: Path) -> None:
    """SIGSTOP a node past its lease: the others take over its running jobs within the TTL
    plus 1 s (by the stall rule: paused at the checkpoint, re-queued, or failed without one);
    after SIGCONT it writes nothing more for them and serves again."""
    ttl = 3.0
    async with cluster_of(tmp_path, 3, lease_ttl=ttl) as cluster:
        kinds = ["steps", "requeued", "plain"]
        specs = [(USERS[i % 3], kinds[i % 3], {"n": 800, "delay": 0.05}) for i in range(24)]
        created = {job["id"] for job in await create_jobs(cluster, specs)}
        await wait_owning(cluster, "n1", 3)
        await trio.sleep(0.5)  # some checkpoints written
        cluster.signal("n1", signal.SIGSTOP)
        stopped_at = time.time()
        taken = set(await trio.to_thread.run_sync(owned_by, cluster, "n1"))
        assert taken
        with trio.fail_after(ttl + 15):
            while await trio.to_thread.run_sync(owned_by, cluster, "n1"):  # noqa: ASYNC110
                await trio.sleep(0.1)
        # Within TTL + 1 s of the stop, by the taker's own clock (the commit's timestamp):
        # the lease was renewed at most at the stop, so it expired at most TTL after it.
        # The takeover is the first event since the stop that leaves the running state.
        events = await trio.to_thread.run_sync(read_events, cluster.store)
        takeovers = {job_id: left_running(events, job_id, stopped_at) for job_id in taken}
        for job_id, event in takeovers.items():
            assert event["type"] in ("recovery", "failed"), event
            assert owner_node(event["data"]["taken_over_from"]) == "n1", event
            assert owner_node(event["data"]["taken_over_by"]) in ("n0", "n2"), event
            assert event["at"] - stopped_at <= ttl + 1, (job_id, event["at"] - stopped_at)
        jobs = await trio.to_thread.run_sync(read_jobs, cluster.store)
        before = {job_id: jobs[job_id] for job_id in taken}

        cluster.signal("n1", signal.SIGCONT)
        await trio.sleep(3 * ttl)  # it finds its lease gone and abandons the jobs
        check_log(cluster.store, created, {})
        after = await trio.to_thread.run_sync(read_jobs, cluster.store)
        events = await trio.to_thread.run_sync(read_events, cluster.store)
        for job_id, job in before.items():
            later = [e for e in events if e["job_id"] == job_id and e["seq"] > job["seq"]]
            if job["state"] in ("paused", "failed"):
                assert after[job_id] == job, job_id  # nothing written since the takeover
            else:  # re-queued: next comes another claim's start, nothing of n1's old attempt
                assert not later or later[0]["type"] == "started", (job_id, later[:1])
        # It registered again (a new incarnation) and serves: it runs jobs again, and takes
        # creates (run by whichever node has a slot first).
        assert cluster.nodes["n1"].alive and await cluster.nodes["n1"].ready()
        listing = nodes_listing(cluster)
        assert any(n["node_id"] == "n1" and n["state"] == "alive" for n in listing), listing
        old_owner = next(iter(takeovers.values()))["data"]["taken_over_from"]
        owners_now = {job["owner"] for job in after.values() if job["state"] == "running"}
        assert any(
            owner and owner_node(owner) == "n1" and owner != old_owner for owner in owners_now
        ), owners_now
        short = [("late", "steps", {"n": 2, "delay": 0.01})] * 4
        more = {job["id"] for job in await create_jobs(cluster, short, on=["n1"])}
        await settle_some(cluster, more)
        summary = check_log(cluster.store, created | more, {})
        assert all(summary.jobs[j]["state"] == "completed" for j in more)


async def settle_some(cluster: Cluster, ids: set[str], seconds: float = 60) -> None:
    """Wait until the jobs ``ids`` are not waiting or running."""
    with trio.fail_after(seconds):
        while True:
            jobs = await trio.to_thread.run_sync(read_jobs, cluster.store)
            if all(jobs[i]["state"] in ("completed", "failed", "paused") for i in ids):
                return
            await trio.sleep(0.2)


@pytest.mark.slow
@pytest.mark.parametrize(
    "nodes", [1, pytest.param(3, marks=needs_cluster)], ids=["one-node", "three-nodes"]
)
async def test_redis_and_postgres_outages_lose_nothing(tmp_path: Path, nodes: int) -> None:
    """Mid-run, Redis is killed and restarted (with a cluster) and a node's PostgreSQL
    connections are terminated: every event still reaches every client once, in order (from
    the log while Redis is away), no job is lost, and service resumes by itself."""
    async with cluster_of(tmp_path, nodes) as cluster, trio.open_nursery() as n:
        followers = await start_followers(n, cluster)
        created = {job["id"] for job in await create_jobs(cluster, mixed_load(60))}
        await trio.sleep(1)
        if cluster.redis is not None:
            await cluster.redis.kill()
            # Jobs created and events written meanwhile reach the clients from the log.
            created |= {job["id"] for job in await create_jobs(cluster, mixed_load(30))}
            await trio.sleep(1.5)
            await cluster.redis.start()
        victim = cluster.nodes["n0"]
        backends = await trio.to_thread.run_sync(node_pg_backends, cluster.store, victim.pid)
        assert backends, "the node has no PostgreSQL connection"
        await trio.to_thread.run_sync(terminate_backends, cluster.store, backends)
        created |= {job["id"] for job in await create_jobs(cluster, mixed_load(30))}
        with trio.fail_after(30):  # every node ready again, by itself
            for node in cluster.nodes.values():
                while not await node.ready():  # noqa: ASYNC110 - another process
                    await trio.sleep(0.1)
        assert all(node.alive for node in cluster.nodes.values())
        await settle(cluster, created)
        summary = check_log(cluster.store, created, merged_acks(followers), settled=True)
        await caught_up(followers, summary.heads)
        n.cancel_scope.cancel()
    check_deliveries(followers, summary.heads)
    assert summary.states["completed"] >= len(created) // 2


@pytest.mark.slow
@needs_cluster
async def test_sigterm_hands_a_nodes_jobs_to_the_others_at_once(tmp_path: Path) -> None:
    """A graceful shutdown hands its running jobs back at once (well before the lease
    would expire) and exits 0; the others pick up the re-queued ones and finish them."""
    ttl = 5.0
    async with cluster_of(tmp_path, 3, lease_ttl=ttl) as cluster:
        specs = [(USERS[i % 3], "requeued", {"n": 200, "delay": 0.05}) for i in range(24)]
        created = {job["id"] for job in await create_jobs(cluster, specs)}
        await wait_owning(cluster, "n2", 2)
        await trio.sleep(0.3)
        handed = set(await trio.to_thread.run_sync(owned_by, cluster, "n2"))
        began = time.time()
        assert await cluster.terminate("n2") == 0
        events = await trio.to_thread.run_sync(read_events, cluster.store)
        for job_id in handed:
            back = left_running(events, job_id, began)
            assert back["type"] == "recovery" and back["state"] in ("created", "paused"), back
            assert back["at"] - began < ttl / 2, back  # at the shutdown, not at the lease's end
        await resume_paused(cluster)
        await settle(cluster, created)
        summary = check_log(cluster.store, created, {}, settled=True)
        for job_id in handed:
            assert summary.jobs[job_id]["state"] == "completed", job_id
            assert owner_node(summary.owners[job_id][-1]) != "n2", job_id


def write_log(store: str, events: list[tuple[str, str, int, dict[str, Any]]]) -> None:
    """A one-job log ``(type, state, user_seq, data)`` and its row, as the store writes them."""
    with psycopg.connect(store, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS jobs (id text, record text, owner text)")
        conn.execute(
            "CREATE TABLE IF NOT EXISTS events"
            " (job_id text, user_id text, seq integer, user_seq bigint, type text, record text)"
        )
        conn.execute("DELETE FROM jobs")
        conn.execute("DELETE FROM events")
        for seq, (kind, state, user_seq, data) in enumerate(events, 1):
            record = {"type": kind, "state": state, "at": float(seq), "data": data}
            conn.execute(
                "INSERT INTO events VALUES ('j1', 'u0', %s, %s, %s, %s)",
                (seq, user_seq, kind, orjson.dumps(record).decode()),
            )
        job = {"seq": len(events), "state": events[-1][1], "checkpoint_version": 1, "error": None}
        conn.execute("INSERT INTO jobs VALUES ('j1', %s, NULL)", (orjson.dumps(job).decode(),))


GOOD: list[tuple[str, str, int, dict[str, Any]]] = [
    ("created", "created", 1, {}),
    ("started", "running", 2, {"attempt": 1, "owner": "n0#1"}),
    ("checkpoint", "running", 3, {"version": 1}),
    ("recovery", "paused", 4, {"taken_over_from": "n0#1", "taken_over_by": "n1#1"}),
    ("resumed", "created", 5, {}),
    ("started", "running", 6, {"attempt": 2, "owner": "n1#1"}),
    ("completed", "completed", 7, {}),
]


@pytest.mark.parametrize(
    ("log", "acked", "created", "found"),
    [
        (
            [*GOOD[:2], ("started", "running", 3, {"attempt": 2, "owner": "n1#1"})],
            0,
            {"j1"},
            "attempts overlap",
        ),
        ([*GOOD[:4], ("progress", "running", 5, {})], 0, {"j1"}, "written after its attempt"),
        ([*GOOD[:3], ("recovery", "paused", 5, {})], 0, {"j1"}, "user_seq gap"),
        (GOOD, 2, {"j1"}, "checkpoint lost"),
        (
            [
                *GOOD[:3],
                ("recovery", "paused", 4, {"taken_over_from": "n2#1", "taken_over_by": "n1#1"}),
            ],
            0,
            {"j1"},
            "taken from another owner",
        ),
        (
            [
                *GOOD[:4],
                ("recovery", "paused", 5, {"taken_over_from": "n0#1", "taken_over_by": "n2#1"}),
            ],
            0,
            {"j1"},
            "taken over twice",
        ),
        (GOOD, 0, {"j1", "j2"}, "jobs lost"),
        (
            [*GOOD[:5], ("started", "running", 6, {"attempt": 3, "owner": "n1#1"})],
            0,
            {"j1"},
            "attempts",
        ),
    ],
)
async def test_the_invariants_catch_what_they_name(
    pg_url: str,
    log: list[tuple[str, str, int, dict[str, Any]]],
    acked: int,
    created: set[str],
    found: str,
) -> None:
    """The checker the cluster tests rely on fails on each violation (and passes a good log:
    two attempts on two nodes, a takeover between them)."""
    await trio.to_thread.run_sync(write_log, pg_url, GOOD)
    summary = check_log(pg_url, {"j1"}, {"j1": 1}, settled=True)
    assert summary.owners == {"j1": ["n0#1", "n1#1"]}
    assert (summary.recoveries, summary.takeovers) == (1, 1)
    await trio.to_thread.run_sync(write_log, pg_url, log)
    with pytest.raises(AssertionError, match=found):
        check_log(pg_url, created, {"j1": acked})
