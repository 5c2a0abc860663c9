"""One converter, strict: JSON of the wrong type is refused, never coerced."""

from __future__ import annotations

import attrs
import cattrs
import pytest

from actors import JobState
from actors._codec import converter


@attrs.frozen
class Sample:
    name: str
    count: int
    ratio: float
    flag: bool
    state: JobState


GOOD = {"name": "a", "count": 1, "ratio": 2, "flag": True, "state": "paused"}


def test_good_values_structure() -> None:
    assert converter.structure(GOOD, Sample) == Sample("a", 1, 2.0, True, JobState.PAUSED)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("name", 5),
        ("count", "1"),
        ("count", 1.5),
        ("count", True),
        ("ratio", "2"),
        ("flag", 1),
        ("state", "zombie"),
        ("state", 3),
    ],
)
def test_wrong_types_are_refused(field: str, value: object) -> None:
    with pytest.raises(cattrs.BaseValidationError) as info:
        converter.structure({**GOOD, field: value}, Sample)
    assert any(f"$.{field}" in line for line in cattrs.transform_error(info.value))


_EVENT_RECORD = {
    "job_id": "j1",
    "user_id": "alice",
    "seq": 3,
    "type": "progress",
    "state": "running",
    "at": 2.5,
    "data": {"progress": 5.0, "step": "x"},
    "actor": None,
    "user_seq": 7,
}


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"at": 2},
        {"actor": "ops", "data": {}},
        {"data": {"nested": {"a": [1, 2]}}},
    ],
)
def test_job_event_fast_structure_matches_the_generated_hook(changes: dict[str, object]) -> None:
    """The hand-written JobEvent hook builds what cattrs' generated one builds (a copy of
    ``data``), with the same strict types."""
    from actors._events import JobEvent, _structure_event_checked

    record = {**_EVENT_RECORD, **changes}
    event = converter.structure(record, JobEvent)
    assert event == _structure_event_checked(record, JobEvent)
    assert type(event.at) is float and event.data is not record["data"]
    minimal = {k: v for k, v in record.items() if k not in ("data", "actor", "user_seq")}
    assert converter.structure(minimal, JobEvent) == _structure_event_checked(minimal, JobEvent)


@pytest.mark.parametrize(
    "changes",
    [
        {"seq": True},
        {"seq": 3.0},
        {"user_seq": "7"},
        {"at": "2.5"},
        {"at": None},
        {"type": "nope"},
        {"type": 1},
        {"state": "Running"},
        {"actor": 3},
        {"data": [1]},
        {"data": {1: 2}},
        {"job_id": None},
        {"seq": None},
    ],
)
def test_job_event_fast_structure_refuses_as_the_generated_hook(
    changes: dict[str, object],
) -> None:
    from actors._events import JobEvent

    with pytest.raises(cattrs.ClassValidationError):
        converter.structure({**_EVENT_RECORD, **changes}, JobEvent)
    missing = {k: v for k, v in _EVENT_RECORD.items() if k != next(iter(changes))}
    if next(iter(changes)) in ("job_id", "user_id", "seq", "type", "state", "at"):
        with pytest.raises(cattrs.ClassValidationError):
            converter.structure(missing, JobEvent)
    with pytest.raises(cattrs.ClassValidationError):
        converter.structure([1, 2], JobEvent)
