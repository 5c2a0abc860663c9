"""Log output of the ``jobspine`` command: human text, or one JSON object per line.

The JSON format is a stdlib :class:`logging.Formatter` writing with orjson (already a
dependency), so no logging library is needed. Each line has ``time`` (ISO 8601, UTC),
``level``, ``logger`` and ``message``; lines about a job add ``job_id``, ``user_id``,
``attempt`` and ``event`` (see ``actors._joblog``), so they join with the job's events; a line
with an exception adds ``exception`` (the formatted traceback).

A log line may quote job data (a handler's exception message holds what the handler put
there, often its input): what a terminal would obey or hide in it is escaped (see
:mod:`transport._inert`), in the text format (a line stays one line) and in the JSON format
(as JSON escapes), so a job cannot drive the terminal of the operator reading the log. In
the text format a traceback keeps its own lines, but each part of it that can hold data (the
message of each exception, chained or in a group, its notes, a syntax error's text) is one
line there too: data cannot start a line of its own, one that would read as another record.
"""

from __future__ import annotations

import logging
import sys
import traceback
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import orjson

from actors._joblog import JOB_FIELDS

from ._inert import json_inert, one_line, visible

__all__ = ["LOG_FORMATS", "JsonFormatter", "TextFormatter", "configure_logging"]

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for field in JOB_FIELDS:
            if field in record.__dict__:
                line[field] = record.__dict__[field]
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        elif record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json_inert(orjson.dumps(line, default=str).decode())


def _str_of(value: object, what: str) -> str:
    try:
        return str(value)
    except Exception:  # as the traceback module writes a note or message it cannot convert
        return f"<{what} str() failed>"


def _inert_parts(top: traceback.TracebackException) -> None:
    """Make one line (:func:`one_line`) each part of ``top`` that holds data, in it and in
    every exception it quotes (cause, context, an exception group's members): the message,
    the notes, a syntax error's file name, text and message, each frame's file name and
    function name (code may be compiled under a name taken from data). What stays is the
    traceback's own structure, and source lines read from files, one line each."""
    pending, seen = [top], set()
    while pending:
        part = pending.pop()
        if id(part) in seen:  # never, as the traceback module quotes each exception once
            continue
        seen.add(id(part))
        # _str is the message as format_exception_only writes it (3.11 to 3.14; the tests in
        # test_trial_faults fail if a Python writes it from elsewhere).
        part._str = one_line(part._str)  # type: ignore[attr-defined]
        notes = part.__notes__
        if notes is not None:
            # A note is one line here; the traceback module would split it at its newlines.
            listed = [notes] if isinstance(notes, str) or not isinstance(notes, Sequence) else notes
            part.__notes__ = [one_line(_str_of(note, "note")) for note in listed]
        for field in ("filename", "text", "msg"):  # a SyntaxError's, from whoever raised it
            value = getattr(part, field, None)
            if isinstance(value, str):
                setattr(part, field, one_line(value.rstrip("\n") if field == "text" else value))
        for frame in part.stack:
            frame.filename = one_line(frame.filename)
            frame.name = one_line(frame.name)
        pending.extend(e for e in (part.__cause__, part.__context__) if e is not None)
        pending.extend(part.exceptions or ())


class TextFormatter(logging.Formatter):
    """``fmt`` (:data:`TEXT_FORMAT`), job data made inert: a message is one line, every control
    character escaped (``\\x1b``, ``\\n``); a traceback keeps its lines, each exception's
    message and notes one line (:func:`_inert_parts`), every other control character escaped;
    a stack keeps its frame lines."""

    def __init__(self, fmt: str = TEXT_FORMAT) -> None:
        super().__init__(fmt)

    def format(self, record: logging.LogRecord) -> str:
        # logging.Formatter.format, but the traceback is always formatted here: the one it
        # caches on the record (exc_text) may be another handler's formatter's, raw.
        record.message = record.getMessage()
        if self.usesTime():
            record.asctime = self.formatTime(record, self.datefmt)
        lines = [self.formatMessage(record)]
        if record.exc_info:
            lines.append(self.formatException(record.exc_info))
        elif record.exc_text:
            # Formatted elsewhere (a record sent from another process): its lines cannot be
            # told from data in it, so it is shown as a stack is.
            lines.append(_indented(visible(record.exc_text)))
        if record.stack_info:
            lines.append(self.formatStack(record.stack_info))
        return "\n".join(lines)

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        return one_line(super().formatMessage(record))

    def formatException(self, ei: Any) -> str:  # noqa: N802
        kind, exc, tb = ei
        if exc is None:
            return super().formatException(ei)  # "NoneType: None": no data
        # As logging.Formatter.formatException (traceback.print_exception) writes it.
        top = traceback.TracebackException(kind, exc, tb, compact=True)
        _inert_parts(top)
        return visible("".join(top.format()).removesuffix("\n"))

    def formatStack(self, stack_info: str) -> str:  # noqa: N802
        return _indented(visible(super().formatStack(stack_info)))


def _indented(text: str) -> str:
    """``text`` (a stack: "Stack (most recent call last):", then frame lines, each indented)
    with every line after its first indented: a line there at the margin is not the stack's
    own (a file name holding a newline) and must not read as a record of its own."""
    first, *rest = text.split("\n")
    return "\n".join([first, *(line if line[:1] in ("", " ") else "    " + line for line in rest)])


def configure_logging(level: str, log_format: str = "text") -> None:
    """Send every log record at ``level`` or above to stderr in ``log_format``."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, not {log_format!r}")
    handler = logging.StreamHandler(sys.stderr)
    formatter = JsonFormatter() if log_format == "json" else TextFormatter()
    handler.setFormatter(formatter)
    logging.basicConfig(level=level.upper(), handlers=[handler])
    if level.upper() != "DEBUG":
        # coredis logs every retry of a lost Redis connection at INFO (30 lines a second while
        # Redis is down); the fan-out reports the outage itself, once, with its reason.
        logging.getLogger("coredis").setLevel(logging.WARNING)
