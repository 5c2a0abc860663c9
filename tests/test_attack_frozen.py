"""Attacks on "a frozen node never holds up the cluster" (commit 08fb0e6).

A frozen node is simulated as the feature's own tests do: a session of its own in the middle
of a pipelined transaction (``BEGIN`` and a locking statement sent, no Sync: the session stays
*active*, so ``idle_in_transaction_session_timeout`` never ends it), named as a node's
incarnation (``application_name``)."""

from __future__ import annotations

import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio
from psycopg import sql

from actors import (
    ClaimLimits,
    ClaimRequest,
    JobContext,
    JobState,
    PostgresBackend,
    RuntimeConfig,
    open_runtime,
)
from actors._ids import new_id
from actors._ops import create
from actors._options import CreateOptions
from actors._postgres import application_name

from .conftest import PG_PREFIX, PG_SERVER, _pg_numbers, drop_pg_database, pg_admin
from .test_nodes import owned, wait_until


async def work(ctx: JobContext, input: Any) -> Any:
    await trio.sleep_forever()


HANDLERS = {"work": work}
TTL = 2.0
CONFIG = RuntimeConfig(
    node_id="t", lease_ttl=TTL, lease_renew_interval=0.25, heartbeat_timeout=3600
)


def freeze(url: str, incarnation: str, job_id: str) -> psycopg.Connection[Any]:
    """A session of node ``incarnation`` frozen mid-pipeline while it writes ``job_id``: the
    job's row stays locked (state 'active', no idle timeout) until the session ends."""
    conn = psycopg.connect(url, autocommit=True, application_name=application_name(incarnation))
    pgconn = conn.pgconn
    pgconn.enter_pipeline_mode()
    pgconn.send_query_params(b"BEGIN", None)
    pgconn.send_query_params(b"SELECT 1 FROM jobs WHERE id = $1 FOR UPDATE", [job_id.encode()])
    pgconn.flush()
    return conn


async def claimed_job(backend: PostgresBackend, owner: str) -> str:
    """A waiting job of a kind the runtime under test does not run, claimed by ``owner``."""
    job, _ = create(new_id(), "bob", "elsewhere", {}, time.time(), CreateOptions())
    await backend.commit([job], [], (), {})
    now = time.time()
    (claimed,) = (
        await backend.claim(ClaimRequest(owner, now, now + 60, ClaimLimits(max_running=1)))
    ).jobs
    assert claimed.id == job.id and claimed.owner == owner
    return job.id


async def test_a_takeover_waiting_on_a_frozen_live_nodes_row_lock_never_costs_the_taker_its_lease(
    pg_url: str,
) -> None:
    """Invariant: a takeover never delays the taker's own lease renewals ("leases are renewed
    on a connection of their own, so that a commit waiting on a lock never delays a
    renewal"), so a frozen node can never make a healthy node lose its lease and its jobs.

    Three nodes: d dies (its claimed job J waiting), n freezes in the middle of a pipelined
    commit that writes J (a cancel/update of J through n, say), t is healthy and runs a job.
    t takes d over: the takeover's ``UPDATE jobs ... WHERE owner = d AND state = 'created'``
    waits on n's row lock. n's lease has not expired yet when t takes d over, so its sessions
    are (rightly) not ended. But the takeover runs on the "nodes" connection under the lane's
    lock, which the renewals need too: t stops renewing, its lease lapses, it abandons its own
    running job, and it cannot even register again (the lane is still held) for as long as n
    stays frozen; t's scan loop is stuck in d's takeover, so it never takes n over either."""
    async with open_runtime(pg_url, handlers=HANDLERS, config=CONFIG) as t:
        mine = await t.create_job("work", "alice", {})
        first = t.node.owner

        async def running() -> bool:
            return (await t.get_job(mine.id)).state is JobState.RUNNING

        await wait_until(running, 10)
        aux = PostgresBackend(pg_url)
        async with aux.opened():
            dead = await aux.register_node("d", new_id(), 1.0, "elsewhere", 1)
            job_id = await claimed_job(aux, dead.owner)
            # n froze just after its last renewal: its lease expires a second after d's.
            frozen = await aux.register_node("n", new_id(), TTL, "elsewhere", 2)
            conn = await trio.to_thread.run_sync(freeze, pg_url, frozen.incarnation, job_id)
            try:
                await trio.sleep(1.0 + 3 * TTL)  # d taken over by t, n frozen all along
                fenced, healthy = t.node.fenced, t.node.healthy
                job = await t.get_job(mine.id)
            finally:
                conn.close()  # n's session ends: its lock goes
    assert (fenced, healthy) == (0, True), "t lost its lease to a frozen node's row lock"
    assert (job.state, job.owner) == (JobState.RUNNING, first)


@pytest.fixture
def weak_role_url() -> Iterator[tuple[str, str]]:
    """A database owned by a role that may not end other roles' sessions (no superuser, no
    ``pg_signal_backend``): ``(its URL as that role, its URL as the superuser)``."""
    role = "jobspine_attack_weak"
    name = f"{PG_PREFIX}{next(_pg_numbers)}"
    with pg_admin() as admin:
        if not admin.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone():
            admin.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
        admin.execute(
            sql.SQL("CREATE DATABASE {} OWNER {}").format(
                sql.Identifier(name), sql.Identifier(role)
            )
        )
    host = PG_SERVER.split("@", 1)[1]
    try:
        yield f"postgresql://{role}@{host}/{name}", f"{PG_SERVER}/{name}"
    finally:
        drop_pg_database(name)
        with pg_admin() as admin:
            admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


async def test_a_taker_that_may_not_end_a_frozen_nodes_sessions_keeps_its_own_lease(
    weak_role_url: tuple[str, str],
) -> None:
    """Invariant (README: without the privilege "its row locks are released when it runs
    again"): a taker whose role may not end the frozen node's sessions only waits for those
    locks; it never loses its own lease, nor its own jobs, to them.

    d (the superuser's role) freezes mid-pipeline while it starts its claimed job J; t runs as
    a role without ``pg_signal_backend``. t's ``pg_terminate_backend`` is refused (warning),
    then its takeover waits on J's row lock on the "nodes" connection, which its renewals
    need: t is fenced, abandons its job, and stays unregistered while d is frozen."""
    weak_url, admin_url = weak_role_url
    async with open_runtime(weak_url, handlers=HANDLERS, config=CONFIG) as t:
        mine = await t.create_job("work", "alice", {})
        first = t.node.owner

        async def running() -> bool:
            return (await t.get_job(mine.id)).state is JobState.RUNNING

        await wait_until(running, 10)
        aux = PostgresBackend(admin_url)
        async with aux.opened():
            dead = await aux.register_node("d", new_id(), 1.0, "elsewhere", 1)
            job_id = await claimed_job(aux, dead.owner)
            conn = await trio.to_thread.run_sync(freeze, admin_url, dead.incarnation, job_id)
            try:
                await trio.sleep(1.0 + 3 * TTL)
                fenced, healthy = t.node.fenced, t.node.healthy
                job = await t.get_job(mine.id)
            finally:
                conn.close()
    assert (fenced, healthy) == (0, True), "t lost its lease to a frozen node's row lock"
    assert (job.state, job.owner) == (JobState.RUNNING, first)


async def test_a_recovery_waiting_on_a_frozen_nodes_lock_does_not_stop_its_takeover(
    pg_url: str,
) -> None:
    """Invariant: a frozen node delays the others by its lease at most (README), so the
    recovery of a dead node's jobs is never held up past the frozen node's own takeover.

    Three nodes: d dies running alice's job J; n freezes in the middle of a pipelined commit of
    another of alice's jobs (it holds alice's ``user_heads`` row, as every commit of alice's
    events does). t takes d over and recovers J: the recovery's commit waits on alice's head.
    n's lease expires a second later, but the only node that could take it over (and end its
    session) is t, whose scan loop is stuck inside d's recovery: J stays running under a dead
    owner, t's store is stuck behind that commit, and n is never taken over, for as long as n
    stays frozen."""
    async with open_runtime(pg_url, handlers=HANDLERS, config=CONFIG) as t:
        await t.create_job("work", "alice", {})  # alice's head row exists
        aux, d, n = (PostgresBackend(pg_url) for _ in range(3))
        async with aux.opened(), d.opened(), n.opened():
            dead = await d.register_node("d", new_id(), 1.0, "elsewhere", 1)
            (job,) = owned(new_id(), "work", dead.owner, time.time(), ckpt=True)
            await aux.commit([job], [], (), {})
            frozen = await n.register_node("n", new_id(), TTL, "elsewhere", 2)
            conn = await trio.to_thread.run_sync(
                freeze_sql,
                pg_url,
                frozen.incarnation,
                "UPDATE user_heads SET head = head WHERE user_id = 'alice'",
            )
            try:
                await trio.sleep(1.0 + 3 * TTL)  # d, then n, expired long ago
                nodes = {n.node_id: n.state for n in await aux.list_nodes()}
                stored = await aux.load(job.id)
            finally:
                conn.close()
    assert stored is not None
    assert nodes["n"] == "dead", "the frozen node was never taken over"
    assert stored.state is JobState.PAUSED, "the dead node's job is still running"


def freeze_sql(url: str, incarnation: str, statement: str) -> psycopg.Connection[Any]:
    """A session of node ``incarnation`` frozen mid-pipeline after ``statement``."""
    conn = psycopg.connect(url, autocommit=True, application_name=application_name(incarnation))
    pgconn = conn.pgconn
    pgconn.enter_pipeline_mode()
    pgconn.send_query_params(b"BEGIN", None)
    pgconn.send_query_params(statement.encode(), None)
    pgconn.flush()
    return conn


# -- real nodes (``jobspine serve``), SIGSTOP/SIGCONT -------------------------------------------


@pytest.mark.slow
async def test_short_freezes_at_any_moment_cost_a_node_nothing(tmp_path: Path) -> None:
    """Invariant (README): "paused for less than its TTL, it keeps its jobs". A node is
    frozen again and again, each time for 1.3 to 2.5 s, well under its lease (6 s), at random
    moments of a busy run (many short jobs: claims and commits in flight), so some freezes
    land inside a transaction. Nothing may be taken over, recovered, or run twice."""
    from bench.cluster import cluster_supported

    from .cluster import check_log, cluster_of, create_jobs, settle

    if not cluster_supported():
        pytest.skip("no cluster")
    ttl = 6.0
    rng = random.Random(7)
    async with cluster_of(tmp_path, 2, lease_ttl=ttl) as cluster:
        specs = [(f"u{i % 4}", "steps", {"n": 8, "delay": 0.02}) for i in range(400)]
        created: set[str] = set()

        async def freezer() -> None:
            for _ in range(6):
                await trio.sleep(rng.uniform(0.2, 1.0))
                cluster.signal("n1", signal.SIGSTOP)
                await trio.sleep(rng.uniform(1.3, 2.5))
                cluster.signal("n1", signal.SIGCONT)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(freezer)
            for chunk in range(0, len(specs), 50):
                created |= {
                    j["id"]
                    for j in await create_jobs(cluster, specs[chunk : chunk + 50], on=["n0"])
                }
        await settle(cluster, created, 180)
        summary = check_log(cluster.store, created, {}, settled=True)
        assert cluster.nodes["n1"].alive
    assert summary.takeovers == 0 and summary.recoveries == 0
    assert summary.states == {"completed": len(created)}, summary.states
    assert all(len(o) == 1 for o in summary.owners.values())


@pytest.mark.slow
async def test_two_nodes_frozen_past_their_lease_at_once(tmp_path: Path) -> None:
    """Invariant: two of three nodes frozen together past their lease: the third takes both
    over within TTL + 1 s (each job exactly once); after SIGCONT the two write nothing more for
    their old attempts and come back as new incarnations; every job ends."""
    from bench.cluster import cluster_supported

    from .cluster import check_log, cluster_of, create_jobs, settle

    if not cluster_supported():
        pytest.skip("no cluster")
    ttl = 3.0
    async with cluster_of(tmp_path, 3, lease_ttl=ttl) as cluster:
        kinds = ["steps", "requeued", "plain"]
        specs = [(f"u{i % 3}", kinds[i % 3], {"n": 60, "delay": 0.05}) for i in range(24)]
        created = {job["id"] for job in await create_jobs(cluster, specs)}
        await trio.sleep(1.0)
        cluster.signal("n1", signal.SIGSTOP)
        cluster.signal("n2", signal.SIGSTOP)
        await trio.sleep(ttl + 3)
        cluster.signal("n1", signal.SIGCONT)
        cluster.signal("n2", signal.SIGCONT)
        await settle(cluster, created, 120)
        summary = check_log(cluster.store, created, {}, settled=True)
        assert all(cluster.nodes[n].alive for n in ("n0", "n1", "n2"))

        def node_rows() -> list[tuple[str, str, str | None]]:
            with psycopg.connect(cluster.store) as conn:
                return conn.execute(
                    "SELECT node_id, state, taken_over_by FROM nodes ORDER BY started_at"
                ).fetchall()

        # Each registers again at its next tick (its first try after SIGCONT may meet the
        # session its takeover ended: retried one renewal interval later).
        with trio.move_on_after(10):
            while {n for n, state, _ in node_rows() if state == "alive"} != {"n0", "n1", "n2"}:  # noqa: ASYNC110 - another process
                await trio.sleep(0.2)
        rows = node_rows()
    assert summary.takeovers > 0
    dead = {(node, (by or "").split("#")[0]) for node, state, by in rows if state == "dead"}
    assert dead == {("n1", "n0"), ("n2", "n0")}, rows
    alive = {node for node, state, _ in rows if state == "alive"}
    assert alive == {"n0", "n1", "n2"}, rows
