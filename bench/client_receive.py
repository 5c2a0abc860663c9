"""The Python client's CPU per event received: frames parsed, rooms' cursors checked, events
structured and handed out by ``Client.events()``.

    python -m bench.client_receive [--events 80000] [--jobs 100] [--per-frame 40] [--json FILE]

No network and no server: batch frames as PROTOCOL.md describes them (``{"type": "batch",
"messages": [{"type": "event", "event": …}, …]}``, one user's progress events spread over
``--jobs`` jobs) are fed to the client's read loop in place of a websocket's, the client
following the user's room and every job's room. Two ways of taking them: as they come (the
application's loop takes each frame's events before the next frame is read, as a program
keeping up does) and all at once after every frame was read (a program that fell behind:
its buffer holds them all). Prints a table and writes the figures as JSON: CPU µs per event
(``time.process_time``; one thread, so it is the client's whole cost but the websocket's).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import orjson
import trio
from trio_websocket import ConnectionClosed

from bench.args import amount
from transport import Client, ConnectionLostError
from transport.client import RoomCursor, _Room


def frames(events: int, jobs: int, per_frame: int) -> list[bytes]:
    seqs = [0] * jobs
    out = []
    for first in range(0, events, per_frame):
        messages = []
        for user_seq in range(first + 1, min(events, first + per_frame) + 1):
            job = user_seq % jobs
            seqs[job] += 1
            event = {
                "job_id": f"job{job:05d}", "user_id": "u", "seq": seqs[job], "type": "progress",
                "state": "running", "at": 1_795_000_000.0 + user_seq / 1000,
                "data": {"progress": 12.5, "step": "reading"}, "actor": None,
                "user_seq": user_seq,
            }  # fmt: skip
            messages.append({"type": "event", "event": event})
        out.append(orjson.dumps({"type": "batch", "messages": messages}))
    return out


class _Frames:
    """What the client's read loop reads in place of a websocket: ``frames``, then closed."""

    def __init__(self, frames: list[bytes]) -> None:
        self._frames = iter(frames)

    async def get_message(self) -> bytes:
        await trio.lowlevel.checkpoint()  # the application's loop runs between frames
        try:
            return next(self._frames)
        except StopIteration:
            raise ConnectionClosed(None) from None


def _client(jobs: int, events: int) -> Client:
    client = Client("ws://unused", "token", event_buffer=events + 1)
    client.welcome = {"epoch": "e"}
    for room in ["user:u", *(f"job:job{job:05d}" for job in range(jobs))]:
        client.rooms[room] = _Room(RoomCursor("e", 0), RoomCursor("e", 0), resyncing=False)
    return client


async def run_case(mode: str, events: int, jobs: int, per_frame: int) -> dict[str, Any]:
    data = frames(events, jobs, per_frame)
    client = _client(jobs, events)
    taken = 0

    async def take() -> None:
        nonlocal taken
        async for _ in client.events():
            taken += 1

    cpu = time.process_time()
    async with trio.open_nursery() as nursery:
        if mode == "as they come":
            nursery.start_soon(take)
        with contextlib.suppress(ConnectionLostError):  # the end of the frames
            await client._read_loop(_Frames(data))  # type: ignore[arg-type]
        client._send_events.close()
        if mode != "as they come":
            await take()
    cpu = time.process_time() - cpu
    if taken != events:
        raise SystemExit(f"bench.client_receive: {taken} of {events} events handed out")
    return {"mode": mode, "events": events, "cpu_us_per_event": 1e6 * cpu / events}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--events", type=amount(int, 1), default=80_000, help="(default 80000)")
    parser.add_argument("--jobs", type=amount(int, 1), default=100, help="(default 100)")
    parser.add_argument(
        "--per-frame", type=amount(int, 1), default=40, help="events per frame (default 40)"
    )
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    rows = [
        trio.run(run_case, mode, args.events, args.jobs, args.per_frame)
        for mode in ("as they come", "all at once")
    ]
    print(
        f"bench.client_receive: {os.cpu_count()} cores ({platform.machine()}), Python"
        f" {platform.python_version()}; {args.events:,} events of {args.jobs} jobs,"
        f" {args.per_frame} per frame, user room and job rooms followed"
    )
    print(f"{'taken':>14} {'CPU us/event':>13}")
    for r in rows:
        print(f"{r['mode']:>14} {r['cpu_us_per_event']:>13.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"cores": os.cpu_count(), "runs": rows}, indent=2))


if __name__ == "__main__":
    main()
