"""The one cattrs converter of the runtime and the JSON helpers built on it.

Values always go through JSON bytes: structure only from decoded JSON, so what a test sees is
what a client or the database sees.
"""

from __future__ import annotations

from typing import Any, TypeVar

import orjson
from cattrs.preconf.orjson import make_converter

from ._errors import NotSerializableError

__all__ = ["converter", "dumps", "dumps_json_value", "loads"]

T = TypeVar("T")

converter = make_converter()


def dumps(obj: object) -> bytes:
    """Serialize an attrs message (or plain JSON data) to JSON bytes."""
    return orjson.dumps(converter.unstructure(obj))


def loads(data: bytes | str, cls: type[T]) -> T:
    return converter.structure(orjson.loads(data), cls)


def dumps_json_value(value: Any, what: str) -> bytes:
    """Encode a user-supplied JSON value, refusing anything JSON cannot carry exactly."""
    try:
        return orjson.dumps(value)
    except TypeError as exc:
        raise NotSerializableError(f"{what} is not JSON-serializable: {exc}") from None
