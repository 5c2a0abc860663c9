"""The fanout workload on arq (Redis), the fastest Python peer, for a side-by-side figure.

    python -m bench.arq_fanout worker --jobs N --redis URL --queue NAME
    python -m bench.arq_fanout observe --jobs N --events P --interval S --redis URL --queue NAME

arq has no progress API: its users publish progress themselves, most often on Redis pub/sub,
which is what the handler here does (one ``PUBLISH`` per update, nothing persisted). The
worker runs N jobs at once (``max_jobs``), each publishing P updates; the observer (a separate
process, like jobspine's clients) subscribes first, then enqueues the jobs, counts each update
once and times it from the handler's publish. Prints one JSON line, as ``bench.saq_fanout``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from typing import Any

import orjson
from arq import create_pool
from arq.connections import RedisSettings
from arq.worker import Worker, func

from bench.args import amount, run_peer
from bench.redis_keys import delete_matching


async def emit(
    ctx: dict[str, Any], *, channel: str, count: int, interval: float, start_at: float
) -> int:
    redis = ctx["redis"]
    key = ctx["job_id"]
    delay = start_at - time.time()
    if delay > 0:
        await asyncio.sleep(delay)
    for i in range(count):
        await redis.publish(channel, orjson.dumps({"k": key, "i": i, "t0": time.time()}))
        if interval:
            await asyncio.sleep(interval)
    return count


def settings(args: argparse.Namespace) -> RedisSettings:
    return RedisSettings.from_dsn(args.redis)


async def worker(args: argparse.Namespace) -> None:
    running = Worker(
        functions=[func(emit, name="emit")],
        redis_settings=settings(args),
        queue_name=args.queue,
        max_jobs=args.running or args.jobs,
        job_timeout=args.timeout,
        handle_signals=False,
        keep_result=0,
        poll_delay=0.05,
    )
    try:
        await running.main()
    finally:
        await running.close()


async def observe(args: argparse.Namespace) -> None:
    pool = await create_pool(settings(args), default_queue_name=args.queue)
    channel = f"{args.queue}:progress"
    pubsub: Any = pool.pubsub()  # redis-py types aclose() loosely
    await pubsub.subscribe(channel)
    start_at = time.time() + 2 + args.jobs / 500
    keys = [f"bench-{args.run}-{n}" for n in range(args.jobs)]
    for key in keys:
        job = await pool.enqueue_job(
            "emit",
            channel=channel,
            count=args.events,
            interval=args.interval,
            start_at=start_at,
            _job_id=key,
        )
        assert job is not None
    seen: dict[str, set[int]] = {key: set() for key in keys}
    latencies: list[float] = []
    expected = args.jobs * args.events
    delivered = 0
    first = last = 0.0
    print("READY", flush=True)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(args.timeout):
            while delivered < expected:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if message is None:
                    continue
                now = time.time()
                update = orjson.loads(message["data"])
                got = seen.get(update["k"])
                if got is None or update["i"] in got:
                    continue
                got.add(update["i"])
                delivered += 1
                latencies.append(now - update["t0"])
                first = first or now
                last = now
    sys.stdout.write(
        orjson.dumps(
            {
                "deliveries": delivered,
                "expected": expected,
                "latencies": latencies,
                "first": first,
                "last": last,
                "finished": sum(len(s) == args.events for s in seen.values()),
            }
        ).decode()
        + "\n"
    )
    await pubsub.aclose()
    await pool.aclose()


async def clean(args: argparse.Namespace) -> None:
    """Delete the run's keys: its jobs' (arq names them by job id) and its queue's."""
    patterns = [f"arq:*:bench-{args.run}-*", args.queue, f"{args.queue}:*"]
    print(await delete_matching(args.redis, patterns))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["worker", "observe", "clean"])
    parser.add_argument("--jobs", type=amount(int, 1), default=100)
    parser.add_argument("--events", type=amount(int, 1), default=100)
    parser.add_argument("--running", type=amount(int), default=0, help="jobs at once (0: all)")
    parser.add_argument("--interval", type=amount(float), default=0.0)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379")
    parser.add_argument("--queue", default="jobspine-bench-arq")
    parser.add_argument("--run", default=str(int(time.time())))
    parser.add_argument("--timeout", type=amount(float, 0.0, above=True), default=120)
    args = parser.parse_args()
    run_peer({"worker": worker, "observe": observe, "clean": clean}[args.role](args))


if __name__ == "__main__":
    main()
