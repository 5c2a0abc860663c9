"""Delivery latency across nodes: Redis push versus the log fallback.

    python -m bench.fanout_latency [--server postgresql://postgres@127.0.0.1:5432]
                                   [--events 300] [--pause 0.01]

Two runtimes share one PostgreSQL database (a database of its own, dropped at the end) and a
``redis-server`` this script starts on a free port. Node A runs a job making ``--events``
progress events ``--pause`` seconds apart, each labelled with the wall-clock time of its
``progress`` call; a subscriber of the user's room on node B (and one on A, for reference)
records when each event reaches its outbox. Then the same with Redis killed: B polls the log.
Reported: p50/p90/p99/max of (arrival - progress call), in milliseconds.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import time
from typing import Any

import orjson
import psycopg
import trio
from psycopg import sql

from actors import BroadcasterConfig, JobContext, Outbox, Runtime, RuntimeConfig, open_runtime
from actors._fanout import FanoutConfig
from actors._postgres import PostgresBackend
from bench.args import amount


async def ticker(ctx: JobContext, input: Any) -> Any:
    for step in range(input["n"]):
        await ctx.progress(step * 100 / input["n"], repr(time.time()))
        await trio.sleep(input["pause"])
    return input["n"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def collect(rt: Runtime, user: str, delays: list[float], done: trio.Event) -> None:
    assert rt.broadcaster is not None
    outbox = Outbox(rt.broadcaster.config)
    await rt.broadcaster.join(outbox, f"user:{user}", None)
    rt.broadcaster.finish_join(outbox, f"user:{user}")
    while True:
        await outbox.wait()
        for item in outbox.take(max_bytes=1 << 30):
            message = orjson.loads(item)
            if message["type"] != "event":
                continue
            event = message["event"]
            if event["type"] == "progress":
                delays.append(time.time() - float(event["data"]["step"]))
            elif event["type"] == "completed":
                done.set()
                return


def summary(delays: list[float]) -> str:
    ms = sorted(d * 1000 for d in delays)
    q = statistics.quantiles(ms, n=100)
    return f"n={len(ms)} p50={q[49]:.1f} p90={q[89]:.1f} p99={q[98]:.1f} max={ms[-1]:.1f} ms"


async def run_round(a: Runtime, b: Runtime, user: str, events: int, pause: float) -> list[str]:
    remote: list[float] = []
    local: list[float] = []
    remote_done, local_done = trio.Event(), trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(collect, b, user, remote, remote_done)
        nursery.start_soon(collect, a, user, local, local_done)
        await trio.sleep(0.5)  # both joined
        await a.create_job("ticker", user, {"n": events, "pause": pause})
        with trio.fail_after(events * pause * 10 + 60):
            await remote_done.wait()
            await local_done.wait()
    return [f"  other node: {summary(remote)}", f"  same node:  {summary(local)}"]


async def main(args: argparse.Namespace) -> None:
    name = f"fanout_bench_{os.getpid()}"
    with psycopg.connect(f"{args.server}/postgres", autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    port = free_port()
    redis = await trio.lowlevel.open_process(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"{args.server}/{name}"
    try:
        await trio.sleep(0.3)
        fanout = FanoutConfig(f"redis://127.0.0.1:{port}/0", ping_interval=0.2)

        def node(handlers: dict[str, Any]) -> Any:
            return open_runtime(
                backend=PostgresBackend(url),
                handlers=handlers,
                config=RuntimeConfig(resume_on_start=False),
                broadcast=BroadcasterConfig(),
                fanout=fanout,
            )

        async with node({"ticker": ticker}) as a, node({}) as b:
            assert a.fanout is not None and b.fanout is not None
            with trio.fail_after(10):
                while not (a.fanout.health.ok and b.fanout.health.ok):  # noqa: ASYNC110
                    await trio.sleep(0.05)
            print(f"Redis up (push), {args.events} events {args.pause * 1000:g} ms apart:")
            print("\n".join(await run_round(a, b, "push", args.events, args.pause)))
            redis.kill()
            await redis.wait()
            with trio.fail_after(10):
                while b.fanout.health.ok or a.fanout.health.ok:  # noqa: ASYNC110
                    await trio.sleep(0.05)
            print(f"Redis down (log polled every {fanout.poll_interval * 1000:g} ms):")
            print("\n".join(await run_round(a, b, "poll", args.events, args.pause)))
    finally:
        if redis.poll() is None:
            redis.kill()
            await redis.wait()
        with psycopg.connect(f"{args.server}/postgres", autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", default="postgresql://postgres@127.0.0.1:5432")
    parser.add_argument("--events", type=amount(int, 1), default=300)
    parser.add_argument("--pause", type=amount(float), default=0.01)
    trio.run(main, parser.parse_args())
