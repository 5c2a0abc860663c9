"""The Python client's event buffer full: the application takes no events for a while, and
the client keeps serving its requests.

The read loop used to wait for room in the buffer, so every reply behind an event waited
too: a program that subscribed, then created or polled jobs before reading its events timed
out on every request once ``event_buffer`` events had arrived. Now an event that finds the
buffer full is left out and its rooms are resubscribed from their cursors once the
application has taken half the buffer: each event still reaches it once and in order.
Real server on loopback, real time (threads: the database).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio

from actors import JobEvent
from transport import Client, open_client

from .serving import GATES, serving, token


async def _until_completed(client: Client, job_ids: list[str]) -> None:
    """Poll each job until it completed: every poll is a request answered while the
    application takes no event."""
    with trio.fail_after(20):
        for job_id in job_ids:
            while True:
                if (await client.get(job_id))["state"] == "completed":
                    break
                await trio.sleep(0.05)


async def _drain(client: Client, last: int) -> list[JobEvent]:
    """The events handed out until one with ``user_seq`` ``last``."""
    taken: list[JobEvent] = []
    with trio.fail_after(20):
        async for item in client.events():
            assert isinstance(item, JobEvent), item  # no reset: the log replays everything
            taken.append(item)
            if item.user_seq == last:
                return taken
    raise AssertionError("events() ended")


def _emitting(gate: str, count: int) -> dict[str, Any]:
    GATES.setdefault(gate, trio.Event()).set()
    return {"phases": [{"gate": gate, "count": count}]}


async def test_requests_are_answered_while_the_event_buffer_is_full(tmp_path: Path) -> None:
    async with (
        serving(tmp_path / "db") as running,
        open_client(running.url, token("alice"), event_buffer=8, request_timeout=5) as client,
    ):
        await client.subscribe("user:alice")
        jobs = [
            (await client.create("emitter", _emitting("buffer-full-user", 40)))["id"]
            for _ in range(3)
        ]
        await _until_completed(client, jobs)
        head = (await client.request("subscribe", room="user:alice"))["head"]
        assert client.counters.buffer_full > 0
        taken = await _drain(client, head)
    # The user's room, once each and in order: user_seq 1..head without a gap or a repeat.
    assert [e.user_seq for e in taken] == list(range(1, head + 1))
    for job_id in jobs:
        seqs = [e.seq for e in taken if e.job_id == job_id]
        assert seqs == list(range(1, len(seqs) + 1)) and taken[-1].user_seq == head


async def test_a_job_room_left_out_of_a_full_buffer_resumes_where_it_was(tmp_path: Path) -> None:
    """Both rooms of one job on one client: each is resubscribed from its own cursor, and
    every event is handed out once, in order: the replay of the room resubscribed second
    repeats what the other one handed out, and those are dropped as duplicates (PROTOCOL.md
    lets a client that follows both rooms of an event receive it twice; this one does not
    hand it out twice)."""
    async with (
        serving(tmp_path / "db") as running,
        open_client(running.url, token("alice"), event_buffer=6, request_timeout=5) as client,
    ):
        gate = GATES.setdefault("buffer-full-job", trio.Event())
        phases = [{"gate": "buffer-full-job", "count": 40}]
        job = (await client.create("emitter", {"phases": phases}))["id"]
        # The gate not open yet: the job waits before its first progress. Follow both rooms.
        with trio.fail_after(10):
            while True:
                if (await client.get(job))["state"] == "running":
                    break
                await trio.sleep(0.02)
        await client.subscribe(f"job:{job}")
        await client.subscribe("user:alice")
        gate.set()
        await _until_completed(client, [job])
        head = (await client.request("subscribe", room="user:alice"))["head"]
        assert client.counters.buffer_full > 0
        taken = await _drain(client, head)
    # Each room's events once and in order: every number from the first to the last once
    # (an event of both rooms is handed out once, whichever room replays it first).
    seqs, user_seqs = [e.seq for e in taken], [e.user_seq for e in taken]
    assert seqs == list(range(seqs[0], seqs[0] + len(taken))), seqs
    assert user_seqs == list(range(user_seqs[0], head + 1)), user_seqs
    assert client.counters.duplicates > 0  # the replays of the room resubscribed second
