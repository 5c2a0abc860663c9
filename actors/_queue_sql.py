"""The SQLite claim: a walk over the partial index of waiting jobs, run in the connection's
thread (synchronous sqlite3 calls), planned by :class:`ClaimPlanner`.

The index ``jobs_waiting (priority, user_id, kind, ready_at, id) WHERE state = 'created'`` is
walked as a loose index scan: one seek per priority level, one per (user, kind) group in
it, and for each open group only as many of its oldest ready jobs as the plan takes. The cost
is O(groups x log n + claimed), not O(waiting jobs). Without statistics (no ``ANALYZE``)
SQLite would pick the index on ``state`` and scan every waiting job, so each statement names
its index.
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

    def after(self, candidate: Candidate) -> Candidate | None:
        i = self.buffer.index(candidate) + 1
        if i < len(self.buffer):
            return self.buffer[i]
        if self.exhausted:
            return None
        self.fill(candidate)
        return self.buffer[0] if self.buffer else None


def _next_group(
    db: sqlite3.Connection, priority: int, user_id: str, kind: str
) -> tuple[str, str] | None:
    """The (user, kind) group after ``(user_id, kind)`` within ``priority``. Two seeks: a row
    value ``(user_id, kind) > (?, ?)`` would seek on ``user_id`` only and then step through
    every waiting job of that user."""
    found = db.execute(
        "SELECT user_id, kind FROM jobs INDEXED BY jobs_waiting WHERE state = 'created'"
        " AND priority = ? AND user_id = ? AND kind > ? ORDER BY kind LIMIT 1",
        (priority, user_id, kind),
    ).fetchone()
    if found is None:
        found = db.execute(
            "SELECT user_id, kind FROM jobs INDEXED BY jobs_waiting WHERE state = 'created'"
            " AND priority = ? AND user_id > ? ORDER BY user_id, kind LIMIT 1",
            (priority, user_id),
        ).fetchone()
    return None if found is None else (found[0], found[1])


def _next_in(groups: dict[GroupKey, _Group]) -> Callable[[Candidate], Candidate | None]:
    return lambda candidate: groups[candidate.group].after(candidate)


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
            groups: dict[GroupKey, _Group] = {}
            user_id, kind = "", ""
            while True:
                found = _next_group(db, priority, user_id, kind)
                if found is None:
                    break
                user_id, kind = found
                key = (priority, user_id, kind)
                if planner.group_open(key):
                    group = _Group(db, key, now, request.owner)
                    group.fill(None)
                    if group.buffer:
                        groups[key] = group
            heads = {key: group.buffer[0] for key, group in groups.items()}
            picked += planner.plan_priority(heads, _next_in(groups))
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
