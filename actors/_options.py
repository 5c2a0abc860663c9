"""Per-kind queue options (retries, timeout, stall re-queue) and the checks of a create's
queue options. Plain values: the decisions that use them live in :mod:`._scheduling`."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

import attrs

from ._errors import InvalidInputError, shown
from ._job import (
    MAX_ATTEMPTS,
    MAX_DELAY,
    MAX_KEY_LENGTH,
    MAX_PRIORITY,
    MAX_TAG_LENGTH,
    MAX_TAGS,
    MAX_TIMEOUT,
)
from ._ranges import as_float

__all__ = [
    "CreateOptions",
    "KindOptions",
    "RetryPolicy",
    "kind_options",
    "options_from_wire",
    "options_of",
    "options_to_wire",
]

_H = TypeVar("_H", bound=Callable[..., Awaitable[Any]])


def _is_number(value: object) -> bool:
    """A real number: an int or a float, never a bool (``True`` is no interval)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def _interval(_: object, attribute: attrs.Attribute[float], value: float) -> None:
    # A retry waits at most as long as a create may be delayed: a year.
    if not (_is_number(value) and 0 < value <= MAX_DELAY):
        raise InvalidInputError(
            f"{attribute.name} must be seconds in (0, {MAX_DELAY}] (one year), got {shown(value)}"
        )


@attrs.frozen
class RetryPolicy:
    """Backoff between failed attempts (Temporal's policy). The delay before attempt ``n + 1``,
    after ``n`` failed attempts, is ``min(maximum_interval, initial_interval *
    backoff_coefficient ** (n - 1))`` seconds, times a random factor in
    ``[1 - jitter, 1 + jitter]``, and never over ``maximum_interval``.

    Intervals are seconds in (0, 31536000] (one year, as a create's ``delay``),
    ``backoff_coefficient`` a number in 1..100, ``jitter`` a number in [0, 1), and
    ``maximum_interval >= initial_interval``; a bool is no number. Raises
    :class:`InvalidInputError` naming the field."""

    initial_interval: float = attrs.field(default=1.0, validator=_interval)
    backoff_coefficient: float = 2.0
    maximum_interval: float = attrs.field(default=100.0, validator=_interval)
    jitter: float = 0.2

    def __attrs_post_init__(self) -> None:
        coefficient = self.backoff_coefficient
        if not (_is_number(coefficient) and 1 <= coefficient <= 100):
            raise InvalidInputError(
                f"backoff_coefficient must be a number in 1..100, got {shown(coefficient)}"
            )
        if not (_is_number(self.jitter) and 0 <= self.jitter < 1):
            raise InvalidInputError(f"jitter must be a number in [0, 1), got {shown(self.jitter)}")
        if self.maximum_interval < self.initial_interval:
            raise InvalidInputError(
                f"maximum_interval ({shown(self.maximum_interval)}) must be >= initial_interval"
                f" ({shown(self.initial_interval)})"
            )


def _names(values: Iterable[str]) -> frozenset[str]:
    if isinstance(values, str) or not isinstance(values, Iterable):
        raise InvalidInputError("non_retryable must be a list of error type names")
    names = list(values)
    if not all(isinstance(v, str) and v for v in names):
        raise InvalidInputError("non_retryable must be a list of error type names")
    return frozenset(names)


@attrs.frozen
class KindOptions:
    """A kind's queue behaviour. ``max_attempts`` (1..100) and ``timeout`` (seconds per
    attempt, None: none) are the defaults of jobs created without their own; error types in
    ``non_retryable`` (matched on the recorded error type, e.g. ``"ValueError"``) fail a job
    at once, like :class:`PermanentError`; ``requeue_stalled`` puts a stalled job that has a
    checkpoint back in the queue (resumed from it) instead of pausing it."""

    max_attempts: int = 1
    retry: RetryPolicy = RetryPolicy()
    timeout: float | None = None
    non_retryable: frozenset[str] = attrs.field(default=frozenset(), converter=_names)
    requeue_stalled: bool = False

    def __attrs_post_init__(self) -> None:
        check_attempts(self.max_attempts)
        check_timeout(self.timeout)
        if not isinstance(self.retry, RetryPolicy):
            # None or a dict would be found only when a job fails: its outcome then not
            # stored, and the job left running until the stall rule recovered it.
            raise InvalidInputError(f"retry must be a RetryPolicy, got {shown(self.retry)}")
        if not isinstance(self.requeue_stalled, bool):
            raise InvalidInputError(
                f"requeue_stalled must be True or False, got {shown(self.requeue_stalled)}"
            )


def kind_options(
    *,
    max_attempts: int = 1,
    retry: RetryPolicy | None = None,
    timeout: float | None = None,
    non_retryable: Iterable[str] = (),
    requeue_stalled: bool = False,
) -> Callable[[_H], _H]:
    """Decorator giving a handler its :class:`KindOptions` (stored as its ``kind_options``
    attribute), used when it is registered without explicit options. Raises
    :class:`InvalidInputError` for an out-of-range value."""
    options = KindOptions(
        max_attempts,
        RetryPolicy() if retry is None else retry,
        timeout,
        _names(non_retryable),
        requeue_stalled,
    )

    def mark(handler: _H) -> _H:
        handler.kind_options = options  # type: ignore[attr-defined]
        return handler

    return mark


def options_of(handler: object) -> KindOptions:
    """The options a handler was decorated with (:func:`kind_options`), else the defaults."""
    found = getattr(handler, "kind_options", None)
    return found if isinstance(found, KindOptions) else _DEFAULTS


_RETRY_KEYS = ("initial_interval", "backoff_coefficient", "maximum_interval", "jitter")
_OPTION_KEYS = ("max_attempts", "retry", "timeout", "non_retryable", "requeue_stalled")


def options_to_wire(options: KindOptions) -> dict[str, Any]:
    """``options`` as JSON (a worker's hello, PROTOCOL.md section 9): every field, the retry
    policy as an object, ``non_retryable`` as a sorted list."""
    retry = options.retry
    return {
        "max_attempts": options.max_attempts,
        "retry": {key: getattr(retry, key) for key in _RETRY_KEYS},
        "timeout": options.timeout,
        "non_retryable": sorted(options.non_retryable),
        "requeue_stalled": options.requeue_stalled,
    }


def _fields(value: object, keys: tuple[str, ...], what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidInputError(f"{what} must be an object with {', '.join(keys)}")
    unknown = sorted(set(value) - set(keys))
    if unknown:
        raise InvalidInputError(f"{what}: unknown field {shown(unknown[0])} ({', '.join(keys)})")
    return value


def _number(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidInputError(f"{name} must be a number")
    return value


def options_from_wire(value: object) -> KindOptions:
    """Strictly read :func:`options_to_wire`'s JSON (every field optional, defaults as
    :class:`KindOptions`), with :class:`KindOptions`' checks; raises
    :class:`InvalidInputError` naming the field."""
    data = _fields(value, _OPTION_KEYS, "options")
    retry = RetryPolicy()
    if data.get("retry") is not None:
        given = _fields(data["retry"], _RETRY_KEYS, "retry")
        retry = RetryPolicy(**{key: _number(given[key], key) for key in given})
    requeue = data.get("requeue_stalled", False)
    if not isinstance(requeue, bool):
        raise InvalidInputError("requeue_stalled must be true or false")
    names = data.get("non_retryable", [])
    if not isinstance(names, list):
        raise InvalidInputError("non_retryable must be a list of error type names")
    return KindOptions(
        check_attempts(data.get("max_attempts", 1)),
        retry,
        check_timeout(data.get("timeout")),
        frozenset(_names(names)),
        requeue,
    )


def check_attempts(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_ATTEMPTS:
        raise InvalidInputError(f"max_attempts must be an integer in 1..{MAX_ATTEMPTS}")
    return value


def check_timeout(value: object) -> float | None:
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not 0 < value <= MAX_TIMEOUT
    ):
        raise InvalidInputError(f"timeout must be seconds in (0, {MAX_TIMEOUT:g}]")
    return float(value)


def _seconds(value: object, name: str) -> float:
    seconds = as_float(value)  # None for an integer beyond any float (10**400) too
    if seconds is None or not math.isfinite(seconds):
        raise InvalidInputError(f"{name} must be a finite number of seconds")
    return seconds


@attrs.frozen
class CreateOptions:
    """The queue options of one create, checked (:meth:`check`) before anything is stored.
    ``run_at`` is absolute (Unix seconds), None for at once (a delay of 0, a ``run_at`` in
    the past); ``max_attempts`` and ``timeout`` None take the kind's defaults."""

    priority: int = 0
    run_at: float | None = None
    max_attempts: int | None = None
    timeout: float | None = None
    tags: tuple[str, ...] = ()
    parent_id: str | None = None
    idempotency_key: str | None = None

    @classmethod
    def check(
        cls,
        now: float,
        *,
        priority: object = 0,
        delay: object = None,
        run_at: object = None,
        max_attempts: object = None,
        timeout: object = None,
        tags: object = (),
        parent_id: object = None,
        idempotency_key: object = None,
    ) -> CreateOptions:
        """Validate a create's keyword arguments; raises :class:`InvalidInputError`."""
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise InvalidInputError(f"priority must be an integer in 0..{MAX_PRIORITY}")
        if not 0 <= priority <= MAX_PRIORITY:
            raise InvalidInputError(f"priority must be an integer in 0..{MAX_PRIORITY}")
        if delay is not None and run_at is not None:
            raise InvalidInputError("give delay or run_at, not both")
        at: float | None = None
        if delay is not None:
            seconds = _seconds(delay, "delay")
            if not 0 <= seconds <= MAX_DELAY:
                raise InvalidInputError(f"delay must be seconds in 0..{MAX_DELAY} (one year)")
            at = now + seconds if seconds > 0 else None
        elif run_at is not None:
            at = _seconds(run_at, "run_at")
            if at > now + MAX_DELAY:
                raise InvalidInputError("run_at must be within a year from now")
            if at < 0:
                raise InvalidInputError("run_at must be Unix seconds (>= 0)")
            if at <= now:
                # A time past is "at once", as a delay of 0: the job is as old as its create.
                # Kept, it ranked the job by that time, before every job of its priority
                # created earlier (run_at 0 went ahead of other users' older jobs).
                at = None
        attempts = None if max_attempts is None else check_attempts(max_attempts)
        # A list or tuple: a set has no order to keep, a mapping would give its keys.
        if not isinstance(tags, list | tuple):
            raise InvalidInputError("tags must be a list of strings")
        tag_list = list(tags)
        if len(tag_list) > MAX_TAGS:
            raise InvalidInputError(f"at most {MAX_TAGS} tags")
        for tag in tag_list:
            if not isinstance(tag, str) or not 0 < len(tag) <= MAX_TAG_LENGTH:
                raise InvalidInputError(
                    f"each tag must be a string of 1..{MAX_TAG_LENGTH} characters"
                )
        if len(set(tag_list)) != len(tag_list):
            raise InvalidInputError("tags must be distinct")
        if parent_id is not None and (not isinstance(parent_id, str) or not parent_id):
            raise InvalidInputError("parent_id must be a job id")
        if idempotency_key is not None and (
            not isinstance(idempotency_key, str) or not 0 < len(idempotency_key) <= MAX_KEY_LENGTH
        ):
            raise InvalidInputError(
                f"idempotency_key must be a string of 1..{MAX_KEY_LENGTH} characters"
            )
        return cls(
            priority,
            at,
            attempts,
            check_timeout(timeout),
            tuple(tag_list),
            parent_id,
            idempotency_key,
        )


#: The options of an undecorated handler: frozen, so one serves all of its jobs.
_DEFAULTS = KindOptions()
