"""PostgreSQL from Trio, two ways: which drives psycopg 3 better?

    python -m bench.pg_modes [--server postgresql://postgres@127.0.0.1:5432]
                             [--commits 400] [--json FILE]

* ``thread``: :meth:`actors.PostgresBackend.commit` itself: a sync psycopg connection, each
  backend call one ``trio.to_thread.run_sync`` hop.
* ``asyncio``: psycopg's ``AsyncConnection`` in a trio-asyncio loop, each backend call one
  ``aio_as_trio`` crossing (as the SQLite backend runs aiosqlite).

Both run exactly the same statements (:func:`actors._postgres.commit_plan`) in one transaction
per commit, back to back, for group commits of 1 event (1 job written) and of 100 events (10
jobs written). Latency is one whole commit, as the store actor waits for it. The thread mode
runs first (its backend creates the schema); the asyncio mode empties the tables, then runs.
A database of its own is created and dropped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

# trio_asyncio first: it patches asyncio.get_running_loop, which psycopg imports by name (in
# the other order psycopg's async API fails with "no running event loop" under trio-asyncio).
import trio_asyncio

# isort: split
import psycopg
import trio
from psycopg import sql
from trio_asyncio import aio_as_trio

from actors import EventType, Job, JobEvent, JobState, PostgresBackend
from actors._postgres import commit_plan

Group = tuple[list[Job], list[JobEvent]]


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Groups:
    """Commit groups with fresh, gapless seq and user_seq numbers."""

    def __init__(self) -> None:
        self.jobs: dict[str, Job] = {}
        self.user_seq = 0

    def next(self, events: int, jobs: int) -> Group:
        now = time.time()
        written: dict[str, Job] = {}
        out: list[JobEvent] = []
        for n in range(events):
            job_id = f"bench-{n % jobs:04d}"
            job = written.get(job_id) or self.jobs.get(job_id)
            if job is None:
                job = Job(job_id, "bench-user", "bench", JobState.RUNNING, {}, now, now, attempt=1)
            job = Job(
                job.id, job.user_id, job.kind, job.state, job.input, job.created_at, now,
                progress=50.0, step="x" * 40, attempt=1, seq=job.seq + 1,
            )  # fmt: skip
            written[job_id] = job
            self.user_seq += 1
            out.append(
                JobEvent(
                    *(job_id, job.user_id, job.seq, EventType.PROGRESS, job.state, now),
                    *({"progress": 50.0, "step": "x" * 40}, None, self.user_seq),
                )
            )
        self.jobs.update(written)
        return list(written.values()), out


async def measure(
    commit: Callable[[Group], Awaitable[None]], groups: Groups, events: int, commits: int
) -> dict[str, float]:
    jobs = 1 if events == 1 else 10
    for _ in range(20):  # warm up: connection, plans, caches
        await commit(groups.next(events, jobs))
    latencies = []
    began = time.perf_counter()
    for _ in range(commits):
        group = groups.next(events, jobs)
        start = time.perf_counter()
        await commit(group)
        latencies.append(time.perf_counter() - start)
    elapsed = time.perf_counter() - began
    return {
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
        "commits_per_s": commits / elapsed,
        "events_per_s": commits * events / elapsed,
    }


async def thread_mode(url: str, sizes: list[int], commits: int) -> dict[int, dict[str, float]]:
    backend = PostgresBackend(url)
    groups = Groups()
    results = {}
    async with backend.opened():

        async def commit(group: Group) -> None:
            await backend.commit(*group, (), {})

        for size in sizes:
            results[size] = await measure(commit, groups, size, commits)
    return results


async def asyncio_mode(url: str, sizes: list[int], commits: int) -> dict[int, dict[str, float]]:
    groups = Groups()
    results = {}
    async with trio_asyncio.open_loop():
        conn = await aio_as_trio(psycopg.AsyncConnection.connect)(url, autocommit=True)
        try:

            async def transaction(group: Group) -> None:
                async with conn.transaction(), conn.cursor() as cursor:
                    for statement, rows in commit_plan(*group, (), {}):
                        await cursor.executemany(statement, rows)

            async def commit(group: Group) -> None:
                await aio_as_trio(transaction)(group)

            await aio_as_trio(conn.execute)("TRUNCATE jobs, events")
            for size in sizes:
                results[size] = await measure(commit, groups, size, commits)
        finally:
            await aio_as_trio(conn.close)()
    return results


async def run(server: str, commits: int) -> list[dict[str, Any]]:
    name = f"jobspine_bench_{os.getpid()}"
    with psycopg.connect(f"{server}/postgres", autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = f"{server}/{name}"
    sizes = [1, 100]
    try:
        by_mode = {
            "thread": await thread_mode(url, sizes, commits),
            "asyncio": await asyncio_mode(url, sizes, commits),
        }
    finally:
        with psycopg.connect(f"{server}/postgres", autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
    return [
        {"mode": mode, "events_per_commit": size, "commits": commits, **figures}
        for mode, results in by_mode.items()
        for size, figures in results.items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--server", default="postgresql://postgres@127.0.0.1:5432")
    parser.add_argument("--commits", type=int, default=400, help="measured commits per case")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    results = trio.run(run, args.server, args.commits)
    with psycopg.connect(f"{args.server}/postgres") as conn:
        server_version = conn.info.server_version
    print(
        f"{os.cpu_count()} cores, Python {platform.python_version()},"
        f" psycopg {psycopg.__version__}, PostgreSQL {server_version}"
    )
    header = ("mode", "events", "p50 ms", "p99 ms", "commits/s", "events/s")
    print("{:8} {:>6} {:>8} {:>8} {:>10} {:>10}".format(*header))
    for r in results:
        print(
            f"{r['mode']:8} {r['events_per_commit']:>6} {r['p50_ms']:>8.3f} {r['p99_ms']:>8.3f}"
            f" {r['commits_per_s']:>10.0f} {r['events_per_s']:>10.0f}"
        )
    document = {
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "psycopg": psycopg.__version__,
        "postgresql": server_version,
        "results": results,
    }
    print(json.dumps(document))
    if args.json:
        Path(args.json).write_text(json.dumps(document))


if __name__ == "__main__":
    main()
