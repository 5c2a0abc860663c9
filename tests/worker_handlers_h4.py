"""A handler for tests/test_attack_workers_h4.py, importable by a ``jobspine worker`` process
(``--handlers tests.worker_handlers_h4``)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import trio

from actors import JobContext


async def threaded(ctx: JobContext, input: Any) -> Any:
    """Sleeps ``seconds`` in a thread (no cancel stops it) while ``dir/<job id>`` marks the job
    as running; an attempt finding the mark of another still running leaves ``dir/overlap``."""
    mark = Path(input["dir"]) / ctx.job_id

    def work() -> None:
        try:
            os.close(os.open(mark, os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            (Path(input["dir"]) / "overlap").write_text(f"attempt {ctx.attempt}")
            return
        time.sleep(input["seconds"])
        mark.unlink()

    with ctx.keep_alive():
        await trio.to_thread.run_sync(work)
    return {"attempt": ctx.attempt}


HANDLERS = {"threaded": threaded}
