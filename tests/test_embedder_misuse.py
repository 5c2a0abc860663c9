"""An application that embeds the runtime, carelessly: every way it can misuse the API stays
with its cause (a handler's exits that are no ``Exception``: ``tests/test_handler_endings``)."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from actors import (
    InvalidInputError,
    JobContext,
    JobState,
    KindOptions,
    RuntimeClosedError,
    UnknownJobError,
    UnknownKindError,
    kind_options,
)

from .conftest import memory_runtime, wait_for_state

S = JobState


async def quick(ctx: JobContext, input: Any) -> Any:
    return input


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


async def test_recovery_queries_check_their_arguments(autojump_clock: trio.abc.Clock) -> None:
    """``get_resumable_jobs(5)`` raised a TypeError from inside the store's filter, and
    ``find_stale_jobs(None)`` one from its arithmetic; each is InvalidInputError naming the
    argument, as ``get_user_stats`` and ``queue_stats`` are."""
    async with memory_runtime({"quick": quick}) as rt:
        users: list[Any] = [5, ["alice"], b"alice"]
        for user in users:
            with pytest.raises(InvalidInputError, match="user_id must be a string"):
                await rt.get_resumable_jobs(user)
        seconds: list[Any] = [None, "30", -1, float("nan"), 10**400]
        for value in seconds:
            with pytest.raises(InvalidInputError, match=r"^stalled_seconds must be"):
                await rt.find_stale_jobs(value)
        assert await rt.get_resumable_jobs("alice") == []
        assert await rt.find_stale_jobs(0) == []


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
