"""Command-line amounts for the benchmarks: a bad value is a usage error, not a crash later."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TypeVar

__all__ = ["amount"]

N = TypeVar("N", int, float)


def amount(
    kind: Callable[[str], N], least: N = 0, *, above: bool = False, most: N | None = None
) -> Callable[[str], N]:
    """An argparse ``type``: ``kind`` of the text; a usage error below ``least`` (or at it,
    with ``above``), above ``most``, or not a number (NaN)."""

    def parse(text: str) -> N:
        value = kind(text)
        if not (value > least if above else value >= least):  # NaN too
            bound = f"more than {least}" if above else f"{least} or more"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text!r}")
        if most is not None and value > most:
            raise argparse.ArgumentTypeError(f"must be {most} or less, got {text!r}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its "invalid" message
    return parse
