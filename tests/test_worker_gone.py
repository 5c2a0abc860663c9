"""A worker's connection that ends with attempts assigned to it: the attempts it never named
(no heartbeat entry, no report) go back to the queue with nothing counted, as far as the
server can know never started; those it named get the stall rule. A worker that connects and
drops at once used to fail every job it was handed (the stall rule, ``max_attempts=1``)."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import trio

from actors import EventType, JobState

from .conftest import wait_for_state
from .serving import eventually
from .test_worker_protocol import raw_worker, receive, send
from .worker_support import served, start_worker_process, wait_connected


async def test_attempts_a_worker_never_named_go_back_to_the_queue_uncounted(
    tmp_path: Path,
) -> None:
    """Workers that take an assignment and drop before naming it, three times over (a worker
    crash-looping at its start): the job (one attempt allowed) waits again each time, with a
    ``recovery`` event (``worker_gone``, ``requeued``) and no failed attempt, and the next
    worker that runs it completes it."""
    async with served(tmp_path / "db", "in_process", in_process_handlers=False) as s:
        rt = s.runtime
        job = await rt.create_job("steps", "alice", {"n": 1})
        for attempt in (1, 2, 3):
            async with raw_worker(s.running.url, ["steps"]) as ws:
                assigned = await receive(ws, "assign")
                assert (assigned["job_id"], assigned["attempt"]) == (job.id, attempt)
            back = await wait_for_state(rt, job.id, {JobState.CREATED, JobState.FAILED})
            assert back.state is JobState.CREATED, back
            assert back.failed_attempts == 0 and back.recovery_attempts == 0, back
            recovery = (await rt.read_events(job.id))[-1]
            assert recovery.type is EventType.RECOVERY, recovery
            assert recovery.data["reason"] == "worker_gone" and recovery.data["requeued"]
        async with raw_worker(s.running.url, ["steps"]) as ws:
            assigned = await receive(ws, "assign")
            ref = {"job_id": job.id, "attempt": assigned["attempt"]}
            await send(ws, {"op": "complete", "id": 1, **ref, "result": {"ok": True}})
            assert (await receive(ws, "reply"))["id"] == 1
        done = await wait_for_state(rt, job.id)
        assert done.state is JobState.COMPLETED and done.result == {"ok": True}, done


@pytest.mark.parametrize("how", ["heartbeat", "progress"])
async def test_an_attempt_its_worker_named_gets_the_stall_rule(tmp_path: Path, how: str) -> None:
    """Once the worker has named the attempt (a heartbeat entry, a report), its handler may
    have run: a drop is a stall, and a job with one attempt allowed and no checkpoint fails
    (type ``Stalled``), as before."""
    async with served(tmp_path / "db", "in_process", in_process_handlers=False) as s:
        rt = s.runtime
        job = await rt.create_job("steps", "alice", {"n": 1})
        async with raw_worker(s.running.url, ["steps"]) as ws:
            await receive(ws, "assign")
            ref = {"job_id": job.id, "attempt": 1}
            if how == "heartbeat":
                await send(ws, {"op": "heartbeat", "jobs": [ref]})
                await eventually(lambda: rt.supervisor.workers[job.id].handler.started)
            else:
                await send(ws, {"op": "progress", "id": 1, **ref, "progress": 10})
                assert (await receive(ws, "reply"))["id"] == 1
        failed = await wait_for_state(rt, job.id)
        assert failed.state is JobState.FAILED and failed.error is not None, failed
        assert failed.error.type == "Stalled", failed.error


@pytest.mark.slow
async def test_jobspine_worker_names_an_attempt_before_its_handler_starts(
    tmp_path: Path,
) -> None:
    """``jobspine worker`` names each attempt before its handler runs: SIGKILLed as soon as
    the handler has begun (its mark made), the job gets the stall rule (failed: one attempt,
    no checkpoint), never a silent re-queue of work that may have been done."""
    mark = tmp_path / "mark"
    async with served(tmp_path / "db", "in_process", in_process_handlers=False) as s:
        rt = s.runtime
        async with trio.open_nursery() as nursery:
            worker = await start_worker_process(nursery, s.running.url)
            await wait_connected(s.running)
            job = await rt.create_job("marked", "alice", {"mark": str(mark)})
            await eventually(mark.exists)
            worker.send_signal(signal.SIGKILL)
            failed = await wait_for_state(rt, job.id, timeout=15)
            assert failed.state is JobState.FAILED, failed
            assert failed.error is not None and failed.error.type == "Stalled", failed.error
            nursery.cancel_scope.cancel()
