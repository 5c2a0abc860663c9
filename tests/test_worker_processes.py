"""Worker processes for real: SIGKILL mid-job, a stopped (SIGSTOP) process, a CPU-bound
handler that must not delay anyone else's progress, ``serve --worker-processes``."""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio
from trio_websocket import open_websocket_url

from actors import JobState, KindOptions
from transport import mint_token, open_client

from .conftest import wait_for_state
from .serving import SECRET, eventually, free_port, token
from .test_worker_protocol import raw_worker, receive, send, wait_checkpoint
from .test_workers import wait_progress
from .worker_handlers import QUICK
from .worker_support import (
    ROOT,
    WORKER_COMMAND,
    kill_and_outlive,
    run_jobspine_worker,
    serve_one_worker,
    served,
    start_worker_process,
    wait_connected,
)

pytestmark = pytest.mark.slow


async def test_sigkill_mid_job_resumes_from_the_acknowledged_checkpoint(tmp_path: Path) -> None:
    async with served(tmp_path / "db", "in_process", in_process_handlers=False) as s:
        rt = s.runtime
        async with trio.open_nursery() as nursery:
            worker = await start_worker_process(nursery, s.running.url)
            await wait_connected(s.running)
            job = await rt.create_job("steps", "alice", {"n": 400, "delay": 0.02})
            await wait_checkpoint(rt, job.id, 5)
            acknowledged = (await rt.get_job(job.id)).checkpoint_version
            worker.send_signal(signal.SIGKILL)
            # Lost at once (the server sees the connection close), not at the 30 s deadline.
            with trio.fail_after(5):
                recovered = await wait_for_state(rt, job.id, {JobState.PAUSED})
            assert recovered.pause_reason == "recovery"
            assert recovered.checkpoint_version >= acknowledged
            at = recovered.checkpoint["i"]
            assert at == recovered.checkpoint_version  # one checkpoint per step

            # A late report from the dead attempt is refused and changes nothing.
            async with raw_worker(s.running.url, ["steps"]) as late:
                ref = {"job_id": job.id, "attempt": 1}
                await send(late, {"op": "checkpoint", "id": 1, **ref, "data": {"i": 0}})
                assert (await receive(late, "error"))["code"] == "not_assigned"
            assert await rt.get_job(job.id) == recovered

            await start_worker_process(nursery, s.running.url)
            await wait_connected(s.running)
            await rt.resume(job.id)
            done = await wait_for_state(rt, job.id)
            assert done.state is JobState.COMPLETED
            assert done.result == {"done": 400, "from": at}
            nursery.cancel_scope.cancel()


async def test_sigkill_before_the_first_checkpoint_retries_a_job_with_attempts_left(
    tmp_path: Path,
) -> None:
    """A ``jobspine worker`` killed while its job has reported progress but no checkpoint: the
    attempt is a failed attempt of type ``Stalled`` (the stall rule), and the job, with
    attempts left, runs again from the start on the next worker."""
    kinds = {"ticker": KindOptions(max_attempts=2, retry=QUICK)}
    async with served(tmp_path / "db", "in_process", in_process_handlers=False, kinds=kinds) as s:
        rt = s.runtime
        async with trio.open_nursery() as nursery:
            worker = await start_worker_process(nursery, s.running.url)
            await wait_connected(s.running)
            job = await rt.create_job("ticker", "alice", {"count": 20, "interval": 0.05})
            await wait_progress(rt, job.id, 10)
            worker.send_signal(signal.SIGKILL)
            with trio.fail_after(5):  # lost at once, not at the 30 s deadline
                back = await wait_for_state(rt, job.id, {JobState.CREATED})
            assert (back.failed_attempts, back.recovery_attempts) == (1, 1)
            await start_worker_process(nursery, s.running.url)
            await wait_connected(s.running)
            done = await wait_for_state(rt, job.id)
            assert done.state is JobState.COMPLETED and done.attempt == 2
            retrying = [e.data for e in await rt.read_events(job.id) if e.type.value == "retrying"]
            assert [r["error"]["type"] for r in retrying] == ["Stalled"]
            nursery.cancel_scope.cancel()


async def test_sigterm_hands_jobs_back_to_the_queue_for_the_next_worker(tmp_path: Path) -> None:
    async with served(tmp_path / "db", "in_process", in_process_handlers=False) as s:
        rt = s.runtime
        async with trio.open_nursery() as nursery:
            worker = await start_worker_process(nursery, s.running.url)
            await wait_connected(s.running)
            job = await rt.create_job("steps", "alice", {"n": 300, "delay": 0.02})
            await wait_checkpoint(rt, job.id, 3)
            worker.send_signal(signal.SIGTERM)
            with trio.fail_after(10):
                assert await worker.wait() == 0
            handed_back = await wait_for_state(rt, job.id, {JobState.CREATED}, timeout=5)
            last = (await rt.read_events(job.id))[-1]
            assert (last.type.value, last.data["reason"]) == ("recovery", "worker_shutdown")
            assert last.data["requeued"] and handed_back.recovery_attempts == 0
            at = handed_back.checkpoint["i"]
            assert at >= 3
            await trio.sleep(0.3)  # no worker serves the kind now: it waits
            assert (await rt.get_job(job.id)).state is JobState.CREATED
            # A worker serving the kind connects: it takes the job back up from there.
            await start_worker_process(nursery, s.running.url)
            done = await wait_for_state(rt, job.id)
            assert done.state is JobState.COMPLETED
            assert done.result == {"done": 300, "from": at}
            nursery.cancel_scope.cancel()


async def test_a_stopped_worker_is_detected_and_a_restarted_one_takes_over(
    tmp_path: Path,
) -> None:
    async with served(
        tmp_path / "db", "in_process", in_process_handlers=False, heartbeat_timeout=1.0
    ) as s:
        rt = s.runtime
        async with trio.open_nursery() as nursery:
            worker = await start_worker_process(nursery, s.running.url)
            await wait_connected(s.running)
            job = await rt.create_job("steps", "alice", {"n": 400, "delay": 0.02})
            await wait_checkpoint(rt, job.id, 2)
            worker.send_signal(signal.SIGSTOP)  # it stops reading and sending, socket open
            try:
                with trio.fail_after(10):
                    recovered = await wait_for_state(rt, job.id, {JobState.PAUSED})
                assert recovered.pause_reason == "recovery"
                await eventually(lambda: not s.running.server.workers.workers)
            finally:
                worker.kill()
            await start_worker_process(nursery, s.running.url)
            await wait_connected(s.running)
            following = await rt.create_job("steps", "alice", {"n": 3})
            assert (await wait_for_state(rt, following.id)).state is JobState.COMPLETED
            await rt.resume(job.id)
            assert (await wait_for_state(rt, job.id)).state is JobState.COMPLETED
            nursery.cancel_scope.cancel()


async def test_a_cpu_bound_worker_delays_no_one_elses_progress(tmp_path: Path) -> None:
    """The issue's acceptance test: a handler spins the CPU for 5 s in a worker process
    while jobs in the server report progress (4 jobs, each every 20 ms) to a subscribed
    client; the worst gap between two progress events at the client stays under 100 ms.

    What is measured is the server's event loop, not the disk (no fsync per commit). On a
    machine other programs load, any process can be descheduled for 100 ms, so up to three
    5 s trials are made and one must stay under 100 ms; a handler blocking the server's loop
    gives a gap of the whole 5 s in every trial."""
    async with served(tmp_path / "db", "in_process", sqlite_synchronous="OFF") as s:
        rt = s.runtime
        async with trio.open_nursery() as nursery:
            # One slot: the spinning job takes it, the tickers run in the server. As serve
            # --worker-processes starts them, the worker has a lower CPU priority.
            await start_worker_process(nursery, s.running.url, "--concurrency", "1", "--nice", "5")
            await wait_connected(s.running)
            async with open_websocket_url(s.running.url) as ws:
                await send(ws, {"op": "hello", "id": 0, "token": token("alice")})
                await receive(ws, "reply")
                await send(ws, {"op": "subscribe", "id": 1, "room": "user:alice"})
                await receive(ws, "reply")
                trials = []
                for _ in range(3):
                    worst = await _worst_gap_while_spinning(rt, s.running, ws)
                    trials.append(worst)
                    if worst < 0.1:
                        break
            shown = ", ".join(f"{t * 1000:.1f} ms" for t in trials)
            print(f"worst progress delay during a 5 s CPU-bound worker job: {shown}")
            assert min(trials) < 0.1, shown
            nursery.cancel_scope.cancel()


async def _worst_gap_while_spinning(rt: Any, running: Any, ws: Any) -> float:
    spinning = await rt.create_job("spin", "alice", {"seconds": 5})
    await wait_for_state(rt, spinning.id, {JobState.RUNNING})  # claimed: the worker's slot
    assert running.server.workers.workers[0].attempts.keys() == {spinning.id}
    tickers = {
        (await rt.create_job("ticker", "alice", {"count": 400, "interval": 0.02})).id
        for _ in range(4)
    }
    arrivals: list[float] = []

    async def collect() -> None:
        while True:
            message = orjson.loads(await ws.get_message())
            for inner in message.get("messages", [message]):
                event = inner.get("event") or {}
                if event.get("type") == "progress" and event["job_id"] in tickers:
                    arrivals.append(time.perf_counter())

    async with trio.open_nursery() as inner:
        inner.start_soon(collect)
        done = await wait_for_state(rt, spinning.id, timeout=60)
        inner.cancel_scope.cancel()
    assert done.state is JobState.COMPLETED and done.result["loops"] > 0
    assert done.run_seconds >= 5
    for ticker in tickers:
        await rt.cancel(ticker)
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert len(gaps) > 400
    return max(gaps)


async def test_serve_worker_processes_runs_handlers_outside_and_restarts_crashed_ones(
    tmp_path: Path,
) -> None:
    port = free_port()
    env = {**os.environ, "JOBSPINE_SECRET": SECRET, "JOBSPINE_DATA": str(tmp_path)}
    command = [
        sys.executable, "-m", "transport._cli", "--log-level", "WARNING", "serve",
        "--port", str(port), "--health-port", str(free_port()), "--no-demo",
        "--handlers", "tests.worker_handlers", "--worker-processes", "2",
    ]  # fmt: skip
    url = f"ws://127.0.0.1:{port}"
    async with trio.open_nursery() as nursery:
        run = partial(trio.run_process, command, env=env, cwd=str(ROOT), check=False)
        server: trio.Process = await nursery.start(run)

        async def submit(kind: str, input: object) -> Any:
            """Create a job (it waits for a worker's slot) and wait for its end."""
            with trio.fail_after(30):
                async with open_client(url, token("alice")) as c:
                    job = await c.create(kind, input)
                    while job["state"] not in ("completed", "failed", "cancelled"):
                        await trio.sleep(0.05)
                        job = await c.get(job["id"])
                    return job

        first = await submit("steps", {"n": 2})
        assert first["state"] == "completed"
        workers = [int(p) for p in (await trio.run_process(
            ["pgrep", "-P", str(server.pid)], capture_stdout=True, check=False
        )).stdout.split()]  # fmt: skip
        assert len(workers) == 2
        os.kill(workers[0], signal.SIGKILL)
        await trio.sleep(0.2)
        second = await submit("steps", {"n": 2})
        assert second["state"] == "completed"
        with trio.fail_after(20):
            while True:
                found = (await trio.run_process(
                    ["pgrep", "-P", str(server.pid)], capture_stdout=True, check=False
                )).stdout.split()  # fmt: skip
                if len(found) == 2 and workers[0] not in map(int, found):
                    break
                await trio.sleep(0.1)
        server.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            assert await server.wait() == 0
        for pid in map(int, found):
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)


async def test_a_worker_whose_handlers_import_hangs_dies_with_its_server(
    tmp_path: Path,
) -> None:
    """A local worker process stuck importing its handlers (the watch on the server's pipe
    began only after them) outlived its SIGKILLed server for good. It now ends within
    moments of the server's death, whatever its import is doing."""
    async with serve_one_worker(tmp_path, "tests.handlers_hang_in_worker") as local:
        worker = await local.worker()
        await trio.sleep(1)  # well inside its import now
        await kill_and_outlive(local, worker, 10)


@pytest.mark.parametrize(
    ("which", "cause"),
    [("user", "(wrong_role): this is not a worker token"), ("other_secret", "(auth_failed)")],
)
async def test_jobspine_worker_refused_token_is_one_error_line_and_exit_5(
    tmp_path: Path, which: str, cause: str
) -> None:
    """A user's token (4010) or one of another secret (4003): one ``jobspine: error:`` line
    naming the cause and how to mint a worker token, exit status 5, no reconnect loop."""
    bad = token("bob") if which == "user" else mint_token("x" * 40, "w", role="worker")
    async with served(tmp_path / "db", "in_process") as s:
        status, err = await run_jobspine_worker(s.running.url, bad)
    assert status == 5, err
    assert err.startswith("jobspine: error: the server refused this worker " + cause), err
    assert "jobspine token --worker" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_jobspine_worker_help_says_how_to_mint_a_worker_token() -> None:
    helped = subprocess.run(
        [*WORKER_COMMAND, "--help"], capture_output=True, text=True, check=True, cwd=str(ROOT)
    ).stdout
    assert "worker token (mint one: jobspine token --worker)" in " ".join(helped.split())
    assert "--user NAME" not in helped


async def test_each_jobspine_worker_has_a_name_of_its_own(tmp_path: Path) -> None:
    """``--name``, else HOST-PID: two workers with one token (as ``serve --worker-processes``
    starts them) are told apart in the server's log and status (both were its token's
    subject, ``local-worker``)."""
    async with (
        served(tmp_path / "db", "in_process", in_process_handlers=False) as s,
        trio.open_nursery() as nursery,
    ):
        named = await start_worker_process(nursery, s.running.url, "--name", "gpu-box-1")
        unnamed = await start_worker_process(nursery, s.running.url)
        await wait_connected(s.running, 2)
        names = sorted(w.name for w in s.running.server.workers.workers)
        assert names == sorted(["gpu-box-1", f"{socket.gethostname()}-{unnamed.pid}"])
        assert named.pid != unnamed.pid
        nursery.cancel_scope.cancel()
