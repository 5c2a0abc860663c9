"""PostgreSQL from Trio, two ways: which drives psycopg 3 better?

    python -m bench.pg_modes [--server postgresql://postgres@127.0.0.1:5432]
                             [--commits 100] [--rounds 10] [--json FILE]

* ``thread``: :meth:`actors.PostgresBackend.commit` itself: a sync psycopg connection, each
  backend call one ``trio.to_thread.run_sync`` hop.
* ``asyncio``: psycopg's ``AsyncConnection`` in a trio-asyncio loop, each backend call one
  ``aio_as_trio`` crossing (as the SQLite backend runs aiosqlite).

Both run exactly the same statements (the heads, then :func:`actors._postgres.commit_plan`) in
one transaction per commit, back to back, for group commits of 1 event (1 job written) and of
100 events (10 jobs written). Latency is one whole commit, as the store actor waits for it.
The two modes take turns, round by round, so that load from elsewhere on a shared machine hits
both alike. A database of its own is created and dropped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
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
from actors._postgres import _ADVANCE_HEAD, commit_plan, user_counts
from bench.args import amount

Group = tuple[list[Job], list[JobEvent]]


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Groups:
    """Commit groups with fresh, gapless seq and user_seq numbers (one user per mode)."""

    def __init__(self, user: str) -> None:
        self.user = user
        self.jobs: dict[str, Job] = {}
        self.user_seq = 0

    def next(self, events: int, jobs: int) -> Group:
        now = time.time()
        written: dict[str, Job] = {}
        out: list[JobEvent] = []
        for n in range(events):
            job_id = f"{self.user}-{n % jobs:04d}"
            job = written.get(job_id) or self.jobs.get(job_id)
            if job is None:
                job = Job(job_id, self.user, "bench", JobState.RUNNING, {}, now, now, attempt=1)
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


Commit = Callable[[Group], Awaitable[None]]


@asynccontextmanager
async def thread_mode(url: str) -> AsyncIterator[Commit]:
    backend = PostgresBackend(url)
    async with backend.opened():

        async def commit(group: Group) -> None:
            await backend.commit(*group, (), {})

        yield commit


@asynccontextmanager
async def asyncio_mode(url: str) -> AsyncIterator[Commit]:
    async with trio_asyncio.open_loop():
        conn = await aio_as_trio(psycopg.AsyncConnection.connect)(url, autocommit=True)
        try:

            async def transaction(group: Group) -> None:
                async with conn.transaction(), conn.cursor() as cursor:
                    # The heads as PostgresBackend.commit advances them (the groups' numbers
                    # already follow them, so the events need no renumbering here).
                    await cursor.executemany(_ADVANCE_HEAD, user_counts(group[1]))
                    for statement, rows, _ in commit_plan(*group, (), {}):
                        await cursor.executemany(statement, rows)

            async def commit(group: Group) -> None:
                await aio_as_trio(transaction)(group)

            yield commit
        finally:
            await aio_as_trio(conn.close)()


async def measure(url: str, commits: int, rounds: int) -> list[dict[str, Any]]:
    """Both modes open side by side; per size, ``rounds`` rounds alternate between them
    (``commits`` per round each), so that load from elsewhere on the machine hits both."""
    out = []
    async with thread_mode(url) as by_thread, asyncio_mode(url) as by_asyncio:
        modes = {"thread": by_thread, "asyncio": by_asyncio}
        groups = {mode: Groups(mode) for mode in modes}
        for events in (1, 100):
            jobs = 1 if events == 1 else 10
            latencies: dict[str, list[float]] = {mode: [] for mode in modes}
            elapsed = dict.fromkeys(modes, 0.0)
            for mode, commit in modes.items():
                for _ in range(20):  # warm up: connection, statements, caches
                    await commit(groups[mode].next(events, jobs))
            for _ in range(rounds):
                for mode, commit in modes.items():
                    began = time.perf_counter()
                    for _ in range(commits):
                        group = groups[mode].next(events, jobs)
                        start = time.perf_counter()
                        await commit(group)
                        latencies[mode].append(time.perf_counter() - start)
                    elapsed[mode] += time.perf_counter() - began
            for mode in modes:
                done = rounds * commits
                out.append(
                    {
                        "mode": mode,
                        "events_per_commit": events,
                        "commits": done,
                        "p50_ms": statistics.median(latencies[mode]) * 1000,
                        "p99_ms": percentile(latencies[mode], 0.99) * 1000,
                        "commits_per_s": done / elapsed[mode],
                        "events_per_s": done * events / elapsed[mode],
                    }
                )
    return out


async def run(server: str, commits: int, rounds: int) -> list[dict[str, Any]]:
    name = f"jobspine_bench_{os.getpid()}"
    with psycopg.connect(f"{server}/postgres", autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        return await measure(f"{server}/{name}", commits, rounds)
    finally:
        with psycopg.connect(f"{server}/postgres", autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--server", default="postgresql://postgres@127.0.0.1:5432")
    parser.add_argument(
        "--commits", type=amount(int, 1), default=100, help="commits per round and mode"
    )
    parser.add_argument(
        "--rounds", type=amount(int, 1), default=10, help="rounds per size (alternating)"
    )
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    results = trio.run(run, args.server, args.commits, args.rounds)
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
