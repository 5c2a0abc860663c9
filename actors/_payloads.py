"""Large payloads left out of messages: the ``$omitted`` marker (sans-I/O).

A *payload* is a user-supplied value of unbounded size: a job's ``input``, ``result``,
``checkpoint``, ``error`` and ``step``, and any value of an event's ``data``. Messages that
carry many of them (events, lists, snapshots) replace each one whose JSON encoding is over an
inline limit by ``{"$omitted": <field>, "size": <bytes>}``; the client fetches it on demand
(``get_payload``). A value that itself looks like a marker (an object with a ``$omitted`` key)
is always replaced, so a marker is never ambiguous.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import orjson

__all__ = ["JOB_PAYLOAD_FIELDS", "MARKER_KEY", "fit_job", "inline_payloads", "is_marker", "marker"]

MARKER_KEY = "$omitted"
_ALWAYS = 1 << 62  # the "size" of a value that must be replaced whatever the limit

#: Fields of the job object that hold user-supplied values of unbounded size.
JOB_PAYLOAD_FIELDS = ("input", "result", "checkpoint", "error", "step")


def marker(field: str, size: int) -> dict[str, Any]:
    return {MARKER_KEY: field, "size": size}


def is_marker(value: object) -> bool:
    return isinstance(value, dict) and MARKER_KEY in value


def _sizes(values: dict[str, Any], fields: Iterable[str]) -> dict[str, int]:
    """Encoded size of each present, non-null field; a value that looks like a marker counts
    as larger than any limit (it is always replaced)."""
    sizes: dict[str, int] = {}
    for field in fields:
        value = values.get(field)
        if value is not None:
            sizes[field] = _ALWAYS if is_marker(value) else len(orjson.dumps(value))
    return sizes


def _replace(values: dict[str, Any], field: str) -> dict[str, Any]:
    return marker(field, len(orjson.dumps(values[field])))


def inline_payloads(
    values: dict[str, Any], limit: int, fields: Iterable[str] | None = None
) -> dict[str, Any]:
    """``values`` with each of ``fields`` (default: every key) whose encoding is over
    ``limit`` bytes replaced by a marker. Returns ``values`` itself when nothing changes."""
    changed: dict[str, Any] | None = None
    for field, size in _sizes(values, values if fields is None else fields).items():
        if size > limit:
            if changed is None:
                changed = dict(values)
            changed[field] = _replace(values, field)
    return values if changed is None else changed


def fit_job(job: dict[str, Any], budget: int) -> dict[str, Any]:
    """The job with its payloads inline if its encoding fits ``budget`` bytes; otherwise with
    the largest payloads replaced by markers, one by one, until it fits (or none is left)."""
    sizes = _sizes(job, JOB_PAYLOAD_FIELDS)
    fitted = inline_payloads(job, _ALWAYS - 1, JOB_PAYLOAD_FIELDS)
    total = len(orjson.dumps(fitted))
    for field in sorted(sizes, key=sizes.__getitem__, reverse=True):
        if total <= budget:
            break
        if sizes[field] == _ALWAYS:
            continue
        fitted = {**fitted, field: _replace(job, field)}
        total = len(orjson.dumps(fitted))
    return fitted
