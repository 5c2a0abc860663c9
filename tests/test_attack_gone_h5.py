"""A worker's connection that ends with attempts assigned to it, attacked (h5): what the
server counts for an attempt the worker had not started (see tests/test_worker_gone.py)."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from actors import EventType, Job, JobContext, JobState
from transport._worker_process import WorkerProcess

from .conftest import wait_for_state
from .serving import eventually
from .worker_support import Served, served, wait_connected, worker_token


@asynccontextmanager
async def restarted_behind_a_thread(
    tmp_path: Path, started: list[int], seconds: float, **runtime: Any
) -> AsyncIterator[tuple[Served, WorkerProcess, Job]]:
    """A job (one attempt allowed) whose handler sleeps ``seconds`` in a thread (no cancel stops it;
    alive meanwhile), run by a worker in this process, cancelled and restarted as soon as it
    runs: its second attempt comes to the same worker, which holds it until the first has
    unwound. Each handler's attempt is appended to ``started`` as it starts."""

    async def threaded(ctx: JobContext, input: Any) -> Any:
        started.append(ctx.attempt)
        with ctx.keep_alive():
            await trio.to_thread.run_sync(time.sleep, input["seconds"])
        return {"attempt": ctx.attempt}

    async with served(tmp_path / "db", "in_process", in_process_handlers=False, **runtime) as s:
        rt = s.runtime
        worker = WorkerProcess(s.running.url, worker_token(), {"threaded": threaded})
        async with trio.open_nursery() as nursery:
            nursery.start_soon(worker.run)
            await wait_connected(s.running)
            job = await rt.create_job("threaded", "alice", {"seconds": seconds}, max_attempts=1)
            await eventually(lambda: started == [1])
            await rt.cancel(job.id)
            await rt.restart(job.id)

            def waiting() -> bool:
                session = worker.session
                return session is not None and session.attempts[job.id].attempt == 2

            await eventually(waiting)
            yield s, worker, job
            nursery.cancel_scope.cancel()


async def test_an_attempt_waiting_for_an_older_one_to_unwind_is_not_started(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The connection drops while the second attempt waits for the first to unwind: its
    handler never ran, so the job goes back to the queue with nothing counted
    (``worker_gone``), as README and PROTOCOL.md say, and runs to its end once the worker is
    back. It was failed (``Stalled``): the worker's heartbeats named the waiting attempt, so
    the server took it for started. The worker's log says so (it said: a stall)."""
    caplog.set_level(logging.WARNING, logger="jobspine.worker")
    started: list[int] = []
    async with restarted_behind_a_thread(tmp_path, started, 3, stop_grace=10.0) as (s, worker, job):
        rt = s.runtime
        await trio.sleep(1.5)  # a periodic heartbeat (every second) goes out meanwhile
        assert started == [1], "the second attempt's handler started during the wait"
        assert worker.session is not None
        await worker.session.ws.aclose()
        back = await wait_for_state(rt, job.id, {JobState.CREATED, JobState.FAILED})
        assert started == [1]
        assert back.state is JobState.CREATED, back
        assert back.failed_attempts == 0 and back.recovery_attempts == 0, back
        recovery = (await rt.read_events(job.id))[-1]
        assert recovery.type is EventType.RECOVERY, recovery
        assert recovery.data["reason"] == "worker_gone", recovery
        assert rt.supervisor.status().stalls_detected == 0
        lines = [r.getMessage() for r in caplog.records if "connection ended" in r.getMessage()]
        assert lines == [
            f"worker: the connection ended with 1 job not started here yet ({job.id}): stopped"
            " here; the server puts each back in the queue"
        ]
        # The worker reconnects once the old thread has ended, and runs the job.
        done = await wait_for_state(rt, job.id, timeout=30)
        assert done.state is JobState.COMPLETED and done.result == {"attempt": 3}, done


async def test_a_wait_past_half_the_stall_deadline_keeps_the_attempt_alive(
    tmp_path: Path,
) -> None:
    """A ``stop_grace`` longer than ``heartbeat_timeout``: the second attempt waits for the
    first (5 s) past its stall deadline (2 s). Its heartbeats name it from half that deadline
    on, so the server does not find it stalled, and its handler runs once the first has
    ended: the job completes with its second attempt, nothing counted."""
    started: list[int] = []
    async with restarted_behind_a_thread(
        tmp_path, started, 5, stop_grace=10.0, heartbeat_timeout=2.0
    ) as (s, _, job):
        rt = s.runtime
        done = await wait_for_state(rt, job.id, timeout=30)
        assert done.state is JobState.COMPLETED and done.result == {"attempt": 2}, done
        assert done.failed_attempts == 0 and done.recovery_attempts == 0, done
        assert started == [1, 2]
        assert rt.supervisor.status().stalls_detected == 0
