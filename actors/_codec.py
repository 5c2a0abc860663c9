"""The one cattrs converter of the runtime and the JSON helpers built on it.

Values always go through JSON bytes: structure only from decoded JSON, so what a test sees is
what a client or the database sees.
"""

from __future__ import annotations

import enum
import math
from typing import Any, TypeVar

import orjson
from cattrs.preconf.orjson import make_converter

from ._errors import NotSerializableError

__all__ = ["converter", "dumps", "dumps_json_value", "loads"]

T = TypeVar("T")

converter = make_converter()


# Structuring is strict: JSON of the wrong type is an error, never silently coerced
# (cattrs would otherwise turn 5 into "5" or 1.5 into 1).
def _strict_str(value: Any, _: type) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return value


def _strict_int(value: Any, _: type) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"expected an integer, got {type(value).__name__}")
    return value


def _strict_float(value: Any, _: type) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise TypeError(f"expected a number, got {type(value).__name__}")
    return float(value)


def _strict_bool(value: Any, _: type) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"expected a boolean, got {type(value).__name__}")
    return value


def _str_enum(value: Any, cls: type[enum.StrEnum]) -> enum.StrEnum:
    return cls(_strict_str(value, str))


converter.register_structure_hook(str, _strict_str)
converter.register_structure_hook(int, _strict_int)
converter.register_structure_hook(float, _strict_float)
converter.register_structure_hook(bool, _strict_bool)
# More specific than ``str`` in an enum's MRO, so enums are built, not passed through.
converter.register_structure_hook(enum.StrEnum, _str_enum)


def dumps(obj: object) -> bytes:
    """Serialize an attrs message (or plain JSON data) to JSON bytes."""
    return orjson.dumps(converter.unstructure(obj))


def loads(data: bytes | str, cls: type[T]) -> T:
    return converter.structure(orjson.loads(data), cls)


def _has_non_finite(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(_has_non_finite(v) for v in value.values())
    if isinstance(value, list | tuple):
        return any(_has_non_finite(v) for v in value)
    return False


def dumps_json_value(value: Any, what: str) -> bytes:
    """Encode a user-supplied JSON value, refusing anything JSON cannot carry exactly."""
    try:
        encoded = orjson.dumps(value)
    except TypeError as exc:
        raise NotSerializableError(f"{what} is not JSON-serializable: {exc}") from None
    # orjson writes NaN and infinities as null: look for them only when a null was written.
    if b"null" in encoded and _has_non_finite(value):
        raise NotSerializableError(f"{what} is not JSON-serializable: NaN or infinity")
    return encoded
