"""The benchmarks' command lines: a bad value is a usage error, not a crash later; Ctrl-C
ends them quietly.

The peers' programs (:mod:`bench.arq_fanout`, :mod:`bench.saq_fanout`) import this module, so
it imports nothing of jobspine's at load: ``actors`` loads trio-asyncio, which patches asyncio
(its loop lookups), and arq measured with it loaded ran at a third of its rate."""

from __future__ import annotations

import argparse
import asyncio
import math
import re
import sys
import tempfile
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

__all__ = ["MAX_RUNNING", "amount", "interrupted", "output_file", "redis_url", "run_peer"]

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


def redis_url(text: str) -> str:
    """An argparse ``type``: a ``redis://HOST:PORT/DB`` URL (each part optional), as the
    PING before a peer's run and the peers' own clients take it; a usage error otherwise."""
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - ValueError for a port that is no number, or past 65535
    except ValueError:
        parts = None
    if not parts or parts.scheme != "redis" or not re.fullmatch(r"(/\d*)?", parts.path):
        from actors._fanout import redact_redis_url  # not at load: see the module's docstring

        raise argparse.ArgumentTypeError(
            f"expected a redis://HOST:PORT/DB URL, got {redact_redis_url(text)!r}"
        )
    return text


def output_file(text: str) -> str:
    """An argparse ``type``: a file the results can be written to once the run is over
    (replaced, its missing directories made then), tried now, leaving nothing: the file
    opened to append if it exists, else a file made and removed in the nearest directory
    above it that exists; a usage error otherwise (a directory, a path under a file, a
    read-only place)."""
    path = Path(text)
    try:
        if path.exists():
            with path.open("ab"):
                pass
        else:
            nearest = next(p for p in path.parents if p.exists())
            with tempfile.TemporaryFile(dir=nearest):
                pass
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: {exc.strerror}") from None
    return text


def interrupted(exc: BaseException) -> bool:
    """Whether ``exc`` is Ctrl-C (SIGINT), alone or in the groups of the nurseries it went
    through: a program of the bench then exits with status 130, no traceback (a terminal
    sends it to the bench's every process; the bench alone says ``interrupted``)."""
    if isinstance(exc, BaseExceptionGroup):
        return exc.subgroup(KeyboardInterrupt) is not None
    return isinstance(exc, KeyboardInterrupt)


def run_peer(main: Coroutine[Any, Any, None]) -> None:
    """Run a peer program's asyncio ``main`` (saq's or arq's); Ctrl-C ends it with status
    130 and no traceback."""
    try:
        asyncio.run(main)
    except BaseException as exc:
        if not interrupted(exc):
            raise
        sys.exit(130)
