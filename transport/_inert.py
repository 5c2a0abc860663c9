"""Job data made inert for a terminal or a log: what a terminal would obey, or show other
than as written, is escaped.

A step label, an error, a result, a tag or a user id is a user's or a handler's text; shown
as it is, a terminal obeys its control characters (colours, titles, hyperlinks, cursor moves,
a cleared screen), and its bidirectional controls reorder the rest of the line (another
user's name and count in ``jobspine stats --all``). Escaped, they are shown, not obeyed:
``\\x1b``, ``\\u202e``. This module imports nothing but ``re``, so the log formatters use it
too.
"""

from __future__ import annotations

import re

__all__ = ["json_inert", "one_line", "visible"]

#: Characters a terminal does not show as themselves beyond the controls: the ones that
#: reorder text (the Arabic letter mark, left-to-right and right-to-left marks, embeddings,
#: overrides, isolates), the invisible ones (zero-width space, word joiner, invisible
#: operators, byte order mark) and the line and paragraph separators. Zero-width joiners
#: (emoji sequences, Indic and Persian writing) are shown as they are.
_UNSEEN = "\u061c\u200b\u200e\u200f\u2028-\u202e\u2060-\u2064\u2066-\u2069\ufeff"

#: Control characters but newline and tab, and the unseen ones.
_CONTROL = re.compile(f"[\x00-\x08\x0b-\x1f\x7f-\x9f{_UNSEEN}]")
#: Every control character, and the unseen ones.
_FIELD = re.compile(f"[\x00-\x1f\x7f-\x9f{_UNSEEN}]")
#: In orjson's output (which escapes the C0 controls itself): DEL, C1 and the unseen ones.
_JSON = re.compile(f"[\x7f-\x9f{_UNSEEN}]")


def _escape(control: re.Match[str]) -> str:
    return repr(control.group())[1:-1]  # "\x1b", "\u202e": shown, not obeyed


def _json_escape(control: re.Match[str]) -> str:
    return f"\\u{ord(control.group()):04x}"


def visible(text: str) -> str:
    """``text`` with every control character but newline and tab escaped (``\\x1b``), and
    the characters that reorder or hide text (``\\u202e``, ``\\u200b``)."""
    return _CONTROL.sub(_escape, text)


def one_line(text: object) -> str:
    """A job's field (step, kind, error, reason) as shown: as :func:`visible`, newline and
    tab escaped too (a newline in a step would add a row to the ``jobs`` table)."""
    return _FIELD.sub(_escape, str(text))


def json_inert(document: str) -> str:
    """A JSON document from orjson, the same JSON, with nothing a terminal would obey or
    hide: DEL, the C1 controls and the characters :func:`visible` escapes are written as
    JSON escapes (``\\u009b``), which any JSON reader reads back as the same characters.
    (:func:`visible`'s ``\\x9b`` is not JSON: ``jobspine get --json`` of a job whose step
    held one could not be parsed.)"""
    return _JSON.sub(_json_escape, document)
