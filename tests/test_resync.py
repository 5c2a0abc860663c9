"""A refused resubscription is retried with backoff until the room is live again.

A room whose resubscription is refused receives nothing more from the server, so giving up
freezes it for good (`jobspine submit --watch` stuck at 34% while the job completed). Here
the server refuses for rate (a tight `request_rate`), after a `lagged` and after a reconnect,
and every room must still reach its job's final event.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from actors import EventType, JobEvent
from transport import CLOSE, Client, ClientError, RunningServer, open_client
from transport._commands import watch_job
from transport._display import PlainView

from .serving import GATES, eventually, serving, token


@pytest.fixture(autouse=True)
def fresh_gates() -> None:
    GATES.clear()


def gate(name: str) -> None:
    GATES.setdefault(name, trio.Event()).set()


def phases(*counts: int, prefix: str) -> list[dict[str, Any]]:
    return [{"gate": f"{prefix}{n}", "count": count} for n, count in enumerate(counts)]


async def patiently(call: Callable[[], Awaitable[Any]]) -> Any:
    """Set-up requests under a tight rate limit: wait out `rate_limited`."""
    while True:
        try:
            return await call()
        except ClientError as exc:
            if exc.code != "rate_limited":
                raise
            await trio.sleep(0.1)


async def exhaust_rate(client: Client) -> None:
    """Spend the connection's request budget: the next request is refused for rate."""
    with pytest.raises(ClientError) as refused:
        for _ in range(1000):
            await client.ping()
    assert refused.value.code == "rate_limited"


def lag_everyone(running: RunningServer) -> None:
    """The broadcaster fell behind the store: every connection is told `lagged` and must
    resubscribe its rooms from their cursors (the path of a server under load)."""
    running.server.broadcaster._lag_everyone()


async def final_event(client: Client, job_ids: set[str], seconds: float = 30) -> set[str]:
    done: set[str] = set()
    with trio.fail_after(seconds):
        async for item in client.events():
            if isinstance(item, JobEvent) and item.type is EventType.COMPLETED:
                done.add(item.job_id)
                if done == job_ids:
                    return done
    raise AssertionError("the event stream ended")


async def test_a_resubscribe_refused_for_rate_is_retried(tmp_path: Path) -> None:
    async with (
        serving(tmp_path / "rate.db", request_rate=0.5, request_burst=4) as running,
        open_client(running.url, token("alice"), max_backoff=0.5) as client,
    ):
        job = await client.create("emitter", {"phases": phases(5, 5, prefix="a")})
        room = f"job:{job['id']}"
        await client.subscribe(room)
        gate("a0")
        await eventually(lambda: client.rooms[room].cursor.seq >= 8)  # type: ignore[union-attr]
        await exhaust_rate(client)
        lag_everyone(running)
        await eventually(lambda: client.rooms[room].resync_failures >= 1)
        state = client.rooms[room]
        assert state.resyncing and state.resync_pending
        assert "rate_limited" in (state.resync_error or "")
        gate("a1")  # the job finishes while the room is refused
        assert await final_event(client, {job["id"]}) == {job["id"]}
        # Settled when the reply came, before the events after it; the resubscribing task
        # ends a scheduling round later.
        assert not state.resyncing and state.resync_error is None and state.resync_failures == 0
        await eventually(lambda: not state.resync_pending)
        assert client.counters.resync_failures >= 1 and client.counters.connects == 1


async def test_resubscribes_refused_after_a_reconnect_are_retried(tmp_path: Path) -> None:
    """Another input of the kind: after a reconnect the client resubscribes five rooms at
    once on a connection allowed a burst of three; two are refused and must be retried."""
    async with (
        serving(tmp_path / "burst.db", request_rate=3.0, request_burst=3) as running,
        open_client(running.url, token("alice"), max_backoff=0.5) as client,
    ):
        ids = set()
        for n in range(5):
            job = await patiently(
                partial(client.create, "emitter", {"phases": phases(1, 3, prefix=f"r{n}-")})
            )
            await patiently(partial(client.subscribe, f"job:{job['id']}"))
            gate(f"r{n}-0")
            ids.add(job["id"])
        await eventually(lambda: all(r.cursor.seq >= 4 for r in client.rooms.values()))  # type: ignore[union-attr]
        await trio.sleep(1.1)  # a full bucket, then spend it on the resubscribes
        for conn in list(running.server.connections):
            conn.close(CLOSE["going_away"], "test: drop every connection")
        await eventually(lambda: client.counters.resync_failures >= 2)
        for n in range(5):
            gate(f"r{n}-1")
        assert await final_event(client, ids) == ids
        assert client.counters.connects == 2
        assert not any(r.resyncing or r.resync_error for r in client.rooms.values())
        await eventually(lambda: not any(r.resync_pending for r in client.rooms.values()))


async def test_the_watcher_reaches_the_final_state_after_a_refused_resubscribe(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`jobspine submit --watch` (its `watch_job`) does not freeze at the last progress."""
    async with (
        serving(tmp_path / "watch.db", request_rate=0.5, request_burst=5) as running,
        open_client(running.url, token("alice"), max_backoff=0.5) as client,
    ):
        job = await client.create("emitter", {"phases": phases(34, 66, prefix="w")})
        room = f"job:{job['id']}"
        status: list[int] = []

        async def watch() -> None:
            status.append(
                await watch_job(client, job["id"], PlainView(job["id"]), exit_on_pause=False)
            )

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            await eventually(lambda: room in client.rooms and not client.rooms[room].resyncing)
            gate("w0")
            await eventually(lambda: client.rooms[room].cursor.seq >= 36)  # type: ignore[union-attr]
            await exhaust_rate(client)
            lag_everyone(running)
            await eventually(lambda: client.rooms[room].resync_failures >= 1)
            gate("w1")
            with trio.fail_after(30):
                while not status:  # noqa: ASYNC110 - the watcher reports by returning
                    await trio.sleep(0.05)
        assert status == [0]
        out = capsys.readouterr().out
        assert "completed: " in out and "100.0%" not in out.splitlines()[0]
