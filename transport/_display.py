"""What the ``jobspine`` client commands show: tables, JSON, watched jobs.

Three views of a watched job, chosen by the command: ``transport._live.LiveView`` (a
terminal), :class:`PlainView` (a pipe: one line per state or step change) and
:class:`JsonView` (``--json``: one JSON line per event). Only the terminal parts import rich
(``transport._live``), so that ``jobspine serve`` starts without it.
"""

from __future__ import annotations

import sys
import time
from datetime import datetime
from types import TracebackType
from typing import Any, Protocol, TextIO

import orjson

from actors import JobEvent, JobState
from actors._codec import converter

from ._inert import json_inert, one_line, visible
from .client import Reset

__all__ = [
    "JsonView",
    "PlainView",
    "StdoutClosedError",
    "change_line",
    "WatchView",
    "describe_job",
    "final_line",
    "format_duration",
    "jobs_table",
    "stats_text",
    "write",
    "one_line",
    "visible",
    "write_json",
]


class StdoutClosedError(Exception):
    """The reader of stdout went away (a closed pipe)."""


def write(text: str, stream: TextIO | None = None) -> None:
    """Write to stdout (flushed), every control character but newline and tab escaped, and
    every character that reorders or hides text (:func:`~transport._inert.visible`); a
    closed pipe becomes :class:`StdoutClosedError`, which ``main`` turns into a quiet exit,
    so it is never mistaken for a socket's error."""
    try:
        out = stream or sys.stdout
        out.write(visible(text))
        out.flush()
    except BrokenPipeError:
        raise StdoutClosedError from None


def _dumps(value: Any, indent: bool = False) -> str:
    option = orjson.OPT_INDENT_2 if indent else 0
    return orjson.dumps(value, option=option | orjson.OPT_NON_STR_KEYS).decode()


def write_json(value: Any, *, lines: bool = False) -> None:
    """One JSON document (indented), or one compact line of a JSON-lines stream; what a
    terminal would obey or hide in a string is a JSON escape (:func:`json_inert`)."""
    write(json_inert(_dumps(value, indent=not lines)) + "\n")


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


def _state(job: dict[str, Any], now: float) -> str:
    """The job's state; a waiting job whose ``run_at`` is still ahead (a delay, a retry's
    backoff) is ``scheduled`` with the time left, so that it is not read as ready."""
    run_at = job.get("run_at")
    if job["state"] == JobState.CREATED.value and isinstance(run_at, int | float) and run_at > now:
        return f"scheduled {format_duration(run_at - now)}"
    return str(job["state"])


def _row(job: dict[str, Any], now: float, compact: bool = False) -> tuple[str, ...]:
    return (
        job["id"],
        one_line(job["kind"]),
        _state(job, now),
        f"{job['progress']:5.1f}%",
        _local_time(job["created_at"], compact),
        format_duration(_ran(job, now)),
        one_line(job.get("step") or ""),
    )


def jobs_table(jobs: list[dict[str, Any]], *, terminal: bool) -> None:
    """The ``jobs`` listing: a rich table on a terminal (:func:`transport._live.rich_jobs_table`),
    aligned plain columns in a pipe."""
    now = time.time()
    if terminal:
        from ._live import rich_jobs_table  # rich is imported only where it draws

        rich_jobs_table([_row(job, now, compact=True) for job in jobs], _COLUMNS)
        return
    rows = [_row(job, now) for job in jobs]
    widths = [max(len(r[i]) for r in [_COLUMNS, *rows]) for i in range(len(_COLUMNS) - 1)]
    for row in [_COLUMNS, *rows]:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        write("  ".join([*cells, row[-1]]).rstrip() + "\n")


def stats_text(counts: dict[str, Any], queue: dict[str, Any]) -> None:
    """``jobspine stats``: jobs per state, then the queue (waiting ready and scheduled,
    running; waiting per kind, and per user for an admin's view of everyone: the users the
    server names, and how many more it left out)."""
    states = {key: value for key, value in counts.items() if isinstance(value, int)}
    width = max(len(key) for key in states)
    for key, value in states.items():
        write(f"{key:<{width}}  {value:>9,}\n")
    write(
        f"\nqueue: {queue['waiting']:,} waiting ({queue['ready']:,} ready,"
        f" {queue['scheduled']:,} scheduled), {queue['running']:,} running\n"
    )
    for what in ("kind", "user"):
        waiting = queue[f"waiting_by_{what}"]
        if waiting and (what == "kind" or len(waiting) > 1):
            shown = ", ".join(f"{name} {n:,}" for name, n in sorted(waiting.items()))
            # The server names the users with the most waiting jobs (at most 100).
            more = queue.get("waiting_users", 0) - len(waiting) if what == "user" else 0
            if more > 0:
                shown += f"; and {more:,} more users with fewer"
            write(f"waiting by {what}: {shown}\n")


def describe_job(job: dict[str, Any]) -> str:
    """One line for a job an action returned: ``ID state (attempt N) progress step``."""
    parts = [job["id"], job["state"], f"attempt {job['attempt']}", f"{job['progress']:.1f}%"]
    if job.get("step"):
        parts.append(one_line(job["step"]))
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

    def note(self, text: str) -> None:
        """A change of the connection (not of the job), e.g. "reconnected"."""
        ...

    def finish(self, job: dict[str, Any]) -> None: ...


def change_line(event: JobEvent, job_id: str) -> str | None:
    """The line a state change prints (progress and checkpoints are not state changes)."""
    data = event.data
    match event.type.value:
        case "paused" | "recovery":
            reason = one_line(data.get("reason", ""))
            # What a recovery did is the state it left the job in: a job handed back to the
            # queue (a worker's shutdown, a stall of a kind with requeue_stalled) is not
            # paused, and resuming it is refused.
            if event.state is JobState.CREATED:
                return f"back in the queue ({reason}): it runs again when a worker is free"
            if event.state is JobState.FAILED:
                return f"failed ({reason})"
            # The command on a line of its own: a long reason must not wrap it mid-id.
            if reason == "shutdown":  # what a server's stop paused, a server's start resumes
                return (
                    f"paused ({reason})\n  resumed when a server starts again"
                    f" (or: jobspine resume {job_id})"
                )
            return f"paused ({reason})\n  resume with: jobspine resume {job_id}"
        case "started":
            # A claim that resumes from a checkpoint (after a resume, retry or re-queue).
            verb = "started" if data.get("resumed_from_checkpoint") is None else "resumed"
            return f"{verb} (attempt {data.get('attempt', '-')})"
        case "resumed":
            return "resumed (queued to run again)"
        case "retrying":
            error = data.get("error") or {}
            return (
                f"retrying in {data.get('delay', 0):.1f} s: attempt failed"
                f" ({data.get('failed_attempts')} of {data.get('max_attempts')}):"
                f" {one_line(error.get('type'))}: {one_line(error.get('message'))}"
            )
        case "created" | "restarted" if isinstance(data.get("run_at"), int | float):
            # Delayed: say when it is due (in this machine's local time).
            due = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(data["run_at"]))
            return f"{event.type.value}: waits until {due}"
        case "restarted" | "created" | "cancelled" | "deleted":
            return event.type.value
    return None


def final_line(job: dict[str, Any]) -> str:
    if job["state"] == "completed":
        return "completed: " + _dumps(job["result"])
    if job["state"] == "failed":
        error = job.get("error") or {}
        return f"failed: {one_line(error.get('type'))}: {one_line(error.get('message'))}"
    return str(job["state"])


class PlainView:
    """For pipes and logs: one line per state change and per step label."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        self.step: str | None = None
        self.last: str | None = None

    def _line(self, line: str) -> None:
        self.last = line
        write(line + "\n")

    def __enter__(self) -> PlainView:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        return None

    def start(self, job: dict[str, Any]) -> None:
        # The job as it is now; its events follow from the first, so "created" may come after.
        write(
            f"{job['id']} ({job['kind']}) is {job['state']}, {job['progress']:.1f}%; its events:\n"
        )

    def event(self, event: JobEvent) -> None:
        if event.type.value == "progress":
            if event.data["step"] != self.step:
                self.step = event.data["step"]
                write(f"{event.data['progress']:5.1f}%  {one_line(self.step or '')}\n")
            return
        line = change_line(event, self.job_id)
        if line is not None:
            self._line(line)

    def reset(self, reset: Reset) -> None:
        self._line(f"resynchronized ({reset.reason})")

    def note(self, text: str) -> None:
        self._line(text)

    def finish(self, job: dict[str, Any]) -> None:
        line = final_line(job)
        if not (self.last and self.last.startswith(line)):  # said already ("cancelled")
            self._line(line)


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

    def note(self, text: str) -> None:
        return None

    def finish(self, job: dict[str, Any]) -> None:
        return None
