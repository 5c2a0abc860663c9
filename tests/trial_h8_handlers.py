"""A CPU-bound kind as README's *CPU-bound code in a worker* writes it: each step computes
in a thread under ``ctx.keep_alive()`` (here a step that takes an hour)."""

from __future__ import annotations

import time
from typing import Any

import trio

from actors import JobContext


async def grind(ctx: JobContext, input: Any) -> Any:
    await ctx.progress(1, "grinding")
    with ctx.keep_alive():
        await trio.to_thread.run_sync(time.sleep, 3600)
    return "ground"


HANDLERS = {"grind": grind}
