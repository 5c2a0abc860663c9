"""Retention: which finished jobs (and their events) are removed, and when. Sans-I/O.

A finished job (completed, failed or cancelled) is kept for ``keep_for`` seconds after it
finished (its ``updated_at``), and at most ``max_count`` finished jobs of one kind are kept
(the oldest go first). Each kind may have its own :class:`RetentionRule`; the rest follow the
default. Jobs that are not finished are never removed, nor are those the store keeps
whatever the policy says (see :meth:`Backend.oldest_finished`): a job whose idempotency key is
still kept, and a job that has children.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import attrs

from ._errors import InvalidInputError, shown
from ._ranges import as_float, check_count, check_number

__all__ = ["DAY", "PruneReport", "RetentionPolicy", "RetentionRule", "parse_duration"]

DAY = 86400.0


@attrs.frozen
class RetentionRule:
    """``keep_for``: seconds a finished job is kept (None: no age limit; ``inf`` too).
    ``max_count``: finished jobs of one kind kept at most (None: no count limit)."""

    keep_for: float | None = 7 * DAY
    max_count: int | None = None

    def __attrs_post_init__(self) -> None:
        """:class:`InvalidInputError` (a ``ValueError``) naming the field and the value for
        a ``keep_for`` that is no number >= 0 (NaN, negative, a bool, a string, an integer
        beyond any float: each pass of the policy raised OverflowError) or a ``max_count``
        that is no integer >= 0."""
        keep_for, count = self.keep_for, self.max_count
        seconds = as_float(keep_for)
        if keep_for is not None and not (seconds is not None and seconds >= 0):
            raise InvalidInputError(f"keep_for must be >= 0 seconds or None, not {shown(keep_for)}")
        if count is not None:
            check_count("max_count", count, low=0)

    def due(self, finished: int, oldest: Sequence[tuple[str, float]], now: float) -> list[str]:
        """The ids among ``oldest`` (the oldest finished jobs of one kind, ``(id, finished
        at)`` oldest first) that are due at ``now`` (Unix seconds), given ``finished`` jobs of
        the kind in all. Due jobs are always a prefix of ``oldest``."""
        excess = 0 if self.max_count is None else max(0, finished - self.max_count)
        cutoff = -math.inf if self.keep_for is None else now - self.keep_for
        found: list[str] = []
        for index, (job_id, finished_at) in enumerate(oldest):
            if index >= excess and not finished_at < cutoff:
                break
            found.append(job_id)
        return found


@attrs.frozen
class RetentionPolicy:
    """Finished jobs kept per ``default`` (7 days, no count limit), or per the rule of their
    kind in ``kinds``. The runtime applies it every ``interval`` seconds, removing at most
    ``batch_size`` jobs (with their events) per store transaction."""

    default: RetentionRule = RetentionRule()
    kinds: Mapping[str, RetentionRule] = attrs.field(factory=dict)
    interval: float = 60.0
    batch_size: int = 500

    def __attrs_post_init__(self) -> None:
        """:class:`InvalidInputError` (a ``ValueError``) naming the field and the value for
        an ``interval`` that is no finite number of seconds above 0, a ``batch_size`` that
        is no integer >= 1, or a rule that is no :class:`RetentionRule`."""
        check_number("interval", self.interval)
        check_count("batch_size", self.batch_size)
        rules = {
            "default": self.default,
            **{f"kinds[{shown(k)}]": r for k, r in self.kinds.items()},
        }
        for name, rule in rules.items():
            if not isinstance(rule, RetentionRule):
                raise InvalidInputError(f"{name} must be a RetentionRule, not {shown(rule)}")

    def rule(self, kind: str) -> RetentionRule:
        return self.kinds.get(kind, self.default)

    def older_than(self, keep_for: float) -> RetentionPolicy:
        """This policy with every kind's ``keep_for`` replaced (a manual ``prune
        --older-than``); count limits stay."""
        return attrs.evolve(
            self,
            default=attrs.evolve(self.default, keep_for=keep_for),
            kinds={k: attrs.evolve(r, keep_for=keep_for) for k, r in self.kinds.items()},
        )


@attrs.frozen
class PruneReport:
    """What one prune removed (or, for a dry run, would remove): ``jobs`` and ``events``
    counts, the ids of the jobs, and the store transactions (``batches``) it took."""

    jobs: int = 0
    events: int = 0
    batches: int = 0
    dry_run: bool = False
    job_ids: tuple[str, ...] = ()


_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": DAY, "w": 7 * DAY}


def parse_duration(text: str) -> float:
    """``"90"`` (seconds), ``"45s"``, ``"30m"``, ``"12h"``, ``"7d"`` or ``"2w"`` in seconds;
    :class:`ValueError` for anything else (negative, not a number, unknown unit). A unit may
    be upper case, but for ``M``: months to many people, it pruned what finished more than
    that many minutes ago (``prune --older-than 6M``)."""
    if text.strip().endswith("M"):
        raise ValueError(
            f"duration {shown(text)}: M is ambiguous (months or minutes?): minutes are m;"
            " for months use d or w"
        )
    value = text.strip().lower()
    scale = _UNITS.get(value[-1:])
    number = value[:-1] if scale is not None else value
    try:
        seconds = float(number) * (scale or 1.0)
    except ValueError:
        raise ValueError(
            f"duration {shown(text)}: expected a number with an optional unit s, m, h, d or w"
        ) from None
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"duration {shown(text)}: must be a finite number >= 0")
    return seconds
