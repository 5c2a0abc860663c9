"""The fanout workload on saq (Redis), the nearest Python peer, for a side-by-side figure.

    python -m bench.saq_fanout worker --jobs N --redis URL --queue NAME
    python -m bench.saq_fanout observe --jobs N --events P --interval S --redis URL --queue NAME

The worker runs N jobs at once, each calling ``job.update(progress=..., meta={"t0": ...})``
P times. The observer (a separate process, like jobspine's clients) enqueues the jobs, listens
to saq's update notifications and, as a UI would, reads the job on each one; it counts each
progress value once and times it from the handler's update call. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from typing import Any

import orjson
from saq import Queue, Worker

from bench.args import amount, run_peer
from bench.redis_keys import delete_matching


async def emit(ctx: Any, *, count: int, interval: float, start_at: float) -> int:
    job = ctx["job"]
    delay = start_at - time.time()
    if delay > 0:
        await asyncio.sleep(delay)
    for i in range(count):
        await job.update(progress=(i + 1) / count, meta={"t0": time.time(), "i": i})
        if interval:
            await asyncio.sleep(interval)
    return count


async def worker(args: argparse.Namespace) -> None:
    queue = Queue.from_url(args.redis, name=args.queue)
    await Worker(queue, functions=[emit], concurrency=args.running or args.jobs).start()


async def observe(args: argparse.Namespace) -> None:
    queue = Queue.from_url(args.redis, name=args.queue)
    await queue.connect()
    start_at = time.time() + 2 + args.jobs / 500
    keys = []
    for n in range(args.jobs):
        job = await queue.enqueue(
            "emit",
            key=f"bench-{args.run}-{n}",
            count=args.events,
            interval=args.interval,
            start_at=start_at,
            timeout=0,
        )
        assert job is not None
        keys.append(job.key)
    seen: dict[str, set[int]] = {key: set() for key in keys}
    latencies: list[float] = []
    finished: set[str] = set()
    first = last = 0.0

    async def on_update(key: str, status: Any) -> bool:
        nonlocal first, last
        job = await queue.job(key)
        now = time.time()
        if job is not None:
            i = job.meta.get("i")
            if i is not None and i not in seen[key]:
                seen[key].add(i)
                latencies.append(now - job.meta["t0"])
                first = first or now
                last = now
            if job.status in ("complete", "failed", "aborted") or str(job.status).endswith(
                ("COMPLETE", "FAILED", "ABORTED")
            ):
                finished.add(key)
        return len(finished) == len(keys)

    print("READY", flush=True)
    with contextlib.suppress(TimeoutError):
        await queue.listen(keys, on_update, timeout=args.timeout)
    # saq's listen leaves its pub/sub generator to the garbage collector once the callback
    # stops it; asyncio closes it in a task of its own, which unsubscribes. That task must end
    # before the disconnect below, else it writes to a closed connection (a traceback).
    others = asyncio.all_tasks() - {asyncio.current_task()}
    if others:
        await asyncio.wait(others, timeout=5)
    delivered = sum(len(s) for s in seen.values())
    sys.stdout.write(
        orjson.dumps(
            {
                "deliveries": delivered,
                "expected": args.jobs * args.events,
                "latencies": latencies,
                "first": first,
                "last": last,
                "finished": len(finished),
            }
        ).decode()
        + "\n"
    )
    await queue.disconnect()


async def clean(args: argparse.Namespace) -> None:
    """Delete the run's keys: saq names every key of a queue after it."""
    print(await delete_matching(args.redis, [f"*{args.queue}*"]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["worker", "observe", "clean"])
    parser.add_argument("--jobs", type=amount(int, 1), default=100)
    parser.add_argument("--events", type=amount(int, 1), default=100)
    parser.add_argument("--running", type=amount(int), default=0, help="jobs at once (0: all)")
    parser.add_argument("--interval", type=amount(float), default=0.0)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379")
    parser.add_argument("--queue", default="jobspine-bench")
    parser.add_argument("--run", default=str(int(time.time())))
    parser.add_argument("--timeout", type=amount(float, 0.0, above=True), default=120)
    args = parser.parse_args()
    run_peer({"worker": worker, "observe": observe, "clean": clean}[args.role](args))


if __name__ == "__main__":
    main()
