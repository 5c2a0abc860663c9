"""One behavioural suite, run against in-process handlers and against the same handlers in a
connected worker: completion, failure, pause/resume from the checkpoint, cancel, restart,
stall recovery and graceful shutdown must be indistinguishable (states, events, stored
fields)."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from actors import JobState

from .conftest import wait_for_state
from .worker_support import MODES, served

pytestmark = pytest.mark.parametrize("mode", MODES)


async def wait_progress(rt, job_id: str, at_least: float) -> None:  # type: ignore[no-untyped-def]
    with trio.fail_after(20):
        async with rt.events() as stream:
            if (await rt.get_job(job_id)).progress >= at_least:
                return
            async for event in stream:
                if event.job_id == job_id and event.data.get("progress", 0) >= at_least:
                    return


async def event_types(rt, job_id: str) -> list[str]:  # type: ignore[no-untyped-def]
    return [e.type.value for e in await rt.read_events(job_id)]


async def test_complete_and_fail(tmp_path: Path, mode: str) -> None:
    async with served(tmp_path / "db", mode) as s:
        rt = s.runtime
        job = await rt.create_job("steps", "alice", {"n": 3})
        done = await wait_for_state(rt, job.id)
        assert done.state is JobState.COMPLETED
        assert done.result == {"done": 3, "from": 0}
        assert done.checkpoint == {"i": 3} and done.checkpoint_version == 3
        types = await event_types(rt, job.id)
        assert types == ["created", "started"] + ["progress", "checkpoint"] * 3 + ["completed"]

        bad = await rt.create_job("boom", "alice", {"why": "no"})
        failed = await wait_for_state(rt, bad.id)
        assert failed.state is JobState.FAILED
        assert failed.error is not None
        assert (failed.error.type, failed.error.message) == ("ValueError", "bad thing: no")


async def test_pause_resumes_from_the_checkpoint(tmp_path: Path, mode: str) -> None:
    async with served(tmp_path / "db", mode) as s:
        rt = s.runtime
        job = await rt.create_job("steps", "alice", {"n": 100, "delay": 0.02})
        await wait_progress(rt, job.id, 5)
        paused = await rt.pause(job.id, by="alice")
        assert paused.state is JobState.PAUSED and paused.pause_reason == "user"
        at = paused.checkpoint["i"]
        assert at >= 5
        await trio.sleep(0.2)  # the stopped attempt reports nothing more
        assert (await rt.get_job(job.id)).checkpoint == {"i": at}
        resumed = await rt.resume(job.id, by="alice")
        assert resumed.attempt == 2
        done = await wait_for_state(rt, job.id)
        assert done.state is JobState.COMPLETED
        assert done.result == {"done": 100, "from": at}


async def test_cancel_then_restart(tmp_path: Path, mode: str) -> None:
    async with served(tmp_path / "db", mode) as s:
        rt = s.runtime
        job = await rt.create_job("steps", "alice", {"n": 200, "delay": 0.02})
        await wait_progress(rt, job.id, 2)
        cancelled = await rt.cancel(job.id, by="alice")
        assert cancelled.state is JobState.CANCELLED
        seq = (await rt.get_job(job.id)).seq
        await trio.sleep(0.3)
        assert (await rt.get_job(job.id)).seq == seq  # nothing from the cancelled attempt
        assert rt.supervisor.workers == {}
        if s.worker is not None:
            assert s.worker.session is not None and s.worker.session.attempts == {}
        await rt.restart(job.id, {"n": 2}, by="alice")
        done = await wait_for_state(rt, job.id)
        assert done.result == {"done": 2, "from": 0}


async def test_stall_is_recovered_by_the_rule(tmp_path: Path, mode: str) -> None:
    async with served(tmp_path / "db", mode, heartbeat_timeout=0.6) as s:
        rt = s.runtime
        job = await rt.create_job("silent", "alice", None)
        failed = await wait_for_state(rt, job.id, timeout=10)
        # No checkpoint: the stall rule fails it (with one, it would be paused).
        assert failed.state is JobState.FAILED
        assert failed.error is not None and "stalled" in failed.error.message
        assert rt.status().stalls_detected == 1


async def test_shutdown_pauses_with_a_checkpoint(tmp_path: Path, mode: str) -> None:
    async with served(tmp_path / "db", mode) as s:
        rt = s.runtime
        job = await rt.create_job("steps", "alice", {"n": 500, "delay": 0.02})
        await wait_progress(rt, job.id, 1)
    # Read back where nothing resumes it (a connecting worker adopts shutdown-paused jobs).
    async with served(tmp_path / "db", "in_process", resume_on_start=False) as s:
        stored = await s.runtime.get_job(job.id)
        assert stored.state is JobState.PAUSED and stored.pause_reason == "shutdown"
        assert stored.checkpoint["i"] >= 5
