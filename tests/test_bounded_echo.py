"""An error message quotes what its caller gave bounded: a value of 300,000 characters (a job
id, a kind, a field name, a room, an op, a state, a parent id, an input key...) is named by
its first characters, an ellipsis and its length, with its control characters escaped, in an
error reply, an exception of the Python API, a CLI error line and an HTTP answer alike, never
echoed whole (300,000 characters in, as many out) nor with a newline that forges a line.
Real servers, real sockets, real processes; one helper, :func:`actors._errors.shown`."""

from __future__ import annotations

import os
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio
from trio_websocket import WebSocketConnection

from actors import InvalidInputError, JobspineError, RetryPolicy, Runtime
from transport import RunningServer

from .conftest import memory_runtime
from .serving import raw, receive, request, serving, token
from .test_cli import COMMAND
from .test_dashboard_http import exchange, get, served_http

#: The values echoed: 300,000 characters plain, and the same length led by characters that
#: would forge a log line or drive a terminal.
PLAIN = "01ABC" + "Z" * 299_995
HOSTILE = "a\nFORGED line\r\x1b[31mred\x07\u2028" + "z" * 299_976
VALUES = {"plain": PLAIN, "hostile": HOSTILE}
#: Big enough for a request carrying 300,000 characters (twice that as JSON escapes).
FRAME = 1024 * 1024


def bounded(message: str, value: str, length: int | None = None) -> None:
    """The message names ``value`` bounded: short, with its length (``length``: of the value
    quoted, when ``value`` is a part of it), on one line, escaped."""
    assert len(message) < 1000, message[:2000]
    assert f"({length or len(value):,} characters)" in message, message
    assert "\n" not in message and "\r" not in message, message
    assert not {"\x1b", "\x07", "\u2028"} & set(message), message


def test_shown_quotes_a_value_bounded_and_escaped() -> None:
    from actors._errors import shown  # the helper of every message below

    assert shown("01ABC") == "'01ABC'"
    assert shown("a\nb") == "'a\\nb'"
    assert shown(PLAIN) == f"'{PLAIN[:100]}'… (300,000 characters)"
    assert shown("\U0001f600\x00" * 5000).endswith("… (10,000 characters)")
    assert len(shown("\x00" * 300_000)) < 150  # escapes do not make the quote longer
    for value in VALUES.values():
        bounded(shown(value), value)


# -- the websocket: error replies ------------------------------------------------------------


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[RunningServer]:
    async with serving(tmp_path / "db.sqlite", max_frame_size=FRAME) as running:
        yield running


async def _frame(ws: WebSocketConnection, text: str) -> Any:
    """Send ``text`` as it is (a request orjson cannot write, 1e999) and return its reply."""
    await ws.send_message(text)
    with trio.fail_after(10):
        while True:
            message = await receive(ws)
            for inner in message.get("messages", [message]):
                if inner.get("id") == 1 and inner["type"] in ("reply", "error"):
                    return inner


Ask = Callable[[WebSocketConnection, str, str], Awaitable[Any]]


def _op(op: str, **fields: Callable[[str], Any]) -> Ask:
    """A request ``op`` whose fields are made from the value (and a job's id)."""

    async def ask(ws: WebSocketConnection, value: str, job_id: str) -> Any:
        return await request(ws, op, **{k: make(value) for k, make in fields.items()})

    return ask


async def _unknown_input_key_overflowing(ws: WebSocketConnection, value: str, _: str) -> Any:
    key = orjson.dumps(value).decode()
    return await _frame(
        ws, f'{{"op": "create", "id": 1, "kind": "research", "input": {{{key}: 1e999}}}}'
    )


async def _payload_field(ws: WebSocketConnection, value: str, job_id: str) -> Any:
    return await request(ws, "get_payload", job_id=job_id, field=value, seq=1)


async def _unknown_field(ws: WebSocketConnection, value: str, _: str) -> Any:
    return await request(ws, "get", job_id="x", **{value: 1})


async def _unknown_op(ws: WebSocketConnection, value: str, _: str) -> Any:
    return await request(ws, value)


def _create(**fields: Callable[[str], Any]) -> Ask:
    defaults: dict[str, Callable[[str], Any]] = {
        "kind": lambda v: "research",
        "input": lambda v: {"query": "q"},
    }
    return _op("create", **{**defaults, **fields})


#: Each case: how it asks, and the codes it may get (a kind that is not printable is
#: ``invalid_input``, a printable one ``unknown_kind``).
WEBSOCKET: dict[str, tuple[Ask, tuple[str, ...]]] = {
    "get": (_op("get", job_id=str), ("unknown_job",)),
    "cancel": (_op("cancel", job_id=str), ("unknown_job",)),
    "pause": (_op("pause", job_id=str), ("unknown_job",)),
    "restart": (_op("restart", job_id=str), ("unknown_job",)),
    "children": (_op("children", job_id=str), ("unknown_job",)),
    "recovery_options": (_op("recovery_options", job_id=str), ("unknown_job",)),
    "subscribe a job": (_op("subscribe", room=lambda v: f"job:{v}"), ("unknown_job",)),
    "subscribe a user": (_op("subscribe", room=lambda v: f"user:{v}"), ("forbidden",)),
    "subscribe a bad room": (_op("subscribe", room=str), ("invalid_input",)),
    "unsubscribe a bad room": (_op("unsubscribe", room=str), ("invalid_input",)),
    "an unknown field": (_unknown_field, ("bad_request",)),
    "an unknown op": (_unknown_op, ("unknown_op",)),
    "list's state": (_op("list", state=str), ("invalid_input",)),
    "list's states": (_op("list", states=lambda v: [v]), ("invalid_input",)),
    "a kind": (
        _op("create", kind=lambda v: v[:1024], input=lambda v: 1),
        ("unknown_kind", "invalid_input"),
    ),
    "a parent": (_create(parent_id=str), ("invalid_parent",)),
    "an input field": (_create(input=lambda v: {v: 1}), ("invalid_input",)),
    "an input value": (_create(input=lambda v: {"query": v}), ("invalid_input",)),
    "an input key's path": (_unknown_input_key_overflowing, ("invalid_input",)),
    "a payload field": (_payload_field, ("invalid_input",)),
}


@pytest.mark.parametrize("value", VALUES.values(), ids=VALUES.keys())
@pytest.mark.parametrize("case", WEBSOCKET.keys())
async def test_an_error_reply_quotes_the_callers_value_bounded(
    served: RunningServer, case: str, value: str
) -> None:
    ask, codes = WEBSOCKET[case]
    if case in ("a kind", "a parent"):
        value = value[:1000]  # over 1,024 bytes is refused by its size alone, naming only that
    job = await served.runtime.create_job("research", "alice", {"query": "q", "delay": 0})
    async with raw(served) as ws:
        reply = await ask(ws, value, job.id)
    assert reply["type"] == "error", str(reply)[:500]
    assert reply["code"] in codes, reply["message"][:500]
    bounded(reply["message"], value, len(value) + 5 if case == "subscribe a user" else None)


async def test_an_unknown_field_of_a_cursor_is_named_bounded(served: RunningServer) -> None:
    async with raw(served) as ws:
        for value in VALUES.values():
            cursor = {"epoch": "e", "seq": 0, value: 0}
            reply = await request(ws, "subscribe", room="user:alice", cursor=cursor)
            assert reply["code"] == "bad_request", reply["message"][:500]
            assert "unknown field" in reply["message"] and "$.cursor" in reply["message"]
            bounded(reply["message"], value)


async def test_an_idempotency_conflict_names_the_key_bounded(served: RunningServer) -> None:
    """A key is at most 256 characters; the one quoted in a conflict is cut all the same."""
    key = "k\n\x1b" + "y" * 253
    async with raw(served) as ws:
        fields: dict[str, Any] = {"kind": "research", "idempotency_key": key}
        first = await request(ws, "create", input={"query": "a"}, **fields)
        assert first["type"] == "reply", first
        reply = await request(ws, "create", 2, input={"query": "b"}, **fields)
    assert reply["code"] == "idempotency_conflict"
    bounded(reply["message"], key)


# -- the Python API: exceptions --------------------------------------------------------------


async def _quick(ctx: Any, input: Any) -> Any:
    return input


Call = Callable[[Runtime, str], Awaitable[Any]]
API: dict[str, tuple[Call, type[Exception]]] = {
    "get_job": (lambda rt, v: rt.get_job(v), JobspineError),
    "cancel": (lambda rt, v: rt.cancel(v), JobspineError),
    "pause": (lambda rt, v: rt.pause(v), JobspineError),
    "restart": (lambda rt, v: rt.restart(v), JobspineError),
    "list_children": (lambda rt, v: rt.list_children(v), JobspineError),
    "get_recovery_options": (lambda rt, v: rt.get_recovery_options(v), JobspineError),
    "wait_job": (lambda rt, v: rt.wait_job(v), JobspineError),
    "a kind": (lambda rt, v: rt.create_job(v[:1024], "alice", 1), JobspineError),
    "a parent": (lambda rt, v: rt.create_job("k", "alice", 1, parent_id=v), JobspineError),
    "list_jobs's states": (lambda rt, v: rt.list_jobs("alice", states=[v]), InvalidInputError),
}


@pytest.mark.parametrize("value", VALUES.values(), ids=VALUES.keys())
@pytest.mark.parametrize("case", API.keys())
async def test_the_python_api_quotes_the_callers_value_bounded(case: str, value: str) -> None:
    call, error = API[case]
    if case in ("a kind", "a parent"):
        value = value[:1000]  # over 1,024 bytes is refused by its size alone, naming only that
    async with memory_runtime({"k": _quick}) as rt:
        with pytest.raises(error) as raised:
            await call(rt, value)
    bounded(str(raised.value), value)


@pytest.mark.parametrize("value", VALUES.values(), ids=VALUES.keys())
def test_a_retry_policy_quotes_its_value_bounded(value: str) -> None:
    with pytest.raises(InvalidInputError) as raised:
        RetryPolicy(jitter=value)  # type: ignore[arg-type]
    bounded(str(raised.value), value)


# -- the CLI: error lines --------------------------------------------------------------------

#: A command-line argument is at most 128 KiB (the kernel's MAX_ARG_STRLEN).
CLI_VALUES = {name: value[:100_000] for name, value in VALUES.items()}


@pytest.mark.parametrize("value", CLI_VALUES.values(), ids=CLI_VALUES.keys())
@pytest.mark.parametrize("command", ["get", "cancel", "watch", "recovery"])
async def test_a_cli_error_line_quotes_the_job_id_bounded(
    served: RunningServer, command: str, value: str
) -> None:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("JOBSPINE_")}
    environment.update(JOBSPINE_URL=served.url, JOBSPINE_TOKEN=token("alice"))
    with trio.fail_after(60):
        result = await trio.run_process(
            [*COMMAND, command, value],
            env=environment,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    done = subprocess.CompletedProcess(
        result.args, result.returncode, result.stdout.decode(), result.stderr.decode()
    )
    assert done.returncode == 6, done.stderr[:500]
    assert done.stdout == ""
    assert done.stderr.startswith("jobspine: error: unknown_job: "), done.stderr[:500]
    assert done.stderr.endswith("\n")
    bounded(done.stderr.removesuffix("\n"), value)


# -- the HTTP port ---------------------------------------------------------------------------


async def test_the_http_port_quotes_a_method_bounded(tmp_path: Path) -> None:
    """A method is echoed in a 405 (a request head is up to 8 KiB): cut, saying its length."""
    method = "X" * 6000
    async with served_http(tmp_path) as (_, port):
        status, _, body = await exchange(port, get("/healthz", method=method))
    assert status == 405
    bounded(orjson.loads(body)["error"], method)
