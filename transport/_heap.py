"""``jobspine serve``: hand the heap memory the process freed back to the operating system.

glibc's allocator keeps freed memory for reuse: after a burst (10,000 creates over 100
websocket connections, say) the pages of buffers that are gone stay in the process's RSS for
good, about 2 KB per job created in that burst (``jobspine bench --scenario idle``).
``malloc_trim(0)`` returns every free page of every arena to the kernel (``madvise``), not
only the top of the heap. It takes 5 to 10 ms on a 200 MB heap and releases the GIL, so it
runs in a worker thread, never on the event loop.

Only the standalone server does this: an application embedding the runtime owns its process
and its allocator. Where the C library has no ``malloc_trim`` (musl, macOS) nothing runs.

The server also tunes Python's cyclic garbage collector (:func:`tune_collector`): measured on
the fan-out benchmark, the collector's default pace (a young collection every 700 net
allocations) took about 16% of the event loop's time, and each full collection, which scans
every object the process holds, paused it for 35 to 60 ms: most of the latency tail.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
from collections.abc import Callable

import trio

__all__ = ["HeapTrimmer", "malloc_trim", "resident_bytes", "tune_collector"]

log = logging.getLogger("jobspine.heap")


def malloc_trim() -> Callable[[int], int] | None:
    """The C library's ``malloc_trim(pad) -> released?``, None where it has none. Looked up
    among the symbols the process has loaded (``dlopen(NULL)``): no search for the library
    file, which fails on images without ``ldconfig``."""
    try:
        trim: Callable[[int], int] | None = getattr(ctypes.CDLL(None), "malloc_trim", None)
    except OSError:
        return None
    return trim


def tune_collector(young_threshold: int) -> None:
    """Once the server has started: freeze what startup made (modules, handlers, the runtime's
    actors: they live as long as the process) out of every later collection, and collect the
    youngest generation every ``young_threshold`` net allocations instead of 700 (0: Python's
    pace is kept). Memory still goes back as soon as nothing refers to it (reference
    counting); only objects in reference cycles wait for a collection, so the heap holds at
    most about ``young_threshold`` more objects (50,000: a few MB)."""
    gc.freeze()
    if young_threshold > 0:
        _, middle, old = gc.get_threshold()
        gc.set_threshold(young_threshold, middle, old)
    frozen, thresholds = gc.get_freeze_count(), gc.get_threshold()
    log.debug("garbage collector: %d objects frozen, thresholds %s", frozen, thresholds)


def resident_bytes() -> int | None:
    """This process's resident set size in bytes (Linux ``/proc``), None elsewhere."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return None


class HeapTrimmer:
    """Every ``interval`` seconds (> 0), ``trim(0)`` in a worker thread; ``trims`` counts
    them. ``trim``: :func:`malloc_trim` unless given (None: the actor returns at once)."""

    def __init__(self, interval: float, trim: Callable[[int], int] | None = None) -> None:
        if not interval > 0:
            raise ValueError(f"interval must be > 0 seconds, got {interval!r}")
        self.interval = interval
        self._trim = trim if trim is not None else malloc_trim()
        self.trims = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        trim = self._trim
        if trim is None:
            log.debug("no malloc_trim in this C library: freed heap memory stays mapped")
            return
        while True:
            await trio.sleep(self.interval)
            # Not abandoned on cancel: the call is short, and no thread outlives the nursery.
            before, after = await trio.to_thread.run_sync(self._measured, trim)
            self.trims += 1
            if before is not None and after is not None:
                log.debug("heap trimmed: RSS %.1f -> %.1f MB", before / 2**20, after / 2**20)

    @staticmethod
    def _measured(trim: Callable[[int], int]) -> tuple[int | None, int | None]:
        before = resident_bytes()
        trim(0)
        return before, resident_bytes()
