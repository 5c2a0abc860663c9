"""The SQLite claim: a walk over the partial index of waiting jobs, run in the connection's
thread (synchronous sqlite3 calls), planned by :class:`ClaimPlanner`.

The index ``jobs_waiting (priority, user_id, kind, ready_at, id) WHERE state = 'created'`` is
walked as a loose index scan: one seek per priority level; one statement finds each (user,
kind) group in it with its oldest claimable job (:data:`_HEADS`); the plan reads further
into a group only as far as it takes from it. The cost is O(groups x log n + claimed), not
O(waiting jobs): with 2,000 users waiting, 16 ms for one slot (``python -m bench.claim``).
Without statistics (no ``ANALYZE``) SQLite would pick the index on ``state`` and scan every
waiting job, so each statement names its index.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

from ._backend import ClaimRequest
from ._scheduling import Candidate, GroupKey

__all__ = ["claim_sync"]

#: Candidates read per group per seek, at most.
_BATCH = 64


class _Group:
    """A cursor over one group's ready jobs, oldest first. The first read takes the head
    only, each later one twice as many as the one before (up to ``_BATCH``): the rows read
    from a group stay within twice what the plan takes from it, plus one. (Reading
    ``_BATCH`` from every group made a claim of one free slot read O(groups x _BATCH) rows.)"""

    __slots__ = ("buffer", "db", "exhausted", "key", "limit", "now", "owner")

    def __init__(self, db: sqlite3.Connection, key: GroupKey, now: float, owner: str) -> None:
        self.db = db
        self.owner = owner
        self.key = key
        self.now = now
        self.buffer: list[Candidate] = []
        self.exhausted = False
        self.limit = 1

    def fill(self, after: Candidate | None) -> None:
        priority, user_id, kind = self.key
        ready, last = (-1e300, "") if after is None else (after.ready_at, after.id)
        rows = self.db.execute(
            "SELECT id, ready_at FROM jobs INDEXED BY jobs_waiting WHERE state = 'created'"
            " AND priority = ? AND user_id = ? AND kind = ? AND ready_at <= ?"
            " AND (ready_at, id) > (?, ?)"
            " AND (owner IS NULL OR owner = ? OR lease_expires_at < ?)"
            " ORDER BY ready_at, id LIMIT ?",
            (priority, user_id, kind, self.now, ready, last, self.owner, self.now, self.limit),
        ).fetchall()
        self.buffer = [Candidate(job_id, priority, user_id, kind, at) for job_id, at in rows]
        self.exhausted = len(rows) < self.limit
        self.limit = min(_BATCH, 2 * self.limit)

    def head(self, candidate: Candidate) -> None:
        """Start from ``candidate``, the group's oldest claimable job (as :meth:`fill` from
        the start would have read it)."""
        self.buffer = [candidate]
        self.limit = 2

    def after(self, candidate: Candidate) -> Candidate | None:
        i = self.buffer.index(candidate) + 1
        if i < len(self.buffer):
            return self.buffer[i]
        if self.exhausted:
            return None
        self.fill(candidate)
        return self.buffer[0] if self.buffer else None


#: Each (user, kind) group of a priority with its oldest claimable job, in one statement: a
#: loose index scan as a recursive CTE (two seeks per group, in SQLite's C instead of a
#: Python round trip per seek). A row value ``(user_id, kind) > (?, ?)`` would seek on
#: ``user_id`` only and then step through every waiting job of that user: hence the two
#: seeks (the next kind of the same user, else the next user).
_HEADS = """
WITH RECURSIVE g(user_id, kind) AS (
    SELECT * FROM (
        SELECT user_id, kind FROM jobs INDEXED BY jobs_waiting
        WHERE state = 'created' AND priority = :priority ORDER BY user_id, kind LIMIT 1
    )
    UNION ALL
    SELECT n.user_id, n.kind FROM g JOIN jobs AS n ON n.rowid = coalesce(
        (SELECT rowid FROM jobs INDEXED BY jobs_waiting
         WHERE state = 'created' AND priority = :priority AND user_id = g.user_id
         AND kind > g.kind ORDER BY kind LIMIT 1),
        (SELECT rowid FROM jobs INDEXED BY jobs_waiting
         WHERE state = 'created' AND priority = :priority AND user_id > g.user_id
         ORDER BY user_id, kind LIMIT 1)
    )
)
SELECT g.user_id, g.kind, h.id, h.ready_at FROM g JOIN jobs AS h ON h.rowid = (
    SELECT rowid FROM jobs INDEXED BY jobs_waiting
    WHERE state = 'created' AND priority = :priority AND user_id = g.user_id
    AND kind = g.kind AND ready_at <= :now
    AND (owner IS NULL OR owner = :owner OR lease_expires_at < :now)
    ORDER BY ready_at, id LIMIT 1
)
"""


def _next_in(
    db: sqlite3.Connection, now: float, owner: str
) -> Callable[[Candidate], Candidate | None]:
    """The plan's ``next_of``: a group's cursor is opened when the plan first takes its head
    (most groups of a large queue are never read past it)."""
    groups: dict[GroupKey, _Group] = {}

    def next_of(candidate: Candidate) -> Candidate | None:
        group = groups.get(candidate.group)
        if group is None:
            group = groups[candidate.group] = _Group(db, candidate.group, now, owner)
            group.head(candidate)
        return group.after(candidate)

    return next_of


def claim_sync(db: sqlite3.Connection, request: ClaimRequest) -> tuple[list[str], float | None]:
    """Pick and mark (``owner``, ``lease_expires_at``) in one transaction; returns the ids
    claimed, in order, and the earliest future ``ready_at`` among waiting jobs."""
    now = request.now
    planner = request.planner()
    picked: list[Candidate] = []
    db.execute("BEGIN IMMEDIATE")
    try:
        row = db.execute(
            "SELECT max(priority) FROM jobs INDEXED BY jobs_waiting WHERE state = 'created'"
        ).fetchone()
        priority = row[0]
        while priority is not None and planner.slots():
            params = {"priority": priority, "now": now, "owner": request.owner}
            heads = {
                (priority, user_id, kind): Candidate(job_id, priority, user_id, kind, at)
                for user_id, kind, job_id, at in db.execute(_HEADS, params).fetchall()
            }
            picked += planner.plan_priority(heads, _next_in(db, now, request.owner))
            row = db.execute(
                "SELECT max(priority) FROM jobs INDEXED BY jobs_waiting"
                " WHERE state = 'created' AND priority < ?",
                (priority,),
            ).fetchone()
            priority = row[0]
        ids = [candidate.id for candidate in picked]
        db.executemany(
            "UPDATE jobs SET owner = ?, lease_expires_at = ? WHERE id = ?",
            [(request.owner, request.lease_expires_at, job_id) for job_id in ids],
        )
        later = db.execute(
            "SELECT min(ready_at) FROM jobs INDEXED BY jobs_scheduled"
            " WHERE state = 'created' AND ready_at > ?",
            (now,),
        ).fetchone()[0]
        db.commit()
    except Exception:
        db.rollback()
        raise
    return ids, later
