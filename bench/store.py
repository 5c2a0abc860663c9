"""Store actor benchmark: durable checkpoint latency and write throughput under concurrency.

    python -m bench.store [--jobs 100 1000] [--writes 20] [--sync FULL NORMAL] [--json FILE]

Each of N concurrent workers writes checkpoints back to back; every write is acknowledged
only after its group commit, so the latency printed is "checkpoint durable" latency.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from actors import EventHub, SqliteBackend, StoreActor, StoreClient
from bench.args import amount


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run_case(path: Path, jobs: int, writes: int, sync: str) -> dict[str, Any]:
    actor = StoreActor(SqliteBackend(path, synchronous=sync), EventHub())
    client = actor.client()
    latencies: list[float] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(actor.run)
        async with client:
            ids = []
            for n in range(jobs):
                job = await client.create(f"user{n % 10}", "bench", {"n": n})
                await client.start(job.id)
                ids.append(job.id)
            commits_before = actor.commits

            async def worker(store: StoreClient, job_id: str) -> None:
                for i in range(writes):
                    start = time.perf_counter()
                    await store.checkpoint(job_id, 1, {"i": i, "payload": "x" * 200})
                    latencies.append(time.perf_counter() - start)

            began = time.perf_counter()
            async with trio.open_nursery() as workers:
                for job_id in ids:
                    workers.start_soon(worker, client, job_id)
            elapsed = time.perf_counter() - began
            commits = actor.commits - commits_before
    total = jobs * writes
    return {
        "jobs": jobs,
        "sync": sync,
        "writes": total,
        "writes_per_s": total / elapsed,
        "commits": commits,
        "mean_batch": total / commits,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * percentile(latencies, 0.99),
        "max_ms": 1000 * max(latencies),
    }


async def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    results = []
    for sync in args.sync:
        for jobs in args.jobs:
            with tempfile.TemporaryDirectory() as tmp:
                results.append(await run_case(Path(tmp) / "bench.db", jobs, args.writes, sync))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--jobs", type=amount(int, 1), nargs="+", default=[100, 1000])
    parser.add_argument("--writes", type=amount(int, 1), default=20)
    parser.add_argument("--sync", nargs="+", default=["FULL", "NORMAL"])
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    results = trio.run(measure, args)
    print(f"store checkpoint benchmark: {os.cpu_count()} cores, Python {platform.python_version()}")
    print(
        f"{'sync':<7}{'jobs':>6}{'writes/s':>11}{'batch':>8}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}"
    )
    for r in results:
        print(
            f"{r['sync']:<7}{r['jobs']:>6}{r['writes_per_s']:>11.0f}{r['mean_batch']:>8.1f}"
            f"{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}{r['max_ms']:>9.2f}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"cores": os.cpu_count(), "results": results}))


if __name__ == "__main__":
    main()
