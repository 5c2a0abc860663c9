"""Job kinds for the benchmarks (registered with ``jobspine serve --handlers bench.handlers``).

Each waits until ``start_at`` (wall clock) so that every subscriber is in place first; progress
step labels carry the wall time just before ``ctx.progress()``, so a client can measure the
latency from the handler's call to its own receipt.
"""

from __future__ import annotations

import os
import random
import time
from typing import Any

import trio

from actors import Handler, JobContext, RetryPolicy, kind_options

#: The retry policy of the ``flaky`` kind (the retry-storm benchmark checks delays against it).
FLAKY_RETRY = RetryPolicy(
    initial_interval=0.2, backoff_coefficient=2.0, maximum_interval=10.0, jitter=0.2
)


def _gone_ahead(path: str) -> bool:
    return os.path.exists(path)


async def _start(input: Any) -> None:
    """Wait for ``go_file`` to exist (the runner creates it once every subscriber is in
    place), looking every ``poll`` to twice ``poll`` seconds, or until ``start_at``."""
    go_file = input.get("go_file")
    if go_file:
        poll = float(input.get("poll", 1.5))  # 1.5 s: cheap even for 10,000 waiting jobs
        while not _gone_ahead(go_file):  # noqa: ASYNC110 - another process's signal
            await trio.sleep(poll * (1 + random.random()))
        return
    delay = float(input.get("start_at", 0)) - time.time()
    if delay > 0:
        await trio.sleep(delay)


def _spin(seconds: float) -> None:
    """Hold this thread's CPU for ``seconds`` (CPU time, not wall time): a CPU-bound step."""
    until = time.thread_time() + seconds
    while time.thread_time() < until:
        pass


async def emit(ctx: JobContext, input: Any) -> Any:
    """``count`` progress events, ``interval`` seconds apart (0: back to back), each after
    ``cpu`` seconds of CPU work (0: none)."""
    await _start(input)
    count = int(input["count"])
    interval = float(input.get("interval", 0))
    cpu = float(input.get("cpu", 0))
    for i in range(count):
        if cpu:
            _spin(cpu)
        await ctx.progress(100 * (i + 1) / count, f"{time.time():.6f}")
        if interval:
            await trio.sleep(interval)
    return {"count": count}


async def idle(ctx: JobContext, input: Any) -> Any:
    """Only heartbeats, every ``every`` seconds, for ``seconds``."""
    await _start(input)
    deadline = trio.current_time() + float(input["seconds"])
    every = float(input["every"])
    while trio.current_time() < deadline:
        await trio.sleep(every)
        await ctx.heartbeat()
    return "idle"


async def checkpointer(ctx: JobContext, input: Any) -> Any:
    """``count`` checkpoints, ``interval`` seconds apart (first at a random offset within it,
    so that jobs spread out); returns each one's durable latency in ms."""
    await _start(input)
    pad = "x" * int(input.get("size", 200))
    interval = float(input.get("interval", 0))
    if interval:
        await trio.sleep(random.uniform(0, interval))
    latencies = []
    for i in range(int(input["count"])):
        began = time.perf_counter()
        await ctx.checkpoint({"i": i, "pad": pad})
        latencies.append(round(1000 * (time.perf_counter() - began), 3))
        if interval:
            await trio.sleep(interval)
    return {"latencies_ms": latencies}


async def staller(ctx: JobContext, input: Any) -> Any:
    """Checkpoints once, then stops heartbeating; once resumed, reports progress at once."""
    if ctx.resumed_from is None:
        await ctx.checkpoint({"stalled_at": time.time()})
        await trio.sleep_forever()
    await ctx.progress(50, f"{time.time():.6f}")
    return "resumed"


async def hold(ctx: JobContext, input: Any) -> Any:
    """Holds a running slot: until ``go_file`` exists (if given; alive all along, however
    long the wait), then ``seconds``."""
    with ctx.keep_alive():
        await _start(input)
    seconds = float(input.get("seconds", 0))
    if seconds:
        await trio.sleep(seconds)


@kind_options(max_attempts=3, retry=FLAKY_RETRY)
async def flaky(ctx: JobContext, input: Any) -> Any:
    """Fails its first ``failures`` attempts (default 2), then succeeds."""
    if ctx.attempt <= int(input.get("failures", 2)):
        raise RuntimeError(f"attempt {ctx.attempt} fails on purpose")
    return {"attempt": ctx.attempt}


HANDLERS: dict[str, Handler] = {
    "hold": hold,
    "flaky": flaky,
    "emit": emit,
    "idle": idle,
    "checkpointer": checkpointer,
    "staller": staller,
}
