"""Job-related log records carry job fields; the JSON formatter writes one object per line."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

import pytest
import trio

from actors import JobContext
from actors._joblog import JOB_FIELDS
from transport._logging import JsonFormatter

from .conftest import memory_runtime, wait_for_state


async def hang(ctx: JobContext, input: Any) -> Any:
    if input.get("checkpoint"):
        await ctx.checkpoint({"at": 1})
    await trio.sleep_forever()


def job_records(caplog: pytest.LogCaptureFixture, job_id: str) -> list[logging.LogRecord]:
    return [record for record in caplog.records if job_id in record.getMessage()]


@pytest.mark.parametrize(("checkpoint", "event"), [(True, "recovery"), (False, "failed")])
async def test_a_stall_is_logged_with_the_job_fields(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture, checkpoint: bool, event: str
) -> None:
    caplog.set_level(logging.INFO, logger="jobspine")
    async with memory_runtime({"hang": hang}, heartbeat_timeout=5) as rt:
        job = await rt.create_job("hang", "carol", {"checkpoint": checkpoint})
        await wait_for_state(rt, job.id, {job.state.PAUSED, job.state.FAILED})
    (record,) = job_records(caplog, job.id)
    assert "stalled" in record.getMessage()
    fields = {field: getattr(record, field) for field in JOB_FIELDS}
    assert fields == {"job_id": job.id, "user_id": "carol", "attempt": 1, "event": event}


def test_json_formatter_writes_one_object_per_line() -> None:
    logger = logging.getLogger("jobspine.test")
    record = logger.makeRecord(
        logger.name,
        logging.WARNING,
        __file__,
        1,
        "job %s said %r",
        ("J1", "two\nlines"),
        None,
        extra={"job_id": "J1", "user_id": "u", "attempt": 2, "event": "failed"},
    )
    line = JsonFormatter().format(record)
    assert "\n" not in line
    assert json.loads(line) == {
        "time": json.loads(line)["time"],
        "level": "WARNING",
        "logger": "jobspine.test",
        "message": "job J1 said 'two\\nlines'",
        "job_id": "J1",
        "user_id": "u",
        "attempt": 2,
        "event": "failed",
    }
    assert json.loads(line)["time"].endswith("+00:00")
    try:
        raise ValueError("with a traceback")
    except ValueError:
        failed = logger.makeRecord(
            logger.name, logging.ERROR, __file__, 1, "oops", (), sys.exc_info()
        )
    parsed = json.loads(JsonFormatter().format(failed))
    assert "job_id" not in parsed
    assert "ValueError: with a traceback" in parsed["exception"]
