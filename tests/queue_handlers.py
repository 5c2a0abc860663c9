"""A job kind for the crash loop: it fails its first two attempts, then finishes; its retries
wait in the queue with a short backoff."""

from __future__ import annotations

from typing import Any

import trio

from actors import JobContext, RetryPolicy, kind_options


@kind_options(max_attempts=3, retry=RetryPolicy(initial_interval=0.2, maximum_interval=0.5))
async def flaky(ctx: JobContext, input: Any) -> Any:
    start = 0 if ctx.resumed_from is None else ctx.resumed_from["i"]
    for i in range(start, input["steps"]):
        await trio.sleep(0.02)
        await ctx.checkpoint({"i": i + 1})
    if ctx.attempt <= 2:
        raise RuntimeError(f"attempt {ctx.attempt} fails on purpose")
    return {"steps": input["steps"]}


HANDLERS = {"flaky": flaky}
