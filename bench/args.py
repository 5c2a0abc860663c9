"""Command-line amounts for the benchmarks: a bad value is a usage error, not a crash later."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import TypeVar

__all__ = ["MAX_RUNNING", "amount"]

N = TypeVar("N", int, float)

#: The most a count can be that becomes the server's ``max_running`` (or
#: ``max_waiting_per_user``): ``jobspine serve`` refuses a config file past it.
MAX_RUNNING = 2**31 - 1


def amount(
    kind: Callable[[str], N], least: N = 0, *, above: bool = False, most: N | None = None
) -> Callable[[str], N]:
    """An argparse ``type``: ``kind`` of the text; a usage error below ``least`` (or at it,
    with ``above``), above ``most``, not a number (NaN) or infinite."""

    def parse(text: str) -> N:
        value = kind(text)
        if not (value > least if above else value >= least):  # NaN too
            bound = f"more than {least}" if above else f"{least} or more"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text!r}")
        if most is not None and value > most:
            raise argparse.ArgumentTypeError(f"must be {most} or less, got {text!r}")
        if value == math.inf:  # no count, rate or time is: int(inf) fails, a wait never ends
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its "invalid" message
    return parse
