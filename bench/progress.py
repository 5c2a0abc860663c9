"""In-process progress throughput: N handlers each report P progress events back to back.

    python -m bench.progress [--jobs 100] [--events 200] [--store URL_OR_FILE] [--json FILE]

No network and no subscriber: the runtime's own cost per progress event (the handler's call,
the store actor, the group commit, the hub), on SQLite (``synchronous=FULL``, a temporary
file) unless ``--store`` names a PostgreSQL URL. Prints one table row per run and writes the
figures as JSON: events/s, CPU per event (the whole process: event loop and database
thread), commits and the mean group size, and the share of the run the committer was busy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from actors import JobContext, RuntimeConfig, open_runtime
from bench.args import amount


async def run_case(store: str | Path, jobs: int, events: int) -> dict[str, Any]:
    finished = 0
    all_done = trio.Event()

    async def emit(ctx: JobContext, input: Any) -> None:
        nonlocal finished
        for i in range(events):
            await ctx.progress(100 * (i + 1) / events, "s")
        finished += 1
        if finished == jobs:
            all_done.set()

    config = RuntimeConfig(max_running=jobs)
    async with open_runtime(store, handlers={"emit": emit}, config=config) as rt:
        cpu, started = time.process_time(), time.perf_counter()
        for n in range(jobs):
            await rt.create_job("emit", f"user{n % 10}", {})
        await all_done.wait()
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
        actor = rt.store_actor
        commits, requests = actor.commits, actor.committed_requests
        committing = actor.metrics.commit_seconds.sum
    total = jobs * events
    return {
        "jobs": jobs,
        "events": total,
        "events_per_s": total / seconds,
        "cpu_us_per_event": 1e6 * cpu / total,
        "commits": commits,
        "mean_group": requests / max(1, commits),
        "committer_busy": committing / seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--jobs", type=amount(int, 1), nargs="+", default=[100])
    parser.add_argument(
        "--events", type=amount(int, 1), default=200, help="progress events per job"
    )
    parser.add_argument("--store", help="a postgresql:// URL (default: a temporary SQLite file)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    rows = []
    for jobs in args.jobs:
        with tempfile.TemporaryDirectory() as tmp:
            store = args.store or Path(tmp) / "progress.db"
            rows.append(trio.run(run_case, store, jobs, args.events))
    print(
        f"bench.progress: {os.cpu_count()} cores ({platform.machine()}), Python "
        f"{platform.python_version()}, store {'PostgreSQL' if args.store else 'SQLite FULL'}"
    )
    print(f"{'jobs':>6} {'events':>8} {'events/s':>10} {'CPU us/event':>13} {'commits':>8}"
          f" {'mean group':>11} {'committer busy':>15}")  # fmt: skip
    for r in rows:
        print(f"{r['jobs']:>6} {r['events']:>8,} {r['events_per_s']:>10,.0f}"
              f" {r['cpu_us_per_event']:>13.0f} {r['commits']:>8,} {r['mean_group']:>11.1f}"
              f" {r['committer_busy']:>14.0%}")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"cores": os.cpu_count(), "runs": rows}, indent=2))


if __name__ == "__main__":
    main()
