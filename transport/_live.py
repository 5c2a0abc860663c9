"""The terminal parts of the ``jobspine`` client, drawn with rich: the live watch display
and the ``jobs`` table. rich draws them because redrawing a bar in place (terminal width,
wide characters, log lines interleaved above it) is what it is built for."""

from __future__ import annotations

import logging
import time
from datetime import timedelta
from types import TracebackType
from typing import Any, Literal

from rich.cells import cell_len
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TaskProgressColumn, TextColumn
from rich.table import Column, Table
from rich.text import Text

from actors import JobEvent

from ._display import change_line, final_line, one_line, visible
from ._logging import TextFormatter
from .client import Reset

__all__ = ["LiveView", "rich_jobs_table"]


def rich_jobs_table(rows: list[tuple[str, ...]], columns: tuple[str, ...]) -> None:
    """Job ids, states and times are never shortened; KIND and STEP give way when narrow:
    they share the room the others leave (KIND a third of it when STEP needs the rest), so
    that no job's long kind or step label pushes a column out (left to rich, one step of 90
    characters on a terminal of 120 columns took PROGRESS and RAN off every row)."""
    console = Console()
    natural = [max(cell_len(r[i]) for r in [columns, *rows]) for i in range(len(columns))]
    kind, step = columns.index("KIND"), len(columns) - 1
    fixed = sum(width for i, width in enumerate(natural) if i not in (kind, step))
    room = console.width - fixed - (len(columns) - 1)  # a space between columns
    kind_width = max(4, min(natural[kind], max(room // 3, room - natural[step])))
    step_width = max(4, room - kind_width)
    table = Table(box=None, header_style="bold", pad_edge=False, collapse_padding=True)
    for i, name in enumerate(columns[:-1]):
        justify: Literal["left", "right"] = "right" if name in ("PROGRESS", "RAN") else "left"
        if i == kind:
            table.add_column(name, no_wrap=True, min_width=4, max_width=kind_width)
        else:
            table.add_column(name, no_wrap=True, justify=justify, min_width=natural[i])
    table.add_column(columns[-1], no_wrap=True, overflow="ellipsis", max_width=step_width)
    for row in rows:
        table.add_row(*map(Text, row))  # as written: a step is text, not rich markup
    console.print(table)


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
            # The step label says more than the bar: it gets three times the bar's room.
            TextColumn(
                "{task.fields[step]}",
                markup=False,  # a step label is the handler's text, shown as it is
                table_column=Column(ratio=3, no_wrap=True, overflow="ellipsis"),
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
        # rich writes a record's control characters as they are: the message made inert.
        handler.setFormatter(TextFormatter("%(message)s"))
        root.handlers = [handler]
        self.progress.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.progress.stop()
        logging.getLogger().handlers = self._saved

    def _update(self, **fields: Any) -> None:
        if "step" in fields:
            fields["step"] = one_line(fields["step"])
        self.progress.update(self.task, **fields)

    def _print(self, line: str) -> None:
        self.progress.console.print(visible(line), markup=False, highlight=False, soft_wrap=True)

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
        line = change_line(event, self.job_id)
        fields: dict[str, Any] = {"state": event.state.value}
        if event.type.value == "started":
            fields["since"] = event.at
        if event.type.value == "restarted":
            fields.update(completed=0, step="")
        self._update(**fields)
        if line is not None:
            self._print(line)

    def note(self, text: str) -> None:
        self._print(text)

    def reset(self, reset: Reset) -> None:
        self._print(f"resynchronized ({reset.reason})")
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
        self._print(final_line(job))
