"""The seam the tests' backend doubles share: a real backend whose ``commit`` first awaits the
test's :meth:`CommitHooks.before_commit` (to wait, count, check, or fail as the database
would: then nothing is written) and, once committed, :meth:`CommitHooks.after_commit` (to
check what was stored), so no double repeats ``Backend.commit``'s signature."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

import attrs
import pytest

from actors import Backend, Job, JobEvent, MemoryBackend, PostgresBackend, SqliteBackend


@attrs.frozen
class Commit:
    """One call of ``Backend.commit``, its arguments as given."""

    jobs: Collection[Job]
    events: Sequence[JobEvent]
    deleted: Collection[str]
    heartbeats: Mapping[str, tuple[int, float]]
    progress_only: Collection[str]


class CommitHooks:
    """A mixin, listed before the backend class: ``class Gated(CommitHooks, MemoryBackend)``."""

    async def before_commit(self, commit: Commit) -> None:
        """Runs before every commit; raising fails the commit with nothing written."""

    async def after_commit(self, commit: Commit) -> None:
        """Runs after every commit that succeeded."""

    async def commit(
        self,
        jobs: Collection[Job],
        events: Sequence[JobEvent],
        deleted: Collection[str],
        heartbeats: Mapping[str, tuple[int, float]],
        *,
        progress_only: Collection[str] = (),
        keyed: Mapping[str, float] | None = None,
    ) -> Sequence[JobEvent]:
        call = Commit(jobs, events, deleted, heartbeats, progress_only)
        await self.before_commit(call)
        committed: Sequence[JobEvent] = await super().commit(  # type: ignore[misc]
            jobs, events, deleted, heartbeats, progress_only=progress_only, keyed=keyed
        )
        await self.after_commit(call)
        return committed


def new_backend(request: pytest.FixtureRequest, path: Path) -> Backend:
    """A backend of the kind a fixture's ``request.param`` names (``memory``, ``sqlite`` on
    ``path``, ``postgresql`` on the ``pg_url`` fixture's database), not opened yet."""
    if request.param == "memory":
        return MemoryBackend()
    if request.param == "postgresql":
        return PostgresBackend(request.getfixturevalue("pg_url"))
    return SqliteBackend(path, synchronous="NORMAL")
