"""Leaving ``open_runtime`` while the database stays locked past ``shutdown_timeout``.

A claim sent before the shutdown began (a job's end freed its slot) waits behind the locked
database and is answered after the shutdown's bound ran out, once the supervisor is closed.
It used to launch its jobs into the supervisor's closed nursery (``RuntimeCrashedError``:
"Nursery is closed to new arrivals"), leaving them running with no worker, failed as
``Stalled`` at the next start. Now no attempt starts once the shutdown began: a job claimed
but never run goes back to the queue (:func:`actors._policy.shutdown_state`), and the exit is
clean, as late as the database makes it.

The lock is real in the SQLite tests (a second connection in a thread holds ``BEGIN
IMMEDIATE``); under ``autojump_clock`` a MemoryBackend refuses commits as that database does.
"""

from __future__ import annotations

import functools
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from actors import (
    EventType,
    Job,
    JobContext,
    JobState,
    MemoryBackend,
    Runtime,
    RuntimeConfig,
    open_runtime,
)
from actors._policy import shutdown_state

from .backends import Commit, CommitHooks
from .conftest import memory_runtime, wait_for_state
from .serving import eventually

BOUND = 0.5  # shutdown_timeout: the lock outlasts it


class Gate:
    """Handlers of kind ``w``: each records its run and returns once ``open`` is set."""

    def __init__(self) -> None:
        self.open = trio.Event()
        self.ran: list[Any] = []

    async def __call__(self, ctx: JobContext, input: Any) -> Any:
        self.ran.append(input["n"])
        await self.open.wait()
        return input["n"]


def hold_write_lock(path: Path, held: trio.Event, release: trio.Event) -> None:
    """In a thread: hold the database's write lock from a second connection until
    ``release`` is set (in the Trio thread)."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        trio.from_thread.run_sync(held.set)
        trio.from_thread.run(release.wait)
        conn.execute("ROLLBACK")
    finally:
        conn.close()


def sqlite_config(**overrides: Any) -> RuntimeConfig:
    return RuntimeConfig(
        **{
            "stop_grace": 0.2,
            "shutdown_timeout": BOUND,
            "store_retry_timeout": 30.0,
            "sqlite_synchronous": "NORMAL",
            **overrides,
        }
    )


async def claim_under_way(rt: Runtime) -> None:
    """Wait until the dispatcher holds a claim (sent, not answered)."""
    await eventually(lambda: bool(rt.supervisor._launch_holds))


async def read_back(path: Path) -> dict[int, tuple[Job, list[EventType]]]:
    """Each job (by its input's ``n``) and its event types, as the next start leaves them:
    read by a runtime that runs nothing (its start-up recovery applies the stall rule to any
    job left running, which would fail one that has no checkpoint)."""
    config = sqlite_config(resume_on_start=False)
    async with open_runtime(path, handlers={}, config=config) as rt:
        return {
            job.input["n"]: (job, [e.type for e in await rt.read_events(job.id)])
            for job in await rt.list_jobs()
        }


def lock_in_a_thread(
    nursery: trio.Nursery, path: Path, held: trio.Event, release: trio.Event
) -> None:
    # Abandoned if the test fails first: the thread's connection closes when the run ends.
    nursery.start_soon(
        functools.partial(
            trio.to_thread.run_sync,
            hold_write_lock,
            path,
            held,
            release,
            abandon_on_cancel=True,
        )
    )


async def release_after_the_bound(leaving: trio.Event, release: trio.Event) -> None:
    """Lift the lock (``release``) three shutdown bounds after the application leaves."""
    await leaving.wait()
    await trio.sleep(3 * BOUND)
    release.set()


async def test_a_claim_answered_after_the_bound_puts_its_job_back_in_the_queue(
    tmp_path: Path,
) -> None:
    """The user's case: a runs, b waits; another program locks the database; a ends (its
    end and b's claim wait on the lock); the application leaves; the lock goes once the
    shutdown's bound has run out. The exit is clean, a is completed, b never ran and waits
    in the queue (no attempt or recovery counted), and the next runtime runs it."""
    path = tmp_path / "app.db"
    gate = Gate()
    release, held, leaving = trio.Event(), trio.Event(), trio.Event()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(release_after_the_bound, leaving, release)
        async with open_runtime(
            path, handlers={"w": gate}, config=sqlite_config(max_running=1)
        ) as rt:
            a = await rt.create_job("w", "u", {"n": 1})
            b = await rt.create_job("w", "u", {"n": 2})
            await wait_for_state(rt, a.id, {JobState.RUNNING})
            lock_in_a_thread(nursery, path, held, release)
            await held.wait()
            gate.open.set()  # a ends: its outcome, and the claim of b, wait on the lock
            await claim_under_way(rt)
            left_at = time.monotonic()
            leaving.set()
        # Clean, and only once the database answered: the claim was waited for.
        assert time.monotonic() - left_at >= 3 * BOUND
    assert gate.ran == [1]  # b's handler never started
    stored = await read_back(path)
    assert stored[1][0].state is JobState.COMPLETED
    b_after, b_events = stored[2]
    assert b_after.state is JobState.CREATED, (b_after.state, b_after.error)
    assert (b_after.attempt, b_after.failed_attempts, b_after.recovery_attempts) == (1, 0, 0)
    assert b_events == [EventType.CREATED, EventType.STARTED, EventType.RECOVERY]
    async with open_runtime(path, handlers={"w": gate}, config=sqlite_config()) as rt:
        assert (await wait_for_state(rt, b.id)).state is JobState.COMPLETED
    assert gate.ran == [1, 2]


async def test_a_job_started_at_its_create_behind_the_lock_goes_back_to_the_queue(
    tmp_path: Path,
) -> None:
    """A create that starts its job in its own commit (the fast path: a slot is free) while
    the database is locked: the application leaves, the bound runs out, the lock goes. The
    commit puts the job running; the stopped runtime hands it back instead of launching it."""
    path = tmp_path / "app.db"
    gate = Gate()
    gate.open.set()
    release, held, leaving = trio.Event(), trio.Event(), trio.Event()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(release_after_the_bound, leaving, release)
        async with open_runtime(path, handlers={"w": gate}, config=sqlite_config()) as rt:
            first = await rt.create_job("w", "u", {"n": 1})
            await wait_for_state(rt, first.id)  # nothing waits: a create starts at once
            lock_in_a_thread(nursery, path, held, release)
            await held.wait()
            async with trio.open_nursery() as creating:
                creating.start_soon(functools.partial(rt.create_job, "w", "u", {"n": 2}))
                assert rt.dispatcher is not None
                dispatcher = rt.dispatcher
                await eventually(lambda: bool(dispatcher._admitted))  # started at its create
                creating.cancel_scope.cancel()  # the create's commit is queued all the same
            leaving.set()
    assert gate.ran == [1]
    job, events = (await read_back(path))[2]
    assert job.state is JobState.CREATED, (job.state, job.error)
    assert (job.attempt, job.failed_attempts, job.recovery_attempts) == (1, 0, 0)
    assert events == [EventType.CREATED, EventType.STARTED, EventType.RECOVERY]


class LockedBackend(CommitHooks, MemoryBackend):
    """Refuses every commit while ``locked``, as SQLite does when another program holds the
    write lock longer than ``busy_timeout``."""

    def __init__(self) -> None:
        super().__init__()
        self.locked = False

    async def ping(self) -> None:
        if self.locked:
            raise sqlite3.OperationalError("database is locked")

    async def before_commit(self, commit: Commit) -> None:
        await trio.sleep(0.01)  # the busy wait inside SQLite, shortened
        await self.ping()


@pytest.mark.parametrize(
    ("lock", "bound"),
    [(10.0, 60.0), (10.0, BOUND), (100.0, BOUND)],
    ids=["within_bound", "past_bound", "past_retry"],
)
async def test_a_claim_behind_a_locked_database_at_shutdown(
    autojump_clock: trio.abc.Clock, lock: float, bound: float
) -> None:
    """b, due 5 s after its create, is claimed while the database is locked; the runtime is
    left. The lock goes 10 s later, within ``store_retry_timeout`` (30 s): the claim commits,
    during the shutdown (bound 60 s) or after its bound ran out (0.5 s: under a mock clock
    it runs out as soon as every task waits, as at the teardown of a test with
    ``autojump_clock``), and b is handed back; or 100 s later: the claim is refused and b
    never left the queue. Either way the exit is clean, b never ran, and the next runtime
    runs it."""
    backend = LockedBackend()
    gate = Gate()
    gate.open.set()
    leaving = trio.Event()
    config: dict[str, Any] = {"stop_grace": 0.2, "shutdown_timeout": bound}

    async def unlock_later() -> None:
        await leaving.wait()
        await trio.sleep(lock)
        backend.locked = False

    async with trio.open_nursery() as nursery:
        nursery.start_soon(unlock_later)
        async with memory_runtime({"w": gate}, backend, **config) as rt:
            a = await rt.create_job("w", "u", {"n": 1})
            b = await rt.create_job("w", "u", {"n": 2}, delay=5)
            await wait_for_state(rt, a.id)
            backend.locked = True
            await trio.sleep(6)  # b is claimed at 5 s: its start waits on the lock
            assert rt.supervisor._launch_holds  # the claim is under way
            left_at = trio.current_time()
            leaving.set()
        # The exit waited for the store's answer to the claim: at the lock's end, or once
        # store_retry_timeout (30 s) had passed since its first refused commit (at about 5 s,
        # 1 s before the runtime was left).
        assert trio.current_time() - left_at >= min(lock, 28.0)
    stored = await backend.load(b.id)
    assert stored is not None and stored.state is JobState.CREATED
    assert (stored.failed_attempts, stored.recovery_attempts) == (0, 0)
    assert stored.attempt == (1 if lock < 30 else 0)  # the claim committed, or never did
    assert gate.ran == [1]
    async with memory_runtime({"w": gate}, backend, **config) as rt:
        done = await wait_for_state(rt, b.id)
        assert done.state is JobState.COMPLETED, (done.state, done.error)
        assert EventType.FAILED not in [e.type for e in await rt.read_events(b.id)]
        assert (await rt.get_job(a.id)).state is JobState.COMPLETED
    assert gate.ran == [1, 2]


async def test_nothing_is_claimed_once_the_shutdown_began(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Once the supervisor's shutdown began it starts no attempt, so the dispatcher claims
    nothing more (each job claimed would only be handed back): a job that comes due waits,
    untouched."""
    gate = Gate()
    async with memory_runtime({"w": gate}, stop_grace=0.2) as rt:
        job = await rt.create_job("w", "u", {"n": 1}, delay=60)
        await rt.supervisor.shutdown()
        await trio.sleep(120)
        stored = await rt.get_job(job.id)
        assert (stored.state, stored.attempt) == (JobState.CREATED, 0)
        assert rt.supervisor.workers == {} and gate.ran == []
        assert rt.supervisor.stopping == "shutdown"


async def test_a_shutdown_re_queues_an_attempt_whose_handler_never_started(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Attempt 2 of a job waits for attempt 1 to unwind (it ignores its cancellation) when
    the runtime stops: its handler never started, so the job goes back to the queue instead
    of being paused, and nothing is counted against it."""
    started: list[int] = []

    async def h(ctx: JobContext, input: Any) -> Any:
        started.append(ctx.attempt)
        if ctx.attempt == 1:
            try:
                await trio.sleep_forever()
            finally:
                with trio.CancelScope(shield=True):
                    await trio.sleep(30)  # unwinds slowly
        await trio.sleep_forever()

    backend = MemoryBackend()
    async with memory_runtime({"k": h}, backend, stop_grace=5.0, shutdown_timeout=60.0) as rt:
        job = await rt.create_job("k", "u", {})
        await trio.sleep(0.1)
        await rt.cancel(job.id)
        await rt.restart(job.id)  # a new attempt, claimed at once, waits for attempt 1
        await trio.sleep(0.5)
        assert rt.supervisor.workers[job.id].unwound is not None and started == [1]
    assert started == [1]
    stored = await backend.load(job.id)
    assert stored is not None
    assert (stored.state, stored.pause_reason) == (JobState.CREATED, None)
    assert (stored.failed_attempts, stored.recovery_attempts) == (0, 0)


@pytest.mark.parametrize(
    ("handler_started", "shared", "state"),
    [
        (False, False, JobState.CREATED),
        (False, True, JobState.CREATED),
        (True, True, JobState.CREATED),
        (True, False, JobState.PAUSED),
    ],
)
def test_what_a_shutdown_records(handler_started: bool, shared: bool, state: JobState) -> None:
    """A job whose handler never ran goes back to the queue on any database; one that ran
    is paused for this process's next start, or handed back to a shared database's nodes."""
    assert shutdown_state(handler_started=handler_started, shared=shared) is state
