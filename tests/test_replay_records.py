"""Replays send the logged records without parsing them (``Backend.read_records``,
``Broadcaster.replayed``): byte for byte the messages the parsed events would make, on every
backend, and a record of another layout still goes through the parser."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import orjson
import pytest

from actors import Backend, SqliteBackend
from actors._broadcaster import Broadcaster
from actors._codec import converter
from actors._events import EventHub, EventType, JobEvent, StoredEvent
from actors._states import JobState

_DATA: list[dict[str, Any]] = [
    {},
    {"progress": 12.5, "step": "fetching"},
    {"progress": 100.0, "step": None},
    {"step": 'üñíçødé ✓ 🚀 \u2028 "quoted" \\ /', "n": -(2**63), "m": 2**64 - 1},
    {"result": {"nested": [1, 2.5, None, True, {"k": []}]}},
    {"floats": [5e-324, 1e-7, 1e300, 0.1 + 0.2, -0.0]},
    {"control": "\x00\x01\x1f\x7f\n\t"},
    {"big": "x" * 20_000},  # over the inline limit: left out, through the parser
    {"input": {"$omitted": "input", "size": 3}},  # looks like a marker: through the parser
]


def _events(user: str) -> list[JobEvent]:
    return [
        JobEvent(f"job{i % 3}", user, i // 3 + 1, EventType.PROGRESS, JobState.RUNNING, 1.5 + i, d)
        for i, d in enumerate(_DATA)
    ]


async def test_replayed_records_are_the_parsed_events_messages(backend: Backend) -> None:
    broadcaster = Broadcaster(None, EventHub(), None)  # type: ignore[arg-type]
    staged = _events("alice")
    if not backend.assigns_user_seq:
        staged = [converter.structure({**converter.unstructure(e), "user_seq": i + 1}, JobEvent)
                  for i, e in enumerate(staged)]  # fmt: skip
    stored = list(await backend.commit([], staged, (), {}))
    by_user = await backend.read_records("user", "alice", 0, 100)
    assert [(r.job_id, r.seq, r.user_seq) for r in by_user] == [
        (e.job_id, e.seq, e.user_seq) for e in stored
    ]
    for record, event in zip(by_user, stored, strict=True):
        assert record.user_id == "alice"
        assert broadcaster.replayed(record) == broadcaster.encode(event)
    # A job's room: by seq, after the cursor, within the limit.
    job0 = await backend.read_records("job", "job0", 1, 2)
    expected = [e for e in stored if e.job_id == "job0" and e.seq > 1][:2]
    assert [r.seq for r in job0] == [e.seq for e in expected]
    assert [broadcaster.replayed(r) for r in job0] == [broadcaster.encode(e) for e in expected]
    assert await backend.read_records("job", "job0", 99, 10) == []


@pytest.mark.parametrize(
    "record",
    [
        # The converter's keys in another order (an older writer).
        {"user_seq": 1, "job_id": "j", "user_id": "u", "seq": 1, "type": "progress",
         "state": "running", "at": 2.0, "data": {"a": 1}, "actor": None},
        # No user_seq in the record (the column has it).
        {"job_id": "j", "user_id": "u", "seq": 1, "type": "progress", "state": "running",
         "at": 2.0, "data": {"a": 1}, "actor": None},
        # Spaces (not orjson's output).
        {"job_id": "j", "user_id": "u", "seq": 1, "type": "progress", "state": "running",
         "at": 2.0, "data": {"a": 1}, "actor": None, "user_seq": 1, "$pretty": True},
    ],
)  # fmt: skip
async def test_a_record_of_another_layout_goes_through_the_parser(
    tmp_path: Path, record: dict[str, Any]
) -> None:
    pretty = record.pop("$pretty", False)
    text = orjson.dumps(record, option=orjson.OPT_INDENT_2 if pretty else 0).decode()
    backend = SqliteBackend(tmp_path / "jobs.db")
    async with backend.opened():
        with sqlite3.connect(tmp_path / "jobs.db") as db:
            db.execute(
                "INSERT INTO events (job_id, seq, user_id, user_seq, type, record)"
                " VALUES ('j', 1, 'u', 1, 'progress', ?)",
                (text,),
            )
        [stored] = await backend.read_records("job", "j", 0, 10)
    assert stored == StoredEvent("j", "u", 1, 1, text.encode())
    broadcaster = Broadcaster(None, EventHub(), None)  # type: ignore[arg-type]
    event = converter.structure(orjson.loads(text), JobEvent)
    assert event.user_seq == record.get("user_seq", 0)
    assert broadcaster.replayed(stored) == broadcaster.encode(event)
