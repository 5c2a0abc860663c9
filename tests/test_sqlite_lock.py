"""Another program holds the SQLite write lock longer than ``busy_timeout`` (issue 8, fault 4):
jobs that checkpoint meanwhile wait and complete, none is failed or declared stalled, reads
keep being served, ``/readyz`` says not ready during the outage and ready after it, by itself.

The lock is real: a second connection in a thread holds ``BEGIN EXCLUSIVE``."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

import orjson
import trio

from actors import BroadcasterConfig, JobContext, JobState, RuntimeConfig
from transport import ServerConfig, open_server

from .conftest import wait_for_state
from .serving import SECRET, eventually
from .test_cli import http_get

JOBS = 5


async def checkpointer(ctx: JobContext, input: Any) -> Any:
    i = ctx.resumed_from["i"] + 1 if ctx.resumed_from else 0
    while i < input["to"]:
        await ctx.checkpoint({"i": i})
        i += 1
        await trio.sleep(0.05)
    return i


def hold_write_lock(
    path: Path, seconds: float, held: trio.Event, token: trio.lowlevel.TrioToken
) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("BEGIN EXCLUSIVE")
        trio.from_thread.run_sync(held.set, trio_token=token)
        time.sleep(seconds)
        conn.execute("ROLLBACK")
    finally:
        conn.close()


async def test_a_locked_database_fails_no_job_and_readyz_follows_it(tmp_path: Path) -> None:
    path = tmp_path / "locked.db"
    config = RuntimeConfig(
        heartbeat_timeout=0.5,  # shorter than the outage: waiting on the store is not a stall
        sqlite_synchronous="NORMAL",
        store_retry_timeout=30.0,
    )
    async with open_server(
        path,
        ServerConfig(secret=SECRET, port=0),
        handlers={"checkpointer": checkpointer},
        runtime_config=config,
        broadcast=BroadcasterConfig(),
        health_port=0,
    ) as served:
        rt = served.runtime
        assert served.health_port is not None
        assert (await http_get(served.health_port, "/readyz"))[0] == 200
        jobs = [await rt.create_job("checkpointer", f"u{n}", {"to": 60}) for n in range(JOBS)]
        await eventually(lambda: rt.store_actor.commits > 20)
        held = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                trio.to_thread.run_sync,
                hold_write_lock,
                path,
                2.0,
                held,
                trio.lowlevel.current_trio_token(),
            )
            await held.wait()
            await eventually(lambda: not rt.store_health.ok, 5)
            status, body = await http_get(served.health_port, "/readyz")
            assert status == 503
            assert b"database is locked" in orjson.loads(body)["reason"].encode()
            # Reads keep being served during the outage.
            with trio.fail_after(1):
                for job in jobs:
                    assert (await rt.get_job(job.id)).state is JobState.RUNNING
                assert len(await rt.list_jobs(states=[JobState.RUNNING])) == JOBS
                assert await rt.read_events(jobs[0].id, limit=3)
        # The lock is gone: the store notices by itself and the jobs go on.
        done = [await wait_for_state(rt, job.id) for job in jobs]
        assert [job.state for job in done] == [JobState.COMPLETED] * JOBS
        assert [job.result for job in done] == [60] * JOBS
        supervision = rt.status()
        assert (supervision.stalls_detected, supervision.failures) == (0, 0)
        assert rt.store_health.ok and rt.store_health.outages >= 1
        assert (await http_get(served.health_port, "/readyz"))[0] == 200
