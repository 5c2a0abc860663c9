"""A runtime started on a database left by a dead process recovers every job by the rule."""

from __future__ import annotations

import os
import signal
import sqlite3
import sys
from pathlib import Path

import trio

from actors import EventType, JobState, RuntimeConfig, open_runtime

from .conftest import wait_for_state
from .crash_child import HANDLERS

CHILD = Path(__file__).with_name("crash_child.py")


async def check_recovered(
    path: Path, acked: dict[str, int], checkpointing: dict[str, bool]
) -> None:
    async with open_runtime(path, handlers=HANDLERS, config=RuntimeConfig(stop_grace=0.2)) as rt:
        paused = failed = 0
        for job_id, has_checkpoint in checkpointing.items():
            job = await rt.get_job(job_id)
            events = await rt.read_events(job_id, limit=100_000)
            assert [e.seq for e in events] == list(range(1, job.seq + 1))
            if job.checkpoint_version > 0:
                assert has_checkpoint
                assert job.state is JobState.PAUSED, job
                assert job.pause_reason == "recovery" and job.recovery_attempts == 1
                assert job.checkpoint["i"] >= acked.get(job_id, -1)
                assert events[-1].type is EventType.RECOVERY
                paused += 1
            else:
                assert job_id not in acked, "an acknowledged checkpoint was lost"
                assert job.state is JobState.FAILED, job
                assert job.error is not None and "no checkpoint" in job.error.message
                assert events[-1].type is EventType.FAILED
                failed += 1
        assert (await rt.get_stats())["running"] == 0
        # Counted as stalls (jobspine_stalls_total and the rest): a crash is when they matter.
        status = rt.status()
        assert (status.stalls_detected, status.recoveries, status.failures) == (
            paused + failed,
            paused,
            failed,
        )
        # A recovered job resumes from its checkpoint and finishes.
        job_id = max(acked, key=lambda j: acked[j])
        resumed = await rt.resume(job_id, by="alice")
        assert resumed.state is JobState.CREATED  # back in the queue
        assert (await wait_for_state(rt, job_id, {JobState.RUNNING})).attempt == 2
        await rt.pause(job_id)
        events = await rt.read_events(job_id, after_seq=resumed.seq)
        assert events, "the resumed attempt did no work"


async def test_abrupt_teardown_is_recovered(tmp_path: Path) -> None:
    path = tmp_path / "abrupt.db"
    acked: dict[str, int] = {}
    checkpointing: dict[str, bool] = {}

    config = RuntimeConfig(shutdown_timeout=0, sqlite_synchronous="NORMAL")
    async with open_runtime(path, handlers=HANDLERS, config=config) as rt, rt.events() as stream:
        for n in range(40):
            saves = n % 4 != 0
            input = {"steps": 10_000, "delay": 0.002, "checkpoint": saves}
            job = await rt.create_job("counter", "alice", input)
            checkpointing[job.id] = saves
        async for event in stream:
            if event.type is EventType.CHECKPOINT:
                acked[event.job_id] = event.data["version"] - 1  # i = version - 1
                if len(acked) == 30 and sum(acked.values()) > 100:
                    break
        # Leaving the block with shutdown_timeout=0 cancels every worker with no pause.

    def running() -> int:
        with sqlite3.connect(path) as conn:
            return int(
                conn.execute("SELECT count(*) FROM jobs WHERE state='running'").fetchone()[0]
            )

    assert await trio.to_thread.run_sync(running) == 40
    await check_recovered(path, acked, checkpointing)


async def test_sigkill_loses_no_acknowledged_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "killed.db"
    acked: dict[str, int] = {}
    checkpointing: dict[str, bool] = {}
    process = await trio.lowlevel.open_process(
        [sys.executable, str(CHILD), str(path), "24"],
        stdout=-1,
        env={**os.environ, "PYTHONPATH": str(CHILD.parent.parent)},
    )
    assert process.stdout is not None
    buffer = b""
    with trio.fail_after(60):
        while sum(acked.values()) < 300:
            chunk = await process.stdout.receive_some()
            assert chunk, "child exited early"
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                word, *rest = line.decode().split()
                if word == "JOB":
                    checkpointing[rest[0]] = rest[1] == "1"
                elif word == "ACK":
                    acked[rest[0]] = int(rest[1])
    process.send_signal(signal.SIGKILL)
    await process.wait()
    assert process.returncode == -signal.SIGKILL
    await process.stdout.aclose()
    assert len(checkpointing) == 24
    await check_recovered(path, acked, checkpointing)


async def test_graceful_exit_pauses_and_next_runtime_resumes(tmp_path: Path) -> None:
    path = tmp_path / "graceful.db"
    # The counter ignores stop requests: after the grace it is cancelled mid-run.
    config = RuntimeConfig(stop_grace=0.05, sqlite_synchronous="NORMAL")
    async with open_runtime(path, handlers=HANDLERS, config=config) as rt:
        job = await rt.create_job(
            "counter", "alice", {"steps": 200, "delay": 0.005, "checkpoint": True}
        )
        await trio.sleep(0.2)
    async with open_runtime(path, handlers={}, config=config) as rt:
        # No handler for the kind here: back in the queue, it waits (never claimed) until a
        # runtime or a worker serving its kind is there.
        await trio.sleep(0.2)
        stored = await rt.get_job(job.id)
        assert stored.state is JobState.CREATED and stored.attempt == 1
        assert stored.checkpoint_version > 0
    async with open_runtime(path, handlers=HANDLERS, config=config) as rt:
        done = await wait_for_state(rt, job.id)
        assert done.state is JobState.COMPLETED and done.result == {"steps": 200}
        assert done.attempt == 2
        events = await rt.read_events(job.id, limit=10_000)
        resumed = [e for e in events if e.type is EventType.RESUMED]
        assert [e.actor for e in resumed] == ["system"]
        started = [e.data for e in events if e.type is EventType.STARTED and e.seq > resumed[0].seq]
        assert [(d["attempt"], d["resumed_from_checkpoint"] > 0) for d in started] == [(2, True)]
        # Each step was checkpointed once: nothing was redone after the resume.
        versions = [e.data["version"] for e in events if e.type is EventType.CHECKPOINT]
        assert versions == list(range(1, 201))
