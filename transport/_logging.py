"""Log output of the ``jobspine`` command: human text, or one JSON object per line.

The JSON format is a stdlib :class:`logging.Formatter` writing with orjson (already a
dependency), so no logging library is needed. Each line has ``time`` (ISO 8601, UTC),
``level``, ``logger`` and ``message``; lines about a job add ``job_id``, ``user_id``,
``attempt`` and ``event`` (see ``actors._joblog``), so they join with the job's events; a line
with an exception adds ``exception`` (the formatted traceback).

A log line may quote job data (a handler's exception message holds what the handler put
there, often its input): what a terminal would obey or hide in it is escaped (see
:mod:`transport._inert`), in the text format (a line stays one line) and in the JSON format
(as JSON escapes), so a job cannot drive the terminal of the operator reading the log.
"""

from __future__ import annotations

import logging
import sys
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


class TextFormatter(logging.Formatter):
    """``fmt`` (:data:`TEXT_FORMAT`), job data made inert: a message is one line, every control
    character escaped (``\\x1b``, ``\\n``); a traceback keeps its lines, every other
    control character escaped."""

    def __init__(self, fmt: str = TEXT_FORMAT) -> None:
        super().__init__(fmt)

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        return one_line(super().formatMessage(record))

    def formatException(self, ei: Any) -> str:  # noqa: N802
        return visible(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:  # noqa: N802
        return visible(super().formatStack(stack_info))


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
