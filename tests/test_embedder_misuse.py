"""An application that embeds the runtime, carelessly: every way it can misuse the API stays
with its cause. A handler's exit that is no ``Exception`` (``sys.exit`` or argparse in a
handler, a ``trio.Cancelled`` kept from a scope that has ended and raised again) fails its
own job, and the runtime runs the next; an interrupt landing in a handler leaves
``open_runtime`` as itself, not as a group."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

import pytest
import trio

from actors import (
    InvalidInputError,
    JobContext,
    JobState,
    KindOptions,
    RuntimeClosedError,
    RuntimeConfig,
    UnknownJobError,
    UnknownKindError,
    kind_options,
)
from actors._endings import STRAY_CANCELLED, split_raised
from actors._job import JobError
from transport import ServerConfig, open_server
from transport._worker_process import WorkerProcess

from .conftest import memory_runtime, wait_for_state
from .serving import SECRET
from .worker_support import wait_connected, worker_token

S = JobState


class Abort(BaseException):
    """A library's own control-flow exception, derived from BaseException."""


async def quick(ctx: JobContext, input: Any) -> Any:
    return input


async def stray_cancelled() -> None:
    """A Cancelled kept from a cancel scope that has ended (a retry wrapper keeping the last
    error), raised again: nothing is cancelling the task that raises it."""
    kept: trio.Cancelled | None = None
    with trio.CancelScope() as scope:
        scope.cancel()
        try:
            await trio.sleep(1)
        except trio.Cancelled as exc:
            kept = exc
    assert kept is not None
    raise kept


async def parse_args(ctx: JobContext, input: Any) -> Any:
    parser = argparse.ArgumentParser(prog="report", exit_on_error=True)
    parser.add_argument("--rows", type=int, required=True)
    return vars(parser.parse_args(input))  # a bad argument list: SystemExit(2)


def test_split_raised_leaves_only_an_interrupt_and_a_real_cancellation_to_the_runtime() -> None:
    stray = trio.Cancelled._create()
    exits: list[BaseException] = [SystemExit(2), GeneratorExit(), Abort(), ValueError("v")]
    for exit in exits:
        assert split_raised(exit, cancelled=False) == (exit, None)
        assert split_raised(exit, cancelled=True) == (exit, None)
    assert split_raised(stray, cancelled=False) == (stray, None)
    assert split_raised(stray, cancelled=True) == (None, stray)
    interrupt = KeyboardInterrupt()
    assert split_raised(interrupt, cancelled=False) == (None, interrupt)
    group = BaseExceptionGroup("nursery", [ValueError("v"), stray, SystemExit(1)])
    own, theirs = split_raised(group, cancelled=True)
    assert isinstance(own, BaseExceptionGroup) and isinstance(theirs, BaseExceptionGroup)
    assert [type(e) for e in own.exceptions] == [ValueError, SystemExit]
    assert theirs.exceptions == (stray,)


@pytest.mark.parametrize(
    ("way", "error"),
    [
        ("argparse", JobError("SystemExit", "2")),
        ("sys.exit", JobError("SystemExit", "3")),
        ("GeneratorExit", JobError("GeneratorExit", "GeneratorExit()")),
        ("asyncio.CancelledError", JobError("CancelledError", "CancelledError()")),
        ("a BaseException of its own", JobError("Abort", "aborted")),
        ("a stray Cancelled", JobError("Cancelled", STRAY_CANCELLED)),
    ],
)
async def test_a_handler_exit_that_is_no_exception_fails_its_own_job_only(
    autojump_clock: trio.abc.Clock, way: str, error: JobError
) -> None:
    """Each used to leave the handler's task: a SystemExit (a CLI parser in a handler) or
    any BaseException crashed the runtime, failing every running job, and ``open_runtime``
    raised a raw BaseExceptionGroup; a stray Cancelled ended the supervisor's nursery
    silently: the job stayed running and no job ever ran again (wait_job hung)."""

    async def exits(ctx: JobContext, input: Any) -> Any:
        if way == "argparse":
            return await parse_args(ctx, ["--rows", "many"])
        if way == "sys.exit":
            raise SystemExit(3)
        if way == "GeneratorExit":
            raise GeneratorExit
        if way == "asyncio.CancelledError":
            raise asyncio.CancelledError
        if way == "a BaseException of its own":
            raise Abort("aborted")
        await stray_cancelled()

    async with memory_runtime({"exits": exits, "quick": quick}) as rt:
        slow = await rt.create_job("quick", "bob", "unharmed")
        job = await rt.create_job("exits", "alice", {})
        done = await wait_for_state(rt, job.id, timeout=60)
        assert (done.state, done.error) == (S.FAILED, error)
        assert (await wait_for_state(rt, slow.id)).result == "unharmed"
        after = await rt.create_job("quick", "alice", 5)  # the runtime still runs jobs
        assert (await wait_for_state(rt, after.id, timeout=60)).result == 5
        assert rt.status().running == 0


async def test_an_interrupt_in_a_handler_leaves_open_runtime_as_itself(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Ctrl-C landing while a handler runs is the application's interrupt: it used to leave
    ``open_runtime`` as a BaseExceptionGroup nesting the KeyboardInterrupt."""

    async def interrupted(ctx: JobContext, input: Any) -> Any:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        async with memory_runtime({"k": interrupted}) as rt:
            await rt.create_job("k", "alice", {})
            await trio.sleep_forever()


@kind_options(max_attempts=1)
async def exiting(ctx: JobContext, input: Any) -> Any:
    raise SystemExit(4)


async def test_a_jobspine_worker_fails_the_job_of_a_handler_that_exits(tmp_path: Path) -> None:
    """In a ``jobspine worker`` too: a SystemExit in one handler used to end the worker and
    every job it ran."""
    config = RuntimeConfig(stop_grace=0.5, sqlite_synchronous="NORMAL")
    async with (
        open_server(
            tmp_path / "db", ServerConfig(secret=SECRET, port=0), runtime_config=config
        ) as running,
        trio.open_nursery() as nursery,
    ):
        rt = running.runtime
        nursery.start_soon(
            WorkerProcess(running.url, worker_token(), {"exit": exiting, "q": quick}).run
        )
        await wait_connected(running)
        done = await wait_for_state(rt, (await rt.create_job("exit", "alice", {})).id)
        assert (done.state, done.error) == (S.FAILED, JobError("SystemExit", "4"))
        after = await wait_for_state(rt, (await rt.create_job("q", "alice", 7)).id)
        assert (after.state, after.result) == (S.COMPLETED, 7)
        nursery.cancel_scope.cancel()


# -- the caller's values ----------------------------------------------------------------------

NOT_IDS: list[Any] = [None, 5, b"01ABC", ["01ABC"], {"id": 1}]


@pytest.mark.parametrize("job_id", NOT_IDS, ids=repr)
async def test_a_job_id_that_is_no_string_names_no_job(
    autojump_clock: trio.abc.Clock, job_id: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """``rt.get_job(request.args.get("id"))`` with None, a number or bytes: each call used
    to fail inside the store, logged as a traceback there ("store request failed") and
    raised as a StoreError wrapping a TypeError; now it names no job."""
    async with memory_runtime({"quick": quick}) as rt:
        calls = [
            rt.get_job, rt.cancel, rt.pause, rt.resume, rt.restart, rt.recover_job,
            rt.get_audit, rt.read_events, rt.get_checkpoint_details, rt.validate_checkpoint,
            rt.get_recovery_options, rt.reset_recovery_attempts, rt.list_children, rt.wait_job,
        ]  # fmt: skip
        for call in calls:
            with pytest.raises(UnknownJobError):
                await call(job_id)
        assert "store request failed" not in caplog.text
        job = await rt.create_job("quick", "alice", 1)
        assert (await wait_for_state(rt, job.id)).result == 1


async def test_odd_create_and_restart_arguments_are_invalid_input(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Each used to raise a raw error from inside: OverflowError (an integer delay or run_at
    beyond any float), TypeError (a kind that is a list, modifications that are a list,
    a user id that is a number in get_user_stats or queue_stats)."""
    async with memory_runtime({"quick": quick}) as rt:
        whens: list[dict[str, Any]] = [
            {"delay": 10**400},
            {"run_at": 10**400},
            {"run_at": -(10**400)},
        ]
        for when in whens:
            with pytest.raises(InvalidInputError, match="finite number of seconds"):
                await rt.create_job("quick", "alice", 1, **when)
        kinds: list[Any] = [["quick"], {"quick": 1}]
        for kind in kinds:
            with pytest.raises(UnknownKindError):
                await rt.create_job(kind, "alice", 1)
        users: list[Any] = [5, ["alice"]]
        for user in users:
            with pytest.raises(InvalidInputError, match="user_id must be a string"):
                await rt.get_user_stats(user)
            with pytest.raises(InvalidInputError, match="user_id must be a string"):
                await rt.queue_stats(user)
        job = await wait_for_state(rt, (await rt.create_job("quick", "alice", {"n": 1})).id)
        odd: list[Any] = [[("n", 2)], "n=2", 5]
        for modifications in odd:
            with pytest.raises(InvalidInputError, match="modifications must be an object"):
                await rt.restart(job.id, modifications)
        assert await rt.get_job(job.id) == job  # unchanged


async def test_kind_options_of_the_wrong_type_are_refused_where_given(
    autojump_clock: trio.abc.Clock,
) -> None:
    """``KindOptions(retry=None)`` was accepted: the kind's first failed attempt then failed
    inside the store (its outcome not stored) and the job stayed running until the stall
    rule; ``rt.register(kind, handler, "x")`` was accepted too, and every create of the
    kind raised AttributeError."""
    for fields in (
        {"retry": None},
        {"retry": {"initial_interval": 1.0}},
        {"requeue_stalled": "yes"},
        {"non_retryable": None},
        {"non_retryable": 5},
    ):
        with pytest.raises(InvalidInputError, match=next(iter(fields))):
            KindOptions(**fields)
    with pytest.raises(InvalidInputError, match="retry must be a RetryPolicy"):
        kind_options(retry="fast")  # type: ignore[arg-type]
    async with memory_runtime({"quick": quick}) as rt:
        with pytest.raises(InvalidInputError, match="must be a KindOptions"):
            rt.register("other", quick, "x")  # type: ignore[arg-type]
        assert "other" not in rt.kinds  # nothing registered
        job = await rt.create_job("quick", "alice", 1)
        assert (await wait_for_state(rt, job.id)).result == 1


@pytest.mark.parametrize(
    "arguments",
    [{"buffer": 0}, {"buffer": -1}, {"buffer": None}, {"buffer": float("nan")},
     {"buffer": True}, {"max_bytes": "big"}, {"max_bytes": None}, {"max_bytes": 0}],
    ids=repr,
)  # fmt: skip
async def test_event_stream_arguments_are_checked(
    autojump_clock: trio.abc.Clock, arguments: dict[str, Any]
) -> None:
    """They raised ValueError or TypeError from Trio's channel or a comparison, or (a zero
    buffer) a stream cut off at its first event as lagged."""
    async with memory_runtime({"quick": quick}) as rt:
        with pytest.raises(InvalidInputError):
            rt.events(**arguments)


async def test_events_of_a_closed_runtime_are_refused_not_awaited_forever(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A stream opened on a runtime already closed used to wait for ever: nothing would
    publish to it. Every other call raises RuntimeClosedError then; so does this one."""
    async with memory_runtime({"quick": quick}) as rt:
        pass
    with pytest.raises(RuntimeClosedError):
        rt.events()
    with trio.fail_after(1):  # a subscription of the closed hub ends at once
        async with rt._hub.subscribe() as stream:
            assert [event async for event in stream] == []
