"""Faults a new user's trial found: each test failed before its fix."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from actors import JobContext, JobEvent
from transport import Client, ClientError, ConnectionLostError, RunningServer, open_client
from transport._cli import parser
from transport._commands import parse_inputs
from transport._exit import CLIError, ExitCode
from transport._logging import TextFormatter

from .conftest import memory_runtime, wait_for_state
from .serving import SECRET, eventually, free_port, serving, token

# --- A text log record's data cannot start a line of its own nor drive a terminal -----------

FORGED = "2026-12-01 14:33:27,545 WARNING jobspine: forged line from job data"
#: Each prefixed to FORGED: a line break, a carriage return (a terminal writes what follows
#: over the line), an escape sequence, the Unicode line separator, bidirectional overrides.
BREAKS = [
    "\n",
    "\r",
    "\r\n",
    "\x1b[2K\r",
    "\x1b]0;title\x07\n",
    "\u2028",
    "\u2029",
    "\u202e",
    "\u2066",
]
#: What a terminal would obey or not show as written; a newline only between lines.
RAW_CONTROL = re.compile(
    "[\x00-\x09\x0b-\x1f\x7f-\x9f"  # C0 but the newline, DEL, C1
    "\u061c\u200b\u200e\u200f\u2028-\u202e\u2060-\u2064\u2066-\u2069\ufeff]"  # bidi, unseen
)


def _record(exc_info: Any = None, stack_info: str | None = None) -> logging.LogRecord:
    logger = logging.getLogger("jobspine.test")
    return logger.makeRecord(
        logger.name,
        logging.ERROR,
        __file__,
        1,
        "job %s failed",
        ("J1",),
        exc_info,
        sinfo=stack_info,
    )


def _assert_inert(text: str, copies: int) -> None:
    """``text``'s first line is the record's; FORGED starts none of the others, each of the
    ``copies`` of it is escaped inside a line of the traceback, nothing raw a terminal obeys."""
    lines = text.split("\n")
    assert lines[0].endswith(" jobspine.test: job J1 failed")
    assert RAW_CONTROL.search(text) is None, text
    assert not [line for line in lines[1:] if line.lstrip(" |").startswith("2026-")], text
    assert sum(line.count(FORGED) for line in lines) == copies, text


def _raise_chain(data: str) -> Any:
    """A handler's failure quoting ``data`` everywhere a traceback can: its message, its
    notes, the exception it was raised while handling, and that one's cause."""
    try:
        try:
            raise OSError(5, data) from ValueError(data)
        except OSError:
            failure = RuntimeError(data)
            failure.add_note(data)
            failure.add_note(f"second {data}")
            raise failure  # noqa: B904 - the context is what is tested
    except RuntimeError:
        return sys.exc_info()


@pytest.mark.parametrize("brk", BREAKS)
def test_a_traceback_quotes_job_data_on_one_line(brk: str) -> None:
    data = "x" + brk + FORGED
    text = TextFormatter().format(_record(_raise_chain(data)))
    # The traceback keeps its own lines: headers, frames, chain messages.
    assert "Traceback (most recent call last):" in text
    assert f'File "{__file__}", line' in text
    assert "The above exception was the direct cause of the following exception:" in text
    assert "During handling of the above exception, another exception occurred:" in text
    assert "\nRuntimeError: x" in text
    # RuntimeError, its two notes, OSError, ValueError.
    _assert_inert(text, 5)


@pytest.mark.parametrize("brk", BREAKS)
def test_an_exception_group_quotes_job_data_on_one_line(brk: str) -> None:
    data = "x" + brk + FORGED
    inner = ExceptionGroup(data, [TypeError(data)])
    inner.add_note(data)
    try:
        raise ExceptionGroup(data, [ValueError(data), inner])
    except ExceptionGroup:
        text = TextFormatter().format(_record(sys.exc_info()))
    assert "Exception Group Traceback (most recent call last):" in text
    assert "+---------------- 2 ----------------" in text
    _assert_inert(text, 5)


@pytest.mark.parametrize("brk", BREAKS)
def test_a_syntax_error_in_job_data_is_quoted_on_one_line(brk: str) -> None:
    data = "x" + brk + FORGED
    try:
        raise SyntaxError(data, (data, 1, 2, data + "\n", 1, 3))
    except SyntaxError:
        text = TextFormatter().format(_record(sys.exc_info()))
    assert "SyntaxError: x" in text
    _assert_inert(text, 3)  # its message, its file name, its text


def test_a_traceback_formatted_by_another_handler_first_is_made_inert() -> None:
    """A plain Formatter on another handler caches the raw traceback on the record
    (``exc_text``); the text format made its own from it."""
    record = _record(_raise_chain("x\n" + FORGED))
    assert ("\n" + FORGED) in logging.Formatter().format(record)
    _assert_inert(TextFormatter().format(record), 5)


def test_stack_info_cannot_start_a_record() -> None:
    """A stack is frame lines, indented; one holding a newline (code compiled under a file
    name from data) cannot put a line at the margin, where it would read as a record."""
    stack = 'Stack (most recent call last):\n  File "x\n' + FORGED + '\x1b[2K", line 1, in f'
    text = TextFormatter().format(_record(stack_info=stack))
    lines = text.split("\n")
    assert lines[1] == "Stack (most recent call last):"
    assert RAW_CONTROL.search(text) is None, text
    assert [line for line in lines[1:] if not line.startswith(" ")] == [lines[1]], text


async def _raises_its_input(ctx: JobContext, input: Any) -> Any:
    raise RuntimeError(input["err"])


async def test_a_handler_raising_its_input_logs_one_line_of_it(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """The trial's handler: ``raise RuntimeError(input["err"])``, its failure logged."""
    caplog.set_level(logging.INFO, logger="jobspine")
    async with memory_runtime({"boom": _raises_its_input}) as rt:
        job = await rt.create_job("boom", "carol", {"err": "x\n" + FORGED + "\r\x1b[31m"})
        await wait_for_state(rt, job.id)
    record = next(r for r in caplog.records if r.exc_info and job.id in r.getMessage())
    record.name = "jobspine.test"
    record.msg, record.args = "job %s failed", ("J1",)
    text = TextFormatter().format(record)
    assert "RuntimeError: x\\n" + FORGED + "\\r\\x1b[31m" in text
    _assert_inert(text, 1)


# --- A client that will not recover says so: events() and its block raise --------------------


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[RunningServer]:
    async with serving(tmp_path / "served.db") as running:
        yield running


async def _follow(client: Client, seen: list[str]) -> None:
    """Iterate the client's events, noting how the iteration ended."""
    try:
        async for _ in client.events():
            seen.append("event")
    except ClientError as exc:
        seen.append(exc.code)
        raise
    seen.append("ended")


async def test_a_server_killed_under_a_client_without_reconnect_raises_from_events(
    tmp_path: Path,
) -> None:
    """The trial: ``open_client(url, token, reconnect=False)``, subscribed to a running
    job, and the server SIGKILLed. Before: ``async for ev in client.events()`` simply ended
    and the block exited normally, as if the job had ended. Now both raise
    ConnectionLostError (close code 1006)."""
    port = free_port()
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "transport._cli", "--log-level", "WARNING", "serve",
         "--db", str(tmp_path / "killed.db"), "--port", str(port),
         "--health-port", str(free_port())],
        env={**os.environ, "JOBSPINE_SECRET": SECRET, "HOME": str(tmp_path)},
    )  # fmt: skip
    try:
        url = f"ws://127.0.0.1:{port}"
        with trio.fail_after(30):
            while True:
                try:
                    async with open_client(url, token("alice"), reconnect=False) as client:
                        break
                except ConnectionLostError:
                    await trio.sleep(0.1)
        seen: list[str] = []
        with trio.fail_after(30), pytest.raises(ConnectionLostError) as lost:
            async with open_client(url, token("alice"), reconnect=False) as client:
                job = await client.create("research", {"query": "q", "depth": 500, "delay": 0.2})
                await client.subscribe(f"job:{job['id']}")
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_follow, client, seen)
                    await eventually(lambda: "event" in seen)
                    process.kill()
        assert lost.value.close_code == 1006
        assert "reconnect is off" in lost.value.message
        assert seen[-1] == "connection_lost"
    finally:
        if process.poll() is None:
            process.kill()
        await process.wait()


async def test_a_dropped_connection_without_reconnect_fails_events_requests_and_block(
    served: RunningServer,
) -> None:
    """Events received before the drop are handed out first; then events() raises, and so do
    a request and the block (with the one error, not an exception group)."""
    received: list[Any] = []
    errors: list[ClientError] = []
    with trio.fail_after(10), pytest.raises(ConnectionLostError) as lost:
        async with open_client(served.url, token("alice"), reconnect=False) as client:
            await client.subscribe("user:alice")
            job = await client.create("sized", {"value": 1})
            await eventually(lambda: client.counters.delivered >= 1)
            ws = client._ws
            assert ws is not None
            await ws._stream.aclose()
            try:
                async for item in client.events():
                    received.append(item)
            except ConnectionLostError as exc:
                errors.append(exc)
            with pytest.raises(ConnectionLostError) as again:
                await client.ping()
            errors.append(again.value)
            await trio.sleep_forever()  # cancelled: the client ended
    assert received and all(isinstance(item, JobEvent) for item in received)
    assert received[0].job_id == job["id"]
    assert lost.value.close_code == 1006
    assert "reconnect is off" in lost.value.message
    assert errors == [lost.value, lost.value]


async def test_leaving_the_block_ends_the_events_without_an_error(
    served: RunningServer,
) -> None:
    """A clean close by the application is no error: a task following the events ends."""
    for reconnect in (False, True):
        seen: list[str] = []
        async with (
            trio.open_nursery() as outer,
            open_client(served.url, token("alice"), reconnect=reconnect) as client,
        ):
            await client.subscribe("user:alice")
            outer.start_soon(_follow, client, seen)
            await trio.sleep(0.1)
        assert seen == ["ended"], reconnect


async def test_a_fatal_close_raises_its_error_from_events_and_the_block(
    served: RunningServer,
) -> None:
    """With reconnect on, a fixed token that expires is a fatal close (4004): events() raises
    ClientError token_expired, the block raises it, alone (not in an exception group).
    Before: the loop over the events ended as if there were no more."""
    seen: list[str] = []
    with trio.fail_after(15), pytest.raises(ClientError) as failed:
        async with open_client(served.url, token("alice", ttl=2)) as client:
            await client.subscribe("user:alice")
            await _follow(client, seen)
            seen.append("after the loop")
    assert failed.value.code == "token_expired"
    assert seen == ["token_expired"]


# --- INPUT (and restart's MODIFICATIONS) from a file or stdin ---------------------------------

#: Over 128 KiB: as a command-line argument, the kernel refused it ('Argument list too long').
BIG = {"value": 1, "notes": ["n" * 1000] * 200, "big": 2**62}


def _parsed(*argv: str) -> Any:
    args = parser().parse_args(list(argv))
    parse_inputs(args)
    return args


def test_input_is_read_from_a_file_or_stdin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "input.json"
    path.write_text(json.dumps(BIG, indent=2))
    assert _parsed("submit", "research", f"@{path}").input == BIG
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(json.dumps(BIG).encode())))
    assert _parsed("submit", "research", "-").input == BIG
    path.write_text('{"input": {"query": "again"}}')
    assert _parsed("restart", "J1", f"@{path}").modifications == {"input": {"query": "again"}}
    # As an argument, as before.
    assert _parsed("submit", "research", '{"query": "q"}').input == {"query": "q"}


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (b'{"a": 1, "a": 2}', "INPUT from {path} must be JSON the server takes as it is"),
        (b"123456789012345678901234567890", "INPUT from {path} must be JSON the server takes"),
        (b'{"query": ', "INPUT from {path} must be JSON: Expecting value"),
        (b'"\xff"'.decode("unicode_escape").encode("latin-1"), "INPUT from {path}: not UTF-8"),
        (None, "INPUT @FILE: cannot read {path}: No such file or directory"),
    ],
)
def test_input_from_a_file_is_parsed_as_strictly_as_an_argument(
    tmp_path: Path, content: bytes | None, says: str
) -> None:
    path = tmp_path / "input.json"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CLIError) as refused:
        _parsed("submit", "research", f"@{path}")
    assert refused.value.code == ExitCode.USAGE
    assert says.format(path=repr(str(path))) in str(refused.value)


async def test_submit_reads_a_big_input_from_stdin_end_to_end(tmp_path: Path) -> None:
    """``jobspine submit sized -`` with 200 KB on stdin, to a server whose max_frame_size
    is raised to take it: the job is stored with that input."""
    async with serving(tmp_path / "big.db", max_frame_size=1024 * 1024) as running:
        done = await trio.run_process(
            [sys.executable, "-m", "transport._cli", "submit", "sized", "-"],
            stdin=json.dumps(BIG).encode(),
            env={
                **os.environ,
                "HOME": str(tmp_path),
                "JOBSPINE_URL": running.url,
                "JOBSPINE_TOKEN": token("alice"),
                "PYTHONPATH": str(Path(__file__).parent.parent),
            },
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        job_id = done.stdout.decode().strip()
        async with open_client(running.url, token("alice")) as client:
            assert await client.get_payload(job_id, "input") == BIG


# --- actors.testing without pytest says what to install ------------------------------------


@pytest.mark.parametrize("missing", ["pytest", "pytest_trio"])
async def test_importing_the_testing_plugin_without_pytest_says_what_to_install(
    missing: str,
) -> None:
    """Before: without pytest, ``import actors.testing`` raised a bare ModuleNotFoundError
    ("No module named 'pytest'"); only a missing pytest-trio was explained."""
    done = await trio.run_process(
        [
            sys.executable,
            "-c",
            f"import sys; sys.modules[{missing!r}] = None; import actors.testing",
        ],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)},
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert done.returncode == 1
    last = done.stderr.decode().strip().splitlines()[-1]
    assert last.startswith(("ModuleNotFoundError: actors.testing", "ImportError: actors.testing"))
    assert "pip install 'jobspine[testing]'" in last
