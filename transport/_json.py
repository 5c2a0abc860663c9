"""The one strict JSON reading of everything a client sends (frames, and token claims).

JSON that a lenient parser would silently change is refused instead, naming where it is:

* an integer outside the signed 64-bit range (it would become a float, or not be storable);
* a number that overflows a double (``1e400`` would become infinity); ``NaN`` and
  ``Infinity`` are not JSON at all;
* a string or key holding a lone surrogate escape (``"\\ud83d"``, half of a UTF-16 pair): it
  has no UTF-8 form, so it can be neither stored nor sent back;
* an object with the same key twice (which one is meant?);
* nesting deeper than :data:`MAX_DEPTH`.

One decode does it: the stdlib's C decoder, then checks that cost little and miss nothing
(see :func:`loads_strict`); only a frame they flag is decoded a second time, keeping markers,
to name the path. orjson decodes faster, but turns big integers into floats and keeps the
last of two equal keys without a word, which is exactly what must not happen here.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from actors._errors import shown

__all__ = [
    "INT_MAX",
    "INT_MIN",
    "MAX_DEPTH",
    "RefusedJsonError",
    "check_part",
    "is_plain",
    "loads_lenient",
    "loads_parts",
    "loads_strict",
]

INT_MIN = -(2**63)
INT_MAX = 2**63 - 1
#: Deepest nesting of arrays and objects accepted (the frame's own object is level 1).
MAX_DEPTH = 64
# "-9223372036854775808" has 20 characters: any longer literal is out of range.
_MAX_INT_DIGITS = 20

# The end of every key: its closing quote, then a colon.
_KEY_TOKEN = re.compile(r'"\s*:')


class RefusedJsonError(Exception):
    """JSON that is refused; ``code`` is ``bad_json`` (not JSON), ``bad_request`` (a repeated
    key) or ``invalid_input`` (a value out of range); the message names the path."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class _Repeated(dict[str, Any]):
    """An object that had a key twice; the walk reports it with its path."""

    __slots__ = ("key",)

    def __init__(self, pairs: list[tuple[str, Any]], key: str) -> None:
        super().__init__(pairs)
        self.key = key


class _Huge:
    """An integer literal far outside the range, kept as its digits."""

    __slots__ = ("digits",)

    def __init__(self, digits: str) -> None:
        self.digits = digits


def _refuse_constant(name: str) -> Any:
    raise RefusedJsonError("bad_json", f"the frame is not valid JSON: {name} is not a JSON value")


_PLAIN = json.JSONDecoder(parse_constant=_refuse_constant)


# The slow pass: the hooks keep what is refused as markers, for _check to report with a path.
def _marking_pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(items)
    if len(obj) == len(items):
        return obj
    seen: set[str] = set()
    for key, _ in items:
        if key in seen:
            return _Repeated(items, key)
        seen.add(key)
    raise AssertionError("unreachable: a shorter dict has a repeated key")


def _marking_int(digits: str) -> int | _Huge:
    return _Huge(digits) if len(digits) > _MAX_INT_DIGITS else int(digits)


_MARKING = json.JSONDecoder(
    object_pairs_hook=_marking_pairs, parse_int=_marking_int, parse_constant=_refuse_constant
)


def loads_strict(text: str) -> Any:
    """Decode ``text`` (one JSON value) or raise :class:`RefusedJsonError`.

    The fast pass is the stdlib's C decoder with no hooks, then checks that cost little and
    miss nothing (:func:`_suspect`). Only when one fires does the slow pass decode again,
    keeping markers, and walk the result to name the path; if it finds nothing (a false alarm
    from the text of a string), the fast result stands."""
    try:
        data = _PLAIN.decode(text)
    except json.JSONDecodeError as exc:
        raise RefusedJsonError("bad_json", f"the frame is not valid JSON: {exc}") from None
    except RecursionError:
        message = f"$: nested deeper than {MAX_DEPTH} levels"
        raise RefusedJsonError("invalid_input", message) from None
    except ValueError:  # an integer of 4,300+ digits, which int() refuses: the slow pass
        _check(_MARKING.decode(text))
        raise AssertionError("unreachable: the slow pass refuses a huge integer") from None
    if _suspect(data, text):
        _check(_MARKING.decode(text))
    return data


def loads_parts(text: str) -> Any:
    """Decode ``text``, keeping what :func:`loads_strict` refuses as markers, for a frame
    refused as a whole whose parts are then judged one by one with :func:`check_part` (a
    batch of requests: one bad request must not refuse the others). Raises
    :class:`RefusedJsonError` only for text that is not JSON."""
    try:
        return _MARKING.decode(text)
    except json.JSONDecodeError as exc:
        raise RefusedJsonError("bad_json", f"the frame is not valid JSON: {exc}") from None
    except RecursionError:
        message = f"$: nested deeper than {MAX_DEPTH} levels"
        raise RefusedJsonError("invalid_input", message) from None


def check_part(value: Any) -> None:
    """Raise :class:`RefusedJsonError` for the first thing in ``value`` (a part of what
    :func:`loads_parts` returned) that :func:`loads_strict` refuses, the path and the depth
    counted from ``value`` as if it had been a frame of its own."""
    _check(value)


def is_plain(value: Any, key: str) -> bool:
    """Whether ``value`` (from :func:`loads_parts`) is a JSON object whose ``key`` is given
    once and holds no marker: its value can be read as it is."""
    return (
        isinstance(value, dict)
        and not (isinstance(value, _Repeated) and value.key == key)
        and not isinstance(value.get(key), _Huge)
    )


def _suspect(data: Any, text: str) -> bool:
    """Whether ``data`` (decoded from ``text``) may hold something refused. Walks it level by
    level, looking at every number and counting keys, but at no string: lone surrogates are
    looked for in the text (a ``\\ud``/``\\uD`` escape; a surrogate itself, which only text
    not decoded from UTF-8 can hold), and a repeated key is seen as fewer keys in ``data``
    than key tokens in the text (a colon, at most, per key: fewer keys than colons sends the
    count to a stricter pattern)."""
    if "\\ud" in text or "\\uD" in text or not (text.isascii() or _is_utf8(text)):
        return True
    level = [data]
    keys = 0
    for _ in range(MAX_DEPTH):
        below: list[Any] = []
        for container in level:
            kind = type(container)
            if kind is dict:
                keys += len(container)
                items = container.values()
            elif kind is list:
                items = container
            else:
                items = (container,)  # a scalar at the top
            for item in items:
                kind = type(item)
                if kind is dict or kind is list:
                    below.append(item)
                elif kind is int:
                    if not INT_MIN <= item <= INT_MAX:
                        return True
                elif kind is float and item - item != 0.0:  # infinite (NaN is refused)
                    return True
        if not below:
            return keys != text.count(":") and keys != len(_KEY_TOKEN.findall(text))
        level = below
    return True  # deeper than MAX_DEPTH


def _check(data: Any) -> None:
    """Report the first refused value, depth-first, with its path."""
    stack: list[tuple[Any, str, int]] = [(data, "$", 0)]
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, dict | list):
            if depth >= MAX_DEPTH:
                raise RefusedJsonError(
                    "invalid_input", f"{_shorten(path)}: nested deeper than {MAX_DEPTH} levels"
                )
            if isinstance(value, _Repeated):
                raise RefusedJsonError(
                    "bad_request", f"{_bounded(_join(path, value.key))}: key given twice"
                )
            if isinstance(value, dict):
                for key, item in reversed(value.items()):
                    at = _join(path, key)
                    if not _is_utf8(key):
                        raise RefusedJsonError(
                            "invalid_input", f"{_bounded(at)}: key has a lone surrogate"
                        )
                    stack.append((item, at, depth + 1))
            else:
                for i in range(len(value) - 1, -1, -1):
                    stack.append((value[i], f"{path}[{i}]", depth + 1))
        elif isinstance(value, _Huge) or (
            isinstance(value, int)
            and not isinstance(value, bool)
            and not INT_MIN <= value <= INT_MAX
        ):
            digits = value.digits if isinstance(value, _Huge) else str(value)
            raise RefusedJsonError(
                "invalid_input",
                f"{_bounded(path)}: integer {_abbreviate(digits)} is outside the signed 64-bit"
                " range",
            )
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise RefusedJsonError(
                    "invalid_input", f"{_bounded(path)}: number overflows a double"
                )
        elif isinstance(value, str) and not _is_utf8(value):
            raise RefusedJsonError(
                "invalid_input",
                f"{_bounded(path)}: string has a lone surrogate (half a UTF-16 pair)",
            )


def _is_utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


#: A key longer than this is named cut, by :func:`~actors._errors.shown`, in a path.
_KEY_LIMIT = 64
#: A path longer than this is named by its start and its end (the value refused).
_PATH_LIMIT = 300


def _join(path: str, key: str) -> str:
    if len(key) > _KEY_LIMIT:
        return f"{path}[{shown(key, _KEY_LIMIT)}]"
    if key.isidentifier():
        return f"{path}.{key}"
    return f"{path}[{json.dumps(key)}]"


def _bounded(path: str) -> str:
    """``path`` for a message: a path 64 levels deep, each a long key, is cut in its middle."""
    if len(path) <= _PATH_LIMIT:
        return path
    return f"{path[: _PATH_LIMIT // 3]}…{path[-2 * _PATH_LIMIT // 3 :]}"


def _shorten(path: str) -> str:
    return path if len(path) <= 60 else f"{path[:60]}…"


def _abbreviate(digits: str) -> str:
    return digits if len(digits) <= 30 else f"{digits[:12]}…({len(digits)} digits)"


def loads_lenient(text: str) -> Any:
    """Decode ``text`` as tolerantly as the stdlib allows, objects as lists of key-value pairs
    (so that a repeated key stays visible), or ``None`` when it is not JSON at all. Only for
    reading what a refused frame can still tell (its ``id``); never for serving a request."""
    try:
        return json.loads(text, object_pairs_hook=list, parse_int=_lenient_int)
    except (ValueError, RecursionError):  # JSONDecodeError is a ValueError
        return None


_WHITESPACE = re.compile(r"[ \t\n\r]*")
_BRACKET_OR_QUOTE = re.compile(r'["\[\]{}]')
#: Stands for a nested value skipped unread (never a valid id).
_SKIPPED = object()


def top_level_values(text: str, key: str) -> list[Any] | None:
    """The values of ``key`` at the top level of the JSON object ``text``, read without
    recursing into nested values (for a frame nested too deeply for :func:`loads_lenient`);
    a nested value is given as a placeholder; None when ``text`` is not an object."""
    decoder = json.JSONDecoder(parse_int=_lenient_int)
    try:
        i = _WHITESPACE.match(text, 0).end()  # type: ignore[union-attr]
        if not text.startswith("{", i):
            return None
        i = _WHITESPACE.match(text, i + 1).end()  # type: ignore[union-attr]
        found: list[Any] = []
        if text.startswith("}", i):
            return found
        while text.startswith('"', i):
            name, i = json.decoder.scanstring(text, i + 1)  # type: ignore[attr-defined]
            i = _WHITESPACE.match(text, i).end()  # type: ignore[union-attr]
            if not text.startswith(":", i):
                return None
            i = _WHITESPACE.match(text, i + 1).end()  # type: ignore[union-attr]
            if text[i : i + 1] in ("{", "["):
                end = _skip_nested(text, i)
                if end is None:
                    return None
                value, i = _SKIPPED, end
            else:
                value, i = decoder.raw_decode(text, i)
            if name == key:
                found.append(value)
            i = _WHITESPACE.match(text, i).end()  # type: ignore[union-attr]
            if text.startswith("}", i):
                return found
            if not text.startswith(",", i):
                return None
            i = _WHITESPACE.match(text, i + 1).end()  # type: ignore[union-attr]
        return None
    except ValueError:  # a malformed string or scalar
        return None


def _skip_nested(text: str, i: int) -> int | None:
    """Where the array or object starting at ``i`` ends (iteratively), None if it does not."""
    depth = 0
    while (match := _BRACKET_OR_QUOTE.search(text, i)) is not None:
        char, i = match.group(), match.end()
        if char == '"':
            _, i = json.decoder.scanstring(text, i)  # type: ignore[attr-defined]
        elif char in "[{":
            depth += 1
        else:
            depth -= 1
            if depth == 0:
                return i
    return None


def _lenient_int(digits: str) -> int | None:
    return int(digits) if len(digits) <= _MAX_INT_DIGITS else None
