"""Demo handlers (research, trade, analysis): realistic, deterministic simulated work.

Each runs named steps, reports progress, checkpoints periodically and on a stop request, and
continues correctly from a checkpoint: the result of an interrupted and resumed run equals the
result of an uninterrupted one. ``delay`` (seconds per unit of work) sets the pace.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from typing import Any

import trio

from ._errors import InvalidInputError, JobStopped
from ._worker import Handler, JobContext

__all__ = ["DEMO_HANDLERS", "analysis_handler", "research_handler", "trade_handler"]


def _digest(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "big")


def _require(input: Any, key: str, kind: type | tuple[type, ...]) -> Any:
    if not isinstance(input, dict) or not isinstance(input.get(key), kind):
        raise InvalidInputError(f"input needs {key!r} of type {kind}")
    return input[key]


async def _unit(ctx: JobContext, delay: float, state: dict[str, Any]) -> None:
    """One unit of simulated work, honouring a stop request with a final checkpoint."""
    if ctx.stopping:
        await ctx.checkpoint(state)
        raise JobStopped
    await trio.sleep(delay)


async def research_handler(ctx: JobContext, input: Any) -> Any:
    """Search ``depth`` sources for a query, read each, then synthesize a summary."""
    query = _require(input, "query", str)
    depth = int(input.get("depth", 3))
    delay = float(input.get("delay", 0.2))
    every = int(input.get("checkpoint_every", 1))
    state: dict[str, Any] = ctx.resumed_from or {"done": 0, "findings": []}
    total = depth + 1
    await ctx.progress(100 * state["done"] / total, "planning")
    while state["done"] < depth:
        i = state["done"]
        await ctx.progress(100 * i / total, f"reading source {i + 1}/{depth}")
        await _unit(ctx, delay, state)
        score = _digest(query, i) % 100
        state = {"done": i + 1, "findings": [*state["findings"], {"source": i + 1, "score": score}]}
        if state["done"] % every == 0:
            await ctx.checkpoint(state)
    await ctx.progress(100 * depth / total, "synthesizing")
    await _unit(ctx, delay, state)
    best = max(state["findings"], key=lambda f: f["score"], default=None)
    return {
        "query": query,
        "sources": len(state["findings"]),
        "best_source": None if best is None else best["source"],
        "relevance": sum(f["score"] for f in state["findings"]),
    }


async def trade_handler(ctx: JobContext, input: Any) -> Any:
    """Execute an order in ``slices`` child orders at simulated fill prices."""
    symbol = _require(input, "symbol", str)
    side = _require(input, "side", str)
    if side not in ("buy", "sell"):
        raise InvalidInputError(f"side must be 'buy' or 'sell', not {side!r}")
    quantity = float(_require(input, "quantity", (int, float)))
    slices = int(input.get("slices", 5))
    delay = float(input.get("delay", 0.2))
    state: dict[str, Any] = ctx.resumed_from or {"fills": []}
    base = 50 + _digest(symbol) % 450
    while len(state["fills"]) < slices:
        n = len(state["fills"])
        await ctx.progress(100 * n / slices, f"filling slice {n + 1}/{slices}")
        await _unit(ctx, delay, state)
        price = round(base * (1 + ((_digest(symbol, side, n) % 201) - 100) / 10_000), 4)
        state = {"fills": [*state["fills"], {"qty": quantity / slices, "price": price}]}
        await ctx.checkpoint(state)
    await ctx.progress(100.0, "settling")
    notional = sum(f["qty"] * f["price"] for f in state["fills"])
    return {
        "symbol": symbol,
        "side": side,
        "filled": round(sum(f["qty"] for f in state["fills"]), 8),
        "avg_price": round(notional / quantity, 4) if quantity else 0.0,
    }


async def analysis_handler(ctx: JobContext, input: Any) -> Any:
    """Count words of ``content`` chunk by chunk; report the most common ones."""
    content = _require(input, "content", str)
    size = max(1, int(input.get("chunk_size", 200)))
    delay = float(input.get("delay", 0.2))
    chunks = [content[i : i + size] for i in range(0, len(content), size)] or [""]
    state: dict[str, Any] = ctx.resumed_from or {"index": 0, "counts": {}}
    counts = Counter(state["counts"])
    while state["index"] < len(chunks):
        i = state["index"]
        await ctx.progress(100 * i / len(chunks), f"analysing chunk {i + 1}/{len(chunks)}")
        await _unit(ctx, delay, state)
        # Words split at chunk edges are counted by halves: simple and deterministic.
        counts.update(w.lower() for w in chunks[i].split())
        state = {"index": i + 1, "counts": dict(counts)}
        await ctx.checkpoint(state)
    await ctx.progress(100.0, "summarizing")
    top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:5]
    return {"chunks": len(chunks), "words": sum(counts.values()), "top_words": [w for w, _ in top]}


DEMO_HANDLERS: dict[str, Handler] = {
    "research": research_handler,
    "trade": trade_handler,
    "analysis": analysis_handler,
}
