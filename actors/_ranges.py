"""Range checks of configuration numbers, shared by every config class (``RuntimeConfig``,
``BroadcasterConfig``, ``FanoutConfig``, ``StoreConfig``, ``SupervisorConfig``,
``RetentionPolicy``, and the server's ``ServerConfig``) so that each refuses a bad value at
construction, with :class:`InvalidInputError` naming the field and the value, instead of
failing (or spinning, or silently doing nothing) once running.

A number of seconds is a finite int or float (never a bool: ``True`` is no timeout; never an
int beyond any float, 10**400: each time computed with it raised OverflowError), above 0
unless 0 means something for that field; a count or size is an int (never a bool) from 1, or
from 0 where 0 means something; a port is an int in 0..65535 (0: any free port)."""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping

import attrs
from attrs import AttrsInstance

from ._errors import InvalidInputError, shown

__all__ = [
    "MAX_PORT",
    "as_float",
    "check_count",
    "check_fields",
    "check_number",
    "check_port",
    "is_number",
]

#: The largest TCP port.
MAX_PORT = 65535


def is_number(value: object) -> bool:
    """A real number: an int or a float, never a bool."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def as_float(value: object) -> float | None:
    """``value`` as a float when it is a real number (:func:`is_number`) a float can hold,
    else None: an integer beyond any float (``10**400``) is None too, since every time or
    deadline computed with it raises ``OverflowError``."""
    if not is_number(value):
        return None
    try:
        return float(value)  # type: ignore[arg-type]
    except OverflowError:
        return None


def check_number(name: str, value: object, *, zero: bool = False, unit: str = "seconds") -> None:
    """Refuse anything but a finite number above 0 (``zero``: from 0) of ``unit``: NaN,
    infinity, a negative number, a bool, a string, an integer beyond any float. Raises
    :class:`InvalidInputError` naming ``name`` and the value."""
    number = as_float(value)
    if number is not None and (number >= 0 if zero else number > 0) and number < math.inf:
        return
    if zero:
        raise InvalidInputError(
            f"{name} must be a finite number of {unit} >= 0, not {shown(value)}"
        )
    raise InvalidInputError(
        f"{name} must be a positive number of {unit} (finite), not {shown(value)}"
    )


def check_count(name: str, value: object, *, low: int = 1) -> None:
    """Refuse anything but an int ``>= low`` (a bool, a float, a string included). Raises
    :class:`InvalidInputError` naming ``name`` and the value."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= low:
        return
    raise InvalidInputError(f"{name} must be an integer >= {low}, not {shown(value)}")


def check_port(name: str, value: object) -> None:
    """Refuse anything but an int in 0..65535 (0: any free port). Raises
    :class:`InvalidInputError` naming ``name`` and the value."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_PORT:
        return
    raise InvalidInputError(
        f"{name} must be an integer in 0..{MAX_PORT} (0: any free port), not {shown(value)}"
    )


def check_fields(
    config: AttrsInstance,
    *,
    zero: Collection[str] = (),
    units: Mapping[str, str] | None = None,
    skip: Collection[str] = (),
) -> None:
    """Check every field of the attrs instance ``config`` whose default is a float (a number
    of seconds, or of ``units[name]``: :func:`check_number`) or an int (a count or size:
    :func:`check_count`); those in ``zero`` may be 0, those in ``skip`` (and every other
    field: strings, bools, mappings, optional ones) are left to the class."""
    units = units or {}
    for field in attrs.fields(type(config)):
        if field.name in skip:
            continue
        value = getattr(config, field.name)
        kind = type(field.default)
        if kind is float:
            unit = units.get(field.name, "seconds")
            check_number(field.name, value, zero=field.name in zero, unit=unit)
        elif kind is int:
            check_count(field.name, value, low=0 if field.name in zero else 1)
