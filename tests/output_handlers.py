"""Job kinds for the output attacks: their step labels, errors, results and input checks
hold whatever text the job's input gives them."""

from __future__ import annotations

from typing import Any

from actors import InvalidInputError, JobContext, validates


async def hostile(ctx: JobContext, input: Any) -> Any:
    """Shows ``input["text"]`` as its step and checkpoint, then fails with it as the error
    message (``fail``) or returns it."""
    await ctx.progress(10, input["text"])
    await ctx.checkpoint({"text": input["text"]})
    if input.get("fail"):
        raise RuntimeError(input["text"])
    return {"text": input["text"]}


def _picky_input(input: Any) -> None:
    if input.get("symbol") != "ACME":
        raise InvalidInputError(f"unknown symbol {input.get('symbol')}")


@validates(_picky_input)
async def picky(ctx: JobContext, input: Any) -> Any:
    """Takes only the symbol ACME; its input check quotes any other as it is."""
    return input


HANDLERS = {"hostile": hostile, "picky": picky}
