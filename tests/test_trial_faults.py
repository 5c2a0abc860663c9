"""Faults a new user's trial found: each test failed before its fix."""

from __future__ import annotations

import logging
import re
import sys
from typing import Any

import pytest
import trio

from actors import JobContext
from transport._logging import TextFormatter

from .conftest import memory_runtime, wait_for_state

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
