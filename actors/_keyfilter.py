"""Which idempotency keys may already have a job: so that a create with a fresh key (the
common case: the client and CLI send one on every create) needs no database look-up.

Per user, the hashes of the keys of the user's jobs created since a point in time, loaded
once from the database (:meth:`Backend.keys_since`) and completed by the store with every
keyed job it stages. A key whose hash is absent has no job in that span, for sure; a present
one (a repeat, or a hash collision) is looked up. Sound while this store is the database's
only writer (one runtime owns a database file): on a database several nodes share, another
node's keys are in no filter of this one, so the store looks every key up there. Hashes
are never removed (a deleted or pruned job costs one look-up); a user's set is dropped and
loaded again once the window has moved past its load, so it holds about two windows of keys.

Two bounds. At most ``limit`` users' sets are kept, the least recently used dropped first (a
dropped user's next keyed create loads the set again): else every user that ever sent a
keyed create kept a set for the life of the process. And at most ``max_bytes`` of hashes in
all, each counted as :data:`HASH_BYTES`: else a user creating keyed jobs all day grew a set
without bound (two windows of a day each: 100 creates a second made 17 million hashes, about
1.5 GB), loaded whole from the database at each window. Past it, the least recently used
users' sets are dropped; a user whose keys alone are more than the budget holds keeps no set
(each of its keys is looked up, as on a shared database) until its window moves past.
"""

from __future__ import annotations

from collections import OrderedDict

import attrs

__all__ = ["FILTER_BYTES", "HASH_BYTES", "KeyFilter"]

#: What one key costs in a user's set, in bytes: its hash's int object and its share of the
#: set's table, which grows four-fold at three fifths full, so between 15 and 60 % of it is
#: used. Measured with ``tracemalloc`` for sets of 1,000 to 250,000 keys: 63 to 140, and up
#: to 166 while the table grows (``tests/test_idempotency_keys.py`` keeps it an upper bound).
HASH_BYTES = 168

#: The filter's budget by default: 64 MiB, about 400,000 keys in all.
FILTER_BYTES = 64 * 2**20


@attrs.define
class _UserKeys:
    since: float  # keys of jobs created at or after this (Unix s) are all in ``hashes``
    loaded_at: float
    #: None: the user had more keys than the budget holds; each of its keys is looked up.
    hashes: set[int] | None


@attrs.define
class KeyFilter:
    #: Users whose sets are kept, at most.
    limit: int = 10_000
    #: Bytes of hashes kept in all, at most (:data:`HASH_BYTES` each).
    max_bytes: int = FILTER_BYTES
    # Least recently used first.
    _users: OrderedDict[str, _UserKeys] = attrs.field(factory=OrderedDict)
    # Hashes in all the sets (invariant: the sum of their sizes, at most ``max_hashes``).
    _hashes: int = 0

    def __len__(self) -> int:
        return len(self._users)

    @property
    def max_hashes(self) -> int:
        """Hashes the budget holds in all; a user with more keys keeps no set."""
        return max(1, self.max_bytes // HASH_BYTES)

    @property
    def bytes(self) -> int:
        """What the sets kept are counted as against ``max_bytes``."""
        return self._hashes * HASH_BYTES

    def needs_load(self, user_id: str, since: float) -> bool:
        """Whether the user's keys must be (re)loaded for a create whose window starts at
        ``since``: never loaded (or dropped since), or every key loaded is older than the
        window. A user asked about counts as used now."""
        found = self._users.get(user_id)
        if found is None:
            return True
        self._users.move_to_end(user_id)
        return since > found.loaded_at

    def load(self, user_id: str, since: float, loaded_at: float, keys: list[str] | None) -> None:
        """The keys of the user's jobs created at or after ``since``, read at ``loaded_at``
        (plus those staged and not yet committed), or None when there were more than
        :attr:`max_hashes` (the store reads one more than that at most); drops the least
        recently used users' sets beyond ``limit`` users or ``max_bytes``."""
        self._drop(user_id)
        hashes = None if keys is None else {hash(key) for key in keys}
        if hashes is not None and len(hashes) > self.max_hashes:
            hashes = None
        self._users[user_id] = _UserKeys(since, loaded_at, hashes)
        self._hashes += len(hashes or ())
        self._trim(user_id)

    def add(self, user_id: str, key: str) -> None:
        """A keyed job staged (only a loaded user's set needs it: a load reads the rest)."""
        found = self._users.get(user_id)
        if found is not None and found.hashes is not None:
            before = len(found.hashes)
            found.hashes.add(hash(key))
            if len(found.hashes) > before:
                self._hashes += 1
                self._trim(user_id)

    def may_exist(self, user_id: str, key: str, since: float) -> bool:
        """False only if no job of the user created at or after ``since`` has ``key``."""
        found = self._users.get(user_id)
        return (
            found is None
            or since < found.since
            or found.hashes is None
            or hash(key) in found.hashes
        )

    def _drop(self, user_id: str) -> None:
        found = self._users.pop(user_id, None)
        if found is not None:
            self._hashes -= len(found.hashes or ())

    def _trim(self, user_id: str) -> None:
        """Drop the least recently used other users' sets until both bounds hold; if
        ``user_id``'s set alone is over the budget, it keeps none."""
        while len(self._users) > self.limit or self._hashes > self.max_hashes:
            oldest = next(iter(self._users))
            if oldest == user_id and len(self._users) > 1:
                self._users.move_to_end(user_id)  # it was just used: the others go first
                continue
            if oldest != user_id:
                self._drop(oldest)
                continue
            found = self._users[user_id]
            self._hashes -= len(found.hashes or ())
            found.hashes = None
