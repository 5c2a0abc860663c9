"""Subscriber process for the benchmarks: websocket clients that count and time events.

    python -m bench.client SPEC.json

SPEC: {"url", "secret", "user_rooms": [user...], "job_rooms": [[user, [job ids]]...],
"expect": {job id: progress events}, "timeout": seconds}. Prints "READY" once subscribed, then
one JSON line with what it received: deliveries, losses, latency samples.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import orjson
import trio

from actors import EventType, JobEvent
from bench.args import interrupted
from transport import Client, mint_token, open_client


async def follow(
    client: Client, expect: dict[str, int], stats: dict[str, Any], done: trio.Event
) -> None:
    seen: dict[tuple[str, str], int] = {}
    async for item in client.events():
        if not isinstance(item, JobEvent):
            stats["resets"] += 1
            continue
        now = time.time()
        if item.type is EventType.PROGRESS:
            stats["latencies"].append(now - float(item.data["step"]))
            stats["deliveries"] += 1
            stats["first"] = min(stats["first"], now)
            stats["last"] = max(stats["last"], now)
            for room in (f"job:{item.job_id}", f"user:{item.user_id}"):
                if room in client.rooms:
                    key = (room, item.job_id)
                    seen[key] = seen.get(key, 0) + 1
        elif item.type is EventType.COMPLETED:
            stats["completed"] += 1
            for room in (f"job:{item.job_id}", f"user:{item.user_id}"):
                if room in client.rooms:
                    got = seen.get((room, item.job_id), 0)
                    if got != expect.get(item.job_id, 0):
                        stats["lost"] += expect.get(item.job_id, 0) - got
                    stats["rooms_done"] += 1
            if stats["rooms_done"] >= stats["rooms_expected"]:
                done.set()


async def main(spec: dict[str, Any]) -> None:
    expect: dict[str, int] = spec["expect"]
    stats: dict[str, Any] = {
        "deliveries": 0,
        "latencies": [],
        "lost": 0,
        "resets": 0,
        "completed": 0,
        "rooms_done": 0,
        "first": float("inf"),
        "last": 0.0,
        "gaps": 0,
        "duplicates": 0,
        "skipped": 0,
        "lagged": 0,
        "reconnects": 0,
    }
    user_jobs: dict[str, int] = {}
    for user in spec["owners"].values():
        if user in spec["user_rooms"]:
            user_jobs[user] = user_jobs.get(user, 0) + 1
    stats["rooms_expected"] = sum(user_jobs.values()) + sum(
        len(ids) for _, ids in spec["job_rooms"]
    )
    done = trio.Event()
    clients: list[Client] = []
    async with trio.open_nursery() as nursery:

        async def connect(user: str, rooms: list[str], task_status: trio.TaskStatus[None]) -> None:
            token = mint_token(spec["secret"], user)
            async with open_client(spec["url"], token, event_buffer=1_000_000) as client:
                clients.append(client)
                # Live from now: the jobs wait for the runner's go signal, sent after READY.
                cursor = None
                inflight = trio.Semaphore(16)  # the server's requests-in-flight limit

                async def subscribe(room: str) -> None:
                    async with inflight:
                        await client.subscribe(room, cursor)

                async with trio.open_nursery() as subscribing:
                    for room in rooms:
                        subscribing.start_soon(subscribe, room)
                task_status.started()
                await follow(client, expect, stats, done)

        async with trio.open_nursery() as connecting:
            for user in spec["user_rooms"]:
                connecting.start_soon(nursery.start, connect, user, [f"user:{user}"])
            for user, ids in spec["job_rooms"]:
                connecting.start_soon(nursery.start, connect, user, [f"job:{i}" for i in ids])
        print("READY", flush=True)
        with trio.move_on_after(spec["timeout"]):
            await done.wait()
        for client in clients:
            stats["gaps"] += client.counters.gaps
            stats["duplicates"] += client.counters.duplicates
            stats["skipped"] += client.counters.skipped
            stats["lagged"] += client.counters.lagged
            stats["reconnects"] += client.counters.reconnects
        nursery.cancel_scope.cancel()
    stats["first"] = stats["first"] if stats["deliveries"] else 0.0
    sys.stdout.write(orjson.dumps(stats).decode() + "\n")


if __name__ == "__main__":
    try:
        trio.run(main, orjson.loads(open(sys.argv[1], "rb").read()))  # noqa: SIM115
    except BaseException as exc:
        if not interrupted(exc):
            raise
        sys.exit(130)
