"""A ``jobspine worker``'s report too large for the server's frame limit fails only its own
call or job, with the typed error the server gives a handler of its own for the same value;
the connection and every other attempt running on it carry on.

Before, a result, checkpoint, step label or failure message encoding to a frame over the
server's ``max_frame_size`` (2 MiB) was sent anyway: the server's websocket layer closed the
whole connection with 1009, and every attempt running on the worker was lost with it (handled
as stalls), whosever job it was. Reports batched together could also make a frame over a
smaller ``max_frame_size``. Real sockets: a :class:`WorkerProcess` in this process, connected
to a server."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio

from actors import (
    CheckpointTooLargeError,
    InvalidInputError,
    JobContext,
    JobState,
    RuntimeConfig,
)
from actors._codec import MAX_MESSAGE_LENGTH, sanitize_text
from actors._job import JobError
from transport import RunningServer, ServerConfig, open_server
from transport._worker_process import (
    BATCH_BYTES,
    WorkerProcess,
    _batch_frame,
    _heartbeat_frames,
    _Session,
)

from .conftest import memory_runtime, wait_for_state
from .serving import SECRET
from .worker_support import wait_connected, worker_token

S = JobState
MIB = 2**20
BIG = 3 * MIB  # over the server's frame limit for a worker (2 MiB)


async def steady(ctx: JobContext, input: Any) -> Any:
    """Another user's job, running on the same worker while the bad value is reported."""
    for step in range(10):
        await ctx.progress(step * 10, f"step {step}")
        await trio.sleep(0.05)
    return "done"


async def big_result(ctx: JobContext, input: Any) -> Any:
    return "x" * BIG


async def big_checkpoint(ctx: JobContext, input: Any) -> Any:
    """Tries a checkpoint of ``input`` MiB, then saves a small one: what each call raised."""
    refused = None
    try:
        await ctx.checkpoint("x" * int(input * MIB))
    except InvalidInputError as exc:
        refused = [type(exc).__name__, isinstance(exc, CheckpointTooLargeError)]
    await ctx.checkpoint({"small": True})
    return refused


async def big_step(ctx: JobContext, input: Any) -> Any:
    try:
        await ctx.progress(10, "x" * BIG)
    except InvalidInputError as exc:
        return [type(exc).__name__, str(exc)]
    return None


ERRORS = {"huge": "x" * BIG + "!", "surrogate": "no file \udce9t\xe9.txt"}


async def big_error(ctx: JobContext, input: Any) -> Any:
    raise ValueError(ERRORS[input])


HANDLERS = {
    "steady": steady,
    "big_result": big_result,
    "big_checkpoint": big_checkpoint,
    "big_step": big_step,
    "big_error": big_error,
}


@asynccontextmanager
async def worker_server(
    tmp_path: Path, *, concurrency: int = 2, checkpoint_limit: int = MIB, **config: Any
) -> AsyncIterator[tuple[RunningServer, WorkerProcess]]:
    """A server whose kinds run only in one connected :class:`WorkerProcess` of
    :data:`HANDLERS` with ``concurrency`` slots (``config``: the server's settings)."""
    runtime = RuntimeConfig(
        stop_grace=0.5, sqlite_synchronous="NORMAL", checkpoint_limit=checkpoint_limit
    )
    async with (
        open_server(
            tmp_path / "db",
            ServerConfig(secret=SECRET, port=0, **config),
            runtime_config=runtime,
        ) as running,
        trio.open_nursery() as nursery,
    ):
        process = WorkerProcess(running.url, worker_token(), HANDLERS, concurrency=concurrency)
        nursery.start_soon(process.run)
        await wait_connected(running)
        yield running, process
        nursery.cancel_scope.cancel()


async def beside(running: RunningServer, kind: str, input: Any) -> tuple[Any, Any]:
    """A ``steady`` job of bob's and then a ``kind`` job of alice's on the same worker, both
    run to their end: (alice's job, bob's job)."""
    rt = running.runtime
    other = await rt.create_job("steady", "bob", {})
    with trio.fail_after(10):
        while (await rt.get_job(other.id)).progress == 0:  # noqa: ASYNC110 - bob's job runs
            await trio.sleep(0.01)
    job = await rt.create_job(kind, "alice", input)
    done = await wait_for_state(rt, job.id)
    return done, await wait_for_state(rt, other.id)


def unharmed(other: Any, process: WorkerProcess) -> None:
    """Bob's job completed in its first attempt, on the worker's first connection."""
    assert (other.state, other.result, other.attempt) == (S.COMPLETED, "done", 1), other
    assert process.connections == 1


async def test_a_result_over_the_frame_limit_fails_its_own_job_only(tmp_path: Path) -> None:
    async with worker_server(tmp_path) as (running, process):
        done, other = await beside(running, "big_result", {})
    assert (done.state, done.failed_attempts) == (S.FAILED, 1), done
    assert done.error is not None and done.error.type == "ResultTooLargeError", done.error
    assert done.error.message.startswith(
        f"job {done.id}: result of {BIG + 2} bytes exceeds the limit of"
    ), done.error.message
    unharmed(other, process)


async def test_a_checkpoint_over_a_limit_fails_that_call_only(tmp_path: Path) -> None:
    """Over the frame limit (3 MiB: refused by the worker) and over the server's
    ``checkpoint_limit`` (1.5 MiB: refused by the server) alike: ``ctx.checkpoint`` raises
    :class:`CheckpointTooLargeError`, as in the server (the server's refusal was a plain
    ``InvalidInputError`` in a worker), and the handler goes on."""
    async with worker_server(tmp_path) as (running, process):
        for size in (3, 1.5):
            done, other = await beside(running, "big_checkpoint", size)
            assert (done.state, done.result) == (
                S.COMPLETED,
                ["CheckpointTooLargeError", True],
            ), done
            assert done.checkpoint == {"small": True}
            unharmed(other, process)


async def test_the_worker_refuses_a_checkpoint_over_the_servers_limit_before_sending_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hello's reply gives the server's ``checkpoint_limit`` (here 100,000 bytes): a
    checkpoint over it raises :class:`CheckpointTooLargeError` naming that limit in the
    worker, without being sent (the worker read the limit from the words of the server's
    refusal, after uploading the checkpoint); one within it is stored."""
    sent: list[str] = []
    request = _Session.request

    async def recorded(self: _Session, op: str, **fields: Any) -> Any:
        sent.append(op)
        return await request(self, op, **fields)

    monkeypatch.setattr(_Session, "request", recorded)

    async def over(ctx: JobContext, input: Any) -> Any:
        try:
            await ctx.checkpoint("x" * 150_000)
        except CheckpointTooLargeError as exc:
            refused = [exc.size, exc.limit]
        await ctx.checkpoint("x" * 90_000)
        return refused

    HANDLERS["over"] = over
    try:
        async with worker_server(tmp_path, checkpoint_limit=100_000) as (running, process):
            job = await running.runtime.create_job("over", "alice", {})
            done = await wait_for_state(running.runtime, job.id)
            assert process.connections == 1  # refused alone, the connection kept
    finally:
        del HANDLERS["over"]
    assert (done.state, done.result) == (S.COMPLETED, [150_002, 100_000]), done
    assert done.checkpoint == "x" * 90_000
    assert sent.count("checkpoint") == 1, sent


async def test_a_step_over_the_limit_fails_that_call_as_in_the_server(tmp_path: Path) -> None:
    async with memory_runtime({"big_step": big_step}) as rt:
        job = await rt.create_job("big_step", "alice", {})
        in_server = (await wait_for_state(rt, job.id)).result
    assert in_server[0] == "InvalidInputError", in_server
    async with worker_server(tmp_path) as (running, process):
        done, other = await beside(running, "big_step", {})
    assert (done.state, done.result) == (S.COMPLETED, in_server), done
    unharmed(other, process)


async def test_a_failure_message_over_the_limit_is_recorded_cut(tmp_path: Path) -> None:
    """A handler's error of megabytes, and one with a lone surrogate (which orjson refuses
    to encode: the worker's task failed), fail their job with the error the server records
    for its own handler: cut to 16,384 characters, escaped."""
    async with memory_runtime({"big_error": big_error}) as rt:
        in_server = {}
        for name in ERRORS:
            job = await rt.create_job("big_error", "alice", name)
            in_server[name] = (await wait_for_state(rt, job.id)).error
    assert in_server["huge"] == JobError("ValueError", sanitize_text(ERRORS["huge"]))
    assert len(in_server["huge"].message) == MAX_MESSAGE_LENGTH
    assert in_server["surrogate"] == JobError("ValueError", "no file \\udce9t\xe9.txt")
    async with worker_server(tmp_path) as (running, process):
        for name in ERRORS:
            done, other = await beside(running, "big_error", name)
            assert (done.state, done.failed_attempts, done.error) == (
                S.FAILED,
                1,
                in_server[name],
            ), done
            unharmed(other, process)


async def test_batches_stay_within_a_smaller_frame_limit(tmp_path: Path) -> None:
    """A server whose frame limit (40,000 bytes) is below the worker's batch size (64 KiB):
    progress reports with steps of 10,000 characters from two jobs at once go out in frames
    within the limit, and a checkpoint over it is refused alone."""

    async def chatty(ctx: JobContext, input: Any) -> Any:
        for pct in range(20):
            await ctx.progress(pct, f"{input}" * 10_000)
        refused = None
        try:
            await ctx.checkpoint("x" * 50_000)
        except CheckpointTooLargeError as exc:
            refused = exc.limit < 40_000
        await ctx.checkpoint("x" * 30_000)  # fits: goes alone
        return refused

    HANDLERS["chatty"] = chatty
    try:
        limits = {"max_frame_size": 32_000, "max_message_size": 40_000, "envelope_margin": 1000}
        async with worker_server(tmp_path, **limits) as (running, process):
            rt = running.runtime
            jobs = [await rt.create_job("chatty", "alice", n) for n in range(2)]
            done = [await wait_for_state(rt, job.id) for job in jobs]
            assert process.max_frame_size == 40_000
            assert process.connections == 1
    finally:
        del HANDLERS["chatty"]
    assert [(job.state, job.result, job.attempt) for job in done] == [(S.COMPLETED, True, 1)] * 2


def test_a_batch_frame_is_within_the_limit_and_a_report_that_fits_goes_alone() -> None:
    reports = [b"{" + b"x" * 29_998 + b"}"] * 3
    frame, count = _batch_frame(reports, 40_000)
    assert (len(frame), count) == (30_000, 1)
    frame, count = _batch_frame(reports, 2 * MIB)  # at most BATCH_BYTES in one batch
    assert count == 2 and len(frame) <= BATCH_BYTES
    small = [b"{}"] * 5
    frame, count = _batch_frame(small, 40)
    assert count == 4 and len(frame) == 39


async def test_a_heartbeat_naming_many_attempts_stays_within_a_small_frame_limit(
    tmp_path: Path,
) -> None:
    """A worker of 300 slots, all busy, under a server whose frame limit is 4,000 bytes: its
    heartbeat (about 50 bytes an attempt) goes out in as many frames as it takes. Before, the
    one heartbeat frame was refused as over the limit, the refusal ended the worker's run: the
    worker crashed, every attempt lost."""

    async def sleeper(ctx: JobContext, input: Any) -> Any:
        await trio.sleep(3)
        return input

    HANDLERS["sleeper"] = sleeper
    try:
        limits = {"max_frame_size": 4000, "max_message_size": 4000, "envelope_margin": 100}
        runtime_limits = 300
        async with worker_server(tmp_path, concurrency=runtime_limits, **limits) as (
            running,
            process,
        ):
            rt = running.runtime
            jobs = [await rt.create_job("sleeper", "alice", n) for n in range(runtime_limits)]
            done = [await wait_for_state(rt, job.id, timeout=30) for job in jobs]
            assert process.max_frame_size == 4000
            assert process.connections == 1
    finally:
        del HANDLERS["sleeper"]
    assert [(job.state, job.result, job.attempt) for job in done] == [
        (S.COMPLETED, n, 1) for n in range(runtime_limits)
    ]


class Pct(float):
    """A float subclass, as numpy's float64 is."""


async def subclass_progress(ctx: JobContext, input: Any) -> Any:
    """Progress of a float subclass, of a value no number, and of NaN: what each call did."""
    seen: list[Any] = []
    for pct in (Pct(12.5), object(), float("nan")):
        try:
            await ctx.progress(pct)  # type: ignore[arg-type]
        except Exception as exc:  # what the handler gets, compared
            seen.append([type(exc).__name__, str(exc).replace(repr(pct), "PCT")])
        else:
            seen.append("ok")
    return seen


async def test_progress_of_a_float_subclass_or_no_number_is_taken_as_in_the_server(
    tmp_path: Path,
) -> None:
    """``ctx.progress(numpy.float64(12.5))`` is stored as 12.5 in the server; in a worker,
    orjson refused the float subclass and the handler got a TypeError. A value that is no
    number (or NaN) raises the server's InvalidInputError in both, not a TypeError."""
    HANDLERS["subclass_progress"] = subclass_progress
    try:
        async with memory_runtime({"subclass_progress": subclass_progress}) as rt:
            job = await rt.create_job("subclass_progress", "alice", {})
            in_server = await wait_for_state(rt, job.id)
        assert (
            in_server.result
            == ["ok"] + [["InvalidInputError", "progress must be a number in 0..100, got PCT"]] * 2
        ), in_server.result
        async with worker_server(tmp_path) as (running, process):
            job = await running.runtime.create_job("subclass_progress", "alice", {})
            done = await wait_for_state(running.runtime, job.id)
            assert process.connections == 1
    finally:
        del HANDLERS["subclass_progress"]
    assert (done.state, done.result) == (S.COMPLETED, in_server.result), done


def test_heartbeat_frames_name_every_attempt_in_order_within_the_limit() -> None:
    jobs = [{"job_id": f"{n:026d}", "attempt": 1} for n in range(1000)]
    frames = _heartbeat_frames(jobs, 4000)
    assert len(frames) > 1 and all(len(frame) <= 4000 for frame in frames)
    assert [job for frame in frames for job in orjson.loads(frame)["jobs"]] == jobs
    assert _heartbeat_frames(jobs, 2 * MIB) == [orjson.dumps({"op": "heartbeat", "jobs": jobs})]
    assert _heartbeat_frames([], 4000) == [b'{"op":"heartbeat","jobs":[]}']
