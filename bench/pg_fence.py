"""The cost of several writers' safety on a PostgreSQL commit (issue 11).

``python -m bench.pg_fence`` commits the same groups two ways, through sync psycopg in a worker
thread (as :class:`~actors.PostgresBackend` does), in one transaction per commit:

* ``single``: the single-writer statements (before issue 11): jobs upserted unconditionally,
  events inserted with the numbers the store gave them.
* ``fenced``: :meth:`PostgresBackend.commit` as it is: each user's head advanced under its row
  lock and the events numbered from it, each job written only if its ``seq`` is still the one
  the change was based on (``RETURNING`` checked), a NOTIFY when a job waits (none here).

Groups of 1 event (1 job) and of 100 events (10 jobs), as ``bench/pg_modes.py``; the modes
take turns round by round so that load from elsewhere on the machine hits both alike. A
database of its own is created and dropped.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

import psycopg
import trio
from psycopg import sql

from actors import PostgresBackend
from actors._postgres import commit_plan
from bench.args import amount

from .pg_modes import Group, Groups, percentile


async def measure(url: str, commits: int, rounds: int) -> list[dict[str, Any]]:
    backend = PostgresBackend(url)
    out = []
    async with backend.opened():
        conn = await trio.to_thread.run_sync(lambda: psycopg.connect(url, autocommit=True))

        def single_sync(group: Group) -> None:
            jobs, events = group
            # No events given with the jobs: commit_plan's unfenced upsert, then the events.
            plan = commit_plan(jobs, [], (), {}) + commit_plan([], events, (), {})
            with conn.transaction(), conn.cursor() as cursor:
                for statement, rows, _ in plan:
                    cursor.executemany(statement, rows)

        async def single(group: Group) -> None:
            await trio.to_thread.run_sync(single_sync, group)

        async def fenced(group: Group) -> None:
            await backend.commit(*group, (), {})

        modes = {"single": single, "fenced": fenced}
        groups = {mode: Groups(mode) for mode in modes}
        try:
            for events in (1, 100):
                jobs = 1 if events == 1 else 10
                latencies: dict[str, list[float]] = {mode: [] for mode in modes}
                for mode, commit in modes.items():
                    for _ in range(20):  # warm up
                        await commit(groups[mode].next(events, jobs))
                for _ in range(rounds):
                    for mode, commit in modes.items():
                        for _ in range(commits):
                            group = groups[mode].next(events, jobs)
                            start = time.perf_counter()
                            await commit(group)
                            latencies[mode].append(time.perf_counter() - start)
                for mode in modes:
                    samples = latencies[mode]
                    out.append(
                        {
                            "mode": mode,
                            "events_per_commit": events,
                            "commits": len(samples),
                            "p50_ms": statistics.median(samples) * 1000,
                            "p99_ms": percentile(samples, 0.99) * 1000,
                            "events_per_s": len(samples) * events / sum(samples),
                        }
                    )
        finally:
            await trio.to_thread.run_sync(conn.close)
    return out


async def run(server: str, commits: int, rounds: int) -> list[dict[str, Any]]:
    name = f"jobspine_bench_fence_{os.getpid()}"
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
    args = parser.parse_args()
    results = trio.run(run, args.server, args.commits, args.rounds)
    print("{:8} {:>6} {:>8} {:>8} {:>10}".format("mode", "events", "p50 ms", "p99 ms", "events/s"))
    for r in results:
        print(
            f"{r['mode']:8} {r['events_per_commit']:>6} {r['p50_ms']:>8.3f}"
            f" {r['p99_ms']:>8.3f} {r['events_per_s']:>10.0f}"
        )


if __name__ == "__main__":
    main()
