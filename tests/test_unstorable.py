"""One value the database cannot store fails only the call that brought it (issue 8, fault 3).

Healthy jobs checkpoint in a loop next to a culprit that hands the store an unstorable value;
before the fix the value joined a commit group and failed the healthy jobs' writes with it.
"""

from __future__ import annotations

import datetime
import math
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from actors import (
    InvalidInputError,
    Job,
    JobContext,
    JobState,
    NotSerializableError,
    Runtime,
    RuntimeConfig,
    SqliteBackend,
    open_runtime,
)
from actors._codec import (
    MAX_DEPTH,
    MAX_MESSAGE_LENGTH,
    check_text,
    dumps_json_value,
    sanitize_text,
)

from .backends import Commit, CommitHooks
from .conftest import wait_for_state

HEALTHY = 30
ROUNDS = 20


class Label(str):
    """A str subclass: stored as plain text, it would come back as ``str``."""


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


# -- the validation itself (sans-I/O) ----------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (
            {"file": "caf\udce9.txt"},
            r"lone surrogate '\\udce9' at index 3 \(at checkpoint\['file'\]\)",
        ),
        ({"caf\udce9": 1}, r"lone surrogate '\\udce9' at index 3 of key"),
        ({"n": 2**63}, "integer 9223372036854775808 outside the signed 64-bit range"),
        ([-(2**63) - 1], "outside the signed 64-bit range"),
        ({"n": 2**70}, "outside the signed 64-bit range"),
        ({"r": [1.0, math.inf]}, r"NaN or infinity \(inf\) \(at checkpoint\['r'\]\[1\]\)"),
        ({1: "x"}, "object key 1 is not a string"),
        # orjson would store these as text or as their base type: they would read back changed.
        (
            {"at": datetime.datetime(2026, 1, 1)},
            r"datetime is not a JSON type \(at checkpoint\['at'\]\)",
        ),
        ([datetime.date(2026, 1, 1)], "date is not a JSON type"),
        (Label("x"), "not JSON serializable: Label"),
        ({"s": {1, 2}}, "set is not a JSON type"),
        (nested(MAX_DEPTH + 1), f"nested deeper than {MAX_DEPTH} levels"),
    ],
)
def test_unstorable_values_are_refused_naming_where(value: Any, problem: str) -> None:
    with pytest.raises(NotSerializableError, match=problem):
        dumps_json_value(value, "checkpoint")


@pytest.mark.parametrize(
    "value",
    [
        {"ok": "café ☕", "digits": "12345678901234567890123", "none": None},
        [2**63 - 1, -(2**63), 1.5, True],
        nested(MAX_DEPTH),
    ],
)
def test_storable_values_are_encoded_exactly(value: Any) -> None:
    import orjson

    assert orjson.loads(dumps_json_value(value, "checkpoint")) == value


def test_text_fields_refuse_lone_surrogates_and_messages_are_sanitized() -> None:
    with pytest.raises(NotSerializableError, match=r"step is not storable text: .* at index 11"):
        check_text("reading caf\udce9.txt", "step")
    with pytest.raises(InvalidInputError, match="step must be a string"):
        check_text(5, "step")
    check_text(None, "step", optional=True)
    assert sanitize_text("no such file: caf\udce9.txt") == "no such file: caf\\udce9.txt"
    assert sanitize_text("café") == "café"


# -- in a running runtime, on SQLite -----------------------------------------------------------


async def healthy(ctx: JobContext, input: Any) -> Any:
    for i in range(ROUNDS):
        await ctx.checkpoint({"i": i, "pad": "x" * 100})
        await ctx.progress(100 * i / ROUNDS, f"round {i}")
        await trio.sleep(0.005)
    return {"rounds": ROUNDS}


CULPRITS: dict[str, Callable[[JobContext], Any]] = {
    # The reported case: what os.fsdecode gives for a Latin-1 file name, as a step label.
    "step": lambda ctx: ctx.progress(5, "reading caf\udce9.txt"),
    "checkpoint_int": lambda ctx: ctx.checkpoint({"offset": 2**63}),
    "checkpoint_key": lambda ctx: ctx.checkpoint({"caf\udce9.txt": 1}),
    # Unbounded text is unstorable too: a label travels in every event and list entry.
    "step_too_long": lambda ctx: ctx.progress(50, "s" * 3_000_000),
}
RESULTS: dict[str, Any] = {
    "result_nan": {"ratio": math.nan},
    "result_too_large": {"blob": "x" * 5000},
}
EXPECTED = {
    "step": ("NotSerializableError", "step is not storable text: lone surrogate"),
    "checkpoint_int": ("NotSerializableError", "outside the signed 64-bit range"),
    "checkpoint_key": ("NotSerializableError", "of key"),
    "step_too_long": ("InvalidInputError", "step is 3000000 characters, over the limit of 16384"),
    "result_nan": ("NotSerializableError", "job result is not JSON-serializable: NaN"),
    "result_too_large": ("ResultTooLargeError", "exceeds the limit of 4096 bytes (result_limit)"),
}


async def run_with_culprit(rt: Runtime, culprit: str) -> tuple[Job, list[Job]]:
    jobs = [await rt.create_job("healthy", f"user{n}", {}) for n in range(HEALTHY)]
    bad = await rt.create_job("culprit", "mallory", {"which": culprit})
    done = [await wait_for_state(rt, job.id) for job in jobs]
    return await wait_for_state(rt, bad.id), done


@pytest.mark.parametrize("culprit", sorted(EXPECTED))
async def test_one_unstorable_value_fails_only_its_job(tmp_path: Path, culprit: str) -> None:
    async def bad(ctx: JobContext, input: Any) -> Any:
        for i in range(ROUNDS // 2):
            await ctx.checkpoint({"i": i})
            await trio.sleep(0.005)
        if input["which"] in RESULTS:
            return RESULTS[input["which"]]
        await CULPRITS[input["which"]](ctx)
        return "unreachable"

    config = RuntimeConfig(sqlite_synchronous="NORMAL", result_limit=4096, heartbeat_timeout=60)
    async with open_runtime(
        tmp_path / "j.db", handlers={"healthy": healthy, "culprit": bad}, config=config
    ) as rt:
        failed, done = await run_with_culprit(rt, culprit)
        assert [job.state for job in done] == [JobState.COMPLETED] * HEALTHY
        assert all(job.result == {"rounds": ROUNDS} for job in done)
        # The culprit failed at once with its own error (not stalled, not "write failed").
        assert failed.state is JobState.FAILED
        assert failed.error is not None
        kind, message = EXPECTED[culprit]
        assert failed.error.type == kind
        assert message in failed.error.message
        assert failed.checkpoint == {"i": ROUNDS // 2 - 1}  # its earlier writes were kept
        assert rt.status().stalls_detected == 0


async def test_unstorable_create_and_audit_values_are_refused_at_the_call(
    tmp_path: Path,
) -> None:
    async with open_runtime(
        tmp_path / "j.db", handlers={"healthy": healthy}, config=RuntimeConfig()
    ) as rt:
        with pytest.raises(NotSerializableError, match="user_id is not storable text"):
            await rt.create_job("healthy", "caf\udce9", {})
        with pytest.raises(NotSerializableError, match="job input"):
            await rt.create_job("healthy", "alice", {"path": "caf\udce9"})
        job = await rt.create_job("healthy", "alice", {})
        await wait_for_state(rt, job.id)
        with pytest.raises(NotSerializableError, match="actor is not storable text"):
            await rt.restart(job.id, by="caf\udce9")
        with pytest.raises(NotSerializableError, match="modifications"):
            await rt.restart(job.id, modifications={"n": 2**64})
        with pytest.raises(InvalidInputError, match="actor is 5000 characters"):
            await rt.restart(job.id, by="a" * 5000)
        with pytest.raises(InvalidInputError, match=r"job input is .* over the limit of 1048576"):
            await rt.create_job("healthy", "alice", {"blob": "b" * 2**21})
        with pytest.raises(InvalidInputError, match="user_id is 2000 characters"):
            await rt.create_job("healthy", "u" * 2000, {})
        assert (await rt.get_job(job.id)).state is JobState.COMPLETED
        assert await rt.list_jobs("alice") == [await rt.get_job(job.id)]
        stopped = await rt.create_job("healthy", "bob", {})
        await rt.cancel(stopped.id)
        with pytest.raises(InvalidInputError, match=r"modified input is .* over the limit"):
            await rt.restart(stopped.id, modifications={"blob": "b" * 2**20})
        assert (await rt.get_job(stopped.id)).state is JobState.CANCELLED


async def test_an_error_message_that_cannot_be_stored_is_kept_escaped(tmp_path: Path) -> None:
    async def opener(ctx: JobContext, input: Any) -> Any:
        name = "caf\udce9.txt"  # what os.fsdecode gives for a Latin-1 file name
        raise FileNotFoundError(f"no such file: {name}")

    async with open_runtime(tmp_path / "j.db", handlers={"opener": opener}) as rt:
        job = await rt.create_job("opener", "alice", {})
        failed = await wait_for_state(rt, job.id)
        assert failed.state is JobState.FAILED and failed.error is not None
        assert failed.error.type == "FileNotFoundError"
        assert failed.error.message == "no such file: caf\\udce9.txt"
        assert rt.status().stalls_detected == 0


async def test_a_huge_error_message_is_kept_truncated(tmp_path: Path) -> None:
    async def verbose(ctx: JobContext, input: Any) -> Any:
        raise ValueError("x" * 30_000_000)

    async with open_runtime(tmp_path / "j.db", handlers={"verbose": verbose}) as rt:
        job = await rt.create_job("verbose", "alice", {})
        failed = await wait_for_state(rt, job.id)
        assert failed.state is JobState.FAILED and failed.error is not None
        assert failed.error.type == "ValueError"
        message = failed.error.message
        assert message.startswith("x" * 1000) and message.endswith("characters, truncated)")
        assert len(message) < MAX_MESSAGE_LENGTH + 100


class UnprintableError(Exception):
    """An exception is the handler's own object: its ``__str__`` may itself raise."""

    def __str__(self) -> str:
        raise RuntimeError("__str__ failed")


class UnreprintableError(UnprintableError):
    def __repr__(self) -> str:
        raise RuntimeError("__repr__ failed")


@pytest.mark.parametrize(
    ("error", "message"),
    [
        (UnprintableError, "UnprintableError()"),
        (UnreprintableError, "UnreprintableError (its message could not be rendered)"),
    ],
)
async def test_an_exception_that_cannot_be_rendered_fails_only_its_job(
    tmp_path: Path, error: type[Exception], message: str
) -> None:
    async def raiser(ctx: JobContext, input: Any) -> Any:
        await ctx.checkpoint({"i": 0})
        raise error

    config = RuntimeConfig(sqlite_synchronous="NORMAL", heartbeat_timeout=60)
    async with open_runtime(
        tmp_path / "j.db", handlers={"healthy": healthy, "raiser": raiser}, config=config
    ) as rt:
        jobs = [await rt.create_job("healthy", f"user{n}", {}) for n in range(5)]
        bad = await rt.create_job("raiser", "mallory", {})
        failed = await wait_for_state(rt, bad.id)
        assert failed.state is JobState.FAILED and failed.error is not None
        assert (failed.error.type, failed.error.message) == (error.__name__, message)
        for job in jobs:
            assert (await wait_for_state(rt, job.id)).state is JobState.COMPLETED


class PoisonedBackend(CommitHooks, SqliteBackend):
    """Fault injection around the real SQLite backend: a commit that holds a checkpoint event
    of one job fails as a constraint violation would (tied to that request, not an outage)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, synchronous="NORMAL")
        self.poisoned: set[str] = set()

    async def before_commit(self, commit: Commit) -> None:
        if any(e.job_id in self.poisoned and e.type == "checkpoint" for e in commit.events):
            raise sqlite3.IntegrityError("CHECK constraint failed: poisoned")


async def test_a_group_commit_failing_for_one_request_fails_only_that_request(
    tmp_path: Path,
) -> None:
    backend = PoisonedBackend(tmp_path / "j.db")

    async def poisoned(ctx: JobContext, input: Any) -> Any:
        backend.poisoned.add(ctx.job_id)
        for i in range(ROUNDS):
            await ctx.checkpoint({"i": i})
        return "unreachable"

    async with open_runtime(
        backend=backend, handlers={"healthy": healthy, "poisoned": poisoned}
    ) as rt:
        jobs = [await rt.create_job("healthy", f"user{n}", {}) for n in range(HEALTHY)]
        bad = await rt.create_job("poisoned", "mallory", {})
        done = [await wait_for_state(rt, job.id) for job in jobs]
        failed = await wait_for_state(rt, bad.id)
        assert [job.state for job in done] == [JobState.COMPLETED] * HEALTHY
        assert failed.state is JobState.FAILED and failed.error is not None
        assert failed.error.type == "StoreError"
        assert "CHECK constraint failed: poisoned" in failed.error.message
    # No gaps in the durable log: per-job seq and per-user user_seq each run 1..n.
    with sqlite3.connect(backend.path) as conn:
        rows = conn.execute("SELECT job_id, seq, user_id, user_seq FROM events").fetchall()
    by_job: dict[str, list[int]] = {}
    by_user: dict[str, list[int]] = {}
    for job_id, seq, user_id, user_seq in rows:
        by_job.setdefault(job_id, []).append(seq)
        by_user.setdefault(user_id, []).append(user_seq)
    for seqs in [*by_job.values(), *by_user.values()]:
        assert sorted(seqs) == list(range(1, len(seqs) + 1))
    assert len(by_job) == HEALTHY + 1
