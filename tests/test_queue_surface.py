"""The queue over the protocol and the Python client: create's options parsed strictly (a bad
one stores nothing), the new fields in job views and events, list filters, ``children``,
``queue_stats``, idempotent creates, and a create whose reply was lost resent with its key."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_websocket import open_websocket_url

from actors import JobContext, JobEvent, RetryPolicy, RuntimeConfig, kind_options
from transport import (
    ClientError,
    ConnectionLostError,
    RoomCursor,
    RunningServer,
    ServerConfig,
    open_client,
    open_server,
)
from transport._protocol import MAX_QUEUE_USERS

from .serving import HANDLERS, SECRET, raw, receive, request, send, serving, token

SMALL = {"query": "q", "depth": 1, "delay": 0}
LATER = 3600.0  # a delay that keeps a job waiting for the whole test


async def jobs_of(running: RunningServer, user: str) -> list[dict[str, Any]]:
    async with raw(running, user) as ws:
        reply = await request(ws, "list", limit=500)
    assert reply["type"] == "reply", reply
    jobs: list[dict[str, Any]] = reply["result"]
    return jobs


BAD_OPTIONS = [
    # (field, value, code): wrong JSON types are bad_request, values out of range invalid_input
    ("priority", "5", "bad_request"),
    ("priority", 5.0, "bad_request"),
    ("priority", True, "bad_request"),
    ("priority", -1, "invalid_input"),
    ("priority", 1001, "invalid_input"),
    ("delay", "10", "bad_request"),
    ("delay", -1, "invalid_input"),
    ("delay", 1e12, "invalid_input"),
    ("run_at", -5, "invalid_input"),
    ("run_at", time.time() + 400 * 86_400, "invalid_input"),
    ("max_attempts", 0, "invalid_input"),
    ("max_attempts", 101, "invalid_input"),
    ("max_attempts", 2.0, "bad_request"),
    ("timeout", 0, "invalid_input"),
    ("timeout", 8 * 86_400, "invalid_input"),
    ("timeout", "1", "bad_request"),
    ("tags", "urgent", "bad_request"),  # a string is not an array of one per letter
    ("tags", {"a": 1}, "bad_request"),
    ("tags", [1], "bad_request"),
    ("tags", [""], "invalid_input"),
    ("tags", ["x" * 65], "invalid_input"),
    ("tags", ["a", "a"], "invalid_input"),
    ("tags", [f"t{i}" for i in range(33)], "invalid_input"),
    ("parent_id", 7, "bad_request"),
    ("parent_id", "", "invalid_input"),
    ("idempotency_key", "", "invalid_input"),
    ("idempotency_key", "k" * 257, "invalid_input"),
    ("idempotency_key", 12, "bad_request"),
    ("unknown_option", 1, "bad_request"),
]


async def test_bad_create_options_are_refused_and_store_nothing(tmp_path: Path) -> None:
    async with serving(tmp_path / "db.sqlite") as running, raw(running) as ws:
        for n, (field, value, code) in enumerate(BAD_OPTIONS, start=1):
            reply = await request(ws, "create", n, kind="research", input=SMALL, **{field: value})
            assert (reply["type"], reply["code"]) == ("error", code), (field, value, reply)
            assert reply["id"] == n
            name = "tag" if field == "tags" else field.split("_")[0]
            assert name in reply["message"], reply  # the message names the field
        both = await request(ws, "create", 99, kind="research", input=SMALL, delay=1, run_at=1)
        assert both["code"] == "invalid_input" and "delay or run_at" in both["message"]
        # null is "not given", as for every optional field
        nulls = dict.fromkeys(["priority", "delay", "run_at", "max_attempts", "timeout"])
        ok = await request(ws, "create", 100, kind="research", input=SMALL, tags=None, **nulls)
        assert ok["type"] == "reply", ok
        assert ok["result"]["priority"] == 0 and ok["result"]["tags"] == []
        assert [job["id"] for job in await jobs_of(running, "alice")] == [ok["result"]["id"]]


async def test_client_refuses_what_json_cannot_carry_and_sends_nothing(tmp_path: Path) -> None:
    # A lone surrogate (an undecodable byte of a command-line argument) or a set: a typed
    # error from the client, not a TypeError, and the connection serves the next request.
    async with serving(tmp_path / "db.sqlite") as running:
        async with open_client(running.url, token("alice")) as client:
            bad: list[Callable[[], Awaitable[Any]]] = [
                lambda: client.create("research", SMALL, tags=["\udcff"]),
                lambda: client.create("research", SMALL, idempotency_key="k\udcff"),
                lambda: client.create("research", SMALL, parent_id="\udcff"),
                lambda: client.create("research", {"query": {1, 2}}),
                lambda: client.list(tag="\udcff"),
                lambda: client.get("\udcff"),
            ]
            for call in bad:
                with pytest.raises(ClientError) as refused:
                    await call()
                assert refused.value.code == "invalid_input", refused.value
            assert await client.ping() and client.counters.connects == 1
        assert await jobs_of(running, "alice") == []


async def test_queue_fields_in_views_events_filters_and_stats(tmp_path: Path) -> None:
    async with serving(tmp_path / "db.sqlite") as running, raw(running) as ws:
        parent = (
            await request(ws, "create", 1, kind="research", input=SMALL, delay=LATER, tags=["p"])
        )["result"]
        options = {
            "priority": 7,
            "delay": LATER,
            "max_attempts": 4,
            "timeout": 90,
            "tags": ["nightly", "eu"],
            "parent_id": parent["id"],
            "idempotency_key": "nightly-2026-11-29",
        }
        before = time.time()
        child = await request(ws, "create", 2, kind="research", input=SMALL, **options)
        job = child["result"]
        assert job["state"] == "created"
        assert (job["priority"], job["max_attempts"], job["timeout"]) == (7, 4, 90.0)
        assert job["tags"] == ["nightly", "eu"] and job["parent_id"] == parent["id"]
        assert job["idempotency_key"] == "nightly-2026-11-29"
        assert before + LATER - 1 <= job["run_at"] <= time.time() + LATER
        assert job["failed_attempts"] == 0 and job["owner"] is None
        assert job["lease_expires_at"] is None

        # the created event carries the options
        async with open_client(running.url, token("alice")) as client:
            epoch = client.welcome["epoch"]
            await client.subscribe(f"job:{job['id']}", RoomCursor(epoch, 0))
            with trio.fail_after(10):
                created = await anext(aiter(client.events()))
        assert isinstance(created, JobEvent) and created.type == "created"
        data = created.data
        assert {k: data[k] for k in ("priority", "max_attempts", "timeout", "tags")} == {
            "priority": 7,
            "max_attempts": 4,
            "timeout": 90.0,
            "tags": ["nightly", "eu"],
        }
        assert data["run_at"] == job["run_at"] and data["parent_id"] == parent["id"]

        async def ids(op: str, **fields: Any) -> list[str]:
            reply = await request(ws, op, 9, **fields)
            assert reply["type"] == "reply", reply
            return [j["id"] for j in reply["result"]]

        assert await ids("list", tag="eu") == [job["id"]]
        assert await ids("list", tag="p") == [parent["id"]]
        assert await ids("list", tag="none") == []
        assert await ids("list", parent_id=parent["id"]) == [job["id"]]
        assert await ids("list", states=["created", "running"]) == [job["id"], parent["id"]]
        assert await ids("list", states=["completed"]) == []
        assert await ids("list", state="created", tag="nightly") == [job["id"]]
        assert await ids("children", job_id=parent["id"]) == [job["id"]]
        assert await ids("children", job_id=job["id"]) == []

        queue = (await request(ws, "queue_stats", 10))["result"]
        assert queue == {
            "waiting": 2,
            "ready": 0,
            "scheduled": 2,
            "running": 0,
            "waiting_by_kind": {"research": 2},
            "waiting_by_user": {"alice": 2},
            "waiting_users": 1,
        }
        mine = (await request(ws, "my_stats", 11))["result"]
        assert mine["created"] == 2 and mine["waiting_by_kind"] == {"research": 2}

        # the same key and request: the first job, unchanged; another request: a conflict
        again = await request(ws, "create", 12, kind="research", input=SMALL, **options)
        assert again["result"]["id"] == job["id"]
        other = await request(
            ws, "create", 13, kind="research", input={**SMALL, "query": "other"}, **options
        )
        assert other["code"] == "idempotency_conflict", other
        assert len(await jobs_of(running, "alice")) == 2

        # a parent that is not the caller's reads as one that does not exist
        async with raw(running, "bob") as bob:
            theirs = await request(
                bob, "create", 1, kind="research", input=SMALL, parent_id=parent["id"]
            )
            missing = await request(
                bob, "create", 2, kind="research", input=SMALL, parent_id="01NOSUCHJOB"
            )
            assert theirs["code"] == missing["code"] == "invalid_parent"
            assert theirs["message"].replace(parent["id"], "ID") == missing["message"].replace(
                "01NOSUCHJOB", "ID"
            )
            assert (await request(bob, "children", 3, job_id=parent["id"]))["code"] == "forbidden"
            refused = await request(bob, "queue_stats", 4, user_id="alice")
            assert refused["code"] == "forbidden"
            assert (await request(bob, "queue_stats", 5))["result"]["waiting"] == 0
        assert await jobs_of(running, "bob") == []


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({"states": []}, "invalid_input"),
        ({"states": ["created", "created"]}, "invalid_input"),
        ({"states": ["waiting"]}, "invalid_input"),
        ({"states": "created"}, "bad_request"),
        ({"state": "created", "states": ["running"]}, "invalid_input"),
        ({"tag": ""}, "invalid_input"),
        ({"tag": 5}, "bad_request"),
        ({"parent_id": ""}, "invalid_input"),
    ],
)
async def test_bad_list_filters(tmp_path: Path, fields: dict[str, Any], code: str) -> None:
    async with serving(tmp_path / "db.sqlite") as running, raw(running) as ws:
        reply = await request(ws, "list", 1, **fields)
        assert (reply["type"], reply["code"]) == ("error", code), reply
        children = await request(ws, "children", 2, job_id="01NOSUCHJOB", limit=501)
        assert children["code"] == "invalid_input"


class DropFirstJobReply:
    """A TCP proxy in front of the server that cuts the connection at the first server frame
    holding a job (a create's reply) instead of forwarding it: the server has stored the
    create, the client never hears of it. Later connections pass through untouched. With
    ``hold``, the connection stays open instead, and nothing more reaches the client: a
    server that never answers."""

    def __init__(self, target_port: int, *, hold: bool = False) -> None:
        self.target_port = target_port
        self.hold = hold
        self.port = 0
        self.dropped = 0

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            task_status.started(self.port)
            await trio.serve_listeners(self._connection, listeners, handler_nursery=nursery)

    async def _connection(self, downstream: trio.SocketStream) -> None:
        upstream = await trio.open_tcp_stream("127.0.0.1", self.target_port)
        async with downstream, upstream, trio.open_nursery() as nursery:
            nursery.start_soon(self._pump, downstream, upstream)
            await self._frames(upstream, downstream)
            nursery.cancel_scope.cancel()

    async def _pump(self, source: trio.SocketStream, sink: trio.SocketStream) -> None:
        while chunk := await source.receive_some():
            await sink.send_all(chunk)

    async def _frames(self, source: trio.SocketStream, sink: trio.SocketStream) -> None:
        """Forward the HTTP upgrade answer, then one websocket frame at a time (server frames
        are not masked, and no extension compresses them)."""
        buffer = b""
        while b"\r\n\r\n" not in buffer:
            buffer += await source.receive_some()
        head, buffer = buffer.split(b"\r\n\r\n", 1)
        await sink.send_all(head + b"\r\n\r\n")
        while True:
            while (size := _frame_size(buffer)) is None or len(buffer) < size:
                chunk = await source.receive_some()
                if not chunk:
                    return
                buffer += chunk
            frame, buffer = buffer[:size], buffer[size:]
            if not self.dropped and b'"type":"reply"' in frame and b'"kind":"' in frame:
                self.dropped += 1
                if self.hold:
                    await trio.sleep_forever()
                return  # both sockets close: the client sees the connection drop
            await sink.send_all(frame)


def _frame_size(buffer: bytes) -> int | None:
    if len(buffer) < 2:
        return None
    length, offset = buffer[1] & 0x7F, 2
    if length == 126:
        if len(buffer) < 4:
            return None
        length, offset = int.from_bytes(buffer[2:4]), 4
    elif length == 127:
        if len(buffer) < 10:
            return None
        length, offset = int.from_bytes(buffer[2:10]), 10
    return offset + length


async def test_a_create_whose_reply_was_lost_is_resent_and_makes_one_job(
    tmp_path: Path,
) -> None:
    async with serving(tmp_path / "db.sqlite") as running, trio.open_nursery() as nursery:
        proxy = DropFirstJobReply(running.port)
        port = await nursery.start(proxy.run)
        async with open_client(f"ws://127.0.0.1:{port}", token("alice"), min_backoff=0.01) as c:
            job = await c.create("research", SMALL, delay=LATER, tags=["once"])
            assert proxy.dropped == 1  # the first reply never reached the client
            assert c.counters.connects == 2 and c.counters.create_retries == 1
            assert job["tags"] == ["once"] and job["idempotency_key"]
            # an explicit key is used as given, on the first send and on a resend alike
            again = await c.create("research", SMALL, delay=LATER, tags=["once"],
                                   idempotency_key=job["idempotency_key"])  # fmt: skip
            assert again["id"] == job["id"]
            # without a key of its own, each call is a new job
            other = await c.create("research", SMALL, delay=LATER, tags=["once"])
            assert other["id"] != job["id"]
        nursery.cancel_scope.cancel()
        stored = await jobs_of(running, "alice")
        assert sorted(j["id"] for j in stored) == sorted([job["id"], other["id"]])


async def test_a_create_is_not_resent_by_a_client_that_does_not_reconnect(
    tmp_path: Path,
) -> None:
    async with serving(tmp_path / "db.sqlite") as running, trio.open_nursery() as nursery:
        proxy = DropFirstJobReply(running.port)
        port = await nursery.start(proxy.run)
        url = f"ws://127.0.0.1:{port}"
        with pytest.raises(ConnectionLostError):
            async with open_client(url, token("alice"), reconnect=False) as client:
                await client.create("research", SMALL, delay=LATER, idempotency_key="k-1")
        # the job was stored: a later create with the key returns it (what submit tells you)
        async with open_client(url, token("alice")) as client:
            job = await client.create("research", SMALL, delay=LATER, idempotency_key="k-1")
        nursery.cancel_scope.cancel()
        assert [j["id"] for j in await jobs_of(running, "alice")] == [job["id"]]


@kind_options(max_attempts=2, retry=RetryPolicy(initial_interval=0.05, maximum_interval=1.0))
async def always_fails(ctx: JobContext, input: Any) -> Any:
    raise RuntimeError(f"attempt {ctx.attempt} fails")


async def test_queue_events_reach_clients(tmp_path: Path) -> None:
    """retrying, started with its owner, failed with failed_attempts; a waiting job paused and
    resumed back into the queue."""
    config = ServerConfig(secret=SECRET, port=0)
    runtime = RuntimeConfig(stop_grace=0.2, sqlite_synchronous="NORMAL", node_id="node-a")
    handlers = {**HANDLERS, "always_fails": always_fails}
    async with (
        open_server(tmp_path / "db.sqlite", config, handlers=handlers, runtime_config=runtime)
        as running,
        open_client(running.url, token("alice")) as client,
    ):  # fmt: skip
        await client.subscribe("user:alice")
        job = await client.create("always_fails", None)
        seen: list[JobEvent] = []
        with trio.fail_after(10):
            async for item in client.events():
                assert isinstance(item, JobEvent)
                seen.append(item)
                if item.type == "failed":
                    break
        assert [e.type.value for e in seen] == [
            "created", "started", "retrying", "started", "failed",
        ]  # fmt: skip
        created, first, retrying, second, failed = seen
        assert created.data["max_attempts"] == 2
        # The owner is the node's incarnation: "<node id>#<incarnation>".
        owner = first.data.pop("owner")
        assert owner.startswith("node-a#") and len(owner) > len("node-a#")
        assert first.data == {"attempt": 1, "resumed_from_checkpoint": None}
        assert retrying.state == "created" and retrying.actor == "system"
        data = retrying.data
        assert data["error"] == {"type": "RuntimeError", "message": "attempt 1 fails"}
        assert (data["failed_attempts"], data["max_attempts"]) == (1, 2)
        assert 0.04 <= data["delay"] <= 0.06
        assert data["next_attempt_at"] == pytest.approx(retrying.at + data["delay"])
        assert second.data["attempt"] == 2 and second.at >= data["next_attempt_at"] - 1e-3
        assert failed.data["failed_attempts"] == 2
        assert failed.data["error"]["message"] == "attempt 2 fails"
        stored = await client.get(job["id"])
        assert (stored["state"], stored["failed_attempts"], stored["attempt"]) == ("failed", 2, 2)

        waiting = await client.create("research", SMALL, delay=LATER)
        paused = await client.pause(waiting["id"])
        assert paused["state"] == "paused"
        resumed = await client.resume(waiting["id"])
        assert resumed["state"] == "created"
        with trio.fail_after(10):
            types = []
            async for item in client.events():
                assert isinstance(item, JobEvent)
                if item.job_id == waiting["id"]:
                    types.append((item.type.value, item.state.value))
                if item.type == "resumed":
                    break
        assert types == [("created", "created"), ("paused", "paused"), ("resumed", "created")]


async def test_queue_stats_of_many_users_fit_in_one_reply(tmp_path: Path) -> None:
    # Everyone's waiting_by_user grew with the number of users: past max_message_size (at
    # 2 MiB, some 8,000 users with long ids) the reply no longer fit in one message and an
    # admin could not read the queue at all. 32 KiB for a reply shows it with 3,000 users.
    async with serving(tmp_path / "db.sqlite", max_message_size=96 * 1024) as running:
        limiter = trio.CapacityLimiter(50)

        async def create(i: int) -> None:
            async with limiter:
                await running.runtime.create_job("research", f"user{i:05}", SMALL, delay=LATER)

        async with trio.open_nursery() as nursery:
            for i in range(3000):
                nursery.start_soon(create, i)
        await running.runtime.create_job("research", "user00007", SMALL, delay=LATER)
        async with open_websocket_url(running.url) as ws:
            await send(ws, {"op": "hello", "id": 0, "token": token("root", admin=True)})
            assert (await receive(ws))["type"] == "reply"
            reply = await request(ws, "queue_stats", 1)
        assert reply["type"] == "reply", reply
        stats = reply["result"]
        assert (stats["waiting"], stats["waiting_users"]) == (3001, 3000)
        by_user = stats["waiting_by_user"]
        assert len(by_user) == MAX_QUEUE_USERS and by_user["user00007"] == 2
        assert next(iter(by_user)) == "user00007"  # the most waiting first
