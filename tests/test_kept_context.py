"""A job's context kept past its attempt (by a task of the application's own, started outside
the handler) says the attempt is over: ``ctx.stopping`` is True and ``ctx.wait_stopping()``
returns. Before, ``wait_stopping()`` on it waited for ever (nothing would ever ask that
attempt to stop), and a loop ``while not ctx.stopping`` never ended: in the embedded runtime
and in a ``jobspine worker`` alike."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio

from actors import JobContext, JobState, RuntimeConfig
from transport import ServerConfig, open_server
from transport._worker_process import WorkerProcess

from .conftest import memory_runtime, wait_for_state
from .serving import SECRET
from .worker_support import wait_connected, worker_token

S = JobState


def keeper(kept: list[JobContext], release: trio.Event | None = None) -> Any:
    async def handler(ctx: JobContext, input: Any) -> Any:
        kept.append(ctx)
        if release is not None:
            await release.wait()
        assert not ctx.stopping
        return "done"

    return handler


async def over(ctx: JobContext) -> bool:
    """Whether ``ctx`` says its attempt is over: stopping, and wait_stopping() returns."""
    with trio.move_on_after(5):
        await ctx.wait_stopping()
        return ctx.stopping
    return False


async def test_a_context_kept_past_its_attempt_says_it_is_over(
    autojump_clock: trio.abc.Clock,
) -> None:
    kept: list[JobContext] = []
    async with memory_runtime({"keeper": keeper(kept)}) as rt:
        job = await rt.create_job("keeper", "alice", {})
        assert (await wait_for_state(rt, job.id)).state is S.COMPLETED
        assert await over(kept[0])


async def test_a_task_waiting_for_a_stop_is_woken_when_the_attempt_ends(
    autojump_clock: trio.abc.Clock,
) -> None:
    kept: list[JobContext] = []
    release = trio.Event()
    woken: list[bool] = []
    async with memory_runtime({"keeper": keeper(kept, release)}) as rt, trio.open_nursery() as n:
        job = await rt.create_job("keeper", "alice", {})
        while not kept:  # noqa: ASYNC110 - the handler has started
            await trio.sleep(0.01)

        async def waiter() -> None:
            woken.append(await over(kept[0]))

        n.start_soon(waiter)
        await trio.sleep(1)
        assert not woken  # no stop while the handler runs
        release.set()
        assert (await wait_for_state(rt, job.id)).state is S.COMPLETED
    assert woken == [True]


async def test_a_workers_context_kept_past_its_attempt_says_it_is_over(tmp_path: Path) -> None:
    kept: list[JobContext] = []
    async with (
        open_server(
            tmp_path / "db",
            ServerConfig(secret=SECRET, port=0),
            runtime_config=RuntimeConfig(sqlite_synchronous="NORMAL"),
        ) as running,
        trio.open_nursery() as nursery,
    ):
        process = WorkerProcess(running.url, worker_token(), {"keeper": keeper(kept)})
        nursery.start_soon(process.run)
        await wait_connected(running)
        job = await running.runtime.create_job("keeper", "alice", {})
        assert (await wait_for_state(running.runtime, job.id)).state is S.COMPLETED
        assert await over(kept[0])  # within 5 s of its report
        nursery.cancel_scope.cancel()
