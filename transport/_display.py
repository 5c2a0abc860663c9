"""What the ``jobspine`` client commands show: the live watch display, tables, JSON.

Three views of a watched job, chosen by the command: :class:`LiveView` (a terminal: a rich
progress bar sized to the terminal, log lines and state changes printed above it),
:class:`PlainView` (a pipe: one line per state or step change) and :class:`JsonView`
(``--json``: one JSON line per event). rich draws the terminal parts because redrawing a bar
correctly (terminal width, wide characters, log lines interleaved) is what it is built for.
"""

from __future__ import annotations

import logging
import sys
import time
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any, Literal, Protocol, TextIO

import orjson
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TaskProgressColumn, TextColumn
from rich.table import Column, Table
from rich.text import Text

from actors import JobEvent
from actors._codec import converter

from .client import Reset

__all__ = [
    "JsonView",
    "LiveView",
    "PlainView",
    "WatchView",
    "describe_job",
    "format_duration",
    "jobs_table",
    "write",
    "write_json",
]


class StdoutClosedError(Exception):
    """The reader of stdout went away (a closed pipe)."""


def write(text: str, stream: TextIO | None = None) -> None:
    """Write to stdout (flushed); a closed pipe becomes :class:`StdoutClosedError`, which
    ``main`` turns into a quiet exit, so it is never mistaken for a socket's error."""
    try:
        out = stream or sys.stdout
        out.write(text)
        out.flush()
    except BrokenPipeError:
        raise StdoutClosedError from None


def _dumps(value: Any, indent: bool = False) -> str:
    option = orjson.OPT_INDENT_2 if indent else 0
    return orjson.dumps(value, option=option | orjson.OPT_NON_STR_KEYS).decode()


def write_json(value: Any, *, lines: bool = False) -> None:
    """One JSON document (indented), or one compact line of a JSON-lines stream."""
    write(_dumps(value, indent=not lines) + "\n")


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    hours, rest = divmod(round(seconds), 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _local_time(at: float | None, compact: bool = False) -> str:
    if at is None:
        return "-"
    return datetime.fromtimestamp(at).strftime("%m-%d %H:%M:%S" if compact else "%Y-%m-%d %H:%M:%S")


def _ran(job: dict[str, Any], now: float) -> float | None:
    """Running time of a job record (see ``actors._recovery.running_seconds``)."""
    ran = float(job.get("run_seconds") or 0.0)
    if job.get("run_started_at") is not None:
        ran += max(0.0, now - job["run_started_at"])
    return ran if ran or job.get("started_at") else None


_COLUMNS = ("ID", "KIND", "STATE", "PROGRESS", "CREATED", "RAN", "STEP")


def _row(job: dict[str, Any], now: float, compact: bool = False) -> tuple[str, ...]:
    return (
        job["id"],
        job["kind"],
        job["state"],
        f"{job['progress']:5.1f}%",
        _local_time(job["created_at"], compact),
        format_duration(_ran(job, now)),
        job.get("step") or "",
    )


def jobs_table(jobs: list[dict[str, Any]], *, terminal: bool) -> None:
    """The ``jobs`` listing: a rich table on a terminal (ids never shortened; the step label
    takes what width is left), aligned plain columns in a pipe."""
    now = time.time()
    if terminal:
        table = Table(box=None, header_style="bold", pad_edge=False, collapse_padding=True)
        rows = [_row(job, now, compact=True) for job in jobs]
        for i, name in enumerate(_COLUMNS[:-1]):
            justify: Literal["left", "right"] = "right" if name in ("PROGRESS", "RAN") else "left"
            # Every column but KIND keeps its full width; KIND and STEP give way when narrow.
            width = max(len(r[i]) for r in [_COLUMNS, *rows]) if name != "KIND" else 4
            table.add_column(name, no_wrap=True, justify=justify, min_width=width)
        table.add_column("STEP", no_wrap=True, overflow="ellipsis", ratio=1)
        for row in rows:
            table.add_row(*row)
        Console().print(table)
        return
    rows = [_row(job, now) for job in jobs]
    widths = [max(len(r[i]) for r in [_COLUMNS, *rows]) for i in range(len(_COLUMNS) - 1)]
    for row in [_COLUMNS, *rows]:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        write("  ".join([*cells, row[-1]]).rstrip() + "\n")


def describe_job(job: dict[str, Any]) -> str:
    """One line for a job an action returned: ``ID state (attempt N) progress step``."""
    parts = [job["id"], job["state"], f"attempt {job['attempt']}", f"{job['progress']:.1f}%"]
    if job.get("step"):
        parts.append(job["step"])
    return "  ".join(parts)


# -- watching a job ------------------------------------------------------------------------------


class WatchView(Protocol):
    """How a watched job is shown; a context manager around the whole watch."""

    def __enter__(self) -> WatchView: ...

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...

    def start(self, job: dict[str, Any]) -> None: ...

    def event(self, event: JobEvent) -> None: ...

    def reset(self, reset: Reset) -> None: ...

    def finish(self, job: dict[str, Any]) -> None: ...


def _change_line(event: JobEvent, job_id: str) -> str | None:
    """The line a state change prints (progress and checkpoints are not state changes)."""
    data = event.data
    match event.type.value:
        case "paused" | "recovery":
            reason = data.get("reason", "")
            return f"paused ({reason}); resume with: jobspine resume {job_id}"
        case "started" | "resumed":
            return f"{event.type.value} (attempt {data.get('attempt', '-')})"
        case "restarted" | "created" | "cancelled" | "deleted":
            return event.type.value
    return None


def final_line(job: dict[str, Any]) -> str:
    if job["state"] == "completed":
        return "completed: " + _dumps(job["result"])
    if job["state"] == "failed":
        error = job.get("error") or {}
        return f"failed: {error.get('type')}: {error.get('message')}"
    return str(job["state"])


class PlainView:
    """For pipes and logs: one line per state change and per step label."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        self.step: str | None = None

    def __enter__(self) -> PlainView:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        return None

    def start(self, job: dict[str, Any]) -> None:
        write(f"{job['id']} {job['state']} {job['progress']:.1f}%\n")

    def event(self, event: JobEvent) -> None:
        if event.type.value == "progress":
            if event.data["step"] != self.step:
                self.step = event.data["step"]
                write(f"{event.data['progress']:5.1f}%  {self.step or ''}\n")
            return
        line = _change_line(event, self.job_id)
        if line is not None:
            write(line + "\n")

    def reset(self, reset: Reset) -> None:
        write(f"resynchronized ({reset.reason})\n")

    def finish(self, job: dict[str, Any]) -> None:
        write(final_line(job) + "\n")


class JsonView:
    """``--json``: every event as one JSON line (``type`` is the event type); a resync as
    ``{"type": "reset", "room", "reason", "snapshot"}``."""

    def __enter__(self) -> JsonView:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        return None

    def start(self, job: dict[str, Any]) -> None:
        return None

    def event(self, event: JobEvent) -> None:
        write_json(converter.unstructure(event), lines=True)

    def reset(self, reset: Reset) -> None:
        write_json(
            {
                "type": "reset",
                "room": reset.room,
                "reason": reset.reason,
                "snapshot": reset.snapshot,
            },
            lines=True,
        )

    def finish(self, job: dict[str, Any]) -> None:
        return None


class _JobElapsed(ProgressColumn):
    """Time since the job first started (ticking while it runs; frozen at its end)."""

    def render(self, task: Task) -> Text:
        since, until = task.fields.get("since"), task.fields.get("until")
        if since is None:
            return Text("-:--:--", style="progress.elapsed")
        seconds = max(0.0, (until or time.time()) - since)
        return Text(str(timedelta(seconds=int(seconds))), style="progress.elapsed")


class LiveView:
    """A terminal: state, bar, percentage, elapsed time and step label on one line sized to the
    terminal; log records and state changes are printed above it; the last frame shows the
    final state."""

    def __init__(self, job_id: str, console: Console | None = None) -> None:
        self.job_id = job_id
        self.console = console or Console()
        self.progress = Progress(
            TextColumn("{task.fields[state]}", table_column=Column(no_wrap=True, min_width=9)),
            BarColumn(bar_width=None, table_column=Column(ratio=1)),
            TaskProgressColumn(),
            _JobElapsed(),
            TextColumn(
                "{task.fields[step]}",
                table_column=Column(ratio=1, no_wrap=True, overflow="ellipsis"),
            ),
            console=self.console,
            expand=True,
        )
        self.task = self.progress.add_task("", total=100, state="…", step="", since=None)
        self._saved: list[logging.Handler] = []

    def __enter__(self) -> LiveView:
        root = logging.getLogger()
        self._saved = root.handlers[:]
        handler = RichHandler(console=self.console, show_path=False, markup=False)
        root.handlers = [handler]
        self.progress.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.progress.stop()
        logging.getLogger().handlers = self._saved

    def _update(self, **fields: Any) -> None:
        self.progress.update(self.task, **fields)

    def start(self, job: dict[str, Any]) -> None:
        self._update(
            completed=job["progress"], state=job["state"], step=job.get("step") or "",
            since=job.get("started_at"),
        )  # fmt: skip

    def event(self, event: JobEvent) -> None:
        if event.type.value == "progress":
            self._update(
                completed=event.data["progress"], step=event.data["step"] or "",
                state=event.state.value,
            )  # fmt: skip
            return
        line = _change_line(event, self.job_id)
        fields: dict[str, Any] = {"state": event.state.value}
        if event.type.value == "started":
            fields["since"] = event.at
        if event.type.value == "restarted":
            fields.update(completed=0, step="")
        self._update(**fields)
        if line is not None:
            self.progress.console.print(line, markup=False, highlight=False, soft_wrap=True)

    def reset(self, reset: Reset) -> None:
        self.progress.console.print(
            f"resynchronized ({reset.reason})", markup=False, soft_wrap=True
        )
        job = (reset.snapshot or {}).get("job")
        if job is not None:
            self.start(job)

    def finish(self, job: dict[str, Any]) -> None:
        until = job.get("completed_at") or job.get("failed_at") or job.get("updated_at")
        self._update(
            completed=job["progress"], state=job["state"], step=job.get("step") or "",
            until=until,
        )  # fmt: skip
        self.progress.refresh()
        self.progress.stop()
        self.progress.console.print(final_line(job), markup=False, highlight=False, soft_wrap=True)
