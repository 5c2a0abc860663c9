"""The kinds workers declare are bounded without one worker locking out the others: a full
table forgets, least recently used first, kinds nothing holds (no connected worker, no
handler here, no attempt this runtime runs or must still record). A worker that put a PID or
a counter in its kind names, reconnecting, filled the table for good: every honest worker
declaring a new kind was refused (4002, and ``jobspine worker`` exited) until a restart."""

from __future__ import annotations

from typing import Any

import pytest
import trio

import actors._supervisor
from actors import JobState, KindOptions, UnknownKindError
from actors._declared import DeclaredKinds
from actors._remote import RemotePlacement, RemoteWorker
from actors._supervisor import Supervisor

from .conftest import memory_runtime, wait_for_state
from .test_workers import event_types

DEFAULTS = KindOptions()


def test_a_full_table_forgets_the_least_recently_used_kinds_nothing_holds() -> None:
    table = DeclaredKinds(4)
    table.declare(dict.fromkeys("abcd", DEFAULTS), [])
    assert table.room_for(["a", "b"], lambda kind: False) == []  # known: no room needed
    table.use(["a", "zz"])  # "a" used last; an unknown kind is ignored
    # Two new kinds: the two least recently used that nothing holds ("b" is held).
    assert table.room_for(["x", "y"], lambda kind: kind == "b") == ["c", "d"]
    # A kind declared again is never forgotten to make room for itself.
    assert table.room_for(["c", "x"], lambda kind: kind == "b") == ["d"]
    # No room even with every kind not held forgotten: None, and nothing changes.
    assert table.room_for(["x", "y"], lambda kind: kind != "a") is None
    assert len(table) == 4
    table.declare(dict.fromkeys("xy", KindOptions(max_attempts=2)), ["c", "d"])
    assert [kind for kind in "abcdxy" if kind in table] == ["a", "b", "x", "y"]
    assert table.get("x") == KindOptions(max_attempts=2) and table.get("c") is None


class Link:
    """A connected worker's end, as the runtime sees it: what it was sent."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.more = trio.Event()

    def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)
        self.more.set()
        self.more = trio.Event()


def hello(
    supervisor: Supervisor,
    placement: RemotePlacement,
    kinds: list[str],
    options: dict[str, KindOptions] | None = None,
    capacity: int = 1,
) -> RemoteWorker:
    """What the worker endpoint does for an accepted hello (no await in between)."""
    declared = {kind: (options or {}).get(kind, DEFAULTS) for kind in kinds}
    assert supervisor.declaration_conflict(declared) is None
    worker = placement.connect("w", kinds, capacity, Link(), declared)
    placement.open(worker)
    return worker


async def assigned(worker: RemoteWorker, job_id: str) -> None:
    link = worker.link
    assert isinstance(link, Link)
    with trio.fail_after(60):
        while not any(m["type"] == "assign" and m["job_id"] == job_id for m in link.sent):
            await link.more.wait()


async def test_a_worker_churning_kind_names_locks_no_other_out(
    autojump_clock: trio.abc.Clock,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A worker declaring fresh kinds at each of many reconnections fills the table over and
    over: kinds of workers gone are forgotten to make room, least recently used first, but a
    kind whose attempt is still being recovered is not (its recovery reads the kind's
    options: re-queued at its checkpoint, as declared, not paused as by the defaults). A
    forgotten kind is as after a restart: its create is ``unknown_kind``, its waiting jobs
    stay in the queue and run once a worker declares it again."""
    monkeypatch.setattr(actors._supervisor, "MAX_DECLARED_KINDS", 4)
    caplog.set_level("INFO", logger="jobspine.supervisor")
    requeue = KindOptions(max_attempts=3, requeue_stalled=True)
    async with memory_runtime({}, stop_grace=0.1) as rt:
        supervisor = rt.supervisor
        placement = RemotePlacement(supervisor)
        supervisor.add_placement(placement)
        # An honest worker runs a job that checkpoints; another kind's job waits.
        honest = hello(supervisor, placement, ["resumable"], {"resumable": requeue})
        running = await rt.create_job("resumable", "alice", {})
        assert running.max_attempts == 3
        await assigned(honest, running.id)
        ctx = honest.attempts[running.id].ctx
        assert ctx is not None
        await ctx.checkpoint({"step": 1})
        placement.disconnect(hello(supervisor, placement, ["later"]), "gone")
        waiting = await rt.create_job("later", "bob", {})
        # The honest worker's connection drops; before its attempt is recovered, the buggy
        # worker reconnects again and again, each time with two new kinds.
        placement.disconnect(honest, "the worker's connection closed")
        for i in range(5):
            placement.disconnect(hello(supervisor, placement, [f"pid-{i}", f"n-{i}"]), "gone")
        recovered = await wait_for_state(rt, running.id, {JobState.CREATED, JobState.PAUSED})
        assert recovered.state is JobState.CREATED, recovered  # re-queued, as declared
        assert await event_types(rt, running.id) == ["created", "started", "checkpoint", "recovery"]
        await trio.sleep(1)  # its attempt's worker has exited: nothing holds the kind now
        assert not supervisor.workers
        for i in range(5, 10):
            placement.disconnect(hello(supervisor, placement, [f"pid-{i}", f"n-{i}"]), "gone")
        for kind in ("resumable", "later", "pid-0"):
            with pytest.raises(UnknownKindError):
                await rt.create_job(kind, "carol", {})
        # An honest worker declaring them again is accepted, and their jobs, still waiting,
        # run on it with the options it declares.
        back = hello(supervisor, placement, ["resumable", "later"], {"resumable": requeue}, 2)
        await assigned(back, running.id)
        await assigned(back, waiting.id)
        assert rt.kind_options("resumable") == requeue
        # With the table full of kinds connected workers serve, a new kind is refused.
        busy = hello(supervisor, placement, ["c1", "c2"])
        assert supervisor.declaration_conflict({"c3": DEFAULTS}) == (
            "kinds: 1 new kinds would make more than 4 known from workers' declarations, and"
            " the others are held by connected workers or running jobs"
        )
        placement.disconnect(busy, "gone")
        assert supervisor.declaration_conflict({"c3": DEFAULTS}) is None
    assert "forgot 2 kinds no connected worker serves" in caplog.text


async def test_a_kind_the_server_has_options_for_is_never_forgotten(
    autojump_clock: trio.abc.Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kind the operator configured (``RuntimeConfig.kinds``) and a worker declared stays
    known however many kinds other workers declare after it leaves."""
    monkeypatch.setattr(actors._supervisor, "MAX_DECLARED_KINDS", 2)
    configured = KindOptions(max_attempts=2)
    async with memory_runtime({}, kinds={"configured": configured}) as rt:
        supervisor = rt.supervisor
        placement = RemotePlacement(supervisor)
        supervisor.add_placement(placement)
        placement.disconnect(hello(supervisor, placement, ["configured"]), "gone")
        for i in range(3):
            placement.disconnect(hello(supervisor, placement, [f"pid-{i}"]), "gone")
        job = await rt.create_job("configured", "alice", {})
        assert job.max_attempts == 2
        with pytest.raises(UnknownKindError):
            await rt.create_job("pid-0", "alice", {})
