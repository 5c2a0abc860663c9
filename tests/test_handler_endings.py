"""Every way out of a handler ends its attempt in a recorded outcome: an unasked
``JobStopped`` fails the attempt (retried by the kind's policy) instead of leaving the job
running with nothing running or watching it; errors of a handler's own nursery are recorded
as their leaves (one leaf: that leaf; several: the one that decides the retry, naming the
others), a ``PermanentError`` or a non-retryable type inside a group is not retried, and an
error raised while a stop unwinds the handler's nursery neither crashes the runtime nor
hides the stop. The rule itself (:func:`actors._endings.judge`) is sans-I/O; the runtime's
behaviour under the mock clock on the in-memory store; and a ``jobspine worker`` judges alike."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from actors import (
    JobContext,
    JobState,
    JobStopped,
    KindOptions,
    PermanentError,
    RetryPolicy,
    Runtime,
    RuntimeConfig,
    StaleAttemptError,
    StoreUnavailableError,
    kind_options,
)
from actors._endings import STRAY_CANCELLED, UNASKED_STOP, HandlerFailure, judge, split_raised
from actors._job import JobError
from transport import ServerConfig, open_server
from transport._worker_process import WorkerProcess

from .conftest import memory_runtime, wait_for_state
from .serving import SECRET
from .worker_support import wait_connected, worker_token

S = JobState
FAST = RetryPolicy(initial_interval=1.0, maximum_interval=1.0, jitter=0.0)


def group(*errors: Exception) -> ExceptionGroup[Exception]:
    return ExceptionGroup("Exceptions from Trio nursery", list(errors))


# -- the rule (sans-I/O) --------------------------------------------------------------------


def test_an_unasked_job_stopped_is_a_failure_an_asked_one_a_stop() -> None:
    unasked = judge(JobStopped(), job_id="j", attempt=1, stop_asked=False)
    assert unasked.how == "failed" and not unasked.permanent
    assert unasked.error == JobError("JobStopped", UNASKED_STOP)
    said = judge(JobStopped("pause me"), job_id="j", attempt=1, stop_asked=False)
    assert said.error is not None and said.error.message == f"{UNASKED_STOP} (pause me)"
    assert judge(JobStopped(), job_id="j", attempt=1, stop_asked=True).how == "stopped"
    # In a nursery alike: all acknowledge the stop; an error beside them fails the attempt.
    both = group(JobStopped(), JobStopped())
    assert judge(both, job_id="j", attempt=1, stop_asked=True).how == "stopped"
    mixed = judge(group(JobStopped(), KeyError("k")), job_id="j", attempt=1, stop_asked=True)
    assert (mixed.how, mixed.error) == ("failed", JobError("KeyError", "'k'"))


def test_a_group_of_one_is_its_leaf_nested_or_not() -> None:
    for raised in (group(KeyError("k")), group(group(KeyError("k")))):
        ending = judge(raised, job_id="j", attempt=1, stop_asked=False)
        assert (ending.how, ending.error, ending.permanent) == (
            "failed",
            JobError("KeyError", "'k'"),
            False,
        )
    permanent = judge(group(PermanentError("bad")), job_id="j", attempt=1, stop_asked=False)
    assert (permanent.error, permanent.permanent) == (JobError("PermanentError", "bad"), True)
    remote = HandlerFailure(JobError("Remote", "there"), permanent=True)
    assert judge(group(remote), job_id="j", attempt=1, stop_asked=False).permanent


def test_several_leaves_are_recorded_as_the_one_that_decides_the_retry() -> None:
    """The first leaf that stops retries (permanent, or a non-retryable type) is recorded;
    else the first; the message names the others."""
    raised = group(ValueError("v"), PermanentError("p"), KeyError("k"))
    ending = judge(raised, job_id="j", attempt=1, stop_asked=False)
    assert (ending.error, ending.permanent, ending.cause) == (
        JobError(
            "PermanentError",
            "p (and 2 other errors from this attempt: ValueError: v; KeyError: 'k')",
        ),
        True,
        raised,  # logged whole: every leaf's traceback
    )
    typed = judge(
        raised, job_id="j", attempt=1, stop_asked=False, non_retryable=frozenset({"KeyError"})
    )
    assert typed.error is not None and typed.error.type == "PermanentError"  # the first
    plain = group(ValueError("v"), KeyError("k"))
    not_retried = judge(
        plain, job_id="j", attempt=1, stop_asked=False, non_retryable=frozenset({"KeyError"})
    )
    assert not_retried.error == JobError(
        "KeyError", "'k' (and 1 other error from this attempt: ValueError: v)"
    )
    assert not not_retried.permanent  # not retried by its type (decide_retry)
    retried = judge(plain, job_id="j", attempt=1, stop_asked=False)
    assert retried.error is not None and retried.error.type == "ValueError"
    many = judge(
        group(*(ValueError(str(i)) for i in range(30))), job_id="j", attempt=1, stop_asked=False
    )
    assert many.error is not None and many.error.message.endswith("ValueError: 10; and 19 more)")


def test_the_database_and_the_fence_decide_for_the_whole_attempt() -> None:
    outage = StoreUnavailableError("locked")
    for stop_asked in (False, True):
        ending = judge(group(ValueError("v"), outage), job_id="j", attempt=2, stop_asked=stop_asked)
        assert (ending.how, ending.cause) == ("store_unavailable", outage)
    own = StaleAttemptError("j", 2, 2, "cancelled")
    assert (
        judge(group(ValueError("v"), own), job_id="j", attempt=2, stop_asked=False).how == "fenced"
    )
    # One of an older attempt (a context kept past its attempt) proves nothing about this one:
    # a failure, whose write the store refuses if the job did move on.
    older = judge(StaleAttemptError("j", 1, 2, "running"), job_id="j", attempt=2, stop_asked=False)
    assert older.how == "failed"
    assert judge(own, job_id="j", attempt=2, stop_asked=True).how == "stopped"


def test_sys_exit_in_a_handler_is_a_failure_of_its_attempt() -> None:
    """``SystemExit`` from a handler's code fails its attempt (retried by the policy), named as
    the call that raised it; inside a group alike; a stop asked beside it is still its asker's."""
    for code, said in ((2, "sys.exit(2)"), ("bad", "sys.exit('bad')"), (None, "sys.exit()")):
        ending = judge(SystemExit(code), job_id="j", attempt=1, stop_asked=False)
        assert (ending.how, ending.permanent) == ("failed", False)
        assert ending.error == JobError("SystemExit", f"{said} in the handler")
    nested = judge(
        BaseExceptionGroup("", [SystemExit(3), RuntimeError("x")]),
        job_id="j",
        attempt=1,
        stop_asked=False,
    )
    assert nested.error is not None and nested.error.type == "SystemExit"


# -- the runtime ----------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["handler", "nursery"])
async def test_an_unasked_job_stopped_fails_the_attempt_through_the_retry_policy(
    autojump_clock: trio.abc.Clock, where: str
) -> None:
    """Nothing asked the job to stop: its attempt fails (``JobStopped``, saying so) and is
    retried by the kind's policy; the job never stays running with nothing running it."""

    async def selfstop(ctx: JobContext, input: Any) -> Any:
        await ctx.checkpoint({"at": ctx.attempt})
        if where == "handler":
            raise JobStopped

        async def part() -> None:
            raise JobStopped

        async with trio.open_nursery() as nursery:
            nursery.start_soon(part)

    kinds = {"k": KindOptions(max_attempts=2, retry=FAST)}
    async with memory_runtime({"k": selfstop}, kinds=kinds, heartbeat_timeout=5.0) as rt:
        job = await rt.create_job("k", "alice", {})
        done = await wait_for_state(rt, job.id, timeout=60)
        assert (done.state, done.attempt, done.failed_attempts) == (S.FAILED, 2, 2)
        assert done.error == JobError("JobStopped", UNASKED_STOP)
        events = [e.type.value for e in await rt.read_events(job.id)]
        assert events.count("retrying") == 1 and "paused" not in events
        assert rt.status().running == 0 and (await rt.queue_stats()).running == 0


async def test_a_stop_acknowledged_inside_a_nursery_is_a_stop(
    autojump_clock: trio.abc.Clock,
) -> None:
    async def polite(ctx: JobContext, input: Any) -> Any:
        async def part() -> None:
            await ctx.wait_stopping()
            await ctx.checkpoint({"stopped": True})
            raise JobStopped

        async with trio.open_nursery() as nursery:
            nursery.start_soon(part)
            nursery.start_soon(trio.sleep_forever)

    async with memory_runtime({"k": polite}) as rt:
        job = await rt.create_job("k", "alice", {})
        await trio.sleep(1)
        paused = await rt.pause(job.id)
        assert (paused.state, paused.error, paused.checkpoint) == (
            S.PAUSED,
            None,
            {"stopped": True},
        )
        assert paused.failed_attempts == 0


async def test_errors_of_a_handlers_nursery_are_recorded_as_their_leaves(
    autojump_clock: trio.abc.Clock,
) -> None:
    """One leaf is recorded as itself (type, message, permanence, ``non_retryable``);
    several as the one that decides the retry, naming the others."""

    async def report(ctx: JobContext, input: Any) -> Any:
        async def part(error: Exception) -> None:
            raise error

        raising: dict[str, list[Exception]] = {
            "key": [KeyError("customer_id")],
            "permanent": [PermanentError("bad report definition")],
            "value": [ValueError("row 7")],
            "two": [RuntimeError("flaky"), PermanentError("bad definition")],
        }
        errors = raising[input]
        async with trio.open_nursery() as nursery:
            for error in errors:
                nursery.start_soon(part, error)
            nursery.start_soon(trio.sleep, 1)

    kinds = {"k": KindOptions(max_attempts=3, retry=FAST, non_retryable=["ValueError"])}
    async with memory_runtime({"k": report}, kinds=kinds) as rt:
        outcomes = {}
        for input in ("key", "permanent", "value", "two"):
            done = await wait_for_state(rt, (await rt.create_job("k", "alice", input)).id)
            assert done.state is S.FAILED and done.error is not None
            outcomes[input] = (done.failed_attempts, done.error.type, done.error.message)
        assert outcomes == {
            "key": (3, "KeyError", "'customer_id'"),  # retried, as a KeyError alone would be
            "permanent": (1, "PermanentError", "bad report definition"),
            "value": (1, "ValueError", "row 7"),  # non_retryable matches the leaf
            "two": (
                1,
                "PermanentError",
                "bad definition (and 1 other error from this attempt: RuntimeError: flaky)",
            ),
        }


async def test_an_error_while_a_stop_unwinds_a_nursery_leaves_the_stop_to_its_asker(
    autojump_clock: trio.abc.Clock,
) -> None:
    """The handler ignores the stop; cancelled after the grace, a child's cleanup raises
    beside the Cancelled of its sibling. The runtime stays up and the pause is recorded."""

    async def stubborn(ctx: JobContext, input: Any) -> Any:
        async def part() -> None:
            try:
                await trio.sleep_forever()
            finally:
                raise ValueError("cleanup failed")

        await ctx.checkpoint({"at": 1})
        async with trio.open_nursery() as nursery:
            nursery.start_soon(part)
            nursery.start_soon(trio.sleep_forever)

    async with memory_runtime({"k": stubborn, "quick": quick}, stop_grace=1.0) as rt:
        job = await rt.create_job("k", "alice", {})
        await trio.sleep(1)
        paused = await rt.pause(job.id)
        assert (paused.state, paused.error, paused.checkpoint) == (S.PAUSED, None, {"at": 1})
        after = await rt.create_job("quick", "alice", 5)  # the runtime still runs jobs
        assert (await wait_for_state(rt, after.id)).result == 5


async def quick(ctx: JobContext, input: Any) -> Any:
    return input


async def exits(ctx: JobContext, input: Any) -> Any:
    await ctx.checkpoint({"at": ctx.attempt})
    sys.exit(input)


async def bad_arguments(ctx: JobContext, input: Any) -> Any:
    # argparse refusing arguments prints its usage and calls sys.exit(2)
    parser = argparse.ArgumentParser(prog="model")
    parser.add_argument("--epochs", type=int, required=True)
    return vars(parser.parse_args(input))


async def test_sys_exit_in_a_handler_fails_its_job_and_nothing_else(
    autojump_clock: trio.abc.Clock, capsys: pytest.CaptureFixture[str]
) -> None:
    """A handler calling ``sys.exit()`` (or a library doing it for it: argparse on bad
    arguments) fails its own job through the retry policy; the runtime, and a job running
    beside it, go on. Before, the ``SystemExit`` left the runtime's nursery: every job of every
    user stopped with it, and each restart recovered the job that did it."""

    async def steady(ctx: JobContext, input: Any) -> Any:
        for step in range(5):
            await ctx.progress(step / 5)
            await trio.sleep(1)
        return "done"

    kinds = {"exits": KindOptions(max_attempts=2, retry=FAST)}
    handlers = {"exits": exits, "args": bad_arguments, "steady": steady}
    async with memory_runtime(handlers, kinds=kinds, heartbeat_timeout=5.0) as rt:
        beside = await rt.create_job("steady", "bob", {})
        exited = await rt.create_job("exits", "alice", 3)
        refused = await rt.create_job("args", "alice", ["--epochs", "many"])
        done = await wait_for_state(rt, exited.id, timeout=60)
        assert (done.state, done.failed_attempts, done.checkpoint) == (S.FAILED, 2, {"at": 2})
        assert done.error == JobError("SystemExit", "sys.exit(3) in the handler")
        events = [e.type.value for e in await rt.read_events(exited.id)]
        assert events.count("retrying") == 1
        failed = await wait_for_state(rt, refused.id, timeout=60)
        assert (failed.state, failed.error) == (
            S.FAILED,
            JobError("SystemExit", "sys.exit(2) in the handler"),
        )
        assert "invalid int value: 'many'" in capsys.readouterr().err
        assert (await wait_for_state(rt, beside.id, timeout=60)).result == "done"
        after = await rt.create_job("args", "alice", ["--epochs", "3"])
        assert (await wait_for_state(rt, after.id)).result == {"epochs": 3}


class Abort(BaseException):
    """A library's own control-flow exception, derived from BaseException."""


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
        ("GeneratorExit", JobError("GeneratorExit", "GeneratorExit()")),
        ("asyncio.CancelledError", JobError("CancelledError", "CancelledError()")),
        ("a BaseException of its own", JobError("Abort", "aborted")),
        ("a stray Cancelled", JobError("Cancelled", STRAY_CANCELLED)),
    ],
)
async def test_a_handler_exit_that_is_no_exception_fails_its_own_job_only(
    autojump_clock: trio.abc.Clock, way: str, error: JobError
) -> None:
    """Each used to leave the handler's task: a BaseException (as ``SystemExit``, above)
    crashed the runtime, failing every running job, and ``open_runtime`` raised a raw
    BaseExceptionGroup; a stray Cancelled ended the supervisor's nursery silently: the job
    stayed running and no job ever ran again (wait_job hung)."""

    async def exits(ctx: JobContext, input: Any) -> Any:
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


# -- a jobspine worker judges alike ---------------------------------------------------------

WORKER_RETRY = RetryPolicy(initial_interval=0.05, maximum_interval=0.05, jitter=0.0)


@kind_options(max_attempts=2, retry=WORKER_RETRY)
async def selfstop(ctx: JobContext, input: Any) -> Any:
    raise JobStopped


@kind_options(max_attempts=2, retry=WORKER_RETRY, non_retryable=["KeyError"])
async def two_errors(ctx: JobContext, input: Any) -> Any:
    async def part(error: Exception) -> None:
        raise error

    async with trio.open_nursery() as nursery:
        nursery.start_soon(part, RuntimeError("flaky"))
        nursery.start_soon(part, KeyError("customer_id"))


@asynccontextmanager
async def served_with_worker(tmp_path: Path, handlers: dict[str, Any]) -> AsyncIterator[Runtime]:
    """A server on a SQLite file and a ``jobspine worker`` (in this process) serving
    ``handlers``, connected: the server's runtime."""
    config = RuntimeConfig(stop_grace=0.5, sqlite_synchronous="NORMAL")
    async with (
        open_server(
            tmp_path / "db", ServerConfig(secret=SECRET, port=0), runtime_config=config
        ) as running,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(WorkerProcess(running.url, worker_token(), handlers).run)
        await wait_connected(running)
        yield running.runtime
        nursery.cancel_scope.cancel()


async def test_a_jobspine_worker_judges_its_handlers_endings_alike(tmp_path: Path) -> None:
    """Kinds only a worker serves (its declared options): an unasked ``JobStopped`` is a
    failure there too, and a group is recorded as the leaf that decides the retry."""
    async with served_with_worker(tmp_path, {"selfstop": selfstop, "two": two_errors}) as rt:
        stopped = await wait_for_state(rt, (await rt.create_job("selfstop", "alice", {})).id)
        assert (stopped.state, stopped.failed_attempts, stopped.error) == (
            S.FAILED,
            2,
            JobError("JobStopped", UNASKED_STOP),
        )
        two = await wait_for_state(rt, (await rt.create_job("two", "alice", {})).id)
        assert (two.state, two.failed_attempts) == (S.FAILED, 1)  # KeyError: not retried
        assert two.error == JobError(
            "KeyError", "'customer_id' (and 1 other error from this attempt: RuntimeError: flaky)"
        )


@kind_options(max_attempts=1)
async def worker_exits(ctx: JobContext, input: Any) -> Any:
    sys.exit(input)


async def test_sys_exit_in_a_jobspine_workers_handler_fails_its_job_only(
    tmp_path: Path,
) -> None:
    """In a ``jobspine worker`` alike: the job fails with ``SystemExit``, the worker process
    stays connected and runs the next job (before, the exit ended the worker's process)."""
    async with served_with_worker(tmp_path, {"exits": worker_exits, "quick": quick}) as rt:
        exited = await wait_for_state(rt, (await rt.create_job("exits", "alice", 4)).id)
        assert (exited.state, exited.error) == (
            S.FAILED,
            JobError("SystemExit", "sys.exit(4) in the handler"),
        )
        after = await wait_for_state(rt, (await rt.create_job("quick", "alice", 7)).id)
        assert (after.state, after.result) == (S.COMPLETED, 7)


# -- a handler that is not async ------------------------------------------------------------

NOT_ASYNC = JobError(
    "PermanentError",
    "the handler of kind 'plain' returned dict, not an awaitable: a handler is an async"
    " function, async def handler(ctx, input)",
)


@kind_options(max_attempts=3, retry=WORKER_RETRY)
def plain(ctx: JobContext, input: Any) -> Any:  # the async forgotten: it runs, then fails
    return {"n": input}


async def test_a_handler_that_is_not_async_fails_its_job_once_saying_so() -> None:
    """A plain ``def`` handler failed every attempt with Python's ``TypeError: object dict
    can't be used in 'await' expression``, retried as often as its kind allowed (its side
    effects repeated each time); now its job fails at once, the error naming the kind and
    the fix. A plain function returning a coroutine (a wrapper) is a handler as before."""

    def wrapper(ctx: JobContext, input: Any) -> Any:
        return quick(ctx, input)

    async with memory_runtime({"plain": plain, "wrapped": wrapper}) as rt:
        with trio.fail_after(10):
            done = await wait_for_state(rt, (await rt.create_job("plain", "alice", 1)).id)
            wrapped = await wait_for_state(rt, (await rt.create_job("wrapped", "alice", 2)).id)
        assert (done.state, done.failed_attempts, done.error) == (S.FAILED, 1, NOT_ASYNC)
        assert (wrapped.state, wrapped.result) == (S.COMPLETED, 2)


async def test_a_jobspine_worker_fails_a_handler_that_is_not_async_alike(
    tmp_path: Path,
) -> None:
    async with served_with_worker(tmp_path, {"plain": plain, "quick": quick}) as rt:
        done = await wait_for_state(rt, (await rt.create_job("plain", "alice", 1)).id)
        assert (done.state, done.failed_attempts, done.error) == (S.FAILED, 1, NOT_ASYNC)
        after = await wait_for_state(rt, (await rt.create_job("quick", "alice", 7)).id)
        assert (after.state, after.result) == (S.COMPLETED, 7)
