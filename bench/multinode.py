"""Multi-node benchmark (``jobspine bench --scenario multinode``): nodes on one PostgreSQL
database and one Redis (:mod:`bench.cluster`), all real processes on this machine.

*Fan-out*, for 1 and 2 nodes: J ``emit`` jobs, spread over the nodes (each node's
``max_running`` is its share, so each claims as many), report progress at an offered rate;
one subscriber process follows every user room through node ``n0`` only, so with 2 nodes
half the events reach it across nodes (published to Redis by the node running the job).
Measured: progress events persisted/s, the p99 latency from ``ctx.progress()`` in the
handler to the subscriber, events lost; then the 2-node/1-node ratios. On a 2-core machine
two nodes share the same cores (and PostgreSQL's), so the ratio says what a second node costs
or brings here, not what a second machine would.

*Takeover*, with 2 nodes and the given lease (default: 5 s TTL, renewed every 1 s): long
checkpointing jobs run on both; node ``n1`` is SIGKILLed; a client connected to ``n0`` times
from the kill to the first event of each of ``n1``'s running jobs written by the taker (its
``recovery``: paused at the checkpoint). ``n1`` is restarted and the cycle repeats; p50/p99
over every job of every kill (goal: under 6 s with the default lease).
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import orjson
import psycopg
import trio

from actors import JobEvent
from bench.args import MAX_RUNNING, amount
from bench.cluster import PG_SERVER, Cluster, cluster_supported, open_cluster
from bench.run import (
    SECRET,
    Row,
    create_jobs,
    losses,
    patience,
    percentile,
    poll_until,
    progress_line,
    run_subscribers,
)
from transport import mint_token, open_client

HANDLERS = "bench.handlers:HANDLERS"
EXTRA = ("--heartbeat-timeout", "30", "--request-rate", "100000", "--stop-grace", "1")


def missing_services() -> str | None:
    """What the scenario needs and this machine lacks (PostgreSQL, redis-server), or None."""
    try:
        psycopg.connect(f"{PG_SERVER}/postgres", connect_timeout=5).close()
    except psycopg.Error:
        return f"no PostgreSQL at {PG_SERVER} (JOBSPINE_TEST_PG)"
    if shutil.which("redis-server") is None:
        return "no redis-server on PATH"
    return None


async def fanout(args: argparse.Namespace, workdir: Path, nodes: int) -> list[Row]:
    jobs = args.multinode_jobs
    label = f"multinode fanout {nodes} node{'s' if nodes > 1 else ''}"
    if args.multinode_updates:  # back to back: what the nodes can take
        events, interval = args.multinode_updates, 0.0
    else:
        per_job_rate = args.multinode_rate / jobs
        events, interval = max(2, int(args.duration * per_job_rate)), 1 / per_job_rate
    users = max(1, jobs // 20)
    async with open_cluster(
        workdir,
        nodes,
        secret=SECRET,
        handlers=HANDLERS,
        lease_ttl=args.lease_ttl,
        lease_renew_interval=args.lease_renew_interval,
        config=f"[runtime]\nmax_running = {-(-jobs // nodes)}\n",
        extra=EXTRA,
    ) as cluster:
        go_file = workdir / f"go-multinode-{nodes}"
        # Looked for every 10 to 20 ms: the jobs start together (the default 1.5 to 3 s
        # spread the start over seconds, and the rate measured it).
        input = {"count": events, "interval": interval, "go_file": str(go_file), "poll": 0.01}
        if args.handler_cpu:
            input["cpu"] = args.handler_cpu / 1000
        created = await create_jobs(
            cluster.url("n0"), [(f"user{n % users}", "emit", input) for n in range(jobs)]
        )
        owners = {job["id"]: job["user_id"] for job in created}
        spec = {
            "url": cluster.url("n0"),
            "secret": SECRET,
            "user_rooms": sorted(set(owners.values())),
            "job_rooms": [],
            "owners": owners,
            "expect": dict.fromkeys(owners, events),
            "timeout": patience(args, events, interval),  # every job at once
        }
        start_at = 0.0

        async def ready() -> None:
            nonlocal start_at
            start_at = time.time()
            await trio.Path(go_file).touch()

        result = await run_subscribers(spec, workdir, ready)
        ran_on = await trio.to_thread.run_sync(nodes_that_ran, cluster.store)
    total = jobs * events
    lost = losses(label, result, events)
    span = max(1e-9, result["last"] - max(start_at, result["first"] - 1))
    latencies = [1000 * x for x in result["latencies"]]
    return [
        Row(label, "progress events persisted/s", total / span, "ev/s"),
        Row(label, "latency p50 progress() -> client on n0", percentile(latencies, 0.5), "ms"),
        Row(label, "latency p99", percentile(latencies, 0.99), "ms"),
        Row(label, "nodes that ran jobs", ran_on, ""),
        Row(label, "events lost / gaps / resets", lost, "", "", "0", ok=lost == 0),
    ]


def nodes_that_ran(store: str) -> int:
    """How many distinct nodes own a ``started`` event (node id: the owner's part before
    ``#``)."""
    with psycopg.connect(store, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT DISTINCT split_part(record::json -> 'data' ->> 'owner', '#', 1)"
            " FROM events WHERE type = 'started'"
        ).fetchall()
    return len(rows)


def running_on(store: str, node: str) -> dict[str, int]:
    """Jobs running under a claim of ``node``: id -> checkpoint version."""
    with psycopg.connect(store, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT id, record FROM jobs WHERE state = 'running'"
            " AND split_part(owner, '#', 1) = %s",
            (node,),
        ).fetchall()
    return {job_id: orjson.loads(record)["checkpoint_version"] for job_id, record in rows}


async def takeover(args: argparse.Namespace, workdir: Path) -> list[Row]:
    label = f"multinode takeover (TTL {args.lease_ttl:g} s)"
    per_node = 4
    samples: list[float] = []
    not_taken = 0
    async with (
        open_cluster(
            workdir,
            2,
            secret=SECRET,
            handlers=HANDLERS,
            lease_ttl=args.lease_ttl,
            lease_renew_interval=args.lease_renew_interval,
            config=f"[runtime]\nmax_running = {per_node}\n",
            extra=EXTRA,
        ) as cluster,
        open_client(cluster.url("n0"), mint_token(SECRET, "taker")) as client,
    ):
        await client.subscribe("user:taker")
        long_job = {"count": 1_000_000, "interval": 0.2, "size": 10}
        await create_jobs(cluster.url("n0"), [("taker", "checkpointer", long_job)] * per_node)
        for kill in range(args.multinode_kills):
            progress_line(f"[multinode] takeover: kill {kill + 1} of {args.multinode_kills}")
            # n0 is full with the first jobs (they never end): these run on n1.
            await create_jobs(cluster.url("n0"), [("taker", "checkpointer", long_job)] * per_node)
            owned = await poll_until(
                lambda: trio.to_thread.run_sync(running_on, cluster.store, "n1"),
                lambda jobs: len(jobs) == per_node and all(v > 0 for v in jobs.values()),
                60,
            )
            killed_at = await kill_node(cluster, "n1")
            waiting = set(owned)
            with trio.move_on_after(args.lease_ttl * 3 + 30):
                async for item in client.events():
                    # The taker's event for it (its created and progress events, queued
                    # before the kill, do not count).
                    if (
                        isinstance(item, JobEvent)
                        and item.job_id in waiting
                        and "taken_over_from" in item.data
                    ):
                        samples.append(1000 * (time.time() - killed_at))
                        waiting.discard(item.job_id)
                        if not waiting:
                            break
            not_taken += len(waiting)
            await cluster.start("n1")
    goal = 6000.0
    p99 = percentile(samples, 0.99)
    return [
        Row(label, "kill -> takeover event at client p50", percentile(samples, 0.5), "ms"),
        Row(
            label,
            "kill -> takeover event at client p99",
            p99,
            "ms",
            "60 min (Oban)",
            "< 6,000 ms",
            ratio=f"{3_600_000 / max(p99, 1e-3):.0f}x",
            ok=p99 < goal,
        ),
        Row(label, "jobs lost (not taken over)", not_taken, "", "", "0", ok=not_taken == 0),
    ]


async def kill_node(cluster: Cluster, name: str) -> float:
    """SIGKILL node ``name``; returns the wall-clock time of the kill."""
    killed_at = time.time()
    await cluster.kill(name)
    return killed_at


def ratios(rows: list[Row]) -> list[Row]:
    """2 nodes against 1: events/s and p99 latency."""
    by = {(r.scenario, r.measure): r.value for r in rows}
    one, two = "multinode fanout 1 node", "multinode fanout 2 nodes"
    label = "multinode 2 / 1 nodes"
    out = []
    for measure, name in (("progress events persisted/s", "events/s"), ("latency p99", "p99")):
        if (one, measure) in by and (two, measure) in by:
            ratio = by[two, measure] / max(by[one, measure], 1e-9)
            if name == "events/s":
                out.append(Row(label, "events/s ratio", ratio, "x", "", ">= 1.6x", ok=ratio >= 1.6))
            else:
                out.append(Row(label, f"{name} ratio", ratio, "x"))
    return out


async def multinode(args: argparse.Namespace, workdir: Path) -> list[Row]:
    missing = missing_services()
    if missing:
        progress_line(f"[multinode] skipped: {missing}")
        return []
    rows = await fanout(args, workdir, 1)
    if not cluster_supported():
        progress_line("[multinode] 2 nodes and takeover skipped: serve has no --node-id/--redis")
        return rows
    rows += await fanout(args, workdir, 2)
    rows += ratios(rows)
    if args.multinode_kills:
        rows += await takeover(args, workdir)
    return rows


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--multinode-jobs",
        type=amount(int, 1, most=MAX_RUNNING),
        default=200,
        help="multinode: jobs per fanout",
    )
    p.add_argument(
        "--multinode-rate",
        type=amount(float, 0.0, above=True),
        default=5000,
        help="multinode: offered progress events/s",
    )
    p.add_argument(
        "--multinode-updates",
        type=amount(int),
        default=0,
        help="multinode: progress events per job back to back (0: --multinode-rate, paced)",
    )
    p.add_argument(
        "--multinode-kills",
        type=amount(int),
        default=5,
        help="multinode: takeover kills (0: none)",
    )
    p.add_argument(
        "--lease-ttl",
        type=amount(float, 0.0, above=True),
        default=5.0,
        help="multinode: nodes' lease TTL, s",
    )
    p.add_argument(
        "--lease-renew-interval",
        type=amount(float, 0.0, above=True),
        default=1.0,
        help="multinode: lease renewal, s",
    )


#: ``--smoke``'s sizes for multinode (each unless the command line gives it).
SMOKE = {"multinode_jobs": 20, "multinode_rate": 400, "multinode_kills": 2}
