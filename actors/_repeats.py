"""Failures that a loop retries while their cause lasts (a database down, a connection
refused), logged once per cause rather than at every retry.

A PostgreSQL server down for ten minutes fails every lease renewal, registration, scan and
reconnection of every node once a second or more: logged each time, a node wrote thousands of
warnings saying the same thing. :class:`RepeatedFailure` decides the level (sans-I/O): a
warning the first time a cause is met since the last success, debug while it stays the same.
"""

from __future__ import annotations

import logging


class RepeatedFailure:
    """The log level of one retried operation's failures: ``WARNING`` for the first failure
    after a success and whenever the cause (its message) changes, ``DEBUG`` while the same
    cause repeats. :meth:`succeeded` ends the run of failures: the next one is a warning."""

    __slots__ = ("_last",)

    def __init__(self) -> None:
        self._last: str | None = None

    def level(self, cause: object) -> int:
        """The level to log this failure with, ``cause`` being the error (its text compared)."""
        text = str(cause)
        level = logging.DEBUG if text == self._last else logging.WARNING
        self._last = text
        return level

    def succeeded(self) -> None:
        self._last = None
