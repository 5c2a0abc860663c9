"""Attacks on the latency/replay changes: early-answered progress (a window per job), the replay
byte budget, the broadcaster's hand-built event record, the hand-written JobEvent structure
hook and the client's checkpoint-free ``events()``.

Each was an attack with bad input or adversarial timing; three found defects (``events()``
lost the item it held when cancelled at its every-64th checkpoint, an event or a reset; the
JobEvent hook leaked ``OverflowError``), now fixed; the rest are regression tests."""

from __future__ import annotations

import collections
import dataclasses
import datetime
import enum
import sqlite3
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import cattrs
import orjson
import pytest
import trio
import trio.testing

from actors import (
    Broadcaster,
    BroadcasterConfig,
    Cursor,
    EventHub,
    EventType,
    JobContext,
    JobError,
    JobEvent,
    JobState,
    MemoryBackend,
    Outbox,
    StaleAttemptError,
    StoreUnavailableError,
    open_runtime,
)
from actors._broadcaster import JoinResult
from actors._codec import converter
from actors._events import _structure_event, _structure_event_checked
from actors._payloads import inline_payloads
from transport import Client, open_client
from transport.client import Reset, RoomCursor, _Room

from .backends import Commit, CommitHooks
from .serving import serving, token
from .test_store import GatedMemory, open_store, running_job

# -- 1. early-answered progress -------------------------------------------------------------------


@pytest.mark.parametrize("window", [1, 2, 3])
async def test_progress_from_many_tasks_of_one_job_is_answered_early_up_to_the_window(
    autojump_clock: trio.abc.Clock, window: int
) -> None:
    """Ten tasks of one job report progress at once while commits are stalled: exactly
    ``progress_window`` are answered before their commit; the others at their commit.
    Nothing is published before it is durable, and every event commits once, in order."""
    backend = GatedMemory()
    async with open_store(backend, progress_window=window) as (store, actor, hub):
        job_id = await running_job(store)
        backend.gated = True
        answered: list[int] = []
        async with hub.subscribe() as stream, trio.open_nursery() as nursery:

            async def report(n: int) -> None:
                await store.set_progress(job_id, 1, n, f"s{n}", durable=False)
                answered.append(n)

            for n in range(10):
                nursery.start_soon(report, n)
            await trio.sleep(5)
            assert len(answered) == window  # the rest wait for their commit
            assert list(actor._early) == [job_id] and len(actor._early[job_id]) == window
            with pytest.raises(trio.WouldBlock):
                stream.receive_nowait()
            backend.gate.set()
            await trio.sleep(5)
            assert sorted(answered) == list(range(10))
            published = [stream.receive_nowait() for _ in range(10)]
        assert [e.seq for e in published] == list(range(3, 13))
        assert {e.data["progress"] for e in published} == set(range(10))
        assert actor._early == {}
        assert await store.read_events(job_id, after_seq=2) == published


async def test_stale_attempt_progress_is_refused_and_does_not_hold_the_early_slot(
    autojump_clock: trio.abc.Clock,
) -> None:
    backend = GatedMemory()
    async with open_store(backend) as (store, actor, _):
        job_id = await running_job(store)
        backend.gated = True
        with trio.fail_after(1), pytest.raises(StaleAttemptError):
            await store.set_progress(job_id, 2, 10, None, durable=False)
        assert actor._early == {}
        with trio.fail_after(1):  # the job's first valid one is still answered early
            await store.set_progress(job_id, 1, 10, None, durable=False)
        backend.gate.set()
        await store.checkpoint(job_id, 1, {"k": 1})
        assert actor._early == {}


class FlakyOnce(GatedMemory):
    """Once ``fail_next`` is set, the next commit fails (after the gate) with a request-tied
    error, not an outage; then all succeed."""

    fail_next = False

    async def before_commit(self, commit: Commit) -> None:
        await super().before_commit(commit)
        if self.fail_next:
            self.fail_next = False
            raise ValueError("constraint failed (test)")


@pytest.mark.parametrize("window", [1, 2])
async def test_an_early_progress_in_a_voided_group_is_replayed_and_frees_its_slot(
    autojump_clock: trio.abc.Clock, window: int
) -> None:
    """A request-tied failure voids the group holding a job's early answer: the group is
    replayed one request at a time, everything commits once, and the job's next progress is
    answered early again (no stale entry left behind)."""
    backend = FlakyOnce()
    async with open_store(backend, progress_window=window) as (store, actor, hub):
        job_id = await running_job(store)
        other = await running_job(store, "bob")
        backend.gated = True
        backend.fail_next = True
        async with hub.subscribe() as stream, trio.open_nursery() as nursery:
            # One batch, one group: the early one and another job's fail together.
            nursery.start_soon(partial(store.set_progress, job_id, 1, 10, None, durable=False))
            nursery.start_soon(partial(store.set_progress, other, 1, 5, None, durable=False))
            await trio.sleep(0.1)
            assert job_id in actor._early
            nursery.start_soon(partial(store.set_progress, job_id, 1, 20, None, durable=False))
            await trio.sleep(1)
            backend.gate.set()
            await trio.sleep(5)
            published = []
            while True:
                try:
                    published.append(stream.receive_nowait())
                except trio.WouldBlock:
                    break
        mine = [e for e in published if e.job_id == job_id]
        assert [(e.seq, e.data["progress"]) for e in mine] == [(3, 10), (4, 20)]
        assert actor._early == {}
        backend.gate = trio.Event()
        with trio.fail_after(1):
            await store.set_progress(job_id, 1, 30, None, durable=False)
        backend.gate.set()
        await store.checkpoint(job_id, 1, {})
        assert (await store.get(job_id)).progress == 30


class Locked(CommitHooks, MemoryBackend):
    """Every commit fails as an outage while ``locked``."""

    def __init__(self) -> None:
        super().__init__()
        self.locked = False

    async def ping(self) -> None:
        if self.locked:
            raise sqlite3.OperationalError("database is locked")

    async def before_commit(self, commit: Commit) -> None:
        await trio.sleep(0.01)
        if self.locked:
            raise sqlite3.OperationalError("database is locked")


async def test_an_outage_while_an_early_answer_is_outstanding(
    autojump_clock: trio.abc.Clock,
) -> None:
    """The database goes away with a job's progress answered early: the job's next progress
    (and another job's first) wait for the database; when it comes back within the bound
    all commit in order; when it stays away past the bound they get StoreUnavailableError,
    and afterwards the job's progress is answered early again."""
    backend = Locked()
    async with open_store(backend, store_retry_timeout=5.0, progress_window=1) as (
        store,
        actor,
        hub,
    ):
        job_id = await running_job(store)
        other = await running_job(store, "bob")
        backend.locked = True
        async with hub.subscribe() as stream, trio.open_nursery() as nursery:
            with trio.fail_after(1):
                await store.set_progress(job_id, 1, 10, None, durable=False)
            done: list[str] = []

            async def progress(jid: str, pct: float) -> None:
                await store.set_progress(jid, 1, pct, None, durable=False)
                done.append(jid)

            await trio.sleep(0.1)
            assert not actor.health.ok
            nursery.start_soon(progress, job_id, 20)
            nursery.start_soon(progress, other, 5)
            await trio.sleep(1)
            assert done == []  # unhealthy: nothing is answered early
            backend.locked = False
            await trio.sleep(3)
            assert sorted(done) == sorted([job_id, other])
            published = []
            while True:
                try:
                    published.append(stream.receive_nowait())
                except trio.WouldBlock:
                    break
        assert [e.data["progress"] for e in published if e.job_id == job_id] == [10, 20]
        assert actor._early == {}
        # Past the bound: the early-answered one is lost (logged), the waiting one raises.
        backend.locked = True
        with trio.fail_after(1):
            await store.set_progress(job_id, 1, 30, None, durable=False)
        with pytest.raises(StoreUnavailableError):
            await store.set_progress(job_id, 1, 40, None, durable=False)
        assert actor._early == {}
        backend.locked = False
        await trio.sleep(10)
        with trio.fail_after(1):
            await store.set_progress(job_id, 1, 50, None, durable=False)
        await store.checkpoint(job_id, 1, {})
        assert (await store.get(job_id)).progress == 50


async def test_a_job_that_ends_while_its_progress_waits(autojump_clock: trio.abc.Clock) -> None:
    """A job's second progress waits behind its first (uncommitted) one; the job is cancelled
    meanwhile (applied before the waiting progress): that progress is refused at its commit,
    and the cancel is the job's last event."""
    backend = GatedMemory()
    async with open_store(backend, progress_window=1) as (store, actor, _):
        job_id = await running_job(store)
        backend.gated = True
        outcome: list[object] = []
        async with trio.open_nursery() as nursery:
            with trio.fail_after(1):
                await store.set_progress(job_id, 1, 10, None, durable=False)
            nursery.start_soon(store.cancel, job_id, None)
            await trio.sleep(0.5)

            async def late() -> None:
                try:
                    outcome.append(await store.set_progress(job_id, 1, 20, None, durable=False))
                except Exception as exc:
                    outcome.append(exc)

            nursery.start_soon(late)
            await trio.sleep(1)
            backend.gate.set()
        assert len(outcome) == 1 and isinstance(outcome[0], Exception), outcome
        events = await store.read_events(job_id)
        assert events[-1].type is EventType.CANCELLED
        assert actor._early == {}


# -- 2. the replay budget -------------------------------------------------------------------------


async def steps(ctx: JobContext, input: Any) -> Any:
    for n in range(40):
        await ctx.progress(n, f"step {n}")
    return None


async def _finished_job(rt: Any) -> str:
    async with rt.events() as stream:
        job = await rt.create_job("steps", "u", None)
        with trio.fail_after(10):
            async for e in stream:
                if e.job_id == job.id and e.type is EventType.COMPLETED:
                    break
    await rt.broadcaster.drained()
    return str(job.id)


@asynccontextmanager
async def _replayable(config: BroadcasterConfig) -> AsyncIterator[tuple[Any, Broadcaster, str]]:
    """A runtime on memory with ``config``, its broadcaster and one finished job's id."""
    async with open_runtime(
        backend=MemoryBackend(), handlers={"steps": steps}, broadcast=config
    ) as rt:
        assert rt.broadcaster is not None
        yield rt, rt.broadcaster, await _finished_job(rt)


@pytest.mark.parametrize("room_kind", ["job", "user"])
async def test_replay_budget_edges(room_kind: str) -> None:
    """Exactly at the budget a cursor is replayed; a byte less is cursor_too_far with
    nothing queued; a budget of 0 still serves a cursor at the head; the reply is the
    same in a job room and a user room."""
    async with _replayable(BroadcasterConfig(backlog_bytes=1, backlog=1)) as (rt, b, job_id):
        room = f"job:{job_id}" if room_kind == "job" else "user:u"
        if room_kind == "job":
            logged = await rt._store.read_events(job_id)
        else:
            logged = await rt._store.read_user_events("u", 0, 10_000)
        after = 5
        missed = logged[after:]
        need = sum(len(b.encode(e)) for e in missed)
        for budget, recovered in ((need, True), (need - 1, False)):
            b._backlogs.clear()
            b.config = attrs.evolve(b.config, replay_bytes=budget)
            outbox = Outbox(b.config)
            joined = await b.join(outbox, room, Cursor(rt.epoch, after))
            b.finish_join(outbox, room)
            assert joined.recovered is recovered, (budget, joined)
            items = outbox.take(max_bytes=1 << 22)
            if recovered:
                assert joined.replayed == len(missed)
                assert [orjson.loads(i)["event"]["seq"] for i in items] == [
                    e.seq if room_kind == "job" else e.user_seq for e in missed
                ]
            else:
                assert joined.reset_reason is not None
                assert joined.reset_reason.startswith(
                    f"cursor_too_far: the {len(missed)} events after sequence {after}"
                )
                assert items == []
            b.leave(outbox, room)
        b.config = attrs.evolve(b.config, replay_bytes=0)
        outbox = Outbox(b.config)
        joined = await b.join(outbox, room, Cursor(rt.epoch, joined.head))
        assert joined.recovered and joined.replayed == 0 and joined.reset_reason is None


async def test_replay_budget_over_the_wire_gives_a_snapshot(tmp_path: Path) -> None:
    """cursor_too_far reaches a subscriber over the protocol as a Reset with a snapshot."""
    config = BroadcasterConfig(replay_bytes=0, backlog=1, backlog_bytes=1)
    async with (
        serving(tmp_path / "far.db", broadcast=config) as running,
        open_client(running.url, token("alice")) as client,
    ):
        await client.subscribe("user:alice", None)
        job = await client.create("emitter", {"phases": []})
        room = f"job:{job['id']}"
        with trio.fail_after(10):
            async for item in client.events():
                if isinstance(item, JobEvent) and item.type is EventType.COMPLETED:
                    completed = item
                    break
        epoch = client.cursor("user:alice").epoch  # type: ignore[union-attr]
        await client.unsubscribe("user:alice")
        head = RoomCursor(epoch, completed.seq)
        running.server.broadcaster._backlogs.clear()
        await client.subscribe(room, RoomCursor(head.epoch, 0))
        with trio.fail_after(10):
            async for item in client.events():
                if isinstance(item, Reset):
                    reset = item
                    break
        assert reset.reason.startswith("cursor_too_far:"), reset
        assert reset.snapshot["job"]["id"] == job["id"]
        assert reset.cursor == head


# -- 3. the hand-built event record ---------------------------------------------------------------


class _S(str):
    pass


class _I(int):
    pass


class _E(enum.Enum):
    A = "a"


class _IE(enum.IntEnum):
    A = 3


@dataclasses.dataclass
class _DC:
    x: int
    y: Any = None


@attrs.define
class _AT:
    x: int


_NT = collections.namedtuple("_NT", "a b")

_DATA_VALUES: list[Any] = [
    True,
    2**63 - 1,
    2**64,
    1.5,
    float("nan"),
    -0.0,
    None,
    _S("x"),
    _I(3),
    _E.A,
    _IE.A,
    EventType.PROGRESS,
    (1, 2),
    {1, 2},
    collections.OrderedDict(a=1),
    {1: 2},
    {_S("k"): 1},
    {_E.A: 1},
    datetime.datetime(2024, 1, 1, 12, 0, 0, 123456),
    datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone(datetime.timedelta(hours=5))),
    datetime.date(2024, 1, 1),
    uuid.UUID(int=5),
    _DC(1),
    _DC(1, {2: 3}),
    _AT(1),
    _NT(1, 2),
    b"ab",
    JobError("T", "m"),
    "x" * 20_000,
    {"big": ["y" * 20_000]},
    {"$omitted": "input", "size": 3},
]


def _old_encode(b: Broadcaster, event: JobEvent) -> bytes | str:
    """What Broadcaster.encode wrote before the fast record (the converter's copy)."""
    try:
        message = {"type": "event", "event": converter.unstructure(event)}
        data = orjson.dumps(message)
        limit = b.config.inline_payload_limit
        if len(data) > limit or b'"$omitted"' in data:
            message["event"]["data"] = inline_payloads(message["event"]["data"], limit)
            data = orjson.dumps(message)
        return bytes(data)
    except Exception as exc:
        return type(exc).__name__


@pytest.mark.parametrize("value", _DATA_VALUES, ids=lambda v: type(v).__name__)
def test_fast_event_record_writes_the_converters_bytes(value: Any) -> None:
    b = Broadcaster(None, EventHub(), None)  # type: ignore[arg-type]
    e = JobEvent("j1", "u", 3, EventType.PROGRESS, JobState.RUNNING, 2.5, {"v": value}, None, 9)
    try:
        got: bytes | str = b.encode(e)
    except Exception as exc:
        got = type(exc).__name__
    assert got == _old_encode(b, e)
    assert e.data == {"v": value} or value != value  # not mutated (NaN aside)


# -- 4. the hand-written JobEvent structure hook --------------------------------------------------

_RECORD: dict[str, Any] = {
    "job_id": "j1",
    "user_id": "u",
    "seq": 3,
    "type": "progress",
    "state": "running",
    "at": 2.5,
    "data": {"a": 1},
    "actor": None,
    "user_seq": 7,
}
_MISSING = object()
_VALUES: list[Any] = [
    _MISSING,
    True,
    0,
    -1,
    2**64,
    1.0,
    2.5,
    float("inf"),
    None,
    "",
    "progress",
    "running",
    _S("progress"),
    _S("running"),
    _I(3),
    _IE.A,
    EventType.PROGRESS,
    JobState.RUNNING,
    [],
    {},
    {"k": 1},
    {1: 2},
    {_S("k"): 1},
    collections.OrderedDict(k=1),
    (1,),
]


def _outcome(hook: Any, record: Any) -> tuple[str, Any]:
    try:
        return "ok", hook(record, JobEvent)
    except Exception as exc:
        return "error", type(exc)


@pytest.mark.parametrize("field", [*_RECORD, "extra"])
def test_fast_job_event_hook_agrees_with_the_generated_one(field: str) -> None:
    for value in _VALUES:
        record = dict(_RECORD)
        if value is _MISSING:
            record.pop(field, None)
        else:
            record[field] = value
        fast, slow = _outcome(_structure_event, record), _outcome(_structure_event_checked, record)
        assert fast[0] == slow[0], (field, value, fast, slow)
        if fast[0] == "ok":
            assert fast[1] == slow[1] and type(fast[1].at) is type(slow[1].at)
            assert [type(k) for k in fast[1].data] == [type(k) for k in slow[1].data]
        else:
            assert fast[1] is slow[1], (field, value, fast, slow)
    others: list[Any] = [None, [1], "s", 5, collections.OrderedDict(_RECORD)]
    for record in others:
        assert (
            _outcome(_structure_event, record)[0] == _outcome(_structure_event_checked, record)[0]
        )


def test_fast_job_event_hook_refuses_an_overflowing_time_as_the_generated_one() -> None:
    """An ``at`` integer too large for a float: both hooks refuse it with a cattrs validation
    error (what callers catch and report with the field's path), not a bare OverflowError
    from ``float(at)``. Not reachable through orjson (which parses such numbers as floats or
    refuses them), only from Python-built records."""
    record = {**_RECORD, "at": 10**400}
    with pytest.raises(cattrs.ClassValidationError):
        _structure_event_checked(record, JobEvent)
    with pytest.raises(cattrs.ClassValidationError):
        converter.structure(record, JobEvent)


# -- 5. the client's events() without a checkpoint per event --------------------------------------


def _event(seq: int) -> JobEvent:
    return JobEvent("j1", "u", seq, EventType.PROGRESS, JobState.RUNNING, 0.0, {}, None, seq)


async def test_events_cancelled_at_its_64th_checkpoint_loses_no_event() -> None:
    """A consumer that takes events in short cancellable slices (``move_on_after`` around
    ``async for``, a sync body) and iterates ``events()`` again afterwards, cancelled at the
    checkpoint ``events()`` makes every 64 items: each event is handed out once, in order,
    with no gap (the checkpoint comes before an item is taken)."""
    client = Client("ws://127.0.0.1:1/", "t")
    room = client.rooms["job:j1"] = _Room(RoomCursor("e", 0), RoomCursor("e", 0), resyncing=False)
    for seq in range(1, 101):
        client._send_events.send_nowait((_event(seq), room, RoomCursor("e", seq), None, None))
    got: list[int] = []
    with trio.CancelScope() as scope:
        async for item in client.events():
            assert isinstance(item, JobEvent)
            got.append(item.seq)
            if item.seq == 63:
                scope.cancel()  # e.g. a deadline passing; delivered at the next checkpoint
    with trio.move_on_after(1):
        async for item in client.events():
            assert isinstance(item, JobEvent)
            got.append(item.seq)
            if item.seq == 100:
                break
    assert got == list(range(1, 101)), f"missing {sorted(set(range(1, 101)) - set(got))}"
    assert client.cursor("job:j1") == RoomCursor("e", 100)


async def test_a_reset_at_the_64th_checkpoint_survives_a_cancellation() -> None:
    """As above for a Reset: the one telling the application to re-read a room's state."""
    client = Client("ws://127.0.0.1:1/", "t")
    for seq in range(1, 64):
        client._send_events.send_nowait((_event(seq), None, None, None, None))
    reset = Reset("job:j1", "cursor_too_far: test", {"job": {}}, RoomCursor("e", 500))
    client._send_events.send_nowait((reset, None, None, None, None))
    seen: list[object] = []
    with trio.CancelScope() as scope:
        async for item in client.events():
            seen.append(item)
            if len(seen) == 63:
                scope.cancel()
    with trio.move_on_after(1):
        async for item in client.events():
            seen.append(item)
            break
    assert reset in seen


async def test_events_cancelled_while_waiting_keeps_the_next_event() -> None:
    """Cancelled while blocked (nothing buffered): the next event is not lost."""
    client = Client("ws://127.0.0.1:1/", "t")
    with trio.move_on_after(0.05):
        async for _ in client.events():
            pass
    client._send_events.send_nowait((_event(1), None, None, None, None))
    with trio.fail_after(1):
        async for item in client.events():
            assert isinstance(item, JobEvent) and item.seq == 1
            break


async def test_the_replay_budget_bounds_backlog_served_replays_too() -> None:
    """``replay_bytes`` bounds a replay from the backlog as it bounds one from the durable
    log: with a budget of 0, a cursor one event behind gets cursor_too_far either way."""
    async with open_runtime(
        backend=MemoryBackend(),
        handlers={"steps": steps},
        broadcast=BroadcasterConfig(replay_bytes=0),
    ) as rt:
        b = rt.broadcaster
        assert b is not None
        job_id = await _finished_job(rt)
        room = f"job:{job_id}"
        head = (await rt.get_job(job_id)).seq
        outbox = Outbox(b.config)
        for from_backlog in (True, False):
            if not from_backlog:
                b._backlogs.clear()
            assert bool(b._backlogs.get(room)) is from_backlog
            joined = await b.join(outbox, room, Cursor(rt.epoch, head - 1))
            assert not joined.recovered
            assert (joined.reset_reason or "").startswith("cursor_too_far:")
            b.leave(outbox, room)


async def test_replays_a_connection_has_not_read_share_one_budget() -> None:
    """Subscribing again and again with an old cursor, without reading, queues at most
    ``replay_bytes`` of replays on the connection: past it a join gets cursor_too_far (a
    snapshot, nothing lost), and once the client reads, replays are served again. Before,
    each subscribe queued another full replay: a slow reader grew the server's memory by
    150 MB per second."""
    async with _replayable(BroadcasterConfig(backlog=1, backlog_bytes=1)) as (rt, b, job_id):
        missed = await rt._store.read_events(job_id)
        one = sum(len(b.encode(e)) for e in missed)  # one full replay of the job room
        b.config = attrs.evolve(b.config, replay_bytes=3 * one)
        outbox = Outbox(b.config)
        room = f"job:{job_id}"
        outcomes = []
        for _ in range(5):
            joined = await b.join(outbox, room, Cursor(rt.epoch, 0))
            b.finish_join(outbox, room)
            outcomes.append(joined.recovered)
            assert outbox.replay_bytes <= b.config.replay_bytes
        assert outcomes == [True, True, True, False, False]
        assert "not read yet" in (joined.reset_reason or "")
        # Another room of the same connection shares the budget too.
        joined = await b.join(outbox, "user:u", Cursor(rt.epoch, 0))
        assert not joined.recovered and outbox.replay_bytes == 3 * one
        # Read: the replays leave the budget; the next join is served again.
        while outbox.take(max_bytes=1 << 22):
            pass
        assert outbox.replay_bytes == 0
        joined = await b.join(outbox, room, Cursor(rt.epoch, 0))
        assert joined.recovered and joined.replayed == len(missed)
        # A join left before it finished gives its reservation back.
        b.leave(outbox, room)
        assert outbox.replay_bytes == 0


async def test_joins_being_built_share_the_budget_and_so_do_connections() -> None:
    """Subscribes sent together on one connection (up to its in-flight limit) build their
    replays one after another, each within what the ones before left; all connections
    together stay within ``replay_total_bytes``. Before, each of 16 concurrent subscribes
    built its own 16 MiB: one connection took the server from 42 to 946 MB."""
    async with _replayable(BroadcasterConfig(backlog=1, backlog_bytes=1)) as (rt, b, first):
        jobs = [first] + [await _finished_job(rt) for _ in range(4)]
        sizes = [sum(len(b.encode(e)) for e in await rt._store.read_events(j)) for j in jobs]
        one = max(sizes)  # the same events in each job's room, but for a few digits
        assert 5 * min(sizes) > 4 * one
        b.config = attrs.evolve(b.config, replay_bytes=3 * one, replay_total_bytes=4 * one)
        outbox = Outbox(b.config)
        joined: list[JoinResult] = []

        async def join(job_id: str) -> None:
            joined.append(await b.join(outbox, f"job:{job_id}", Cursor(rt.epoch, 0)))
            assert outbox.replay_bytes <= b.config.replay_bytes

        async with trio.open_nursery() as nursery:  # five at once on one connection
            for job_id in jobs:
                nursery.start_soon(join, job_id)
        assert sorted(j.recovered for j in joined) == [False, False, True, True, True]
        assert outbox.replay_bytes <= 3 * one
        # Another connection: the server's 4 replays' worth leaves it room for one.
        other = Outbox(b.config)
        second = [await b.join(other, f"job:{j}", Cursor(rt.epoch, 0)) for j in jobs[:2]]
        assert [j.recovered for j in second] == [True, False]
        assert "the server holds many replays not read yet" in (second[1].reset_reason or "")


async def test_subscribes_to_one_room_at_once_each_get_the_replay_they_announce() -> None:
    """Six subscribes of one room sent together on one connection: each reply's ``replayed``
    events are queued after it (a later one replaced an earlier one while it was being
    built: the earlier one's replay was announced, never sent, and its bytes stayed reserved
    for good, so one user could take the server's whole replay budget without holding any
    memory). Once read, nothing stays reserved."""
    async with _replayable(BroadcasterConfig(backlog=1, backlog_bytes=1)) as (rt, b, job_id):
        missed = await rt._store.read_events(job_id)
        room = f"job:{job_id}"
        outbox = Outbox(b.config)
        announced = 0

        async def join() -> None:
            nonlocal announced
            joined = await b.join(outbox, room, Cursor(rt.epoch, 0))
            b.finish_join(outbox, room)  # as the server does, right after the reply
            announced += joined.replayed

        async with trio.open_nursery() as nursery:
            for _ in range(6):
                nursery.start_soon(join)
        assert announced == 6 * len(missed)
        sent = []
        while messages := outbox.take(max_bytes=1 << 22):
            sent += [orjson.loads(m) for m in messages]
        assert len([m for m in sent if m["type"] == "event"]) == announced
        assert outbox.replay_bytes == 0 and outbox.replay_reserved == 0
        # A join left (unsubscribed) while it was being built reserves nothing, sends nothing.
        b.leave(outbox, room)

        async def left_midway() -> None:
            await b.join(outbox, room, Cursor(rt.epoch, 0))
            b.finish_join(outbox, room)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(left_midway)
            while room not in outbox.subscriptions:
                await trio.lowlevel.checkpoint()
            b.leave(outbox, room)
        assert outbox.replay_bytes == 0 and outbox.take() == []


async def test_a_reset_reply_into_a_full_event_buffer_is_asked_again_once_there_is_room() -> None:
    """A subscribe reply that resets its room while the application's event buffer is full:
    the read loop neither ends with ``WouldBlock`` nor waits (replies behind it would wait
    too): the requester is answered, the reset is left out with the room still resyncing
    from its old cursor, and its resubscription, once the application made room, gets the
    reset again after the events before it."""
    from transport.client import _Pending

    client = Client("ws://127.0.0.1:1/", "t", event_buffer=2)
    room = "job:j1"
    client.rooms[room] = _Room(RoomCursor("old", 5), RoomCursor("old", 5), resyncing=True)
    for seq in (6, 7):
        client._send_events.send_nowait((_event(seq), None, None, None, None))
    pending = _Pending(on_reply=lambda result: client._joined(room, result))
    client._pending[1] = pending
    reply = {
        "type": "reply",
        "id": 1,
        "result": {"epoch": "new", "head": 9, "reset_reason": "epoch_changed: test"},
    }
    client._dispatch(reply)
    assert pending.done.is_set()
    state = client.rooms[room]
    assert state.resyncing and state.cursor == RoomCursor("old", 5)
    assert client.counters.buffer_full == 1 and client.counters.resets == 0
    seen: list[object] = []
    async for item in client.events():
        seen.append(item)
        if len(seen) == 1:
            # Half the buffer free: the resubscription (here by hand) is answered again.
            client._pending[2] = _Pending(on_reply=lambda result: client._joined(room, result))
            client._dispatch({**reply, "id": 2})
        if isinstance(item, Reset):
            break
    assert [getattr(item, "seq", None) for item in seen] == [6, 7, None]
    assert client.rooms[room].cursor == RoomCursor("new", 9) and not state.resyncing


async def test_a_users_replay_builds_take_turns_and_leave_others_theirs() -> None:
    """While a replay of user u's rooms is being built, u's next waits for it and v's is built
    at once: one user's many connections cannot fill the server's build slots (another
    user's subscribe waited 11 s behind 32 of them). Nothing is kept once they are done."""
    async with _replayable(BroadcasterConfig()) as (_, b, _job):
        release, entered = trio.Event(), []

        async def build(user: str, *, task_status: trio.TaskStatus[None]) -> None:
            task_status.started()
            async with b._building(user):
                entered.append(user)
                await release.wait()

        async with trio.open_nursery() as nursery:
            await nursery.start(build, "u")
            await nursery.start(build, "u")
            await trio.testing.wait_all_tasks_blocked()
            assert entered == ["u"]
            with trio.fail_after(1):
                async with b._building("v"):
                    pass
            release.set()
        assert entered == ["u", "u"] and b._user_builds == {}
