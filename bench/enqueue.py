"""In-process queue benchmark on a SQLite file: create -> start latency with free capacity,
and the create rate with and without idempotency keys.

    python -m bench.enqueue [--latency-jobs 300] [--creates 3000] [--concurrency 64] [--json FILE]

Latency: jobs are created one at a time (5 ms apart) on an idle runtime; create -> start is
read from the job records (``started_at - created_at``, one clock), and measured around the
call too (``create_job`` called -> the handler running). Rate: ``--creates`` jobs from
``--concurrency`` tasks while the runtime is full (nothing of theirs starts), once with a
distinct idempotency key on every create and once without.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from actors import JobContext, RuntimeConfig, SqliteBackend, open_runtime
from bench.args import amount


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def latency(path: Path, jobs: int) -> dict[str, float]:
    began: dict[str, float] = {}
    ran: dict[str, float] = {}
    all_ran = trio.Event()

    async def mark(ctx: JobContext, input: Any) -> Any:
        ran[ctx.job_id] = time.perf_counter()
        if len(ran) == jobs:
            all_ran.set()
        return None

    config = RuntimeConfig(stop_grace=0.1)
    async with open_runtime(
        backend=SqliteBackend(path), handlers={"mark": mark}, config=config
    ) as rt:
        ids = []
        for n in range(jobs):
            at = time.perf_counter()
            job = await rt.create_job("mark", "latency", {"n": n})
            began[job.id] = at
            ids.append(job.id)
            await trio.sleep(0.005)
        with trio.fail_after(60):
            await all_ran.wait()
        records = [await rt.get_job(job_id) for job_id in ids]
        fast = getattr(rt.dispatcher, "fast_started", 0)
    stored = [1000 * (j.started_at - j.created_at) for j in records if j.started_at is not None]
    called = [1000 * (ran[i] - began[i]) for i in ids]
    return {
        "stored_p50_ms": percentile(stored, 0.5),
        "stored_p99_ms": percentile(stored, 0.99),
        "call_to_handler_p50_ms": percentile(called, 0.5),
        "call_to_handler_p99_ms": percentile(called, 0.99),
        "fast_started": fast,
    }


async def rate(path: Path, creates: int, concurrency: int, keyed: bool) -> float:
    async def hold(ctx: JobContext, input: Any) -> Any:
        with ctx.keep_alive():
            await trio.sleep(3600)

    config = RuntimeConfig(max_running=1, max_waiting_per_user=creates + 10, stop_grace=0.1)
    async with open_runtime(
        backend=SqliteBackend(path), handlers={"hold": hold}, config=config
    ) as rt:
        await rt.create_job("hold", "gate", {})  # fills the runtime: the creates all wait
        counter = iter(range(creates))

        async def task(user: str) -> None:
            for n in counter:
                key = f"k{n}" if keyed else None
                await rt.create_job("hold", user, {"n": n}, idempotency_key=key)

        began = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for t in range(concurrency):
                nursery.start_soon(task, f"user{t % 10}")
        return creates / (time.perf_counter() - began)


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        figures: dict[str, Any] = {"latency": await latency(Path(tmp) / "l.db", args.latency_jobs)}
        for keyed in (False, True):
            name = "keyed" if keyed else "unkeyed"
            figures[f"creates_per_s_{name}"] = await rate(
                Path(tmp) / f"{name}.db", args.creates, args.concurrency, keyed
            )
        figures["load_avg_1m"] = os.getloadavg()[0]
        return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency-jobs", type=amount(int), default=300)
    parser.add_argument("--creates", type=amount(int, 1), default=3000)
    parser.add_argument("--concurrency", type=amount(int, 1), default=64)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    figures = trio.run(measure, args)
    lat = figures["latency"]
    print(f"{'case':<44} {'figure':>22}")
    print(
        f"{'create -> start, stored p50 / p99':<44}"
        f" {lat['stored_p50_ms']:>9.2f} / {lat['stored_p99_ms']:.2f} ms"
    )
    print(
        f"{'create called -> handler runs, p50 / p99':<44}"
        f" {lat['call_to_handler_p50_ms']:>9.2f} / {lat['call_to_handler_p99_ms']:.2f} ms"
    )
    print(f"{'started at their create':<44} {lat['fast_started']:>12} of {args.latency_jobs}")
    for name in ("unkeyed", "keyed"):
        print(f"{'creates/s, ' + name:<44} {figures[f'creates_per_s_{name}']:>12,.0f}")
    print(f"load average (1 min): {figures['load_avg_1m']:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
