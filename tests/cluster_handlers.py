"""Job kinds for the cluster tests (``--handlers tests.cluster_handlers:HANDLERS``).

``steps`` checkpoints every step (a takeover pauses it at its latest checkpoint), ``requeued``
is the same with ``requeue_stalled`` (a takeover puts it back in the queue, another node
resumes it from the checkpoint), ``plain`` only reports progress (a takeover fails it: there
is nothing to resume from), ``flaky`` fails its first two attempts (its retries wait in the
queue and may be claimed by any node)."""

from __future__ import annotations

from typing import Any

import trio

from actors import JobContext, kind_options

from .queue_handlers import flaky


async def steps(ctx: JobContext, input: Any) -> Any:
    """``n`` steps of ``delay`` seconds, each reported and checkpointed; returns where it
    resumed ``from`` (0: it never was)."""
    start = ctx.resumed_from["i"] if ctx.resumed_from else 0
    for i in range(start, input["n"]):
        await trio.sleep(input["delay"])
        await ctx.progress(100 * (i + 1) / input["n"])
        await ctx.checkpoint({"i": i + 1})
    return {"done": input["n"], "from": start}


@kind_options(requeue_stalled=True)
async def requeued(ctx: JobContext, input: Any) -> Any:
    """As ``steps`` (the options mark the function: it cannot be ``steps`` itself)."""
    return await steps(ctx, input)


async def plain(ctx: JobContext, input: Any) -> Any:
    """``n`` steps of ``delay`` seconds, reported, never checkpointed."""
    for i in range(input["n"]):
        await trio.sleep(input["delay"])
        await ctx.progress(100 * (i + 1) / input["n"])
    return {"done": input["n"]}


HANDLERS = {"steps": steps, "requeued": requeued, "plain": plain, "flaky": flaky}
