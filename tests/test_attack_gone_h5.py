"""A worker's connection that ends with attempts assigned to it, attacked (h5): what the
server counts for an attempt the worker had not started (see tests/test_worker_gone.py)."""

from __future__ import annotations

import logging
import signal
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
from .test_attack_workers_h4 import threaded_worker
from .test_worker_protocol import raw_worker, receive, send
from .worker_support import Served, served, start_worker_process, wait_connected, worker_token


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


async def test_an_outcome_sent_with_the_close_stands(tmp_path: Path) -> None:
    """A worker that never named its attempts reports them in the frame it closes after
    (a ``complete`` for one, a ``fail`` for the other, one batch): both reports name their
    attempts, so each outcome is stored as reported (completed; failed, its one attempt
    used), neither re-queued nor taken for a stall."""
    async with served(tmp_path / "db", "in_process", in_process_handlers=False) as s:
        rt = s.runtime
        done = await rt.create_job("steps", "alice", {"n": 1}, max_attempts=1)
        failed = await rt.create_job("steps", "alice", {"n": 1}, max_attempts=1)
        async with raw_worker(s.running.url, ["steps"], capacity=2) as ws:
            assigned = {(await receive(ws, "assign"))["job_id"] for _ in range(2)}
            assert assigned == {done.id, failed.id}
            await send(
                ws,
                {
                    "op": "batch",
                    "requests": [
                        {"op": "complete", "id": 1, "job_id": done.id, "attempt": 1, "result": 7},
                        {
                            "op": "fail",
                            "id": 2,
                            "job_id": failed.id,
                            "attempt": 1,
                            "error": {"type": "Boom", "message": "no"},
                        },
                    ],
                },
            )
        completed = await wait_for_state(rt, done.id)
        assert completed.state is JobState.COMPLETED and completed.result == 7, completed
        lost = await wait_for_state(rt, failed.id)
        assert lost.state is JobState.FAILED and lost.error is not None, lost
        assert lost.error.type == "Boom", lost.error
        assert rt.supervisor.status().stalls_detected == 0


@pytest.mark.slow
async def test_a_worker_killed_while_an_attempt_waits_for_the_older_one(tmp_path: Path) -> None:
    """A real ``jobspine worker`` SIGKILLed while a restarted job's attempt waits there for the
    old one's thread to end: the new attempt never ran, so the job (one attempt allowed) waits
    again, nothing counted, and the next worker completes it."""
    async with threaded_worker(tmp_path) as (s, nursery, marks, first):
        rt = s.runtime
        job = await rt.create_job(
            "threaded", "alice", {"dir": str(marks), "seconds": 4}, max_attempts=1
        )
        await eventually(lambda: (marks / job.id).exists())
        await rt.cancel(job.id)
        await rt.restart(job.id)
        await eventually(lambda: job.id in rt.supervisor.workers)
        await trio.sleep(1.5)  # periodic heartbeats go out while it waits
        first.send_signal(signal.SIGKILL)
        back = await wait_for_state(rt, job.id, {JobState.CREATED, JobState.FAILED})
        assert back.state is JobState.CREATED, back
        assert back.failed_attempts == 0 and back.recovery_attempts == 0, back
        (marks / job.id).unlink()  # the killed thread left its mark
        await start_worker_process(nursery, s.running.url, "--handlers", "tests.worker_handlers_h4")
        done = await wait_for_state(rt, job.id, timeout=30)
        assert done.state is JobState.COMPLETED and done.result == {"attempt": 3}, done
        assert not (marks / "overlap").exists()
