"""One strict parse of every frame, token and demo input: values a lenient parser would change
are refused with a documented code naming the field, and the request id is echoed whenever it
can be read. Each case of issue 8, fault 9, with another input of the same kind beside it."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio
import wsproto
from hypothesis import given, settings
from hypothesis import strategies as st
from trio_websocket import ConnectionClosed, open_websocket_url
from wsproto.events import AcceptConnection, CloseConnection, Request, TextMessage

from actors import InvalidInputError, JobState, Runtime, validates
from actors._worker import check_input
from transport import CLOSE, RunningServer, open_client
from transport._json import RefusedJsonError, loads_strict
from transport._protocol import RequestError, parse_request

from .conftest import wait_for_state
from .serving import SECRET, raw, receive, request, send, serving, token


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[RunningServer]:
    async with serving(tmp_path / "strict.db") as running:
        yield running


def refused(frame: str) -> tuple[str | int | None, str, str]:
    with pytest.raises(RequestError) as info:
        parse_request(frame)
    return info.value.request_id, info.value.code, info.value.message


# -- numbers: refused, never changed ---------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "path"),
    [
        ("1180591620717411303425", "$.input.n"),  # the example: 2**70 + 1
        (str(2**63), "$.input.n"),  # one past the top
        (str(-(2**63) - 1), "$.input.n"),  # one past the bottom
        ('[1, {"deep": 99999999999999999999}]', "$.input.n[1].deep"),
        ("1" * 5000, "$.input.n"),  # beyond what int() parses
        ("1e400", "$.input.n"),  # overflows a double: would become infinity
    ],
)
def test_numbers_out_of_range_are_refused_naming_the_path(value: str, path: str) -> None:
    frame = f'{{"op": "create", "id": 4, "kind": "emitter", "input": {{"n": {value}}}}}'
    request_id, code, message = refused(frame)
    assert (request_id, code) == (4, "invalid_input")
    assert message.startswith(path + ":"), message


def test_numbers_at_the_edges_of_the_range_are_kept_exactly() -> None:
    edges = {"top": 2**63 - 1, "bottom": -(2**63), "float": 1.7976931348623157e308}
    parsed = parse_request(
        orjson.dumps({"op": "create", "id": 1, "kind": "k", "input": edges}).decode()
    )
    assert parsed.body.input == edges


async def test_big_integers_never_reach_a_job(served: RunningServer) -> None:
    async with raw(served) as ws:
        big = '{"op": "create", "id": 5, "kind": "emitter", "input": {"phases": [], "n": %s}}'
        await ws.send_message(big % "1180591620717411303425")
        reply = await receive(ws)
        assert (reply["id"], reply["code"]) == (5, "invalid_input"), reply
        await ws.send_message(big % str(2**63 - 1))
        created = await receive(ws)
        assert created["type"] == "reply", created
        job = await served.runtime.get_job(created["result"]["id"])
        assert job.input["n"] == 2**63 - 1  # exactly, not 9.223372036854776e18
        assert (await served.runtime.get_stats())["total"] == 1


# -- strings: lone surrogates ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("frame", "path"),
    [
        ('{"op": "get", "id": 6, "job_id": "\\ud83d"}', "$.job_id"),  # the example
        ('{"op": "create", "id": 6, "kind": "k", "input": {"a": ["x\\udc00"]}}', "$.input.a[0]"),
        ('{"op": "create", "id": 6, "kind": "k", "input": {"\\ud800": 1}}', "$.input"),
    ],
)
def test_lone_surrogates_are_refused_and_the_id_echoed(frame: str, path: str) -> None:
    request_id, code, message = refused(frame)
    assert (request_id, code) == (6, "invalid_input")
    assert message.startswith(path) and "lone surrogate" in message, message


def test_surrogate_pairs_and_escaped_backslashes_are_text() -> None:
    parsed = parse_request('{"op": "get", "id": 1, "job_id": "\\ud83d\\ude00 \\\\ud83d"}')
    assert parsed.body.job_id == "\U0001f600 \\ud83d"


async def test_a_lone_surrogate_is_answered_with_its_id(served: RunningServer) -> None:
    async with raw(served) as ws:
        await ws.send_message('{"op": "get", "id": "req-7", "job_id": "\\ud83d"}')
        reply = await receive(ws)
        assert (reply["id"], reply["code"]) == ("req-7", "invalid_input"), reply
        assert (await request(ws, "ping", 8))["type"] == "reply"


# -- objects: repeated keys, unknown keys at every level, required fields ----------------------


def test_repeated_keys_are_refused() -> None:
    # A repeated id cannot be echoed: which one would it be?
    assert refused('{"op": "ping", "id": 1, "id": 2}')[:2] == (None, "bad_request")
    request_id, code, message = refused(
        '{"op": "create", "id": 3, "kind": "k", "input": {"a": 1, "a": 2}}'
    )
    assert (request_id, code) == (3, "bad_request") and message.startswith("$.input.a"), message


@pytest.mark.parametrize(
    ("fields", "code", "words"),
    [
        ({"cursor": {"epoch": "e", "seq": 1, "extra": 0}}, "bad_request", "$.cursor"),
        ({"cursor": {"epoch": 5, "seq": 1}}, "bad_request", "$.cursor.epoch"),
        ({"cursor": {"epoch": "e", "seq": True}}, "bad_request", "$.cursor.seq"),
        ({"cursor": {"epoch": "e"}}, "bad_request", "$.cursor.seq"),
        ({"cursor": {"epoch": "e", "seq": -1}}, "invalid_input", "$.cursor.seq"),
        ({"cursor": {"epoch": "e", "seq": -(2**63)}}, "invalid_input", "$.cursor.seq"),
    ],
)
def test_cursors_are_parsed_strictly(fields: dict[str, Any], code: str, words: str) -> None:
    frame = orjson.dumps({"op": "subscribe", "id": 9, "room": "user:alice", **fields}).decode()
    request_id, got, message = refused(frame)
    assert (request_id, got) == (9, code) and words in message, message


def test_create_needs_its_input_and_takes_an_explicit_null() -> None:
    request_id, code, message = refused('{"op": "create", "id": 1, "kind": "research"}')
    assert (request_id, code) == (1, "bad_request") and "$.input" in message
    parsed = parse_request('{"op": "create", "id": 1, "kind": "research", "input": null}')
    assert parsed.body.input is None


@pytest.mark.parametrize(
    ("fields", "code", "words"),
    [
        ({"limit": 100_000}, "invalid_input", "$.limit must be in 1..500"),
        ({"limit": 0}, "invalid_input", "$.limit must be in 1..500"),
        ({"state": "zombie"}, "invalid_input", "unknown state 'zombie'"),
        ({"state": "RUNNING"}, "invalid_input", "unknown state 'RUNNING'"),
        ({"limit": "5"}, "bad_request", "$.limit"),
        ({"limit": 5.0}, "bad_request", "$.limit"),
        ({"state": ["running"]}, "bad_request", "$.state"),
    ],
)
def test_list_ranges_are_invalid_input_and_types_bad_request(
    fields: dict[str, Any], code: str, words: str
) -> None:
    frame = orjson.dumps({"op": "list", "id": 2, **fields}).decode()
    assert refused(frame)[:2] == (2, code)
    assert words in refused(frame)[2]


@pytest.mark.parametrize(
    "frame",
    [
        '{"op": "restart", "id": 1, "job_id": "j", "modifications": [1]}',
        '{"op": "restart", "id": 1, "job_id": "j", "extra": {}}',
        '{"op": "hello", "id": 1, "token": "t", "protocol": "1"}',
        '{"op": "refresh", "id": 1, "token": null}',
        '{"op": "unsubscribe", "id": 1, "room": 5}',
        '{"op": "ping", "id": 1, "job_id": "j"}',
        '{"op": "list", "id": 1, "user_id": 7}',
    ],
)
def test_every_request_type_refuses_wrong_shapes(frame: str) -> None:
    assert refused(frame)[:2] == (1, "bad_request")


# -- the id ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ('{"op": "ping", "id": true}', "bad_request"),
        ('{"op": "ping", "id": 1.5}', "bad_request"),
        ('{"op": "ping", "id": {"n": 1}}', "bad_request"),
        ('{"op": "ping", "id": ""}', "invalid_input"),
        ('{"op": "ping", "id": "%s"}' % ("x" * 129), "invalid_input"),
        ('{"op": "ping", "id": 9223372036854775808}', "invalid_input"),
        ('{"op": "ping", "id": "\\udc00"}', "invalid_input"),
    ],
)
def test_an_unusable_id_is_refused_with_id_null(frame: str, code: str) -> None:
    assert refused(frame)[:2] == (None, code)


def test_the_id_is_optional() -> None:
    assert parse_request('{"op": "ping"}').id is None
    assert parse_request('{"op": "ping", "id": null}').id is None


@pytest.mark.parametrize(
    ("frame", "request_id"),
    [
        ('{"op": "ping", "id": 3, "x": NaN}', 3),  # not JSON, but the id is readable
        ('{"op": "ping", "id": "a", "n": 1e999}', "a"),
        ('{"id": -9223372036854775808, "op": "nope"}', -(2**63)),
        ('{"op": 5, "id": "%s"}' % ("x" * 128), "x" * 128),
        ('{"op": "ping", "id": 1, "x": ' + "[" * 100 + "]" * 100 + "}", 1),
    ],
)
def test_the_id_is_echoed_whenever_it_can_be_read(frame: str, request_id: str | int) -> None:
    assert refused(frame)[0] == request_id


async def test_binary_and_rate_limited_frames_echo_their_id(tmp_path: Path) -> None:
    async with (
        serving(tmp_path / "r.db", request_rate=0.001, request_burst=1) as running,
        raw(running) as ws,
    ):
        await ws.send_message(b'{"op": "ping", "id": "bin"}')
        reply = await receive(ws)
        assert (reply["code"], reply["id"]) == ("bad_frame", "bin")
        await ws.send_message('{"op": "ping", "id": "r\\ud83d", "x": 1}')
        await ws.send_message('{"op": "ping", "id": "ok", "x": 1}')
        replies: list[Any] = []
        with trio.fail_after(5):
            while len(replies) < 2:  # the two may come in one batch
                message = await receive(ws)
                replies.extend(message.get("messages", [message]))
        assert {(r["id"], r["code"]) for r in replies} == {
            (None, "rate_limited"),  # its id has a lone surrogate: not echoable
            ("ok", "rate_limited"),
        }


# -- invalid UTF-8: close 1007 ---------------------------------------------------------------


def _masked(opcode: int, payload: bytes) -> bytes:
    """A client frame (FIN set, masked), written by hand so that it can carry any bytes."""
    mask = os.urandom(4)
    length = len(payload)
    header = bytes([0x80 | opcode])
    if length < 126:
        header += bytes([0x80 | length])
    else:
        header += bytes([0x80 | 126]) + length.to_bytes(2, "big")
    return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def _close_code_after(running: RunningServer, frame: bytes) -> int | None:
    """Hello, then ``frame``; the close code the server sends (None if it drops the
    connection without a close frame)."""
    stream = await trio.open_tcp_stream("127.0.0.1", running.port)
    client = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
    events: list[Any] = []

    async def until(kind: type) -> Any:
        while True:
            while events:
                event = events.pop(0)
                if isinstance(event, kind):
                    return event
            data = await stream.receive_some(65536)
            if not data:
                return None
            client.receive_data(data)
            events.extend(client.events())

    async with stream:
        with trio.fail_after(5):
            await stream.send_all(client.send(Request(host="127.0.0.1", target="/")))
            assert await until(AcceptConnection) is not None
            hello = orjson.dumps({"op": "hello", "id": 0, "token": token("alice")}).decode()
            await stream.send_all(client.send(TextMessage(hello)))
            assert await until(TextMessage) is not None
            await stream.send_all(frame)
            closed = await until(CloseConnection)
            return None if closed is None else int(closed.code)


@pytest.mark.parametrize(
    "payload",
    [
        b'{"op": "ping", "id": 1, "x": "\xff"}',  # invalid UTF-8 in the middle of a valid frame
        b"\xed\xa0\xbd",  # a UTF-8-encoded surrogate: not UTF-8
        b'{"op": "get", "id": 2, "job_id": "' + b"a" * 300 + b'\xc3"}',  # truncated sequence
    ],
)
async def test_invalid_utf8_closes_with_1007(served: RunningServer, payload: bytes) -> None:
    async with open_client(served.url, token("bob")) as bystander:
        assert await _close_code_after(served, _masked(0x1, payload)) == CLOSE["invalid_utf8"]
        assert (await bystander.ping())["pong"] > 0


@pytest.mark.parametrize(
    "frame",
    [
        bytes([0x81, 0x02]) + b"{}",  # not masked
        bytes([0xC1]) + _masked(0x1, b"{}")[1:],  # a reserved bit set (no extension agreed)
        _masked(0x3, b"{}"),  # an opcode that does not exist
    ],
)
async def test_malformed_frames_close_with_1002(served: RunningServer, frame: bytes) -> None:
    assert await _close_code_after(served, frame) == CLOSE["websocket_protocol"]


# -- tokens ----------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def signed(claims: str) -> str:
    """An HS256 token with the server's secret over exactly the claim text given."""
    head = _b64(b'{"alg": "HS256", "typ": "JWT"}')
    body = _b64(claims.encode("utf-8", "surrogatepass"))
    mac = hmac.new(SECRET.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{_b64(mac)}"


EXP = int(time.time()) + 3600
BAD_CLAIMS = {
    "exp a string": f'{{"sub": "alice", "exp": "{EXP}"}}',  # the example
    "exp a bool": '{"sub": "alice", "exp": true}',
    "exp beyond int64": '{"sub": "alice", "exp": 1180591620717411303425}',
    "exp twice": f'{{"sub": "alice", "exp": {EXP}, "exp": 1}}',
    "iat a string": f'{{"sub": "alice", "exp": {EXP}, "iat": "0"}}',
    "nbf null": f'{{"sub": "alice", "exp": {EXP}, "nbf": null}}',
    "admin a string": f'{{"sub": "alice", "exp": {EXP}, "admin": "yes"}}',
    "admin 1": f'{{"sub": "alice", "exp": {EXP}, "admin": 1}}',
    "sub a lone surrogate": f'{{"sub": "\\ud83d", "exp": {EXP}}}',
    "sub a number": f'{{"sub": 7, "exp": {EXP}}}',
    "sub too long": f'{{"sub": "{"a" * 1025}", "exp": {EXP}}}',  # a name's limit, as stored
    "sub too many bytes": f'{{"sub": "{"é" * 513}", "exp": {EXP}}}',
    "sub a control character": f'{{"sub": "al\\u0000ice", "exp": {EXP}}}',
    "sub a C1 control character": f'{{"sub": "al\\u0085ice", "exp": {EXP}}}',
    "unknown claim": f'{{"sub": "alice", "exp": {EXP}, "scope": "read"}}',
    "no exp": '{"sub": "alice"}',
    "not an object": f'["alice", {EXP}]',
}


@pytest.mark.parametrize("case", sorted(BAD_CLAIMS))
async def test_tokens_with_malformed_claims_are_refused(served: RunningServer, case: str) -> None:
    async with open_websocket_url(served.url) as ws:
        await send(ws, {"op": "hello", "id": 0, "token": signed(BAD_CLAIMS[case])})
        with trio.fail_after(5), pytest.raises(ConnectionClosed) as info:
            while True:
                await ws.get_message()
        assert info.value.reason is not None
        assert info.value.reason.code == CLOSE["auth_failed"], info.value.reason


async def test_well_formed_claims_are_accepted(served: RunningServer) -> None:
    claims = f'{{"sub": "alice", "exp": {EXP}.5, "iat": 1, "nbf": 0, "admin": false}}'
    async with open_websocket_url(served.url) as ws:
        await send(ws, {"op": "hello", "id": 0, "token": signed(claims)})
        welcome = await receive(ws)
        assert welcome["result"]["user_id"] == "alice"
        assert welcome["result"]["expires_at"] == EXP + 0.5


async def test_refresh_errors_have_documented_codes(served: RunningServer) -> None:
    async with raw(served) as ws:
        cases = {
            "auth_failed": signed(BAD_CLAIMS["exp a string"]),
            "token_expired": signed('{"sub": "alice", "exp": 5}'),
            "forbidden": token("bob"),
        }
        for n, (code, bad) in enumerate(cases.items()):
            reply = await request(ws, "refresh", n, token=bad)
            assert (reply["type"], reply["code"]) == ("error", code), reply
        assert (await request(ws, "ping", 99))["type"] == "reply"  # still open, old token


# -- demo handlers validate their input at create --------------------------------------------


BAD_INPUTS = [
    ("research", {"query": "q", "depth": -1}),  # the example: ZeroDivisionError
    ("research", {"query": "q", "depth": 0}),
    ("research", {"query": "q", "depth": True}),
    ("research", {"query": "q", "delay": -0.1}),
    ("research", {"query": "q", "delay": float("nan")}),
    ("research", {"query": "q", "checkpoint_every": 0}),
    ("research", {"query": ""}),
    ("research", {"query": "q", "dpeth": 3}),
    ("research", None),
    ("research", ["q"]),
    ("trade", {"symbol": "X", "side": "hold", "quantity": 1}),
    ("trade", {"symbol": "X", "side": "buy", "quantity": 0}),
    ("trade", {"symbol": "X", "side": "buy", "quantity": -5}),
    ("trade", {"symbol": "X", "side": "buy", "quantity": "1"}),
    ("trade", {"symbol": "X", "side": "buy", "quantity": 1, "slices": 0}),
    ("trade", {"side": "buy", "quantity": 1}),
    ("analysis", {"content": "a b", "chunk_size": 0}),
    ("analysis", {"content": 5}),
    ("analysis", {"content": "a", "delay": 61}),
]


@pytest.mark.parametrize(("kind", "input"), BAD_INPUTS)
async def test_demo_inputs_are_validated_at_create(
    jobspine_runtime: Runtime, kind: str, input: Any
) -> None:
    with pytest.raises(InvalidInputError):
        await jobspine_runtime.create_job(kind, "alice", input)
    assert (await jobspine_runtime.get_stats())["total"] == 0


def test_a_check_that_trips_over_the_input_refuses_it() -> None:
    """Whatever exception an input check raises refuses the input, named by its type: a
    check that indexes a missing key never fails a create, nor a worker process."""

    @validates(lambda input: input["n"] > 0)
    async def needs_n(ctx: Any, input: Any) -> None: ...

    with pytest.raises(InvalidInputError, match=r"^k: invalid input: KeyError: 'n'$"):
        check_input(needs_n, "k", {})
    check_input(needs_n, "k", {"n": 1})


async def test_restart_validates_the_modified_input(jobspine_runtime: Runtime) -> None:
    rt = jobspine_runtime
    job = await rt.create_job("research", "alice", {"query": "q", "depth": 50})
    await rt.cancel(job.id)
    for bad in ({"depth": -1}, {"side": "buy"}, {"query": 7}):
        with pytest.raises(InvalidInputError):
            await rt.restart(job.id, bad)
    after = await rt.get_job(job.id)
    assert (after.state, after.input) == (JobState.CANCELLED, {"query": "q", "depth": 50})
    await rt.restart(job.id, {"depth": 1, "delay": 0})
    done = await wait_for_state(rt, job.id)
    assert (done.state, done.result["sources"]) == (JobState.COMPLETED, 1)


async def test_demo_input_errors_over_the_socket(served: RunningServer) -> None:
    async with raw(served) as ws:
        reply = await request(ws, "create", 3, kind="research", input={"query": "q", "depth": -1})
        assert (reply["type"], reply["code"]) == ("error", "invalid_input"), reply
        assert "'depth'" in reply["message"]
    assert (await served.runtime.get_stats())["total"] == 0


# -- the fast pass misses nothing: differential test against a plain reference ----------------

_texts = st.one_of(
    st.text(max_size=6),
    # Halves of a pair, a whole emoji, text that looks like a key or an escape.
    st.sampled_from(["\ud83d", "a\udc00", "\U0001f600", "job:1", '":', "\\ud83d", "e+999"]),
)
_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.integers().map(lambda n: n * 2**64)  # out of range unless 0
    | st.floats(allow_nan=False, allow_infinity=False)
    | _texts,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.lists(st.tuples(_texts, inner), max_size=3).map(tuple)  # an object: pairs
    ),
    max_leaves=10,
)


def _dump(value: Any, ascii_only: bool) -> str:
    if isinstance(value, tuple):
        pairs = (f"{_dump(k, ascii_only)}:{_dump(v, ascii_only)}" for k, v in value)
        return "{" + ", ".join(pairs) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_dump(v, ascii_only) for v in value) + "]"
    return json.dumps(value, ensure_ascii=ascii_only)


def _refusable(value: Any) -> bool:
    if isinstance(value, tuple):
        keys = [k for k, _ in value]
        return len(set(keys)) < len(keys) or any(_refusable(k) or _refusable(v) for k, v in value)
    if isinstance(value, list):
        return any(_refusable(v) for v in value)
    if isinstance(value, str):
        return any(0xD800 <= ord(c) <= 0xDFFF for c in value)
    return isinstance(value, int) and not -(2**63) <= value <= 2**63 - 1


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return {k: _plain(v) for k, v in value}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


@settings(max_examples=500, deadline=None)
@given(_values, st.booleans())
def test_strict_loading_refuses_exactly_what_it_must(value: Any, ascii_only: bool) -> None:
    text = _dump(value, ascii_only)
    try:
        loaded = loads_strict(text)
    except RefusedJsonError:
        assert _refusable(value), text
        return
    assert not _refusable(value), text
    assert loaded == _plain(value)


def test_a_deep_frames_top_level_id_is_read_without_recursion() -> None:
    from transport._protocol import read_request_id

    deep = "[" * 5000 + "]" * 5000
    assert read_request_id('{"op": "x", "input": ' + deep + ', "id": 7}') == 7
    # Brackets and quotes inside strings do not end or open anything.
    assert read_request_id('{"a": ["]}\\"[{", ' + deep + '], "id": "k"}') == "k"
    for refused in (
        '{"id": 1, "id": 2, "a": ' + deep + "}",  # two ids: ambiguous
        '{"id": [1], "a": ' + deep + "}",  # not a valid id
        '{"a": ' + deep[:-1] + ', "id": 1}',  # unbalanced
        "[" + deep + "]",  # not an object
        '{"id": 1, "a": ' + deep + "",  # unfinished
    ):
        assert read_request_id(refused) is None, refused[:30]
