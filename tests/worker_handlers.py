"""Handlers for the worker tests, importable by a ``jobspine worker`` process
(``--handlers tests.worker_handlers``)."""

from __future__ import annotations

import time
from typing import Any

import trio

from actors import JobContext, JobStopped


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


HANDLERS = {"steps": steps, "boom": boom, "silent": silent, "spin": spin, "ticker": ticker}
