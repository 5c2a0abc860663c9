"""Job kinds for the command-line tests: one that fails, one that runs until stopped."""

from __future__ import annotations

from typing import Any

import trio

from actors import JobContext, JobStopped


async def failing(ctx: JobContext, input: Any) -> Any:
    await ctx.progress(10, "about to fail")
    raise RuntimeError("failed on purpose")


async def endless(ctx: JobContext, input: Any) -> Any:
    """Counts until asked to stop; checkpoints on the way out."""
    state: dict[str, int] = ctx.resumed_from or {"i": 0}
    while not ctx.stopping:
        await ctx.progress(min(99.0, state["i"] / 10), f"tick {state['i']}")
        await trio.sleep(0.05)
        state = {"i": state["i"] + 1}
    await ctx.checkpoint(state)
    raise JobStopped


HANDLERS = {"failing": failing, "endless": endless}
