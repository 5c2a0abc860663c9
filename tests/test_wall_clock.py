"""The runtime's wall clock (Unix seconds: ``created_at``, ``run_at``, a retry's time, claim
leases) is the system's, ``time.time()``: a step of it (NTP setting a clock that was wrong at
boot, a VM resumed) moves every time the runtime stores or compares together, as the times a
client gives (``run_at``) and the ones other nodes write are read on that clock; stall
deadlines and timeouts count on Trio's monotonic clock and ignore it. Under the mock clock on
the in-memory store, the wall clock being ``time.time()`` moved by a step the test sets."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from actors import JobContext, JobState, RuntimeConfig, SqliteBackend, open_runtime
from transport import ServerConfig, open_server

from .conftest import memory_runtime, wait_for_state
from .serving import SECRET
from .test_cli import http_exchange
from .test_nodes import running_job

S = JobState


class SteppedWall:
    """``time.time()`` plus ``step`` seconds: the system's wall clock, set by the test."""

    def __init__(self, real: Callable[[], float]) -> None:
        self.real = real
        self.step = 0.0

    def __call__(self) -> float:
        return self.real() + self.step


@pytest.fixture
def wall(monkeypatch: pytest.MonkeyPatch) -> Iterator[SteppedWall]:
    stepped = SteppedWall(time.time)
    monkeypatch.setattr(time, "time", stepped)
    yield stepped


def starts() -> tuple[list[float], Any]:
    """A handler recording the Trio time of each start."""
    started: list[float] = []

    async def handler(ctx: JobContext, input: Any) -> Any:
        started.append(trio.current_time())
        return None

    return started, handler


@pytest.mark.parametrize("step", [86_400.0, -5 * 3600.0], ids=["forward-a-day", "back-5h"])
async def test_run_at_and_delay_after_the_wall_clock_was_set(
    autojump_clock: trio.abc.Clock, wall: SteppedWall, step: float
) -> None:
    """A step after the runtime started: a ``run_at`` a client computes from the clock as it
    reads now, and a ``delay``, start 600 s later. Before, the runtime kept the clock as it
    read at its start (plus Trio's monotonic time): a day forward, a job for 10 minutes from
    now started a day and 10 minutes later; 5 hours back, it started at once (its run_at read
    as past), and a delayed job was stored 5 hours ahead of the clock."""
    started, handler = starts()
    async with memory_runtime({"at": handler}) as rt:
        wall.step = step
        begin = trio.current_time()
        at = time.time() + 600
        job = await rt.create_job("at", "alice", {}, run_at=at)
        delayed = await rt.create_job("at", "alice", {}, delay=600)
        assert job.run_at == pytest.approx(at, abs=0.01)
        assert delayed.run_at == pytest.approx(time.time() + 600, abs=0.01)
        assert delayed.created_at == pytest.approx(time.time(), abs=0.01)
        assert (await rt.queue_stats()).scheduled == 2
        for waiting in (job, delayed):
            await wait_for_state(rt, waiting.id, timeout=700)
        assert [t - begin for t in started] == pytest.approx([600, 600], abs=0.01)


async def test_a_step_forward_while_a_job_waits_makes_it_due(
    autojump_clock: trio.abc.Clock, wall: SteppedWall
) -> None:
    """The clock set an hour forward while a job waits for a time an hour ahead: the job is
    due, and starts within a second (it waited the full hour before)."""
    started, handler = starts()
    async with memory_runtime({"at": handler}) as rt:
        at = time.time() + 3600
        job = await rt.create_job("at", "alice", {}, run_at=at)
        await trio.sleep(10)
        wall.step = 3600
        stepped = trio.current_time()
        done = await wait_for_state(rt, job.id, timeout=60)
        assert done.state is S.COMPLETED
        assert started[0] - stepped <= 1.01
        assert done.started_at is not None and done.started_at >= at


async def test_a_step_back_while_a_job_waits_does_not_start_it_early(
    autojump_clock: trio.abc.Clock, wall: SteppedWall
) -> None:
    """The clock set an hour back while a job waits for a time 10 minutes ahead: the job
    does not start before the clock reads its run_at (it started 10 minutes after the create,
    while the clock read 50 minutes before its time)."""
    started, handler = starts()
    async with memory_runtime({"at": handler}) as rt:
        begin = trio.current_time()
        at = time.time() + 600
        job = await rt.create_job("at", "alice", {}, run_at=at)
        await trio.sleep(10)
        wall.step = -3600
        done = await wait_for_state(rt, job.id, timeout=4300)
        assert done.started_at is not None and done.started_at >= at
        assert started[0] - begin == pytest.approx(600 + 3600, abs=1.01)


async def test_stored_times_follow_the_mock_clock(autojump_clock: trio.abc.Clock) -> None:
    """Under a mock clock every stored time moves with it: a job created after a day of
    virtual time, delayed 60 s, is stored created 60 s before its run_at and started 60 s
    after its creation (its created_at, updated_at and heartbeats were the system's time,
    which a mock clock does not move, while run_at followed the mock clock: 86,460 s
    apart)."""
    _, handler = starts()
    async with memory_runtime({"at": handler}) as rt:
        await trio.sleep(86_400)
        job = await rt.create_job("at", "alice", {}, delay=60)
        assert job.run_at is not None
        assert job.run_at - job.created_at == pytest.approx(60, abs=0.01)
        done = await wait_for_state(rt, job.id, timeout=120)
        assert done.started_at is not None and done.completed_at is not None
        assert done.started_at - done.created_at == pytest.approx(60, abs=0.01)
        assert (await rt.queue_stats()).scheduled == 0


async def test_a_delay_is_stored_exactly_and_never_runs_early_by_the_mock_clock(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A delay's run_at was read from the clock once and created_at once more: under a mock
    clock, whose readings at one instant each come a float's least step after the one
    before, a job delayed 3600 s was stored 3599.99999976 s apart, and now and then started
    that much before its delay by the test's clock (a test asserting it waited its delay
    failed one run in a hundred). Both come from one reading now."""
    started, handler = starts()
    async with memory_runtime({"at": handler}) as rt:
        for delay in (60, 3600, 60, 3600):
            begin = trio.current_time()
            job = await rt.create_job("at", "alice", {}, delay=delay)
            assert job.run_at is not None and job.run_at - job.created_at == delay
            await wait_for_state(rt, job.id, timeout=delay + 60)
            assert started[-1] - begin >= delay


async def test_stalls_and_timeouts_ignore_wall_clock_steps(
    autojump_clock: trio.abc.Clock, wall: SteppedWall
) -> None:
    """A job beating every 5 s, with a 30 s heartbeat timeout and a 600 s timeout, runs 300 s
    while the clock is set a day forward and then two days back: it neither stalls nor times
    out, and its running time counts the 300 s it ran (held before too)."""

    async def beating(ctx: JobContext, input: Any) -> Any:
        for i in range(60):
            await trio.sleep(5)
            await ctx.progress(i * 100 / 60, f"beat {i}")
            wall.step = 86_400.0 if i == 10 else -86_400.0 if i == 30 else wall.step
        return "done"

    async with memory_runtime({"beating": beating}, heartbeat_timeout=30.0) as rt:
        job = await rt.create_job("beating", "alice", {}, timeout=600)
        done = await wait_for_state(rt, job.id, timeout=400)
        assert (done.state, done.attempt, done.result) == (S.COMPLETED, 1, "done")
        assert done.recovery_attempts == 0 and done.run_seconds >= 0


@pytest.mark.parametrize("step", [86_400.0, -86_400.0], ids=["forward-a-day", "back-a-day"])
async def test_sqlite_on_the_real_clock_after_it_was_set(
    tmp_path: Any, wall: SteppedWall, step: float
) -> None:
    """The same on SQLite (its database thread), on Trio's real clock: after the clock was
    set a day either way, a job for a second from now and one delayed a second both start
    about a second later (before: a day late, or at once)."""
    started, handler = starts()
    config = RuntimeConfig(sqlite_synchronous="NORMAL")
    async with open_runtime(tmp_path / "w.db", handlers={"at": handler}, config=config) as rt:
        wall.step = step
        begin = trio.current_time()
        job = await rt.create_job("at", "alice", {}, run_at=time.time() + 1)
        delayed = await rt.create_job("at", "alice", {}, delay=1)
        assert job.run_at is not None and delayed.run_at is not None
        assert delayed.run_at == pytest.approx(time.time() + 1, abs=0.5)
        for waiting in (job, delayed):
            await wait_for_state(rt, waiting.id, timeout=10)
        assert all(0.9 <= t - begin <= 5 for t in started), [t - begin for t in started]


async def test_uptime_is_not_moved_by_the_wall_clock(tmp_path: Any, wall: SteppedWall) -> None:
    """``/healthz``'s ``uptime`` and ``jobspine_uptime_seconds`` are durations: the clock set
    an hour back after the start, they stay the seconds the server has run (before: minus an
    hour, the system's clock now minus the start's), and a day forward they do not jump a
    day; ``jobspine_start_time_seconds`` stays when the server started."""

    async def uptimes(port: int) -> tuple[float, float, float]:
        _, health = await http_exchange(port, "/healthz")
        _, body = await http_exchange(port, "/metrics")
        found = {
            sample.name: sample.value
            for family in text_string_to_metric_families(body.decode())
            for sample in family.samples
        }
        uptime = orjson.loads(health)["uptime"]
        return uptime, found["jobspine_uptime_seconds"], found["jobspine_start_time_seconds"]

    config = ServerConfig(secret=SECRET, port=0)
    runtime_config = RuntimeConfig(sqlite_synchronous="NORMAL")
    async with open_server(
        tmp_path / "db.sqlite", config, runtime_config=runtime_config, health_port=0
    ) as running:
        assert running.health_port is not None
        started = running.started_at
        for step in (-3600.0, 86_400.0):
            wall.step = step
            health, metric, start = await uptimes(running.health_port)
            assert 0 <= health < 60 and 0 <= metric < 60, (step, health, metric)
            assert start == started


async def test_a_sqlite_file_recovers_a_crashed_process_jobs_after_the_clock_was_set_back(
    tmp_path: Any, wall: SteppedWall
) -> None:
    """A process crashed with a job running (its node registered, as on every SQLite file,
    with a lease ending at once, never renewed nor left), then the clock was set an hour back
    before the next start. That start found the dead incarnation's lease ahead of the clock,
    took it for a live node and left its job running, with nothing running it, for good (a
    SQLite file has no takeover scan). One process owns the file (its lock): every
    incarnation but its own is dead, whatever the clock says; the job is recovered at start."""
    path = tmp_path / "crashed.db"
    backend = SqliteBackend(path)
    async with backend.opened():
        dead = await backend.register_node("gone", "g1", 0.0, "host", 1)
        await backend.commit(running_job("j1", dead.owner, with_checkpoint=True), [], (), {})
        # no leave_node: the process died
    wall.step = -3600.0
    config = RuntimeConfig(sqlite_synchronous="NORMAL")
    async with open_runtime(path, handlers={"k": starts()[1]}, config=config) as rt:
        job = await rt.get_job("j1")
        assert (job.state, job.pause_reason, job.recovery_attempts) == (S.PAUSED, "recovery", 1)
        node = next(n for n in await rt.node.store.list_nodes() if n.owner == dead.owner)
        assert node.state == "dead"
