"""A caller's mistakes are :class:`InvalidInputError` naming the argument, as the protocol's
are ``invalid_input`` naming the field: a retry policy's booleans and intervals past a year
(a create's delay bound)."""

from __future__ import annotations

import math
from typing import Any

import pytest

from actors import InvalidInputError, RetryPolicy
from actors._options import options_from_wire

YEAR = 365 * 86_400


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("initial_interval", True),
        ("initial_interval", 0),
        ("initial_interval", math.nan),
        ("initial_interval", math.inf),
        ("initial_interval", "1"),
        ("initial_interval", YEAR + 1),
        ("initial_interval", 1e12),
        ("maximum_interval", True),
        ("maximum_interval", YEAR * 2),
        ("backoff_coefficient", True),
        ("backoff_coefficient", 0.5),
        ("jitter", False),
        ("jitter", 1.0),
    ],
)
def test_a_retry_policy_is_refused_naming_the_field(field: str, value: Any) -> None:
    with pytest.raises(InvalidInputError, match=f"^{field} must be"):
        RetryPolicy(**{field: value})


def test_a_retry_policy_may_wait_up_to_a_year_as_a_create_may() -> None:
    longest = RetryPolicy(initial_interval=YEAR, maximum_interval=YEAR)
    assert (longest.initial_interval, longest.maximum_interval) == (YEAR, YEAR)
    assert RetryPolicy(backoff_coefficient=1, jitter=0).backoff_coefficient == 1
    with pytest.raises(InvalidInputError, match="maximum_interval"):
        RetryPolicy(initial_interval=10, maximum_interval=5)
    wire = {"retry": {"initial_interval": 1e12}}  # a worker's hello: the same rule
    with pytest.raises(InvalidInputError, match="initial_interval must be seconds in"):
        options_from_wire(wire)
