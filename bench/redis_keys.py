"""What a peer's run leaves in Redis, deleted after it: the server is shared (the local one),
so only keys of the run's own queue or job ids are matched. arq keeps a job's keys for a day
after a worker is stopped mid-job; 20,000 were left after a few side-by-side runs."""

from __future__ import annotations

from collections.abc import Sequence


async def delete_matching(url: str, patterns: Sequence[str]) -> int:
    """Delete every key matching one of ``patterns`` (Redis ``SCAN MATCH`` globs) at ``url``;
    returns how many were deleted."""
    from redis.asyncio import Redis  # arq's and saq's client, installed with them

    client = Redis.from_url(url)
    deleted = 0
    try:
        for pattern in patterns:
            batch: list[bytes] = []
            async for key in client.scan_iter(match=pattern, count=1000):
                batch.append(key)
                if len(batch) >= 500:
                    deleted += await client.delete(*batch)
                    batch.clear()
            if batch:
                deleted += await client.delete(*batch)
    finally:
        await client.aclose()
    return deleted
