"""Which idempotency keys may already have a job: so that a create with a fresh key (the
common case: the client and CLI send one on every create) needs no database look-up.

Per user, the hashes of the keys of the user's jobs created since a point in time, loaded
once from the database (:meth:`Backend.keys_since`) and completed by the store with every
keyed job it stages. A key whose hash is absent has no job in that span, for sure; a present
one (a repeat, or a hash collision) is looked up. Sound while this store is the database's
only writer (one runtime owns a database file): on a database several nodes share, another
node's keys are in no filter of this one, so the store looks every key up there. Hashes
are never removed (a deleted or pruned job costs one look-up); a user's set is dropped and
loaded again once the window has moved past its load, so it holds about two windows of keys
(tens of bytes each). At most ``limit`` users' sets are kept, the least recently used
dropped first (a dropped user's next keyed create loads the set again): else every user
that ever sent a keyed create (the client sends a key with each) kept a set for the life of
the process.
"""

from __future__ import annotations

from collections import OrderedDict

import attrs

__all__ = ["KeyFilter"]


@attrs.define
class _UserKeys:
    since: float  # keys of jobs created at or after this (Unix s) are all in ``hashes``
    loaded_at: float
    hashes: set[int]


@attrs.define
class KeyFilter:
    #: Users whose sets are kept, at most.
    limit: int = 10_000
    # Least recently used first.
    _users: OrderedDict[str, _UserKeys] = attrs.field(factory=OrderedDict)

    def __len__(self) -> int:
        return len(self._users)

    def needs_load(self, user_id: str, since: float) -> bool:
        """Whether the user's keys must be (re)loaded for a create whose window starts at
        ``since``: never loaded (or dropped since), or every key loaded is older than the
        window. A user asked about counts as used now."""
        found = self._users.get(user_id)
        if found is None:
            return True
        self._users.move_to_end(user_id)
        return since > found.loaded_at

    def load(self, user_id: str, since: float, loaded_at: float, keys: list[str]) -> None:
        """The keys of the user's jobs created at or after ``since``, read at ``loaded_at``
        (plus those staged and not yet committed); drops the least recently used users'
        sets beyond ``limit``."""
        self._users[user_id] = _UserKeys(since, loaded_at, {hash(key) for key in keys})
        self._users.move_to_end(user_id)
        while len(self._users) > self.limit:
            self._users.popitem(last=False)

    def add(self, user_id: str, key: str) -> None:
        """A keyed job staged (only a loaded user's set needs it: a load reads the rest)."""
        found = self._users.get(user_id)
        if found is not None:
            found.hashes.add(hash(key))

    def may_exist(self, user_id: str, key: str, since: float) -> bool:
        """False only if no job of the user created at or after ``since`` has ``key``."""
        found = self._users.get(user_id)
        return found is None or since < found.since or hash(key) in found.hashes
