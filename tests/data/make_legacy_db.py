"""Write a database with the jobspine release this file is run with (kept in tests/data).

Run with the release's code on the path:  PYTHONPATH=<checkout> python make_legacy_db.py OUT

The file holds jobs in every state a release can leave behind: completed (with a result),
failed (with an error), cancelled, created (never started), paused by a user with a
checkpoint, and running with a checkpoint (the process ends abruptly, as in a crash), each
with its events. The WAL is folded into the file afterwards so one file is the whole
database. Used by tests/test_migration.py; the handler names match tests/legacy_handlers.py.
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
from typing import Any

import trio

from actors import JobContext, RuntimeConfig, open_runtime


async def ok(ctx: JobContext, input: Any) -> Any:
    await ctx.progress(50, "half")
    return {"echo": input}


async def boom(ctx: JobContext, input: Any) -> Any:
    raise ValueError("boom")


async def steps(ctx: JobContext, input: Any) -> Any:
    start = 0 if ctx.resumed_from is None else ctx.resumed_from["i"]
    for i in range(start, input["n"]):
        await ctx.checkpoint({"i": i + 1})
        await ctx.progress(100 * (i + 1) / input["n"], f"step {i + 1}")
        if i + 1 >= input.get("hold_at", input["n"]):
            await trio.sleep_forever()
    return {"done": input["n"]}


HANDLERS = {"ok": ok, "boom": boom, "steps": steps}


async def main(path: str) -> None:
    ids: dict[str, str] = {}
    config = RuntimeConfig(stop_grace=0.5, resume_on_start=False)
    async with open_runtime(path, handlers=HANDLERS, config=config) as rt:
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
        with open(path + ".ids.json", "w") as f:  # noqa: ASYNC230 - the process ends next
            json.dump(ids, f, indent=1, sort_keys=True)
        os._exit(0)  # abrupt: the running job stays running in the database


if __name__ == "__main__":
    out = sys.argv[1]
    if os.fork() == 0:
        trio.run(main, out)
    os.wait()
    db = sqlite3.connect(out)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.execute("PRAGMA journal_mode=DELETE")
    db.close()
    for leftover in (out + "-wal", out + "-shm", out + ".owner"):
        if os.path.exists(leftover):
            os.remove(leftover)
