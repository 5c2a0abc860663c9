"""The seam the tests' backend doubles share: a real backend whose ``commit`` first awaits the
test's :meth:`CommitHooks.before_commit` (to wait, count, check, or fail as the database
would: then nothing is written) and, once committed, :meth:`CommitHooks.after_commit` (to
check what was stored), so no double repeats ``Backend.commit``'s signature."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import attrs

from actors import Job, JobEvent


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
    ) -> Sequence[JobEvent]:
        call = Commit(jobs, events, deleted, heartbeats, progress_only)
        await self.before_commit(call)
        committed: Sequence[JobEvent] = await super().commit(  # type: ignore[misc]
            jobs, events, deleted, heartbeats, progress_only=progress_only
        )
        await self.after_commit(call)
        return committed
