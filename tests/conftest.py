from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import trio

from actors import (
    DEMO_HANDLERS,
    TERMINAL_STATES,
    Handler,
    Job,
    JobState,
    MemoryBackend,
    Runtime,
    RuntimeConfig,
    open_runtime,
)

pytest_plugins = ["actors.testing"]


@asynccontextmanager
async def memory_runtime(
    handlers: Mapping[str, Handler] | None = None,
    backend: MemoryBackend | None = None,
    **config: Any,
) -> AsyncIterator[Runtime]:
    """A runtime on the in-memory store: no threads, so safe under autojump_clock."""
    async with open_runtime(
        backend=backend or MemoryBackend(),
        handlers=DEMO_HANDLERS if handlers is None else handlers,
        config=RuntimeConfig(**config),
    ) as runtime:
        yield runtime


async def wait_for_state(
    rt: Runtime,
    job_id: str,
    states: set[JobState] | frozenset[JobState] = TERMINAL_STATES,
    timeout: float = 30,  # noqa: ASYNC109 - a test helper's bound, not an API
) -> Job:
    """Wait until the job is in one of ``states`` (read from the store, woken by its events)."""
    with trio.fail_after(timeout):
        async with rt.events() as stream:
            job = await rt.get_job(job_id)
            if job.state in states:
                return job
            async for event in stream:
                if event.job_id == job_id and event.state in states:
                    return await rt.get_job(job_id)
    raise AssertionError("event stream ended")
