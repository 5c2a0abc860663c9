"""The realtime spine over real websockets on loopback."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed

from actors import BroadcasterConfig, EventType, JobEvent, JobState
from transport import Client, ClientError, Reset, RoomCursor, RunningServer, open_client

from .conftest import wait_for_state
from .serving import (
    GATES,
    eventually,
    free_port,
    raw,
    receive,
    request,
    serving,
    token,
)


@pytest.fixture(autouse=True)
def fresh_gates() -> None:
    GATES.clear()


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[RunningServer]:
    async with serving(tmp_path / "served.db") as running:
        yield running


def phases(*counts: int, prefix: str = "p") -> list[dict[str, Any]]:
    return [{"gate": f"{prefix}{n}", "count": count} for n, count in enumerate(counts)]


def gate(name: str) -> None:
    GATES.setdefault(name, trio.Event()).set()


async def collect(client: Client, n: int, *, seconds: float = 10) -> list[JobEvent | Reset]:
    items: list[JobEvent | Reset] = []
    with trio.fail_after(seconds):
        async for item in client.events():
            items.append(item)
            if len(items) == n:
                break
    return items


async def test_two_users_see_only_their_own(served: RunningServer) -> None:
    async with (
        open_client(served.url, token("alice")) as alice,
        open_client(served.url, token("bob")) as bob,
        open_client(served.url, token("root", admin=True)) as admin,
    ):
        await alice.subscribe("user:alice")
        await bob.subscribe("user:bob")
        a = await alice.create("trade", {"symbol": "A", "side": "buy", "quantity": 1, "delay": 0})
        b = await bob.create("trade", {"symbol": "B", "side": "buy", "quantity": 1, "delay": 0})
        a_events = await collect(alice, 3)
        b_events = await collect(bob, 3)
        assert {e.job_id for e in a_events if isinstance(e, JobEvent)} == {a["id"]}
        assert {e.job_id for e in b_events if isinstance(e, JobEvent)} == {b["id"]}
        assert [j["id"] for j in await alice.list()] == [a["id"]]
        assert [j["id"] for j in await bob.list()] == [b["id"]]
        for attempt in (
            bob.get(a["id"]),
            bob.pause(a["id"]),
            bob.cancel(a["id"]),
            bob.restart(a["id"]),
            bob.recovery_options(a["id"]),
            bob.subscribe(f"job:{a['id']}"),
            bob.subscribe("user:alice"),
            bob.request("list", user_id="alice"),
            bob.stats(),
        ):
            with pytest.raises(ClientError) as info:
                await attempt
            assert info.value.code == "forbidden"
        # An admin sees everyone's.
        assert {j["id"] for j in await admin.list()} == {a["id"], b["id"]}
        assert (await admin.get(a["id"]))["user_id"] == "alice"
        await admin.subscribe("user:alice")
        assert (await admin.stats())["total"] == 2
        assert (await alice.my_stats())["total"] == 1


async def test_missed_50_replayed_exactly_from_backlog(served: RunningServer) -> None:
    async with open_client(served.url, token("alice")) as client:
        job = await client.create("emitter", {"phases": phases(10, 50, 5, prefix="b")})
        room = f"job:{job['id']}"
        await client.subscribe(room, RoomCursor(client.welcome["epoch"], 0))
        gate("b0")
        await collect(client, 2 + 10)  # created, started, 10 progress
        cursor = client.cursor(room)
    assert cursor is not None
    async with served.runtime.events() as committed:
        gate("b1")  # 50 events (and a checkpoint) while nobody listens
        with trio.fail_after(10):
            async for event in committed:
                if event.job_id == job["id"] and event.seq == cursor.seq + 52:
                    break
    async with open_client(served.url, token("alice")) as client:
        reply = await client.subscribe(room, cursor)
        # The first phase's checkpoint (not taken before), 50 progress events, a checkpoint.
        assert reply["recovered"] is True and reply["replayed"] == 52
        missed = await collect(client, 52)
        assert [e.seq for e in missed if isinstance(e, JobEvent)] == list(
            range(cursor.seq + 1, cursor.seq + 53)
        )
        assert sum(e.type is EventType.PROGRESS for e in missed if isinstance(e, JobEvent)) == 50
        gate("b2")
        live = await collect(client, 5)
        assert [e.seq for e in live if isinstance(e, JobEvent)] == list(
            range(cursor.seq + 53, cursor.seq + 58)
        )
        assert client.counters.gaps == 0 and client.counters.duplicates == 0


async def test_missed_1000_replayed_from_durable_log(served: RunningServer) -> None:
    async with open_client(served.url, token("alice")) as client:
        job = await client.create("emitter", {"phases": phases(5, 1000, prefix="d")})
        await client.subscribe("user:alice", RoomCursor(client.welcome["epoch"], 0))
        gate("d0")
        await collect(client, 2 + 5)
        cursor = client.cursor("user:alice")
    assert cursor is not None
    gate("d1")
    await wait_for_state(served.runtime, job["id"])
    backlog = served.server.broadcaster.config.backlog
    async with open_client(served.url, token("alice")) as client:
        reply = await client.subscribe("user:alice", cursor)
        # Phase 0's checkpoint, 1000 progress events, a checkpoint, the completion.
        assert reply["recovered"] is True and reply["replayed"] == 1003 > backlog
        missed = await collect(client, 1003)
        seqs = [e.user_seq for e in missed if isinstance(e, JobEvent)]
        assert seqs == list(range(cursor.seq + 1, cursor.seq + 1004))
        assert missed[-1].type is EventType.COMPLETED  # type: ignore[union-attr]


async def test_cursor_survives_a_server_restart(tmp_path: Path) -> None:
    port = free_port()
    db = tmp_path / "restart.db"
    received: list[JobEvent | Reset] = []
    done = trio.Event()

    async def follow(url: str, task_status: trio.TaskStatus[Client]) -> None:
        async with open_client(url, token("alice"), max_backoff=0.2) as client:
            await client.subscribe("user:alice")
            task_status.started(client)
            async for item in client.events():
                received.append(item)
                if isinstance(item, JobEvent) and item.type is EventType.COMPLETED:
                    done.set()

    async with trio.open_nursery() as nursery:
        async with serving(db, port) as first:
            client: Client = await nursery.start(follow, first.url)
            job = await client.create("emitter", {"phases": phases(20, 20, prefix="r")})
            gate("r0")
            await eventually(lambda: len(received) >= 23)  # created, started, 20, checkpoint
        # The first server shut down gracefully (the job paused for shutdown); the client
        # keeps reconnecting until a new server on the same database takes the port.
        async with serving(db, port) as second:
            gate("r1")
            with trio.fail_after(20):
                await done.wait()
            final = await second.runtime.get_job(job["id"])
            assert final.state is JobState.COMPLETED and final.result == {"emitted": 40}
        nursery.cancel_scope.cancel()
    events = [e for e in received if isinstance(e, JobEvent)]
    assert len(events) == len(received)  # no Reset
    assert [e.user_seq for e in events] == list(range(1, len(events) + 1))
    types = [e.type for e in events]
    assert EventType.PAUSED in types and EventType.RESUMED in types
    assert types[-1] is EventType.COMPLETED
    assert client.counters.resets == 0 and client.counters.connects >= 2


async def test_new_database_means_reset_with_reason(tmp_path: Path) -> None:
    async with serving(tmp_path / "one.db") as one, open_client(one.url, token("alice")) as c:
        await c.create("trade", {"symbol": "X", "side": "buy", "quantity": 1, "delay": 0})
        await c.subscribe("user:alice", RoomCursor(c.welcome["epoch"], 0))
        await collect(c, 3)
        cursor = c.cursor("user:alice")
    async with serving(tmp_path / "two.db") as two, open_client(two.url, token("alice")) as c:
        reply = await c.subscribe("user:alice", cursor)
        assert reply["recovered"] is False
        assert reply["reset_reason"].startswith("epoch_changed")
        (reset,) = await collect(c, 1)
        assert isinstance(reset, Reset) and reset.snapshot == {"jobs": []}
        assert reset.cursor == RoomCursor(two.runtime.epoch, 0)


async def test_cursor_beyond_the_head_is_reset(served: RunningServer) -> None:
    async with open_client(served.url, token("alice")) as c:
        reply = await c.subscribe("user:alice", RoomCursor(c.welcome["epoch"], 99))
        assert reply["reset_reason"].startswith("cursor_ahead")
        (reset,) = await collect(c, 1)
        assert isinstance(reset, Reset) and reset.cursor.seq == 0


async def test_client_at_head_is_recovered_with_nothing(served: RunningServer) -> None:
    async with open_client(served.url, token("alice")) as c:
        job = await c.create("trade", {"symbol": "X", "side": "buy", "quantity": 1, "delay": 0})
        await wait_for_state(served.runtime, job["id"])
        epoch = c.welcome["epoch"]
        head = (await c.subscribe("user:alice"))["head"]
        reply = await c.subscribe("user:alice", RoomCursor(epoch, head))
        assert (reply["recovered"], reply["replayed"], reply["head"]) == (True, 0, head)


async def test_heartbeats_carry_room_heads(served: RunningServer) -> None:
    async with raw(served) as ws:
        reply = await request(ws, "subscribe", room="user:alice")
        beats: list[Any] = []
        with trio.fail_after(2):
            while not beats:
                message = await receive(ws, skip_heartbeats=False)
                beats = [m for m in message.get("messages", [message]) if m["type"] == "heartbeat"]
        message = beats[0]
        assert message["heads"] == {"user:alice": reply["result"]["head"]}
        assert message["epoch"] == served.runtime.epoch


async def test_slow_consumer_does_not_delay_others(tmp_path: Path) -> None:
    config = BroadcasterConfig(coalesce_after=20, overflow_after=200)
    async with (
        serving(tmp_path / "slow.db", broadcast=config, send_timeout=3.0) as running,
        raw(running, "slowpoke") as stalled,
        open_client(running.url, token("eve")) as eve,
        open_client(running.url, token("slowpoke")) as producer,
    ):
        await request(stalled, "subscribe", room="user:slowpoke")
        await eve.subscribe("user:eve")
        # The stalled connection stops reading while its user's jobs flood it with fat events
        # (4 KB labels fill the kernel's socket buffers quickly).
        flood = [
            await producer.create(
                "emitter", {"phases": phases(100_000, prefix=f"s{n}"), "pad": 4000}
            )
            for n in range(2)
        ]
        gate("s00")
        gate("s10")
        (conn,) = [
            c for c in running.server.connections if "user:slowpoke" in c.outbox.subscriptions
        ]
        # Its progress events are coalesced; once a send blocks for send_timeout it is
        # disconnected (4008).
        await eventually(lambda: conn not in running.server.connections, seconds=20)
        assert conn.outbox.coalesced > 0
        # While it is stalled, another client's events arrive promptly.
        latencies = []
        job = await eve.create("emitter", {"phases": phases(200, prefix="e")})
        gate("e0")
        with trio.fail_after(20):
            async for item in eve.events():
                assert isinstance(item, JobEvent)
                latencies.append(time.time() - item.at)
                if item.type is EventType.COMPLETED and item.job_id == job["id"]:
                    break
        for stalled_job in flood:
            await producer.cancel(stalled_job["id"])
        latencies.sort()
        p99 = latencies[int(0.99 * len(latencies))]
        assert p99 < 0.5, f"p99 {p99 * 1000:.0f} ms for a client next to a stalled one"
        # The stalled client was cut off: a send blocked for send_timeout. Its socket was
        # mid-frame, so what it finally reads ends in an abnormal closure, not a close frame.
        assert conn._close == (4008, "slow consumer: a send timed out")
        with trio.fail_after(30), pytest.raises(ConnectionClosed):
            while True:
                await receive(stalled)


async def test_lagging_reader_is_told_to_resubscribe(tmp_path: Path) -> None:
    config = BroadcasterConfig(coalesce_after=1_000_000, coalesce_bytes=10**9, overflow_after=50)
    async with (
        serving(tmp_path / "lag.db", broadcast=config, send_timeout=30.0) as running,
        raw(running, "slowpoke") as stalled,
        open_client(running.url, token("slowpoke")) as producer,
    ):
        joined = await request(stalled, "subscribe", room="user:slowpoke")
        job = await producer.create("emitter", {"phases": phases(100_000, prefix="l"), "pad": 4000})
        gate("l0")
        (conn,) = [
            c for c in running.server.connections if "user:slowpoke" in c.outbox.subscriptions
        ]
        await eventually(lambda: bool(conn.outbox._lag_times), seconds=30)
        await producer.cancel(job["id"])
        last = joined["result"]["head"]
        with trio.fail_after(30):
            while True:
                message = await receive(stalled)
                inner = message.get("messages", [message])
                for m in inner:
                    if m["type"] == "event":
                        assert m["event"]["user_seq"] == last + 1  # in order, no gap
                        last += 1
                if any(m["type"] == "lagged" for m in inner):
                    break
        # Resubscribing from the cursor replays exactly what was dropped.
        cursor = {"epoch": running.runtime.epoch, "seq": last}
        reply = await request(stalled, "subscribe", 5, room="user:slowpoke", cursor=cursor)
        result = reply["result"]
        assert result["recovered"] and result["replayed"] == result["head"] - last > 0


async def test_pause_resume_restart_cancel_over_the_wire(served: RunningServer) -> None:
    async with open_client(served.url, token("alice")) as c:
        job = await c.create("emitter", {"phases": phases(3, prefix="w"), "hold": True})
        gate("w0")
        await eventually(lambda: served.runtime.store_actor.commits > 0)
        async with served.runtime.events() as stream:
            if (await c.get(job["id"]))["checkpoint_version"] == 0:
                async for event in stream:
                    if event.job_id == job["id"] and event.type is EventType.CHECKPOINT:
                        break
        paused = await c.pause(job["id"])
        assert paused["state"] == "paused"
        options = await c.recovery_options(job["id"])
        assert options["resumable"] and options["has_checkpoint"]
        details = await c.checkpoint_details(job["id"])
        assert details["keys"] == ["done"]
        assert (await c.resume(job["id"]))["state"] == "created"  # back in the queue
        running = await wait_for_state(served.runtime, job["id"], {JobState.RUNNING})
        assert running.attempt == 2
        assert (await c.cancel(job["id"]))["state"] == "cancelled"
        restarted = await c.restart(job["id"], {"hold": False})
        assert restarted["input"]["hold"] is False
        with pytest.raises(ClientError) as info:
            await c.resume(job["id"])
        assert info.value.code == "illegal_transition"
        assert (await c.ping())["pong"] > 0
