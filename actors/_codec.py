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

from ._errors import InvalidInputError, NotSerializableError, shown

__all__ = [
    "MAX_DEPTH",
    "MAX_INPUT_BYTES",
    "MAX_LABEL_LENGTH",
    "MAX_STEP_LENGTH",
    "MAX_MESSAGE_LENGTH",
    "MAX_NAME_BYTES",
    "NUL",
    "check_kind",
    "check_name",
    "check_text",
    "converter",
    "dumps",
    "dumps_json_value",
    "loads",
    "may_be_name",
    "sanitize_text",
]

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


#: Deepest nesting of arrays and objects a stored value may have. The store and the protocol
#: wrap values in a few levels of their own, and orjson refuses more than 254 in all.
MAX_DEPTH = 240
_WRAP = 254 - MAX_DEPTH
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# A run of 19 digits may be an integer beyond int64 (or just digits in a string). Found by
# mapping digits to "0" and everything else to " " (C speed; a regex is ten times slower).
_DIGITS_ONLY = bytes(0x30 if 0x30 <= b <= 0x39 else 0x20 for b in range(256))
_LONG_DIGITS = b"0" * 19


def _lone_surrogate(text: str) -> int | None:
    """Index of the first lone surrogate (what ``os.fsdecode`` makes of undecodable bytes), or
    None when the string can be stored as UTF-8."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return exc.start
    return None


def _problem(value: Any, path: str, depth: int) -> tuple[str, str] | None:
    """The first reason ``value`` cannot be stored exactly, with where it is; None if none."""
    if depth > MAX_DEPTH:
        return f"nested deeper than {MAX_DEPTH} levels", path
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, str):
        at = _lone_surrogate(value)
        return None if at is None else (f"lone surrogate {value[at]!r} at index {at}", path)
    if isinstance(value, int):
        if INT64_MIN <= value <= INT64_MAX:
            return None
        quoted = shown(value)  # "an integer of N bits" past Python's digit limit
        number = quoted if quoted.startswith("an ") else f"integer {quoted}"
        return f"{number} outside the signed 64-bit range", path
    if isinstance(value, float):
        return None if math.isfinite(value) else (f"NaN or infinity ({value!r})", path)
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                return f"object key {shown(key)} is not a string", path
            at = _lone_surrogate(key)
            if at is not None:
                return f"lone surrogate {key[at]!r} at index {at} of key {shown(key)}", path
            found = _problem(item, f"{path}[{shown(key, 64)}]", depth + 1)
            if found:
                return found
        return None
    if isinstance(value, list | tuple):
        for index, item in enumerate(value):
            found = _problem(item, f"{path}[{index}]", depth + 1)
            if found:
                return found
        return None
    return f"{type(value).__name__} is not a JSON type", path


def _refuse(value: Any, what: str, fallback: str) -> NotSerializableError:
    found = _problem(value, what, 0)
    reason, path = found if found else (fallback, what)
    if len(path) > 120:
        path = path[:117] + "..."
    where = "" if path == what else f" (at {path})"
    return NotSerializableError(f"{what} is not JSON-serializable: {reason}{where}")


#: orjson would turn these into strings or plain values that read back as another type (a
#: datetime as text, a str or int subclass as its base): refused instead, like any non-JSON type.
_EXACT = (
    orjson.OPT_PASSTHROUGH_DATETIME
    | orjson.OPT_PASSTHROUGH_DATACLASS
    | orjson.OPT_PASSTHROUGH_SUBCLASS
)


def dumps_json_value(value: Any, what: str) -> bytes:
    """Encode a user-supplied JSON value that is to be stored, refusing anything the store
    cannot keep exactly: non-JSON types, lone surrogates in strings or keys, NaN and
    infinities, integers outside int64, nesting deeper than :data:`MAX_DEPTH`.

    Raises :class:`NotSerializableError` naming what and where (``checkpoint['a'][3]``).
    orjson does the common case in C; the Python walk runs only to name a problem or when the
    output hints at one (a null that may be NaN, a digit run that may be a huge integer).
    """
    wrapped = value
    for _ in range(_WRAP):
        wrapped = [wrapped]
    try:
        encoded = orjson.dumps(wrapped, option=_EXACT)[_WRAP:-_WRAP]
    except TypeError as exc:  # orjson.JSONEncodeError included
        raise _refuse(value, what, str(exc)) from None
    suspect = b"null" in encoded or (
        len(encoded) >= 19 and _LONG_DIGITS in encoded.translate(_DIGITS_ONLY)
    )
    if suspect and _problem(value, what, 0):
        raise _refuse(value, what, "")
    return encoded


#: Longest name (user id, kind, actor, reason), in characters. Names travel in every event
#: and list entry, so they are bounded: a longer one is refused at the call.
MAX_LABEL_LENGTH = 1024
#: Longest name in bytes of UTF-8 (1,024 ASCII characters, 256 of four bytes each). PostgreSQL
#: indexes user ids and kinds (a waiting job's entry holds both, an idempotency key's its user
#: and key), and refuses an index entry over 2,704 bytes, where SQLite has no such limit: 1,024
#: characters of three or four bytes each failed every create on PostgreSQL only, as a
#: ``StoreError``. Two names of this size and a key of 256 characters fit, so every backend
#: accepts exactly the names this limit admits.
MAX_NAME_BYTES = 1024
#: Longest step label (``ctx.progress``), in characters: refused beyond it, like a name.
MAX_STEP_LENGTH = 16 * 1024
#: Longest error message kept, in characters; a longer one is truncated, never refused (a
#: job's error must always be recordable).
MAX_MESSAGE_LENGTH = 16 * 1024
#: Largest job input, in bytes of JSON (the websocket protocol's frames are smaller still).
MAX_INPUT_BYTES = 1024 * 1024


def check_text(
    text: object,
    what: str,
    *,
    optional: bool = False,
    limit: int = MAX_LABEL_LENGTH,
    max_bytes: int | None = MAX_NAME_BYTES,
) -> None:
    """Refuse a text field that is not a string, is longer than ``limit`` characters or
    ``max_bytes`` bytes of UTF-8 (None: no such bound, for text that is stored only inside
    JSON, such as a step label) or cannot be stored (a lone surrogate); ``optional`` admits
    None. Raises :class:`InvalidInputError` or :class:`NotSerializableError`."""
    if text is None and optional:
        return
    if not isinstance(text, str):
        raise InvalidInputError(f"{what} must be a string, got {type(text).__name__}")
    if len(text) > limit:
        raise InvalidInputError(f"{what} is {len(text)} characters, over the limit of {limit}")
    at = _lone_surrogate(text)
    if at is not None:
        raise NotSerializableError(
            f"{what} is not storable text: lone surrogate {text[at]!r} at index {at}"
        )
    # A character is at most 4 bytes: only a longer text can be over (then it encodes).
    if max_bytes is not None and len(text) * 4 > max_bytes:
        size = len(text.encode())
        if size > max_bytes:
            raise InvalidInputError(
                f"{what} is {size:,} bytes of UTF-8, over the limit of {max_bytes:,}"
                f" ({len(text):,} characters)"
            )


#: The character no name holds (see :func:`check_name`).
NUL = "\x00"


def check_name(text: str | None, what: str) -> None:
    """Refuse a name holding a NUL character or a lone surrogate; None passes. Names (user
    ids, job ids, kinds, tags, parent ids, idempotency keys, and the rooms and filters naming
    them) are stored and compared in text columns of their own: PostgreSQL's text cannot hold
    NUL (inside a JSON value it is stored escaped, so input, step labels and results may hold
    it), and no database driver can even send a lone surrogate (not UTF-8), so a filter or a
    room holding one failed the store's request (``UnicodeEncodeError``, logged with its
    traceback); :func:`check_text` refuses it in every name stored, so none matches. Refused
    on every backend alike, so that what one store accepts, every one does. Raises
    :class:`InvalidInputError` naming ``what``."""
    if text is None:
        return
    if NUL in text:
        raise InvalidInputError(f"{what} must not contain a NUL character")
    at = _lone_surrogate(text)
    if at is not None:
        raise InvalidInputError(
            f"{what} must be text UTF-8 can hold: lone surrogate {text[at]!r} at index {at}"
            " (no name holds one)"
        )


def may_be_name(text: object) -> bool:
    """Whether ``text`` may name something stored: a string that :func:`check_name` passes.
    A value that is not (None, a number, a string holding NUL or a lone surrogate) names no
    job: an unknown one, never a failure of the store's request."""
    return isinstance(text, str) and NUL not in text and _lone_surrogate(text) is None


def check_kind(kind: object, what: str = "kind") -> None:
    """Refuse a job kind name that no job could be created with, or that a log line or a
    terminal could not show as it is: the one check of every kind, at ``create_job``, at
    handler registration (``open_runtime(handlers=)``, :meth:`Repository.register`,
    ``--handlers``) and in a worker's hello. A kind is a string of 1 to
    :data:`MAX_LABEL_LENGTH` (1,024) printable characters: no NUL (see :func:`check_name`),
    no other control, format or line separator character, no lone surrogate (see
    :func:`check_text`). Raises :class:`InvalidInputError` (:class:`NotSerializableError`
    for a lone surrogate) naming ``what`` and the kind."""
    if not isinstance(kind, str) or not kind:
        raise InvalidInputError(f"{what} must be a non-empty string, not {shown(kind)}")
    check_text(kind, what)
    check_name(kind, what)
    for at, char in enumerate(kind):
        if not char.isprintable():
            raise InvalidInputError(
                f"{what} {shown(kind)} must be printable: {char!r} at index {at} is a"
                " control, format or line separator character"
            )


def sanitize_text(text: str) -> str:
    """``text`` with every character UTF-8 cannot carry replaced by its escape
    (``\\udce9``), cut to :data:`MAX_MESSAGE_LENGTH` characters saying so (the note
    included): for messages that must always be recorded, such as a job's error. Applied
    twice it changes nothing more: a ``jobspine worker`` sanitizes a failure before sending
    it (a message of megabytes does not fit in a frame), the server again, and the job gets
    the message its handler would get in the server (the note, left past the limit, was cut
    and noted a second time)."""
    length = len(text)
    text = text[: MAX_MESSAGE_LENGTH + 1]
    if _lone_surrogate(text) is not None:
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    if length > MAX_MESSAGE_LENGTH or len(text) > MAX_MESSAGE_LENGTH:
        note = f"... ({length} characters, truncated)"
        text = text[: MAX_MESSAGE_LENGTH - len(note)] + note
    return text
