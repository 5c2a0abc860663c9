"""Bad and odd input against the queue through the embedding API: each gets a typed error,
loses nothing, and never fails another user's job or logs a traceback."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from actors import (
    DEMO_HANDLERS,
    IdempotencyConflictError,
    InvalidInputError,
    JobContext,
    JobState,
    MemoryBackend,
    UnknownJobError,
    open_runtime,
    parse_room,
    validates,
)
from transport import ClientError, open_client
from transport._exit import ExitCode

from .conftest import memory_runtime, wait_for_state
from .serving import serving, token
from .test_cli_queue import cli

#: A lone surrogate: what ``os.fsdecode`` makes of an undecodable byte. No name can hold one.
LONE = "\udce9"
SMALL = {"query": "q", "depth": 1, "delay": 0}
LATER = 3600.0  # a delay that keeps a job waiting for the whole test


def errors_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
async def test_names_holding_a_lone_surrogate_are_unknown_or_refused_not_store_errors(
    store: str, request: pytest.FixtureRequest, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: a job id, a ``list_jobs``/stats filter or a user id holding a lone surrogate
    reached the database driver, which cannot encode it: every lookup, control and listing
    failed with ``StoreError`` (``UnicodeEncodeError``) and an ERROR with its traceback was
    logged per call, and a heartbeat for such an id failed the next commit group of every
    job. Now a job id holding one is ``UnknownJobError``, a filter ``InvalidInputError``
    naming it, a heartbeat is dropped; another user's job runs to its end meanwhile and
    nothing is logged."""
    db = request.getfixturevalue("pg_url") if store == "postgresql" else tmp_path / "j.db"
    bad_id = f"01{LONE}"
    with caplog.at_level(logging.WARNING):
        async with open_runtime(db, handlers=DEMO_HANDLERS) as rt:
            job = await rt.create_job("research", "bob", {**SMALL, "depth": 3, "delay": 0.05})
            lookups: dict[str, Callable[[], Awaitable[Any]]] = {
                "get_job": lambda: rt.get_job(bad_id),
                "cancel": lambda: rt.cancel(bad_id),
                "pause": lambda: rt.pause(bad_id),
                "resume": lambda: rt.resume(bad_id),
                "restart": lambda: rt.restart(bad_id),
                "list_children": lambda: rt.list_children(bad_id),
                "read_events": lambda: rt.read_events(bad_id),
                "get_audit": lambda: rt.get_audit(bad_id),
                "recover_job": lambda: rt.recover_job(bad_id),
                "get_recovery_options": lambda: rt.get_recovery_options(bad_id),
                "reset_recovery_attempts": lambda: rt.reset_recovery_attempts(bad_id),
                "delete_job": lambda: rt.delete_job(bad_id),
                "wait_job": lambda: rt.wait_job(bad_id),
            }
            for name, lookup in lookups.items():
                with pytest.raises(UnknownJobError, match="no job with id"):
                    await lookup()
                    pytest.fail(f"{name} found a job")
            filters: dict[str, Callable[[], Awaitable[Any]]] = {
                "user_id": lambda: rt.list_jobs(f"bob{LONE}"),
                "kind": lambda: rt.list_jobs("bob", kind=f"research{LONE}"),
                "tag": lambda: rt.list_jobs("bob", tag=LONE),
                "parent_id": lambda: rt.list_jobs("bob", parent_id=bad_id),
            }
            for field, listing in filters.items():
                with pytest.raises(InvalidInputError, match=f"{field} must be text UTF-8 can"):
                    await listing()
            for stats in (
                lambda: rt.get_user_stats(LONE),
                lambda: rt.queue_stats(LONE),
                lambda: rt.get_resumable_jobs(LONE),
            ):
                with pytest.raises(InvalidInputError, match="user_id must be text UTF-8 can"):
                    await stats()
            await rt.heartbeat(bad_id, 1)  # no such job: dropped, never in a commit
            done = await wait_for_state(rt, job.id)
            assert done.state is JobState.COMPLETED
            assert [j.id for j in await rt.list_jobs(None)] == [job.id]
    assert errors_logged(caplog) == []


def test_a_room_holding_a_lone_surrogate_is_refused() -> None:
    """Before: a room ``user:<name with a lone surrogate>`` passed and its events were read
    from the database, failing there; now it is ``InvalidInputError`` naming the room."""
    for room in (f"job:01{LONE}", f"user:al{LONE}ice"):
        with pytest.raises(InvalidInputError, match="room must be text UTF-8 can hold"):
            parse_room(room)


async def test_a_lone_surrogate_filter_is_refused_on_the_memory_store_too() -> None:
    """The memory store matched such a filter (finding nothing) where the databases failed:
    every backend now refuses it alike."""
    async with memory_runtime() as rt:
        with pytest.raises(InvalidInputError, match="tag must be text UTF-8 can hold"):
            await rt.list_jobs(None, tag=LONE)
        with trio.fail_after(5), pytest.raises(UnknownJobError):
            await rt.get_job(LONE)


async def _fails_when_told(ctx: JobContext, input: Any) -> Any:
    if input["fail"]:
        raise RuntimeError("told to fail")
    return input


@pytest.mark.parametrize("store", ["memory", "sqlite", "postgresql"])
async def test_a_create_sent_again_after_a_restart_with_modifications_gets_its_job(
    store: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """Before: a create sent again with its idempotency key (as a client whose reply was lost
    does) after someone restarted the job with modifications was compared with the job's
    input as it is now and refused with ``IdempotencyConflictError``, though it is the very
    request that made the job. Now it gets the job back, as it is; a create with the key and
    another input still conflicts."""
    db = (
        None
        if store == "memory"
        else request.getfixturevalue("pg_url")
        if store == "postgresql"
        else tmp_path / "j.db"
    )
    backend = MemoryBackend() if db is None else None
    handlers = {"flaky": _fails_when_told}
    async with open_runtime(db, backend=backend, handlers=handlers) as rt:
        first = await rt.create_job("flaky", "alice", {"fail": True, "n": 1}, idempotency_key="k")
        assert (await wait_for_state(rt, first.id)).state is JobState.FAILED
        await rt.restart(first.id, {"fail": False})
        done = await wait_for_state(rt, first.id)
        assert (done.state, done.input) == (JobState.COMPLETED, {"fail": False, "n": 1})
        again = await rt.create_job("flaky", "alice", {"fail": True, "n": 1}, idempotency_key="k")
        assert (again.id, again.state, again.input) == (first.id, done.state, done.input)
        with pytest.raises(IdempotencyConflictError):
            await rt.create_job("flaky", "alice", {"fail": True, "n": 2}, idempotency_key="k")
        assert [j.id for j in await rt.list_jobs(None)] == [first.id]


def _low_below_high(input: Any) -> None:
    if input["low"] > input["high"]:
        raise InvalidInputError(f"low ({input['low']}) must not exceed high ({input['high']})")


SEEN: list[Any] = []


@validates(_low_below_high)
async def _ranged(ctx: JobContext, input: Any) -> Any:
    SEEN.append(input)
    if input["low"] > input["high"]:
        raise RuntimeError("ran with input its check refuses")
    if input.get("fail"):
        raise RuntimeError("told to fail")
    return input


async def test_two_restarts_at_once_never_store_input_the_kinds_check_refuses(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Before: ``restart`` checked the job's input merged with its modifications as read
    before the restart was applied, and the store merged them into the input as it was when
    applied. Two restarts at once, each valid on its own ({"low": 5} and {"high": 3} of
    {"low": 1, "high": 10}), stored {"low": 5, "high": 3}, which the kind's check refuses, and
    the handler ran with it. Now the merged input is checked as it is stored: the second
    restart is ``InvalidInputError`` and the job runs with input its check accepts."""
    SEEN.clear()
    release = trio.Event()

    async def blocker(ctx: JobContext, input: Any) -> Any:
        await release.wait()

    async with memory_runtime({"ranged": _ranged, "blocker": blocker}, max_running=1) as rt:
        job = await rt.create_job("ranged", "alice", {"low": 1, "high": 10, "fail": True})
        assert (await wait_for_state(rt, job.id)).state is JobState.FAILED
        # The one slot taken: both restarts find the job waiting, whichever is applied first.
        await wait_for_state(rt, (await rt.create_job("blocker", "bob", {})).id, {JobState.RUNNING})
        outcomes: dict[str, str] = {}

        async def restart(name: str, modifications: dict[str, Any]) -> None:
            try:
                await rt.restart(job.id, modifications)
                outcomes[name] = "restarted"
            except InvalidInputError:
                outcomes[name] = "refused"

        async with trio.open_nursery() as nursery:
            nursery.start_soon(restart, "low", {"low": 5, "fail": False})
            nursery.start_soon(restart, "high", {"high": 3, "fail": False})
        assert sorted(outcomes.values()) == ["refused", "restarted"], outcomes
        release.set()
        done = await wait_for_state(rt, job.id)
        assert done.state is JobState.COMPLETED, done.error
        assert done.input["low"] <= done.input["high"]
        assert all(seen["low"] <= seen["high"] for seen in SEEN), SEEN


async def test_the_python_client_refuses_nan_and_infinity_instead_of_sending_null(
    tmp_path: Path,
) -> None:
    """Before: ``Client.create(delay=nan)``, ``timeout=inf``, ``run_at=nan``, a NaN in the
    input or in ``restart``'s modifications were encoded by orjson as ``null``: the job was
    created at once, with the kind's timeout, its input holding null, and no error said so.
    Now each is ``ClientError`` ``invalid_input`` naming where, nothing is sent, and the
    connection serves the next request."""
    nan, inf = float("nan"), float("inf")
    async with (
        serving(tmp_path / "j.db") as running,
        open_client(running.url, token("alice")) as client,
    ):
        cases: list[tuple[dict[str, Any], str]] = [
            ({"delay": nan}, "$.delay"),
            ({"timeout": inf}, "$.timeout"),
            ({"run_at": -inf}, "$.run_at"),
            ({"priority": nan}, "$.priority"),
        ]
        for options, where in cases:
            with pytest.raises(ClientError, match=rf"\{where} is NaN or infinity") as err:
                await client.create("research", SMALL, **options)
            assert err.value.code == "invalid_input"
        with pytest.raises(ClientError, match=r"\$\.input\.delay is NaN or infinity"):
            await client.create("sized", {"value": 1, "delay": nan})
        with pytest.raises(ClientError, match=r"\$\.input\.values\[1\] is NaN or infinity"):
            await client.create("sized", {"value": 1, "values": [1.0, inf]})
        assert await client.list() == []
        job = await client.create("research", SMALL, delay=LATER)
        with pytest.raises(ClientError, match=r"\$\.modifications\.delay is NaN"):
            await client.restart(job["id"], {"delay": nan})
        assert (await client.get(job["id"]))["input"] == SMALL
        assert [j["id"] for j in await client.list()] == [job["id"]]


async def test_a_run_at_in_the_past_does_not_jump_ahead_of_older_jobs(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Before: a ``run_at`` in the past (0, an hour ago) was stored as given and ranked the
    job by it: a job created later with ``run_at=0`` started before every other user's older
    job of its priority. A past time is "at once" (PROTOCOL.md), as a ``delay`` of 0: the job
    is now stored with no ``run_at`` and waits its turn behind the older jobs."""
    order: list[str] = []
    release = trio.Event()

    async def blocker(ctx: JobContext, input: Any) -> Any:
        await release.wait()

    async def record(ctx: JobContext, input: Any) -> Any:
        order.append(input["who"])

    handlers = {"blocker": blocker, "record": record}
    async with memory_runtime(handlers, max_running=1) as rt:
        held = await rt.create_job("blocker", "bob", {})
        await wait_for_state(rt, held.id, {JobState.RUNNING})
        older = await rt.create_job("record", "alice", {"who": "alice"})
        await trio.sleep(1)
        jumpers = [
            await rt.create_job("record", "mallory", {"who": "mallory at 0"}, run_at=0),
            await rt.create_job(
                "record", "eve", {"who": "eve an hour ago"}, run_at=time.time() - 3600
            ),
        ]
        assert [job.run_at for job in jumpers] == [None, None]
        release.set()
        for job in (older, *jumpers):
            await wait_for_state(rt, job.id)
    assert order == ["alice", "mallory at 0", "eve an hour ago"]


async def test_cli_json_arguments_are_read_as_strictly_as_the_server_reads_them(
    tmp_path: Path,
) -> None:
    """Before: ``jobspine submit``'s INPUT and ``restart``'s MODIFICATIONS were read with
    orjson, which turns an integer beyond 64 bits into a float and keeps the last of a key
    given twice, and sent so: ``{"value": 123456789012345678901234567890}`` made a job whose
    input held ``1.2345678901234568e+29``, exit 0, where the server refuses the integer in a
    frame. Now each is a usage error (exit 2) naming the path, and nothing is sent."""
    huge = "123456789012345678901234567890"
    async with serving(tmp_path / "j.db") as running:
        alice = token("alice")
        for args, problem in (
            (("submit", "sized", f'{{"value": {huge}}}'), "$.value: integer"),
            (("submit", "sized", '{"value": 1, "value": 2}'), "$.value: key given twice"),
            (("submit", "sized", "[1e400]"), "$[0]: number overflows a double"),
        ):
            result = await cli(running.url, alice, *args)
            assert (result.returncode, result.stdout) == (ExitCode.USAGE, ""), result
            assert problem in result.stderr, result.stderr
        assert [j.id for j in await running.runtime.list_jobs(None)] == []
        job = await running.runtime.create_job("research", "alice", SMALL, delay=LATER)
        result = await cli(running.url, alice, "restart", job.id, '{"depth": 2, "depth": 3}')
        assert result.returncode == ExitCode.USAGE, result
        assert "$.depth: key given twice" in result.stderr
        assert (await running.runtime.get_job(job.id)).input == SMALL


async def test_list_and_event_reads_refuse_numbers_no_database_takes(tmp_path: Path) -> None:
    """Before, on SQLite: ``list_jobs(limit=10**30)`` and ``read_events(job, 10**30)`` failed
    with ``StoreError`` (``OverflowError``) and an ERROR with its traceback was logged;
    ``read_events(job, 0.5)`` the same (``datatype mismatch``); ``read_events(job, -5, -1)``
    and ``("0", "10")`` read every event. Now each is ``InvalidInputError`` naming the
    argument, and a limit up to 2**63 - 1 still reads everything."""
    async with open_runtime(tmp_path / "j.db", handlers=DEMO_HANDLERS) as rt:
        job = await rt.create_job("research", "alice", SMALL)
        await wait_for_state(rt, job.id)
        for limit in (10**30, 2**63, 0, 2.5):
            with pytest.raises(InvalidInputError, match="limit must be an integer >= 1"):
                await rt.list_jobs("alice", limit=limit)  # type: ignore[arg-type]
        for after_seq, limit, name in (
            (10**30, 10, "after_seq"),
            (0, 10**30, "limit"),
            (0.5, 10, "after_seq"),
            (-5, 10, "after_seq"),
            (0, -1, "limit"),
            ("0", 10, "after_seq"),
            (0, True, "limit"),
        ):
            with pytest.raises(InvalidInputError, match=f"{name} must be an integer >= "):
                await rt.read_events(job.id, after_seq, limit)  # type: ignore[arg-type]
        assert [j.id for j in await rt.list_jobs("alice", limit=2**63 - 1)] == [job.id]
        events = await rt.read_events(job.id, 0, 2**63 - 1)
        assert [e.seq for e in events] == list(range(1, len(events) + 1))
