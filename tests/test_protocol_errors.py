"""Bad input over a live socket: the documented error or close code, and nothing else breaks."""

from __future__ import annotations

import base64
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from transport import CLOSE, RunningServer, mint_token, open_client

from .serving import SECRET, raw, receive, request, send, serving, token


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[RunningServer]:
    async with serving(
        tmp_path / "bad.db", max_frame_size=4096, request_rate=20, request_burst=40, flood_limit=100
    ) as running:
        yield running


async def closed_with(ws: Any) -> tuple[int, str | None]:
    with trio.fail_after(5):
        try:
            while True:
                await ws.get_message()
        except ConnectionClosed as exc:
            assert exc.reason is not None
            return exc.reason.code, exc.reason.reason


@pytest.mark.parametrize(
    ("frame", "code", "message"),
    [
        ("{not json", "bad_json", "not valid JSON"),
        ("[1, 2, 3]", "bad_request", "a request is a JSON object, not array"),
        ('"ping"', "bad_request", "not string"),
        ('{"op": "explode", "id": 7}', "unknown_op", "unknown op 'explode'"),
        ('{"id": 8}', "bad_request", "missing field 'op'"),
        ('{"op": "get", "id": 9}', "bad_request", "required field missing @ $.job_id"),
        ('{"op": "get", "id": 10, "job_id": 5}', "bad_request", "$.job_id"),
        (
            '{"op": "get", "id": 11, "job_id": "x", "extra": 1}',
            "bad_request",
            "unknown field 'extra'",
        ),
        ('{"op": "list", "id": 12, "limit": 100000}', "invalid_input", "limit must be in 1..500"),
        ('{"op": "list", "id": 13, "state": "zombie"}', "invalid_input", "unknown state 'zombie'"),
        ('{"op": "get", "id": 14, "job_id": "01NOPE"}', "unknown_job", "no job with id '01NOPE'"),
        (
            '{"op": "create", "id": 15, "kind": "mining", "input": {}}',
            "unknown_kind",
            "no handler registered",
        ),
        ('{"op": "create", "id": 15, "kind": "research"}', "bad_request", "$.input"),
        ('{"op": "subscribe", "id": 16, "room": "planet:x"}', "invalid_input", "room must be"),
        ('{"op": "id", "id": [1]}', "bad_request", "id must be a string or an integer"),
        ('{"op": "hello", "id": 17, "token": "t"}', "bad_request", "already authenticated"),
        (
            '{"op": "create", "id": 18, "kind": "trade", "input": {"side": "x"}}',
            "invalid_input",
            "input needs 'symbol'",
        ),
        ('{"op": "create", "id": 19, "kind": "emitter", "input": {"phases": 5}}', None, None),
    ],
)
async def test_bad_requests_get_errors_and_the_connection_stays(
    served: RunningServer, frame: str, code: str | None, message: str | None
) -> None:
    async with raw(served) as ws:
        before = await served.runtime.get_stats()
        await ws.send_message(frame)
        reply = await receive(ws)
        if code is None:  # a valid request whose job fails: accepted, not a protocol error
            assert reply["type"] == "reply"
            return
        assert reply["type"] == "error", reply
        assert reply["code"] == code and message in reply["message"], reply
        assert (await request(ws, "ping", 99))["type"] == "reply"  # still open
        assert await served.runtime.get_stats() == before  # nothing stored changed


@pytest.mark.parametrize("depth", [100, 1000, 1990])
async def test_a_frame_nested_too_deeply_is_answered_with_its_id(
    served: RunningServer, depth: int
) -> None:
    """The id is null only when there is none to read: a frame nested past what any JSON
    decoder here recurses into still has a readable top-level id (it was null from about
    1,000 levels on)."""
    frame = '{"op": "create", "id": 77, "kind": "research", "input": '
    frame += "[" * depth + "]" * depth + "}"
    async with raw(served) as ws:
        await ws.send_message(frame)
        reply = await receive(ws)
        assert (reply["type"], reply["code"], reply["id"]) == ("error", "invalid_input", 77)
        assert "nested deeper than" in reply["message"], reply


async def test_binary_frames_are_refused(served: RunningServer) -> None:
    async with raw(served) as ws:
        await ws.send_message(b'{"op": "ping", "id": 1}')
        reply = await receive(ws)
        assert (reply["code"], reply["id"]) == ("bad_frame", 1)  # the id could be read
        assert (await request(ws, "ping", 2))["type"] == "reply"


async def test_oversized_frame_closes_with_1009(served: RunningServer) -> None:
    async with raw(served) as ws, open_client(served.url, token("bob")) as bystander:
        await send(ws, {"op": "create", "id": 1, "kind": "research", "input": {"q": "x" * 10_000}})
        code, _ = await closed_with(ws)
        assert code == CLOSE["too_big"]
        assert (await bystander.ping())["pong"] > 0
    assert (await served.runtime.get_stats())["total"] == 0


async def test_no_hello_within_deadline(served: RunningServer) -> None:
    async with open_websocket_url(served.url) as ws:
        start = trio.current_time()
        code, reason = await closed_with(ws)
        assert code == CLOSE["hello_timeout"] and "no hello" in (reason or "")
        assert trio.current_time() - start < 2


def forged(claims: dict[str, Any], alg: str = "none") -> str:
    def part(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(orjson.dumps(data)).rstrip(b"=").decode()

    return f"{part({'alg': alg, 'typ': 'JWT'})}.{part(claims)}."


@pytest.mark.parametrize(
    ("make_token", "code", "words"),
    [
        (lambda: "not-a-jwt", CLOSE["auth_failed"], "invalid token"),
        (
            lambda: mint_token("another-secret-of-sufficient-length-xx", "alice"),
            CLOSE["auth_failed"],
            "Signature verification failed",
        ),
        (
            lambda: forged({"sub": "alice", "exp": time.time() + 60}),
            CLOSE["auth_failed"],
            "invalid",
        ),
        (lambda: mint_token(SECRET, "alice", ttl=-10), CLOSE["token_expired"], "expired"),
        (lambda: mint_token(SECRET, ""), CLOSE["auth_failed"], "sub"),
    ],
)
async def test_bad_tokens_are_refused_with_close_codes(
    served: RunningServer, make_token: Any, code: int, words: str
) -> None:
    async with open_websocket_url(served.url) as ws:
        await send(ws, {"op": "hello", "id": 1, "token": make_token()})
        closed, reason = await closed_with(ws)
        assert closed == code and words in (reason or ""), reason


async def test_first_frame_must_be_hello(served: RunningServer) -> None:
    async with open_websocket_url(served.url) as ws:
        await send(ws, {"op": "ping", "id": 1})
        code, reason = await closed_with(ws)
        assert code == CLOSE["protocol_error"] and "first frame must be a hello" in (reason or "")
    async with open_websocket_url(served.url) as ws:
        await send(ws, {"op": "hello", "id": 1, "token": token("alice"), "protocol": 9})
        code, _ = await closed_with(ws)
        assert code == CLOSE["protocol_error"]


@pytest.mark.parametrize("size", [5_000, 30_000, 100_000, 1_000_000, 3_000_000])
async def test_a_hello_over_the_frame_limit_closes_with_1009_unread(
    served: RunningServer, size: int
) -> None:
    """Before its hello is accepted nobody is known: a connection may send the handshake and
    one client frame (``max_frame_size``, 4 KiB here, plus 32 KiB), whatever the websocket
    layer's own limit (2 MiB, the worker endpoint's). Before, a 1 MB token was read whole and
    parsed (4003), and 150 sockets each holding an unfinished 2 MiB hello took 250 MB."""
    async with open_websocket_url(served.url) as ws, trio.open_nursery() as nursery:

        async def hello() -> None:
            with trio.move_on_after(5):  # the server may stop reading first
                with contextlib.suppress(ConnectionClosed):
                    await send(ws, {"op": "hello", "id": 1, "token": "x" * size})

        nursery.start_soon(hello)
        code, reason = await closed_with(ws)
        assert code == CLOSE["too_big"], reason
        if size < 2 * 1024 * 1024:  # read to its end (the budget's slack), or cut before
            assert "before the hello" in (reason or "") or reason == "hello over max_frame_size"
    async with open_client(served.url, token("bob")) as bob:  # the next one is served
        assert (await bob.ping())["pong"] > 0


async def test_token_expiry_closes_and_refresh_extends(served: RunningServer) -> None:
    async with open_websocket_url(served.url) as ws:
        await send(ws, {"op": "hello", "id": 0, "token": mint_token(SECRET, "alice", ttl=1)})
        assert (await receive(ws))["type"] == "reply"
        refreshed = await request(ws, "refresh", 1, token=mint_token(SECRET, "alice", ttl=60))
        assert refreshed["result"]["expires_at"] > time.time() + 30
        other = await request(ws, "refresh", 2, token=mint_token(SECRET, "bob"))
        assert other["code"] == "forbidden"
        await trio.sleep(2.5)
        assert (await request(ws, "ping", 3))["type"] == "reply"  # refreshed: still open
    async with open_websocket_url(served.url) as ws:
        await send(ws, {"op": "hello", "id": 0, "token": mint_token(SECRET, "alice", ttl=1)})
        assert (await receive(ws))["type"] == "reply"
        code, _ = await closed_with(ws)
        assert code == CLOSE["token_expired"]


async def test_a_flood_is_throttled_then_closed(tmp_path: Path) -> None:
    # A bucket that refills once in 100 s: which requests are refused does not depend on how
    # fast a loaded machine reads them.
    flood = serving(tmp_path / "flood.db", request_rate=0.01, request_burst=40, flood_limit=100)
    async with (
        flood as served,
        raw(served) as ws,
        open_client(served.url, token("bob")) as bystander,
    ):
        for n in range(40):
            await send(ws, {"op": "ping", "id": n})
        for n in range(200):
            try:
                await send(ws, {"op": "ping", "id": 1000 + n})
            except ConnectionClosed:
                break
        codes = set()
        ids: set[int] = set()
        try:
            with trio.fail_after(5):
                while True:
                    frame = orjson.loads(await ws.get_message())
                    for message in frame.get("messages", [frame]):  # errors may be batched
                        codes.add(message.get("code"))
                        if message.get("code") == "rate_limited":
                            ids.add(message["id"])
        except ConnectionClosed as exc:
            assert exc.reason is not None and exc.reason.code == CLOSE["flood"]
        assert "rate_limited" in codes
        assert ids and ids <= set(range(2000))  # refused requests are answered by their id
        assert (await bystander.ping())["pong"] > 0
        assert (await bystander.my_stats())["total"] == 0
