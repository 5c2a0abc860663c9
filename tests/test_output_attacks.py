"""Hostile job data on the operator's output: the ``jobspine`` command's stdout and stderr
(text and ``--json``) and the server's log. A step label, error, result, checkpoint or user id
may hold terminal escapes, bidirectional overrides, invisible characters and C1 controls:
they are shown escaped (never obeyed), ``--json`` stays JSON, and an encoding that cannot
hold a character does not stop a command."""

from __future__ import annotations

import io
import logging
import re
from pathlib import Path
from typing import Any

import orjson
import pytest
from rich.console import Console

from transport._display import jobs_table, stats_text, write_json
from transport._live import LiveView
from transport._logging import configure_logging

from .test_cli import Served, serve_process

HANDLERS = ("--handlers", "tests.output_handlers:HANDLERS")

#: What a terminal obeys or hides: an OSC 8 hyperlink, a colour, a cleared screen, a title, a
#: carriage return, a backspace, a right-to-left override, a zero-width space, the C1 NEL and
#: CSI (``\x9b31m`` is red on a terminal that reads C1), DEL and the line separator.
HOSTILE = (
    "A\x1b]8;;http://evil.example\x1b\\click\x1b]8;;\x1b\\ \x1b[31mRED\x1b[2J\x1b]0;title\x07"
    "\rover\x08 \u202eRTL\u202c zero\u200bwidth \x85nel \x9b31mcsi \x7fdel \u2028ls"
    " caf\u00e9 \U0001f600"
)
#: None of these may reach the output as they are.
RAW = ["\x1b", "\x07", "\r", "\x08", "\u202e", "\u202c", "\u200b", "\x85", "\x9b", "\x7f", "\u2028"]


def _inert(text: str) -> None:
    found = [char for char in RAW if char in text]
    assert not found, (found, text[:2000])


def test_json_output_of_c1_controls_and_bidi_is_json_and_inert(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``--json`` of a job whose step held a C1 control (``\\x85``, ``\\x9b``) or DEL was not
    JSON: the terminal escaping turned them into ``\\x85``, an invalid JSON escape, so
    ``jobspine get --json ID | jq`` failed; a right-to-left override was written as it is.
    Now each is a JSON escape (``\\u009b``), read back as the same text."""
    value = {"step": HOSTILE, "tags": ["\u202etag"], "\x9bkey": 1}
    write_json(value)
    write_json(value, lines=True)
    out = capsys.readouterr().out
    _inert(out)
    indented, _, line = out.rstrip("\n").rpartition("\n}\n")
    assert orjson.loads(indented + "\n}") == value
    assert orjson.loads(line) == value
    assert "\\u009b31mcsi" in line and "\\u202eRTL" in line


def waiting(jobs: int, by_user: dict[str, int]) -> dict[str, Any]:
    """A queue's stats as the server sends them: ``jobs`` waiting, all ready, of kind k."""
    return {
        "waiting": jobs,
        "ready": jobs,
        "scheduled": 0,
        "running": 0,
        "waiting_by_kind": {"k": jobs},
        "waiting_by_user": by_user,
    }


def test_a_bidi_override_in_a_user_id_cannot_reorder_another_users_count(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A user id may hold U+202E (only control characters are refused): ``stats --all``
    wrote it as it is, and a terminal that reorders text showed the rest of the line (the
    next user's name and count) right to left. The ``jobs`` table's step did the same, and a
    zero-width space hid in it. Now they are escaped (``\\u202e``, ``\\u200b``)."""
    counts = {"created": 3, "running": 0}
    queue = waiting(3, {"a\u202emallory": 1, "zed": 2})
    stats_text(counts, queue)
    job = {"id": "j1", "kind": "k", "state": "running", "progress": 1.0, "created_at": 0.0}
    jobs_table([{**job, "step": "a\u202eb\u200bc\u2028d"}], terminal=False)
    out = capsys.readouterr().out
    _inert(out)
    assert "waiting by user: a\\u202emallory 1, zed 2" in out
    assert out.rstrip("\n").endswith("a\\u202eb\\u200bc\\u2028d")


def _formatter(log_format: str) -> logging.Formatter:
    """The formatter of the handler ``configure_logging`` gives the root logger (the
    server's, a worker's and a client command's stderr)."""
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    root.handlers = []
    try:
        configure_logging("INFO", log_format)
        formatter = root.handlers[0].formatter
    finally:
        root.handlers, root.level = saved, level
    assert formatter is not None
    return formatter


def _record(message: str, *args: object, exc: Exception | None = None) -> logging.LogRecord:
    exc_info = (type(exc), exc, exc.__traceback__) if exc is not None else None
    return logging.LogRecord("jobspine.worker", logging.INFO, __file__, 1, message, args, exc_info)


def test_a_handlers_exception_cannot_drive_the_operators_terminal() -> None:
    """The server's log (``jobspine serve``'s stderr, the operator's terminal) printed a
    handler's exception message as it was: a job whose input reached the message cleared
    the operator's screen, set its title, planted a hyperlink, and a newline in a message
    forged a log line. Now the text format escapes them (a message stays one line, a
    traceback keeps its own lines), and the JSON format writes them as JSON escapes."""
    try:
        raise RuntimeError(HOSTILE + "\n2026-01-01 00:00:00,000 INFO jobspine: forged")
    except RuntimeError as caught:
        exc = caught
    record = _record("job %s attempt 1 raised %s", "j1", f"RuntimeError: {HOSTILE}\nforged")
    text = _formatter("text").format(record)
    _inert(text)
    assert "\n" not in text and "\\nforged" in text and "\\x1b]8;;http" in text
    with_traceback = _formatter("text").format(_record("job %s raised", "j1", exc=exc))
    _inert(with_traceback)
    assert with_traceback.splitlines()[1] == "Traceback (most recent call last):"
    assert "RuntimeError: A\\x1b]8;;" in with_traceback
    line = _formatter("json").format(_record("raised %s", HOSTILE, exc=exc))
    _inert(line)
    assert orjson.loads(line)["message"] == f"raised {HOSTILE}"
    assert HOSTILE in orjson.loads(line)["exception"]


async def _failed_job(served: Served) -> str:
    submitted = await served.cli("submit", "hostile", orjson.dumps({"text": HOSTILE}).decode())
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    failing = orjson.dumps({"text": HOSTILE, "fail": True}).decode()
    failed = await served.cli("submit", "hostile", failing, "--watch", "--json")
    assert failed.returncode == 1, failed.stderr
    _inert(failed.stdout)
    events = [orjson.loads(line) for line in failed.stdout.splitlines()]
    assert events[-1]["data"]["error"]["message"] == HOSTILE
    watched = await served.cli("watch", job_id)
    assert watched.returncode == 0, watched.stderr
    _inert(watched.stdout)
    assert "\\x1b]8;;http://evil.example" in watched.stdout
    return str(events[-1]["job_id"])


async def test_hostile_job_data_end_to_end(tmp_path: Path) -> None:
    """Through a real server and the ``jobspine`` command: ``get --json`` of a job whose
    step and error held C1 controls was not JSON; ``get`` and ``watch`` wrote its right-to-left
    override and zero-width space as they were; the server's log wrote the handler's error
    with its escapes; an input check's message quoting the input reached stderr with its
    escapes; and with a stdout that cannot encode ``é`` (``PYTHONIOENCODING=ascii``) ``get``
    stopped with a ``UnicodeEncodeError`` traceback. Now every output is inert and whole."""
    async with serve_process(tmp_path / "data", extra=HANDLERS) as served:
        job_id = await _failed_job(served)
        shown = await served.cli("get", job_id)
        assert shown.returncode == 0, shown.stderr
        _inert(shown.stdout)
        assert "\\u202eRTL" in shown.stdout and "\U0001f600" in shown.stdout
        as_json = await served.cli("get", job_id, "--json")
        _inert(as_json.stdout)
        job = orjson.loads(as_json.stdout)
        assert job["step"] == HOSTILE and job["error"]["message"] == HOSTILE
        listed = await served.cli("jobs", "--json")
        _inert(listed.stdout)
        assert {job["step"] for job in orjson.loads(listed.stdout)} == {HOSTILE}
        table = await served.cli("jobs")
        _inert(table.stdout)
        assert len(table.stdout.splitlines()) == 3  # the header and one row per job

        refused = await served.cli("submit", "picky", orjson.dumps({"symbol": HOSTILE}).decode())
        assert refused.returncode == 2
        _inert(refused.stderr)
        assert "unknown symbol A\\x1b]8;;http://evil.example" in refused.stderr

        ascii_only = await served.cli("get", job_id, env={"PYTHONIOENCODING": "ascii"})
        assert ascii_only.returncode == 0, ascii_only.stderr
        assert "Traceback" not in ascii_only.stderr
        assert "caf\\xe9 \\U0001f600" in ascii_only.stdout
    log = (tmp_path / "data" / "serve.log").read_text()
    assert "RuntimeError: A\\x1b]8;;http://evil.example" in log
    _inert(log)


@pytest.mark.parametrize("long", ["step", "kind"])
def test_a_long_step_or_kind_keeps_every_column_of_the_jobs_table(
    long: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a terminal, one job whose step label was 90 characters long (a step may hold
    16,384) took the PROGRESS and RAN columns off every row of ``jobspine jobs`` at 120
    columns, and one of 3,000 characters STATE too: another user's (or job's) text hid the
    state of every job. Now KIND and STEP share the room the other columns leave, and are
    cut with an ellipsis."""
    monkeypatch.setenv("COLUMNS", "120")
    job = {"kind": "k", "state": "running", "progress": 50.0, "created_at": 0.0}
    jobs = [
        {**job, "id": "01M8RSDEV43CTM4CGEAG94Y8N4", long: "x" * 3000, "run_seconds": 5.0},
        {**job, "id": "01M8RSDC489D676N6SCA0GAWNW", "step": "short", "state": "paused"},
    ]
    jobs_table(jobs, terminal=True)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["ID", "KIND", "STATE", "PROGRESS", "CREATED", "RAN", "STEP"]
    assert all(len(line) <= 120 for line in lines), lines
    cells = lines[1].split()
    assert cells[1].endswith("…") if long == "kind" else lines[1].endswith("…")
    assert cells[2:4] == ["running", "50.0%"] and cells[6] == "5s"
    assert lines[2].split()[2:4] == ["paused", "50.0%"]


def test_stats_all_says_how_many_users_it_left_out(capsys: pytest.CaptureFixture[str]) -> None:
    """The server names at most the 100 users with the most waiting jobs (``waiting_users``
    counts them all): ``jobspine stats --all`` listed those 100 as if they were everyone, so
    with 3,000 users waiting an operator saw 100 and no sign of the rest. Now the line says
    how many more there are."""
    users = {f"user{i:03d}": 2 for i in range(100)}
    queue = {**waiting(3100, users), "waiting_users": 3000}
    stats_text({"created": 3100}, queue)
    line = capsys.readouterr().out.splitlines()[-1]
    assert line.startswith("waiting by user: user000 2, user001 2,")
    assert line.endswith("user099 2; and 2,900 more users with fewer")


def test_a_log_record_during_a_live_watch_cannot_drive_the_terminal() -> None:
    """While ``jobspine watch`` draws on a terminal, log records go through rich's handler,
    which wrote their control characters as they were (an OSC title, a bell, a right-to-left
    override): the text formatter's escaping did not apply there. Now it does."""
    console = Console(file=io.StringIO(), force_terminal=True, width=200)
    with LiveView("j1", console=console):
        logging.getLogger("jobspine.client").warning("refused (%s)", HOSTILE)
    drawn = console.file.getvalue()  # type: ignore[attr-defined]
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", drawn)  # rich's own styles and cursor
    (line,) = [line for line in text.split("\r") if "refused (" in line]
    assert "refused (A\\x1b]8;;http://evil.example" in line
    _inert(line)
