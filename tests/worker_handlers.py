"""Handlers for the worker tests, importable by a ``jobspine worker`` process
(``--handlers tests.worker_handlers``)."""

from __future__ import annotations

import time
from typing import Any

import trio

from actors import (
    JobContext,
    JobStopped,
    PermanentError,
    RetryPolicy,
    kind_options,
    validates,
)

#: Retries within the test's patience: 50 ms, then 100 ms, no jitter.
QUICK = RetryPolicy(initial_interval=0.05, maximum_interval=0.1, jitter=0.0)


async def steps(ctx: JobContext, input: Any) -> Any:
    """``n`` steps of ``delay`` seconds, each reported and checkpointed; resumes from its
    checkpoint; on a stop request, checkpoints and acknowledges it."""
    start = ctx.resumed_from["i"] if ctx.resumed_from else 0
    for i in range(start + 1, input["n"] + 1):
        await trio.sleep(input.get("delay", 0))
        if ctx.stopping:
            raise JobStopped
        await ctx.progress(100 * i / input["n"], f"step {i}")
        await ctx.checkpoint({"i": i})
    return {"done": input["n"], "from": start}


async def boom(ctx: JobContext, input: Any) -> Any:
    raise ValueError(f"bad thing: {input['why']}")


async def silent(ctx: JobContext, input: Any) -> Any:
    """Never reports anything: stalls."""
    await trio.sleep_forever()


async def marked(ctx: JobContext, input: Any) -> Any:
    """Creates the file ``mark`` as it starts, then never reports anything (a stall)."""
    with open(input["mark"], "x"):  # noqa: ASYNC230 - the test waits for it to exist
        pass
    await trio.sleep_forever()


async def spin(ctx: JobContext, input: Any) -> Any:
    """Spins the CPU for ``seconds`` without awaiting (the worst a handler can do)."""
    await ctx.progress(1, "spinning")
    end = time.perf_counter() + input["seconds"]
    n = 0
    while time.perf_counter() < end:
        n += 1
    return {"loops": n}


async def ticker(ctx: JobContext, input: Any) -> Any:
    """``count`` progress events, one per ``interval`` seconds."""
    for i in range(input["count"]):
        await ctx.progress(100 * i / input["count"], f"tick {i}")
        await trio.sleep(input["interval"])
    return {"ticks": input["count"]}


class RefusedError(PermanentError):
    """A permanent failure of a type of its own: only the worker knows it is permanent."""


@kind_options(max_attempts=3, retry=QUICK)
async def flaky(ctx: JobContext, input: Any) -> Any:
    """Checkpoints ``i`` up to ``n``; attempts before ``succeed_at`` fail after their steps
    (``error``: ``"runtime"`` retried, ``"refused"`` permanent, ``"value"`` non-retryable)."""
    start = ctx.resumed_from["i"] if ctx.resumed_from else 0
    for i in range(start + 1, input["n"] + 1):
        await ctx.checkpoint({"i": i})
    if ctx.attempt < input["succeed_at"]:
        error = input.get("error", "runtime")
        message = f"attempt {ctx.attempt} fails"
        if error == "refused":
            raise RefusedError(message)
        if error == "value":
            raise ValueError(message)
        raise RuntimeError(message)
    return {"attempt": ctx.attempt, "from": start}


@kind_options(max_attempts=2, retry=QUICK, requeue_stalled=True)
async def hang(ctx: JobContext, input: Any) -> Any:
    """Checkpoints once, then never reports again (a stall); a kind that re-queues stalls."""
    await ctx.checkpoint({"at": ctx.attempt})
    await trio.sleep_forever()


def _check_count(input: Any) -> None:
    """Trips over input without ``n`` (a KeyError): that refuses it too."""
    if not 1 <= input["n"] <= 100:
        raise ValueError("n must be in 1..100")


@kind_options(max_attempts=3, retry=QUICK)
@validates(_check_count)
async def counted(ctx: JobContext, input: Any) -> Any:
    """Counts to ``n`` (1..100, checked before it runs)."""
    await ctx.progress(100, f"counted to {input['n']}")
    return {"counted": input["n"]}


HANDLERS = {
    "steps": steps,
    "boom": boom,
    "silent": silent,
    "marked": marked,
    "spin": spin,
    "ticker": ticker,
    "flaky": flaky,
    "hang": hang,
    "counted": counted,
}
