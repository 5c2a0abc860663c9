"""Child process for the SIGKILL test: runs checkpointing jobs on a SQLite file and prints
``ACK <job id> <i>`` after each checkpoint is acknowledged (so: durable)."""

from __future__ import annotations

import sys
from typing import Any

import trio

from actors import JobContext, RuntimeConfig, open_runtime


async def counter(ctx: JobContext, input: Any) -> Any:
    i = ctx.resumed_from["i"] + 1 if ctx.resumed_from else 0
    while i < input["steps"]:
        if input["checkpoint"]:
            await ctx.checkpoint({"i": i})
            print(f"ACK {ctx.job_id} {i}", flush=True)
        else:
            await ctx.progress(100 * i / input["steps"])
        i += 1
        await trio.sleep(input["delay"])
    return {"steps": i}


HANDLERS = {"counter": counter}


async def main(path: str, jobs: int) -> None:
    async with open_runtime(path, handlers=HANDLERS, config=RuntimeConfig()) as rt:
        for n in range(jobs):
            input = {"steps": 10_000, "delay": 0.005, "checkpoint": n % 4 != 0}
            job = await rt.create_job("counter", f"user{n % 3}", input)
            print(f"JOB {job.id} {int(input['checkpoint'])}", flush=True)
        print("READY", flush=True)
        await trio.sleep_forever()


if __name__ == "__main__":
    trio.run(main, sys.argv[1], int(sys.argv[2]))
