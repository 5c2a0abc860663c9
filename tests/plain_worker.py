"""A jobspine worker written from PROTOCOL.md ("Worker protocol") alone, with asyncio and the
plain ``websockets`` library: no jobspine import. It serves one kind, ``count``: input
``{"n": N, "delay": seconds}``; it reports progress and checkpoints ``{"i": i}`` after each
step, resumes from its checkpoint, honours ``stop`` (checkpoint, then ``stopped``) and
``cancel``, and returns ``{"counted": N, "resumed_at": i}``.

Usage: python tests/plain_worker.py ws://HOST:PORT WORKER_TOKEN
"""

from __future__ import annotations

import asyncio
import itertools
import json
import sys
from functools import partial
from typing import Any

import websockets

ids = itertools.count(1)


def forget(running: dict[str, Any], job_id: str, task: object) -> None:
    running.pop(job_id, None)


async def main(url: str, token: str) -> None:
    async with websockets.connect(url.rstrip("/") + "/worker", max_size=4 * 1024 * 1024) as ws:
        await ws.send(
            json.dumps(
                {
                    "op": "hello",
                    "id": 0,
                    "token": token,
                    "kinds": ["count"],
                    "capacity": 2,
                    "name": "plain",
                    # The kind's options (section 9); a job of it is stored with them.
                    "options": {"count": {"max_attempts": 2}},
                }
            )
        )
        welcome = json.loads(await ws.recv())
        assert welcome["type"] == "reply", welcome
        interval = welcome["result"]["heartbeat_interval"]
        running: dict[str, dict[str, Any]] = {}
        pending: dict[int, asyncio.Future[Any]] = {}

        async def request(op: str, **fields: Any) -> Any:
            request_id = next(ids)
            future = asyncio.get_running_loop().create_future()
            pending[request_id] = future
            await ws.send(json.dumps({"op": op, "id": request_id, **fields}))
            return await future

        async def heartbeats() -> None:
            while True:
                await asyncio.sleep(interval)
                jobs = [{"job_id": j, "attempt": a["attempt"]} for j, a in running.items()]
                await ws.send(json.dumps({"op": "heartbeat", "jobs": jobs}))

        async def run(assign: dict[str, Any]) -> None:
            ref = {"job_id": assign["job_id"], "attempt": assign["attempt"]}
            state = running[assign["job_id"]]
            start = (assign["checkpoint"] or {}).get("i", 0)
            n = assign["input"]["n"]
            for i in range(start + 1, n + 1):
                await asyncio.sleep(assign["input"].get("delay", 0))
                if state["stop"]:
                    await request("checkpoint", **ref, data={"i": i - 1})
                    await ws.send(json.dumps({"op": "stopped", "id": next(ids), **ref}))
                    return
                await request("progress", **ref, progress=100 * i / n, step=f"{i}/{n}")
                await request("checkpoint", **ref, data={"i": i})
            result = {"counted": n, "resumed_at": start}
            await ws.send(json.dumps({"op": "complete", "id": next(ids), **ref, "result": result}))

        beat = asyncio.create_task(heartbeats())
        async for frame in ws:
            message = json.loads(frame)
            kind = message["type"]
            if kind in ("reply", "error") and message.get("id") in pending:
                pending.pop(message["id"]).set_result(message)
            elif kind == "assign":
                task = asyncio.create_task(run(message))
                running[message["job_id"]] = {
                    "attempt": message["attempt"],
                    "stop": False,
                    "task": task,
                }
                task.add_done_callback(partial(forget, running, message["job_id"]))
            elif kind == "stop" and message["job_id"] in running:
                running[message["job_id"]]["stop"] = True
            elif kind == "cancel" and message["job_id"] in running:
                running.pop(message["job_id"])["task"].cancel()
        beat.cancel()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
