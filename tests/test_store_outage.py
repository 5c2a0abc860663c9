"""A database that is briefly unavailable fails no job (issue 8, fault 4).

Timing logic (retry with backoff, liveness while waiting, the retry bound, the probe that
notices the database is back) runs under ``autojump_clock`` against a MemoryBackend that
refuses writes as a locked SQLite database would. The real lock, from a second connection,
is in ``test_sqlite_lock.py``.
"""

from __future__ import annotations

import sqlite3
from typing import Any

import pytest
import trio

from actors import (
    BroadcasterConfig,
    JobContext,
    JobState,
    MemoryBackend,
    Outbox,
    RuntimeConfig,
    StoreError,
    StoreUnavailableError,
    open_runtime,
)
from actors._backend import is_outage
from actors._fanout import FanoutConfig

from .backends import Commit, CommitHooks
from .conftest import memory_runtime, wait_for_state


class LockedBackend(CommitHooks, MemoryBackend):
    """Refuses every write, as SQLite does when another program holds the write lock longer
    than ``busy_timeout``, while ``locked`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.locked = False
        self.refused = 0

    def _check(self) -> None:
        if self.locked:
            self.refused += 1
            raise sqlite3.OperationalError("database is locked")

    async def ping(self) -> None:
        self._check()

    async def before_commit(self, commit: Commit) -> None:
        await trio.sleep(0.01)  # the busy wait inside SQLite, shortened
        self._check()


def test_outages_are_told_from_request_tied_failures() -> None:
    assert is_outage(sqlite3.OperationalError("database is locked"))
    assert is_outage(sqlite3.OperationalError("disk I/O error"))
    assert is_outage(ConnectionResetError())
    assert is_outage(StoreUnavailableError("down"))
    assert not is_outage(sqlite3.IntegrityError("UNIQUE constraint failed"))
    assert not is_outage(sqlite3.OperationalError("no such table: jobs"))
    assert not is_outage(UnicodeEncodeError("utf-8", "\udce9", 0, 1, "surrogates not allowed"))


async def checkpointer(ctx: JobContext, input: Any) -> Any:
    i = ctx.resumed_from["i"] + 1 if ctx.resumed_from else 0
    while i < input["to"]:
        await ctx.checkpoint({"i": i})
        i += 1
        await trio.sleep(0.05)
    return i


async def test_jobs_wait_out_an_outage_shorter_than_the_retry_bound(
    autojump_clock: trio.abc.Clock,
) -> None:
    backend = LockedBackend()
    async with memory_runtime(
        {"checkpointer": checkpointer},
        backend,
        heartbeat_timeout=0.5,
        store_retry_timeout=30.0,
    ) as rt:
        jobs = [await rt.create_job("checkpointer", f"u{n}", {"to": 200}) for n in range(5)]
        await trio.sleep(1)
        before = {job.id: (await rt.get_job(job.id)).checkpoint_version for job in jobs}
        backend.locked = True  # for 6 s: twelve heartbeat timeouts
        await trio.sleep(0.5)
        assert not rt.store_health.ok
        assert "database is locked" in (rt.store_health.reason or "")
        # Reads are served from committed state while writes wait.
        with trio.fail_after(0.1):
            for job in jobs:
                seen = await rt.get_job(job.id)
                assert seen.state is JobState.RUNNING
                assert seen.checkpoint_version >= before[job.id]
            assert len(await rt.list_jobs(states=[JobState.RUNNING])) == 5
            assert await rt.read_events(jobs[0].id, limit=3)
        await trio.sleep(5.5)
        backend.locked = False
        done = [await wait_for_state(rt, job.id) for job in jobs]
        assert [job.state for job in done] == [JobState.COMPLETED] * 5
        assert [job.result for job in done] == [200] * 5
        assert backend.refused >= 5  # retried with backoff, not once
        assert rt.store_health.ok and rt.store_health.outages == 1
        status = rt.status()
        assert (status.stalls_detected, status.failures) == (0, 0)


async def test_an_outage_past_the_retry_bound_pauses_jobs_at_their_checkpoint(
    autojump_clock: trio.abc.Clock,
) -> None:
    backend = LockedBackend()
    acked: dict[str, int] = {}

    async def counting(ctx: JobContext, input: Any) -> Any:
        i = ctx.resumed_from["i"] + 1 if ctx.resumed_from else 0
        while i < input["to"]:
            await ctx.checkpoint({"i": i})
            acked[ctx.job_id] = i
            i += 1
            await trio.sleep(0.05)
        return i

    async with memory_runtime(
        {"counting": counting}, backend, heartbeat_timeout=0.5, store_retry_timeout=3.0
    ) as rt:
        jobs = [await rt.create_job("counting", f"u{n}", {"to": 200}) for n in range(5)]
        await trio.sleep(1)
        backend.locked = True
        await trio.sleep(10)  # well past store_retry_timeout: writes have failed meanwhile
        assert not rt.store_health.ok
        with pytest.raises(StoreUnavailableError, match="store_retry_timeout"):
            await rt.create_job("counting", "late", {"to": 1})
        for job in jobs:
            assert (await rt.get_job(job.id)).state is JobState.RUNNING  # never failed
        backend.locked = False
        # Nothing writes by itself: the probe notices the database is back.
        await trio.sleep(2)
        assert rt.store_health.ok
        for job in jobs:
            paused = await wait_for_state(rt, job.id, {JobState.PAUSED, JobState.FAILED})
            assert paused.state is JobState.PAUSED, paused.error
            assert paused.pause_reason == "store_unavailable"
            assert paused.recovery_attempts == 0  # not counted against the job
            assert paused.checkpoint == {"i": acked[job.id]}  # the last acknowledged one
            await rt.resume(paused.id)
        done = [await wait_for_state(rt, job.id) for job in jobs]
        assert [job.state for job in done] == [JobState.COMPLETED] * 5
        assert [job.result for job in done] == [200] * 5
        assert rt.status().failures == 0


class LockedReadsBackend(LockedBackend):
    """Refuses listings too while ``locked``, as an unreachable PostgreSQL does every read."""

    async def query(self, query: Any) -> Any:
        self._check()
        return await super().query(query)


async def test_reads_failing_during_an_outage_log_one_line_a_minute_without_traceback(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """During a 13 s PostgreSQL outage each node logged 262 "store read failed" errors, each
    with a traceback of about 40 lines (a client's listing every 50 ms): the reads served
    beside the actor logged every outage failure as a fault of the code. Now each failed read
    still answers StoreError, and the log says so without traceback, once a minute, with the
    count since the last line."""
    backend = LockedReadsBackend()
    async with memory_runtime(
        {"checkpointer": checkpointer}, backend, store_retry_timeout=600.0
    ) as rt:
        await rt.list_jobs()
        backend.locked = True
        async with trio.open_nursery() as nursery:
            # A write finds the outage (and waits it out): reads now bypass the actor.
            nursery.start_soon(rt.create_job, "checkpointer", "alice", {"to": 1})
            await trio.sleep(0.5)
            assert not rt.store_health.ok
            for _ in range(200):  # 10 s of a client listing every 50 ms
                with pytest.raises(StoreError, match="database is locked"):
                    await rt.list_jobs()
                await trio.sleep(0.05)
            lines = [r for r in caplog.records if "failed since the last such warning" in r.message]
            assert len(lines) == 1, [r.message for r in lines]
            assert lines[0].levelname == "WARNING"
            assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
            await trio.sleep(60)
            with pytest.raises(StoreError):
                await rt.list_jobs()
            lines = [r for r in caplog.records if "failed since the last such warning" in r.message]
            assert len(lines) == 2 and lines[1].message.startswith("200 store"), lines[1].message
            backend.locked = False


class RefusedFillsBackend(MemoryBackend):
    """Refuses the fan-out's reads of users' events while ``locked``."""

    def __init__(self) -> None:
        super().__init__()
        self.locked = False
        self.refused = 0

    async def read_users_events(self, *args: Any, **kwargs: Any) -> Any:
        if self.locked:
            self.refused += 1
            raise sqlite3.OperationalError("database is locked")
        return await super().read_users_events(*args, **kwargs)


async def test_fills_failing_during_an_outage_log_one_line_a_minute(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """A node's fan-out fills its users' events from the log; during a 13 s PostgreSQL outage
    it logged "could not fill …" 259 times (a retry every 35 ms). Now once a minute, with the
    count of fills failed since; the fills themselves are retried as before."""
    backend = RefusedFillsBackend()
    async with open_runtime(
        backend=backend,
        handlers={},
        config=RuntimeConfig(resume_on_start=False),
        broadcast=BroadcasterConfig(),
        fanout=FanoutConfig(None, poll_interval=0.035, check_interval=0.035),
    ) as rt:
        assert rt.broadcaster is not None
        outbox = Outbox(rt.broadcaster.config)
        await rt.broadcaster.join(outbox, "user:alice", None)
        rt.broadcaster.finish_join(outbox, "user:alice")
        backend.locked = True
        await trio.sleep(13)
        assert backend.refused > 100  # retried all along
        lines = [r for r in caplog.records if "could not fill" in r.message]
        assert len(lines) == 1, len(lines)
        await trio.sleep(60)
        lines = [r for r in caplog.records if "could not fill" in r.message]
        assert len(lines) == 2 and "fills failed since" in lines[1].message
        backend.locked = False


class DamagedWhileDownBackend(LockedBackend):
    """Unavailable, and its probe (a write, as SQLite's is) meets damaged storage."""

    async def ping(self) -> None:
        self._check()
        raise sqlite3.DatabaseError("database disk image is malformed")


async def test_a_probe_that_meets_damage_reports_it_and_stops_nothing(
    autojump_clock: trio.abc.Clock,
) -> None:
    # The probe of an unavailable database writes (SQLite's takes a page of meta): damage
    # it meets is reported as a request's is (readyz: database corrupt), not raised out of
    # the store actor, which would have ended the runtime.
    backend = DamagedWhileDownBackend()
    async with memory_runtime(None, backend, store_retry_timeout=1.0) as rt:
        backend.locked = True
        with pytest.raises(StoreUnavailableError):
            await rt.create_job("research", "alice", {"query": "q"})
        backend.locked = False
        await trio.sleep(5)  # probes, every heartbeat flush interval
        assert rt.store_health.corrupt is not None
        assert "malformed" in rt.store_health.corrupt
        assert not rt.store_health.ok
