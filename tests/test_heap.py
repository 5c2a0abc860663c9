"""The standalone server's heap trimmer (:mod:`transport._heap`)."""

from __future__ import annotations

import ctypes
import gc
import sys
import threading
import weakref
from pathlib import Path
from typing import Any

import pytest
import trio

from transport._config import resolve
from transport._exit import CLIError, ExitCode
from transport._heap import HeapTrimmer, malloc_trim, tune_collector

from .test_cli import serve_process


async def test_trims_in_a_thread_every_interval_until_cancelled() -> None:
    calls: list[tuple[int, bool]] = []
    loop_thread = threading.current_thread()

    def trim(pad: int) -> int:
        # Run in a worker thread: never on the event loop, which it would stall.
        calls.append((pad, threading.current_thread() is loop_thread))
        return 1

    trimmer = HeapTrimmer(0.05, trim)
    with trio.move_on_after(0.3):
        async with trio.open_nursery() as nursery:
            await nursery.start(trimmer.run)
    assert 3 <= trimmer.trims == len(calls) <= 7
    assert all(call == (0, False) for call in calls)


async def test_without_malloc_trim_nothing_runs() -> None:
    trimmer = HeapTrimmer(0.01)
    trimmer._trim = None  # a C library without it (musl, macOS)
    with trio.fail_after(1):
        async with trio.open_nursery() as nursery:
            await nursery.start(trimmer.run)  # returns at once: the nursery closes
    assert trimmer.trims == 0


@pytest.mark.parametrize("interval", [0, -1.0, float("nan")])
def test_interval_must_be_positive(interval: float) -> None:
    with pytest.raises(ValueError, match="interval must be > 0"):
        HeapTrimmer(interval, lambda pad: 0)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc")
def test_glibc_trim_returns_freed_pages_to_the_kernel() -> None:
    trim = malloc_trim()
    assert trim is not None

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    # 60 MB in blocks under glibc's mmap threshold (kept in the heap when freed); 7 of every
    # 8 freed: the holes are free pages inside the heap, below live blocks, that only
    # malloc_trim gives back.
    blocks = [ctypes.create_string_buffer(4000 + i % 3000) for i in range(12_000)]
    kept = blocks[::8]
    del blocks
    before = rss()
    assert trim(0) == 1
    assert rss() < before - 20 * 2**20
    del kept


async def test_the_standalone_server_trims_every_interval(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JOBSPINE_LOG", "DEBUG")
    monkeypatch.setenv("JOBSPINE_HEAP_TRIM_INTERVAL", "0.1")
    log = trio.Path(tmp_path / "data" / "serve.log")
    async with serve_process(tmp_path / "data"):
        with trio.fail_after(10):
            # Polls another process's log.
            while (await log.read_text()).count("heap trimmed: RSS") < 2:  # noqa: ASYNC110
                await trio.sleep(0.05)
    monkeypatch.setenv("JOBSPINE_HEAP_TRIM_INTERVAL", "0")
    async with serve_process(tmp_path / "off"):
        await trio.sleep(0.5)
    assert "heap trimmed" not in (tmp_path / "off" / "serve.log").read_text()


def test_tune_collector_freezes_startup_and_paces_young_collections() -> None:
    before = gc.get_threshold()
    try:
        tune_collector(50_000)
        assert gc.get_threshold() == (50_000, *before[1:])
        assert gc.get_freeze_count() > 1000  # what startup made: out of every collection
        # A cycle made after startup is still collected.
        node = Node(None)
        node.other = node
        watch = weakref.ref(node)
        del node
        gc.collect()
        assert watch() is None
        gc.unfreeze()
        tune_collector(0)  # Python's pace kept
        assert gc.get_threshold() == (50_000, *before[1:])
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


class Node:
    def __init__(self, other: Any) -> None:
        self.other = other


@pytest.mark.parametrize("value", ["-1", "5", "99", "10000001", "1.5", "many", "nan"])
def test_a_bad_gc_threshold_is_a_usage_error(value: str) -> None:
    with pytest.raises(CLIError) as env:
        resolve({}, {"JOBSPINE_GC_THRESHOLD": value}, {})
    assert env.value.code == ExitCode.USAGE and "gc_threshold" in str(env.value)


@pytest.mark.parametrize(("value", "want"), [("0", 0), ("100", 100), ("", 50_000)])
def test_gc_threshold_values_as_documented(value: str, want: int) -> None:
    assert resolve({}, {"JOBSPINE_GC_THRESHOLD": value}, {})["gc_threshold"].value == want


async def test_the_standalone_server_tunes_its_collector(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JOBSPINE_LOG", "DEBUG")
    monkeypatch.setenv("JOBSPINE_GC_THRESHOLD", "20000")
    async with serve_process(tmp_path / "data"):
        await trio.sleep(0.2)
    text = (tmp_path / "data" / "serve.log").read_text()
    assert "thresholds (20000, 10, 10)" in text and "objects frozen" in text
