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
