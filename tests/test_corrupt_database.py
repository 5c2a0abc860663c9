"""A database file damaged under a running server: one clear error, a server that says it is
not ready, and no traceback per request."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

import orjson
import trio

from actors import JobContext, RuntimeConfig, open_runtime

from .test_cli import http_get, serve_process


async def hang(ctx: JobContext, input: Any) -> Any:
    await trio.sleep_forever()


async def test_a_corrupt_page_makes_the_server_unready_and_says_so_once(tmp_path: Path) -> None:
    """The jobs table's root page overwritten (what a disk fault or a copy made mid-write
    leaves): the server starts (nothing it reads at start is damaged), the first request that
    reads the page is refused with the cause and what to do, later ones the same way without
    another traceback, and /readyz answers 503. Before, it stayed ready and logged a
    traceback for every request and every claim (each second)."""
    data = tmp_path / "data"
    data.mkdir()
    db = data / "jobspine.db"
    config = RuntimeConfig(stop_grace=0.1)
    async with open_runtime(db, handlers={"research": hang}, config=config) as rt:
        for i in range(300):
            await rt.create_job("research", f"u{i % 5}", {"content": "z" * 2000}, delay=3600)
    # Half of them due while the server runs (claims read them), none started before: a job
    # paused at the close would be resumed at the start, which would read the damaged page
    # (the creates take longer than any short delay on a slow machine).
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE jobs SET ready_at = ? WHERE rowid % 2 = 0", (time.time() + 0.5,))
    conn.close()
    with db.open("r+b") as file:  # page 4: the jobs table's root (pages are 4 KiB)
        file.seek(4096 * 3)
        file.write(b"\xff" * 4096)
    async with serve_process(data) as served:
        for _ in range(3):
            refused = await served.cli("submit", "research", '{"query": "q"}')
            assert refused.returncode == 6, refused
            assert "the database is corrupt (database disk image is malformed)" in refused.stderr
            assert "restore it from a backup" in refused.stderr
        status, body = await http_get(served.health, "/readyz")
        assert status == 503 and orjson.loads(body)["status"] == "database corrupt"
        await trio.sleep(2.5)  # claims retried each second meanwhile
        log = (data / "serve.log").read_text()
        assert log.count("Traceback") == 1, log
        assert log.count("ERROR jobspine.store: the database is corrupt") == 1, log
        assert log.count("claim failed") == 1, log  # then retried each second, quietly
