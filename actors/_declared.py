"""The kinds connected workers declared, bounded without letting one worker lock out others.

A kind a worker declared stays known after its workers leave (its jobs are accepted and
wait), so the table outlives connections and must be bounded. Bounded by refusal alone, a
worker that puts a PID or a counter in its kind names filled it for good, reconnecting: from
then on every honest worker declaring a new kind was refused until the server restarted.
:class:`DeclaredKinds` forgets, least recently used first, kinds that nothing holds (see
:meth:`DeclaredKinds.room_for`) to make room; a forgotten kind is as after a restart: a create
of it is ``unknown_kind`` until a worker declares it again, and its stored jobs wait.

Sans-I/O: which kinds are held is the caller's to say; nothing here awaits or reads a clock.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Mapping

from ._options import KindOptions

__all__ = ["DeclaredKinds"]


class DeclaredKinds:
    """Kind -> the options its last accepted declaration gave, at most ``limit`` kinds, in
    the order they were last used (declared, left by their last worker, or named by a create,
    resume or restart): the least recently used first."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._kinds: OrderedDict[str, KindOptions] = OrderedDict()

    def __contains__(self, kind: object) -> bool:
        return kind in self._kinds

    def __len__(self) -> int:
        return len(self._kinds)

    def get(self, kind: str) -> KindOptions | None:
        return self._kinds.get(kind)

    def use(self, kinds: Iterable[str]) -> None:
        """``kinds`` were used now: the last to be forgotten. Kinds not known are ignored."""
        for kind in kinds:
            if kind in self._kinds:
                self._kinds.move_to_end(kind)

    def room_for(self, kinds: Collection[str], held: Callable[[str], bool]) -> list[str] | None:
        """The kinds to forget, least recently used first, so that ``kinds`` fit; None when
        they cannot fit even with every kind not ``held`` forgotten (nothing changes then).

        ``held(kind)`` is true for a kind that must stay known: one a connected worker
        serves or a handler in the server runs, or with an attempt the server still runs or
        recovers (its retry and stall decisions read the kind's options). Kinds being
        declared again are never forgotten to make room for themselves."""
        new = sum(1 for kind in kinds if kind not in self._kinds)
        over = len(self._kinds) + new - self.limit
        if over <= 0:
            return []
        forget: list[str] = []
        for kind in self._kinds:  # least recently used first
            if kind in kinds or held(kind):
                continue
            forget.append(kind)
            if len(forget) == over:
                return forget
        return None

    def declare(self, declared: Mapping[str, KindOptions], forget: Iterable[str]) -> None:
        """Forget ``forget`` (from :meth:`room_for`), then record ``declared`` as used now."""
        for kind in forget:
            del self._kinds[kind]
        for kind, options in declared.items():
            self._kinds[kind] = options
            self._kinds.move_to_end(kind)
