"""Write a PostgreSQL database with the jobspine release this file is run with, and dump it as
SQL (kept in tests/data as ``v2_postgres.sql`` and ``v2_postgres.ids.json``).

Run with the release's code on the path, on an empty database:
    PYTHONPATH=<checkout> python make_legacy_pg.py postgresql://postgres@127.0.0.1/NAME OUT

The jobs are those of make_legacy_db.py (same handlers, every state a release leaves behind:
completed, failed, cancelled, created, paused with a checkpoint, running with a checkpoint
when the process ends abruptly). The dump (``pg_dump --inserts``) is plain SQL that one
``execute`` loads into an empty database: psql's ``\\`` commands and the statement that empties
the session's search path are left out. Used by tests/test_postgres_queue.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import trio
from make_legacy_db import HANDLERS  # type: ignore[import-not-found]  # run from tests/data

from actors import RuntimeConfig, open_runtime


async def main(url: str, out: str) -> None:
    ids: dict[str, str] = {}
    config = RuntimeConfig(stop_grace=0.5, resume_on_start=False)
    async with open_runtime(url, handlers=HANDLERS, config=config) as rt:
        ids["completed"] = (await rt.create_job("ok", "alice", {"x": 1})).id
        ids["failed"] = (await rt.create_job("boom", "alice", {"x": 2})).id
        ids["cancelled"] = (await rt.create_job("steps", "bob", {"n": 5, "hold_at": 1})).id
        ids["paused"] = (await rt.create_job("steps", "bob", {"n": 5, "hold_at": 2})).id
        ids["running"] = (await rt.create_job("steps", "carol", {"n": 5, "hold_at": 3})).id
        # A job stored as created and never started (the store's own create).
        ids["created"] = (await rt._store.create("carol", "ok", {"x": 3})).id
        while True:
            jobs = {k: await rt.get_job(v) for k, v in ids.items()}
            if (
                jobs["completed"].state == "completed"
                and jobs["failed"].state == "failed"
                and jobs["paused"].checkpoint_version == 2
                and jobs["running"].checkpoint_version == 3
                and jobs["cancelled"].checkpoint_version == 1
            ):
                break
            await trio.sleep(0.01)
        await rt.cancel(ids["cancelled"], by="bob")
        await rt.pause(ids["paused"], by="bob")
        with open(out + ".ids.json", "w") as f:  # noqa: ASYNC230 - the process ends next
            json.dump(ids, f, indent=1, sort_keys=True)
        os._exit(0)  # abrupt: the running job stays running in the database


if __name__ == "__main__":
    url, out = sys.argv[1], sys.argv[2]
    if os.fork() == 0:
        trio.run(main, url, out)
    os.wait()
    dump = subprocess.run(
        ["pg_dump", "--inserts", "--no-owner", "--no-privileges", "--no-comments", url],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    kept = [
        line
        for line in dump.splitlines()
        if not line.startswith(("\\", "--", "SELECT pg_catalog.set_config('search_path'"))
    ]
    with open(out + ".sql", "w") as f:
        f.write("\n".join(line for line in kept if line.strip()) + "\n")
