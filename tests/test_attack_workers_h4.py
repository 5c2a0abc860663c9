"""Worker processes attacked for real (h4): frozen and thawed processes, killed ones, a server
restarted under its workers."""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from actors import JobState, KindOptions

from .conftest import wait_for_state
from .serving import eventually
from .test_worker_protocol import raw_worker, wait_checkpoint
from .worker_support import Served, served, start_worker_process, wait_connected

pytestmark = pytest.mark.slow


@asynccontextmanager
async def threaded_worker(
    tmp_path: Path,
) -> AsyncIterator[tuple[Served, trio.Nursery, Path, trio.Process]]:
    """A server running no handlers itself (``stop_grace`` 10 s) with a ``jobspine worker`` of
    :mod:`tests.worker_handlers_h4` connected; the nursery it runs in (cancelled at the end,
    with any other worker started there), the directory its ``threaded`` jobs mark, and the
    worker process."""
    marks = tmp_path / "marks"
    marks.mkdir()
    async with (
        served(tmp_path / "db", "in_process", in_process_handlers=False, stop_grace=10.0) as s,
        trio.open_nursery() as nursery,
    ):
        worker = await start_worker_process(
            nursery, s.running.url, "--handlers", "tests.worker_handlers_h4"
        )
        await wait_connected(s.running)
        yield s, nursery, marks, worker
        nursery.cancel_scope.cancel()


async def test_a_thawed_worker_writes_nothing_for_the_attempt_it_lost(tmp_path: Path) -> None:
    """SIGSTOP a ``jobspine worker`` mid-job past ``heartbeat_timeout``: the job is taken back
    and runs on another worker. SIGCONT: the thawed one's handler, still in its step, must not
    write a progress, checkpoint or result for the attempt it no longer owns."""
    kinds = {"steps": KindOptions(requeue_stalled=True)}
    async with served(
        tmp_path / "db",
        "in_process",
        in_process_handlers=False,
        heartbeat_timeout=1.0,
        kinds=kinds,
    ) as s:
        rt = s.runtime
        async with trio.open_nursery() as nursery:
            first = await start_worker_process(nursery, s.running.url)
            await wait_connected(s.running)
            job = await rt.create_job("steps", "alice", {"n": 300, "delay": 0.02})
            await wait_checkpoint(rt, job.id, 3)
            first.send_signal(signal.SIGSTOP)
            try:
                with trio.fail_after(15):
                    back = await wait_for_state(rt, job.id, {JobState.CREATED})
                await eventually(lambda: not s.running.server.workers.workers)
                await start_worker_process(nursery, s.running.url)
                await wait_connected(s.running)
                with trio.fail_after(15):
                    while (await rt.get_job(job.id)).attempt < 2:  # noqa: ASYNC110
                        await trio.sleep(0.05)
            finally:
                first.send_signal(signal.SIGCONT)
            done = await wait_for_state(rt, job.id, timeout=30)
            assert done.state is JobState.COMPLETED
            assert done.result["from"] >= back.checkpoint["i"]
            events = await rt.read_events(job.id)
            second = min(i for i, e in enumerate(events) if e.data.get("attempt") == 2)
            late = [e for e in events[second:] if e.data.get("attempt") == 1]
            assert late == [], late
            await wait_connected(s.running, 2)  # the thawed worker came back, as a new one
            nursery.cancel_scope.cancel()


async def test_workers_churning_harm_no_other_worker(tmp_path: Path) -> None:
    """Workers of a kind no job has connect and leave at once (some aborting the TCP
    connection mid-hello, some after it), 150 times, while a ``jobspine worker`` runs a job:
    that job goes on undisturbed, and nothing of the churned workers is left behind."""
    async with served(tmp_path / "db", "in_process", in_process_handlers=False) as s:
        rt = s.runtime
        server = s.running.server
        async with trio.open_nursery() as nursery:
            await start_worker_process(nursery, s.running.url)
            await wait_connected(s.running)
            job = await rt.create_job("steps", "alice", {"n": 60, "delay": 0.05})
            await wait_checkpoint(rt, job.id, 1)

            async def churn(i: int) -> None:
                if i % 3 == 0:
                    stream = await trio.open_tcp_stream("127.0.0.1", s.running.port)
                    await stream.send_all(b"GET /worker HTTP/1.1\r\nHost: x\r\n")
                    await stream.aclose()
                    return
                async with raw_worker(s.running.url, [f"churn-{i % 5}"], capacity=4):
                    pass

            for i in range(150):
                await churn(i)
            done = await wait_for_state(rt, job.id, timeout=30)
            assert done.state is JobState.COMPLETED and done.attempt == 1, done
            await eventually(lambda: len(server.workers.workers) == 1)
            await eventually(lambda: len(server.worker_connections) == 1)
            nursery.cancel_scope.cancel()


async def test_a_worker_never_runs_two_attempts_of_a_job_at_once(tmp_path: Path) -> None:
    """A job whose handler computes in a thread (which a cancel cannot stop) is cancelled and
    restarted at once: its next attempt comes to the same ``jobspine worker`` while the old
    thread still runs. As in the server, the new handler starts only once the old attempt has
    unwound (within ``stop_grace``), and so does the one after a next attempt cancelled while
    it waited: two at once would do the job's work twice over."""
    async with threaded_worker(tmp_path) as (s, _, marks, _):
        rt = s.runtime
        job = await rt.create_job("threaded", "alice", {"dir": str(marks), "seconds": 3})
        await eventually(lambda: (marks / job.id).exists())
        await rt.cancel(job.id)
        await rt.restart(job.id)
        # Its next attempt, waiting for the first to unwind, cancelled in turn: the one
        # after it waits for the first still.
        with trio.fail_after(10):
            while (await rt.get_job(job.id)).attempt < 2:  # noqa: ASYNC110
                await trio.sleep(0.02)
        await wait_for_state(rt, job.id, {JobState.RUNNING, JobState.COMPLETED})
        assert not (marks / "overlap").exists(), "two attempts of the job ran at once"
        await rt.cancel(job.id)
        await rt.restart(job.id)
        done = await wait_for_state(rt, job.id, timeout=30)
        assert done.state is JobState.COMPLETED and done.result == {"attempt": 3}, done
        assert not (marks / "overlap").exists(), "two attempts of the job ran at once"
