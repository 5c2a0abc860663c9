"""Demo handlers (research, trade, analysis): realistic, deterministic simulated work.

Each runs named steps, reports progress, checkpoints periodically and on a stop request, and
continues correctly from a checkpoint: the result of an interrupted and resumed run equals the
result of an uninterrupted one. ``delay`` (seconds per unit of work) sets the pace.

Each handler's input is checked at ``create_job`` and ``restart`` (:func:`validates`) by the
same function the handler reads it with: every field's type and range, unknown fields refused.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from typing import Any

import attrs
import trio

from ._errors import InvalidInputError, JobStopped, shown
from ._worker import Handler, JobContext, validates

__all__ = [
    "DEMO_HANDLERS",
    "AnalysisInput",
    "ResearchInput",
    "TradeInput",
    "analysis_handler",
    "analysis_input",
    "research_handler",
    "research_input",
    "trade_handler",
    "trade_input",
]


def _digest(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "big")


#: Bounds of the demo inputs (the pace is seconds per unit of work).
MAX_UNITS = 10_000
MAX_DELAY = 60.0
MAX_TEXT = 1_000_000


class _Fields:
    """Reads one demo input object: each field's type and range, and no unknown field."""

    def __init__(self, kind: str, input: Any, fields: tuple[str, ...]) -> None:
        if not isinstance(input, dict):
            raise InvalidInputError(f"{kind}: input must be an object with {', '.join(fields)}")
        unknown = sorted(set(input) - set(fields))
        if unknown:
            raise InvalidInputError(
                f"{kind}: unknown input field {shown(unknown[0])}; fields: {', '.join(fields)}"
            )
        self.kind = kind
        self.input: dict[str, Any] = input

    def _refuse(self, key: str, rule: str) -> InvalidInputError:
        return InvalidInputError(
            f"{self.kind}: {key!r} must be {rule}, not {shown(self.input[key])}"
        )

    def text(self, key: str, max_length: int, *, empty: bool = False) -> str:
        if key not in self.input:
            raise InvalidInputError(f"{self.kind}: input needs {key!r} (a string)")
        value = self.input[key]
        if not isinstance(value, str) or not (0 if empty else 1) <= len(value) <= max_length:
            raise self._refuse(key, f"a string of at most {max_length} characters")
        return value

    def integer(self, key: str, default: int, low: int, high: int) -> int:
        value = self.input.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise self._refuse(key, f"an integer in {low}..{high}")
        return value

    def number(self, key: str, default: float | None, low: float, high: float) -> float:
        if key not in self.input and default is None:
            raise InvalidInputError(f"{self.kind}: input needs {key!r} (a number)")
        value = self.input.get(key, default)
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not low <= value <= high  # also refuses NaN
        ):
            raise self._refuse(key, f"a number in {low:g}..{high:g}")
        return float(value)


@attrs.frozen
class ResearchInput:
    query: str
    depth: int
    delay: float
    checkpoint_every: int


def research_input(input: Any) -> ResearchInput:
    """``{"query": str, "depth"?: 1..10000 (3), "delay"?: 0..60 s (0.2),
    "checkpoint_every"?: 1..10000 (1)}``; raises :class:`InvalidInputError`."""
    fields = _Fields("research", input, ("query", "depth", "delay", "checkpoint_every"))
    return ResearchInput(
        fields.text("query", 1000),
        fields.integer("depth", 3, 1, MAX_UNITS),
        fields.number("delay", 0.2, 0, MAX_DELAY),
        fields.integer("checkpoint_every", 1, 1, MAX_UNITS),
    )


@attrs.frozen
class TradeInput:
    symbol: str
    side: str
    quantity: float
    slices: int
    delay: float


def trade_input(input: Any) -> TradeInput:
    """``{"symbol": str, "side": "buy"|"sell", "quantity": > 0, "slices"?: 1..10000 (5),
    "delay"?: 0..60 s (0.2)}``; raises :class:`InvalidInputError`."""
    fields = _Fields("trade", input, ("symbol", "side", "quantity", "slices", "delay"))
    symbol = fields.text("symbol", 32)
    side = fields.text("side", 4)
    if side not in ("buy", "sell"):
        raise InvalidInputError(f"trade: side must be 'buy' or 'sell', not {shown(side)}")
    quantity = fields.number("quantity", None, 0, 1e15)
    if quantity <= 0:
        raise InvalidInputError(f"trade: 'quantity' must be more than 0, not {quantity:g}")
    return TradeInput(
        symbol,
        side,
        quantity,
        fields.integer("slices", 5, 1, MAX_UNITS),
        fields.number("delay", 0.2, 0, MAX_DELAY),
    )


@attrs.frozen
class AnalysisInput:
    content: str
    chunk_size: int
    delay: float


def analysis_input(input: Any) -> AnalysisInput:
    """``{"content": str, "chunk_size"?: 1..1000000 (200), "delay"?: 0..60 s (0.2)}``;
    raises :class:`InvalidInputError`."""
    fields = _Fields("analysis", input, ("content", "chunk_size", "delay"))
    return AnalysisInput(
        fields.text("content", MAX_TEXT, empty=True),
        fields.integer("chunk_size", 200, 1, MAX_TEXT),
        fields.number("delay", 0.2, 0, MAX_DELAY),
    )


async def _unit(ctx: JobContext, delay: float, state: dict[str, Any]) -> None:
    """One unit of simulated work, honouring a stop request with a final checkpoint."""
    if ctx.stopping:
        await ctx.checkpoint(state)
        raise JobStopped
    await trio.sleep(delay)


@validates(research_input)
async def research_handler(ctx: JobContext, input: Any) -> Any:
    """Search ``depth`` sources for a query, read each, then synthesize a summary."""
    spec = research_input(input)
    query, depth, delay, every = spec.query, spec.depth, spec.delay, spec.checkpoint_every
    state: dict[str, Any] = ctx.resumed_from or {"done": 0, "findings": []}
    total = depth + 1
    if ctx.resumed_from is None:  # a resumed run goes on at its source, not planning again
        await ctx.progress(0.0, "planning")
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


@validates(trade_input)
async def trade_handler(ctx: JobContext, input: Any) -> Any:
    """Execute an order in ``slices`` child orders at simulated fill prices."""
    spec = trade_input(input)
    symbol, side, quantity, slices = spec.symbol, spec.side, spec.quantity, spec.slices
    state: dict[str, Any] = ctx.resumed_from or {"fills": []}
    base = 50 + _digest(symbol) % 450
    while len(state["fills"]) < slices:
        n = len(state["fills"])
        await ctx.progress(100 * n / slices, f"filling slice {n + 1}/{slices}")
        await _unit(ctx, spec.delay, state)
        price = round(base * (1 + ((_digest(symbol, side, n) % 201) - 100) / 10_000), 4)
        state = {"fills": [*state["fills"], {"qty": quantity / slices, "price": price}]}
        await ctx.checkpoint(state)
    await ctx.progress(100.0, "settling")
    notional = sum(f["qty"] * f["price"] for f in state["fills"])
    return {
        "symbol": symbol,
        "side": side,
        "filled": round(sum(f["qty"] for f in state["fills"]), 8),
        "avg_price": round(notional / quantity, 4),
    }


@validates(analysis_input)
async def analysis_handler(ctx: JobContext, input: Any) -> Any:
    """Count words of ``content`` chunk by chunk; report the most common ones."""
    spec = analysis_input(input)
    content, size = spec.content, spec.chunk_size
    chunks = [content[i : i + size] for i in range(0, len(content), size)] or [""]
    state: dict[str, Any] = ctx.resumed_from or {"index": 0, "counts": {}}
    counts = Counter(state["counts"])
    while state["index"] < len(chunks):
        i = state["index"]
        await ctx.progress(100 * i / len(chunks), f"analysing chunk {i + 1}/{len(chunks)}")
        await _unit(ctx, spec.delay, state)
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
