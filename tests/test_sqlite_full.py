"""A SQLite database on a full disk is reported unavailable for as long as the disk is full,
and available again only once a write can be made.

The disk is real: a tmpfs of a few MiB mounted for the test (it needs the right to mount,
which root has, as in CI; without it the test fails saying so), filled by a file of
zeros and freed by removing that file. Before this was fixed, the store's probe of an
unavailable database only took SQLite's write lock and gave it back, which a full disk
allows: after every ``store_retry_timeout`` the store reported the database back (``/readyz``
ready, "database available again" in the log) and the next write found the disk as full as
before, over and over, for as long as the disk stayed full."""

from __future__ import annotations

import errno
import logging
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from actors import JobContext, RuntimeConfig, StoreError, open_runtime

from .serving import eventually


@contextmanager
def small_disk(path: Path, size: str = "8m") -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``path`` for the block."""
    path.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.fail(
            "this test fills a real disk, a tmpfs it mounts: run it as root (CI does);"
            f" mount said: {mounted.stderr.strip() or mounted.returncode}"
        )
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def fill(path: Path) -> None:
    """Write zeros to ``path`` until its disk has no space left."""
    block = bytes(64 * 1024)
    with path.open("wb", buffering=0) as file:
        for size in (len(block), 4096, 512):
            while True:
                try:
                    file.write(block[:size])
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
    assert os.statvfs(path).f_bavail == 0


async def test_a_full_disk_stays_unavailable_until_a_write_can_be_made(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="jobspine.store")
    acked: list[int] = []

    async def counter(ctx: JobContext, input: Any) -> Any:
        i = ctx.resumed_from["i"] + 1 if ctx.resumed_from else 0
        while True:
            await ctx.checkpoint({"i": i, "pad": "x" * 3000})
            acked.append(i)
            i += 1
            await trio.sleep(0.005)

    config = RuntimeConfig(
        heartbeat_timeout=600,  # the job's recovery is not this test's subject
        store_retry_timeout=0.5,
        heartbeat_flush_interval=0.05,  # the store probes an unavailable database this often
        sqlite_synchronous="NORMAL",
    )
    with small_disk(tmp_path / "disk") as disk:
        filler = disk / "filler"
        async with open_runtime(
            disk / "jobs.db", handlers={"counter": counter}, config=config
        ) as rt:
            job = await rt.create_job("counter", "alice", {})
            await eventually(lambda: len(acked) >= 20)
            # The disk fills up. (Less than a WAL's worth was written: SQLite's WAL has not
            # been checkpointed and restarted, so every commit appends to it.)
            await trio.to_thread.run_sync(fill, filler)
            with pytest.raises(StoreError, match="database or disk is full"):
                await rt.create_job("counter", "bob", {})
            assert not rt.store_health.ok
            # Writes have given up waiting; the store is idle and probes, 40 times in 2 s.
            # The disk is as full as before: no probe may call the database back.
            await trio.sleep(2)
            assert not rt.store_health.ok, "reported available while no write can be made"
            assert rt.store_health.reason == "database unavailable: database or disk is full"
            assert rt.store_health.outages == 1
            assert not [r for r in caplog.records if "available again" in r.getMessage()]
            last_acked = acked[-1]
            # Space returns: the store notices by itself, says so once, and takes writes.
            filler.unlink()
            await eventually(lambda: rt.store_health.ok)
            back = [r.getMessage() for r in caplog.records if "available again" in r.getMessage()]
            assert len(back) == 1, back
            created = await rt.create_job("counter", "bob", {})
            assert (await rt.get_job(created.id)).user_id == "bob"
            # Nothing acknowledged was lost: the job's latest acknowledged checkpoint is kept.
            stored = await rt.get_job(job.id)
            assert stored.checkpoint is not None and stored.checkpoint["i"] >= last_acked
