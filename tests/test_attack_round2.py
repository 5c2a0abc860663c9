"""Attacks on narrow progress writes, the event stream's byte budget and the heap trimmer.

Two found defects (a float subclass as progress, numpy's ``float64`` say, made every commit
holding it fail, and crashed the store on a backend that does not encode events; a stream that
had read everything was cut off by one commit whose events outweigh its budget), now fixed; the
rest are regression tests the other suites lack."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import attrs
import orjson
import pytest
import trio

from actors import (
    EventHub,
    EventType,
    InvalidInputError,
    JobContext,
    JobEvent,
    JobState,
    MemoryBackend,
    NotSerializableError,
    SqliteBackend,
    StoreError,
    open_runtime,
)
from actors._codec import MAX_STEP_LENGTH, converter
from actors._events import EVENT_OVERHEAD
from transport import open_client
from transport._cli import parser
from transport._config import resolve
from transport._exit import CLIError, ExitCode

from .backends import Commit, CommitHooks
from .serving import GATES, eventually, serving, token
from .test_store import open_store, running_job

# -- 1. narrow progress writes: every accepted value, beside every other kind of write -----------

_STEPS: list[str | None] = [
    None,
    "",
    "\x00",
    "nul \x00 inside",
    "\\u0000 as text",
    '"quoted" \\ back / slash',
    "\x7f\ufeff\u2028\u2029\U0010ffff 🚀 ü",
    "\x08\x0c\x1b",
    "y" * MAX_STEP_LENGTH,
]
_PERCENTS: list[float] = [
    0,
    100,
    42,
    -0.0,
    1e-320,
    5e-324,
    2.2250738585072014e-308,
    1 / 3,
    99.99999999999999,
    1e-7,
    12.5,
]


class Checked(CommitHooks, SqliteBackend):
    """After every commit: each job written is stored as the bytes a whole write stores, and
    loads back as written (heartbeat and lease live in their columns); ``fail_next`` fails
    the next commit with a request-tied error (its groups are replayed)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, synchronous="OFF")
        self.narrow = 0
        self.fail_next = False
        self.failed = 0

    async def before_commit(self, commit: Commit) -> None:
        if self.fail_next:
            self.fail_next = False
            self.failed += 1
            raise ValueError("constraint failed (test)")

    async def after_commit(self, commit: Commit) -> None:
        self.narrow += len(commit.progress_only)
        with sqlite3.connect(self.path) as db:
            for job in commit.jobs:
                (record,) = db.execute("SELECT record FROM jobs WHERE id = ?", (job.id,)).fetchone()
                assert record.encode() == orjson.dumps(converter.unstructure(job)), job
                loaded = await self.load(job.id)
                assert loaded is not None
                columns = {"last_heartbeat_at", "lease_expires_at"}
                assert attrs.evolve(loaded, **{k: getattr(job, k) for k in columns}) == job


async def test_narrow_writes_store_a_whole_writes_bytes_beside_every_other_write(
    tmp_path: Path,
) -> None:
    backend = Checked(tmp_path / "jobs.db")
    cases = [(p, s) for p in _PERCENTS for s in _STEPS]
    async with open_store(backend) as (store, _, _):
        ids = [await running_job(store, f"user{n}") for n in range(4)]

        async def report(n: int, job_id: str) -> None:
            for i, (pct, step) in enumerate(cases[n::2]):
                if i == 20 + n:
                    backend.fail_next = True  # voids a group and the ones behind it
                try:
                    await store.set_progress(job_id, 1, pct, step, durable=i % 5 != 0)
                    if i % 9 == n:
                        await store.checkpoint(job_id, 1, {"i": i, "step": step})
                except StoreError:
                    pass  # the failed commit held this write alone: refused, not replayed
                if i % 4 == 1:
                    store.heartbeat(job_id, 1)
            if n == 0:
                await store.complete(job_id, 1, {"last": step})
            elif n == 1:
                await store.pause(job_id, 1, "alice")
                await store.resume(job_id, "alice")
                await store.start(job_id)
                await store.set_progress(job_id, 2, 5.5, "again")
            elif n == 2:
                await store.cancel(job_id, "alice")
            else:
                await store.set_progress(job_id, 1, 1e-320, "\x00")

        async with trio.open_nursery() as nursery:
            for n, job_id in enumerate(ids):
                nursery.start_soon(report, n, job_id)
        jobs = [await store.get(job_id) for job_id in ids]
        for job in jobs:  # every event once, in order
            assert [e.seq for e in await store.read_events(job.id)] == list(range(1, job.seq + 1))
    assert backend.narrow > len(cases) // 2 and backend.failed >= 1
    assert [job.state for job in jobs] == [
        JobState.COMPLETED,
        JobState.RUNNING,
        JobState.CANCELLED,
        JobState.RUNNING,
    ]
    assert (jobs[1].progress, jobs[1].step, jobs[3].progress, jobs[3].step) == (
        5.5,
        "again",
        1e-320,
        "\x00",
    )
    # Read back by a new process, as restart recovery reads them.
    fresh = SqliteBackend(tmp_path / "jobs.db")
    async with fresh.opened():
        for job in jobs:
            loaded = await fresh.load(job.id)
            assert loaded is not None
            assert attrs.evolve(loaded, last_heartbeat_at=job.last_heartbeat_at) == job


@pytest.mark.parametrize(
    ("pct", "step", "error"),
    [
        (True, None, InvalidInputError),
        (float("nan"), None, InvalidInputError),
        (float("inf"), None, InvalidInputError),
        (100.00000000000001, None, InvalidInputError),
        (-1e-320, None, InvalidInputError),
        ("50", None, InvalidInputError),
        (50, "lone \ud800", NotSerializableError),
        (50, "z" * (MAX_STEP_LENGTH + 1), InvalidInputError),
        (50, b"bytes", InvalidInputError),
    ],
)
async def test_progress_the_store_cannot_keep_is_refused_at_the_call(
    tmp_path: Path, pct: Any, step: Any, error: type[Exception]
) -> None:
    async with open_store(SqliteBackend(tmp_path / "jobs.db")) as (store, actor, _):
        job_id = await running_job(store)
        with pytest.raises(error):
            await store.set_progress(job_id, 1, pct, step, durable=False)
        await store.set_progress(job_id, 1, 50, "ok")
        assert actor.metrics.failed_commits == 0


# -- 2. defect: a float subclass as progress (numpy's float64) ---------------------------------


class Float64(float):
    """What ``100 * i / n`` is when ``i`` is a numpy integer: a float orjson will not write."""


async def test_a_float_subclass_progress_is_stored_and_hurts_no_other_write(tmp_path: Path) -> None:
    async with open_store(SqliteBackend(tmp_path / "jobs.db")) as (store, actor, hub):
        mine, other = await running_job(store), await running_job(store, "bob")
        async with hub.subscribe() as stream:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(store.set_progress, mine, 1, Float64(37.5), "numpy")
                nursery.start_soon(store.set_progress, other, 1, 10, "plain")
            events = {e.job_id: e for e in [stream.receive_nowait(), stream.receive_nowait()]}
        assert actor.metrics.failed_commits == 0  # not voided, nor replayed one at a time
        assert (await store.get(mine)).progress == 37.5
        assert type(events[mine].data["progress"]) is float
        assert (await store.read_events(mine))[-1].data == {"progress": 37.5, "step": "numpy"}


async def test_a_float_subclass_progress_does_not_crash_a_memory_store() -> None:
    """The memory backend encodes nothing: the hub's byte count met the value first."""
    async with open_store(MemoryBackend()) as (store, _, hub):
        job_id = await running_job(store)
        async with hub.subscribe() as stream:
            await store.set_progress(job_id, 1, Float64(5.0), None)
            assert stream.receive_nowait().data["progress"] == 5.0


# -- 3. the event stream's byte budget -----------------------------------------------------------


def _big(seq: int, size: int) -> JobEvent:
    data = {"result": "r" * size}
    return JobEvent("job", "alice", seq, EventType.COMPLETED, JobState.COMPLETED, 1.0, data)


async def test_a_stream_that_has_read_everything_takes_a_commit_over_its_budget() -> None:
    """Defect: a caught-up subscriber was cut off by any one commit whose events outweigh its
    budget (the broadcaster, by 64 completions of 1 MiB results: every client resynced)."""
    hub = EventHub()
    async with hub.subscribe(max_bytes=2**20) as stream:
        for seq in range(1, 4):
            hub.publish([_big(seq, 2**20)])  # one commit, alone over the budget
            assert stream.receive_nowait().seq == seq
            assert not stream.lagged and stream.queued_bytes == 0
        hub.publish([_big(4, 2**19)])
        hub.publish([_big(5, 2**19)])  # behind by the budget: cut off
        assert stream.lagged and stream.pending() == 1


async def test_a_nan_budget_is_refused() -> None:
    with pytest.raises(ValueError, match="max_bytes"):
        async with EventHub().subscribe(max_bytes=float("nan")):  # type: ignore[arg-type]
            pass


async def test_the_runtimes_stream_gets_a_result_over_its_budget(tmp_path: Path) -> None:
    async def handler(ctx: JobContext, input: Any) -> str:
        return "r" * 100_000

    async with (
        open_runtime(tmp_path / "jobs.db", handlers={"k": handler}) as rt,
        rt.events(max_bytes=EVENT_OVERHEAD + 50_000) as stream,
    ):
        job = await rt.create_job("k", "alice", {})
        with trio.fail_after(10):
            async for event in stream:  # it keeps up: never cut off
                if event.job_id == job.id and event.type is EventType.COMPLETED:
                    assert len(event.data["result"]) == 100_000
                    break


async def test_a_broadcaster_cut_off_by_bytes_has_its_clients_resync_losing_nothing(
    tmp_path: Path,
) -> None:
    GATES.clear()
    async with (
        serving(tmp_path / "jobs.db") as running,
        open_client(running.url, token("alice"), max_backoff=0.5) as client,
    ):
        phases = [{"gate": "b0", "count": 5}, {"gate": "b1", "count": 5}]
        job = await client.create("emitter", {"phases": phases})
        room = f"job:{job['id']}"
        await client.subscribe(room)
        GATES.setdefault("b0", trio.Event()).set()
        await eventually(lambda: client.rooms[room].cursor.seq >= 8)  # type: ignore[union-attr]
        broadcaster = running.server.broadcaster
        stream = broadcaster._stream
        assert stream is not None
        stream.max_bytes, stream.queued_bytes = 1, 1  # as if behind by its whole budget
        GATES.setdefault("b1", trio.Event()).set()
        seqs = []
        with trio.fail_after(30):
            async for item in client.events():
                if isinstance(item, JobEvent) and item.job_id == job["id"]:
                    seqs.append(item.seq)
                    if item.type is EventType.COMPLETED:
                        break
        assert broadcaster._stream is not stream  # it was cut off, and subscribed again
        assert seqs == list(range(seqs[0], seqs[-1] + 1)) and seqs[0] <= 3


# -- 4. the heap trimmer's interval --------------------------------------------------------------


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "-0.5", "five", "1e999"])
def test_a_bad_heap_trim_interval_is_a_usage_error(value: str) -> None:
    with pytest.raises(CLIError) as env:
        resolve({}, {"JOBSPINE_HEAP_TRIM_INTERVAL": value}, {})
    assert env.value.code == ExitCode.USAGE and "heap_trim_interval" in str(env.value)
    with pytest.raises((SystemExit, CLIError)) as flag:  # argparse's float(), or the check
        args = parser().parse_args(["serve", "--heap-trim-interval", value])
        resolve({"heap_trim_interval": args.heap_trim_interval}, {}, {})
    assert getattr(flag.value, "code", None) == ExitCode.USAGE


@pytest.mark.parametrize("value", [float("nan"), -1, True, "5", [5]])
def test_a_bad_heap_trim_interval_in_the_config_file_is_a_usage_error(value: Any) -> None:
    if value == "5":  # TOML text is read like an environment variable's
        assert (
            resolve({}, {}, {"server": {"heap_trim_interval": value}})["heap_trim_interval"].value
            == 5.0
        )
        return
    with pytest.raises(CLIError) as file:
        resolve({}, {}, {"server": {"heap_trim_interval": value}})
    assert file.value.code == ExitCode.USAGE


@pytest.mark.parametrize(("value", "want"), [("0", 0.0), ("0.25", 0.25), ("", 5.0)])
def test_heap_trim_interval_values_as_documented(value: str, want: float) -> None:
    got = resolve({}, {"JOBSPINE_HEAP_TRIM_INTERVAL": value}, {})["heap_trim_interval"]
    assert got.value == want
