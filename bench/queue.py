"""Queue benchmarks (``jobspine bench --scenario queue retry-storm``), against a real server
process over websockets.

``queue``: N jobs enqueued by 10 users, one of them with 90% of the jobs, with a runtime
capacity (``max_running``) C. The capacity is first filled by C *gate* jobs (another user)
that hold their slots until released, so the N jobs all wait: the enqueue rate, and the
server's RSS with N waiting against the same server before the enqueue (and the empty
server), are measured with nothing of theirs running. Then the gate opens and the queue
drains: the dispatch rate (jobs started/s) and each user's share of the running-job time
while every user still has jobs waiting, against the fair share (max-min: C / 10 each), both
read afterwards from the server's durable event log (``started`` and end events). Last,
with the queue empty, jobs are created one at a time and their create -> start latency read
from the job records (``started_at - created_at``, both the server's clock).

``retry-storm``: N jobs of the ``flaky`` kind (fails twice, then succeeds; ``max_attempts``
3, :data:`bench.handlers.FLAKY_RETRY`), followed through their users' rooms: every job must
complete, with exactly 3 ``started`` events and 2 ``retrying`` events whose delays lie
within the jitter bounds, and each retry must start no earlier than its ``next_attempt_at``.
"""

from __future__ import annotations

import argparse
import math
import sqlite3
import time
from pathlib import Path
from typing import Any

import trio

from actors import EventType, JobEvent
from bench.handlers import FLAKY_RETRY
from bench.run import SECRET, Row, percentile, poll_until, progress_line, server
from transport import Client, mint_token, open_client

MB = 1024 * 1024
#: Jobs one connection enqueues at most (a user with more gets more connections).
PER_CONNECTION = 10_000


def users_for(jobs: int, users: int = 10) -> list[tuple[str, int]]:
    """(user, jobs): user0 has 90%, the others share the rest."""
    big = round(jobs * 0.9)
    rest = jobs - big
    small = [rest // (users - 1) + (1 if n < rest % (users - 1) else 0) for n in range(users - 1)]
    return [("user0", big), *((f"user{n + 1}", count) for n, count in enumerate(small))]


async def enqueue(url: str, plan: list[tuple[str, int]], kind: str, input: Any) -> float:
    """Create the jobs of ``plan`` (16 in flight per connection); returns the seconds taken."""

    async def connection(user: str, count: int) -> None:
        inflight = trio.Semaphore(16)
        async with (
            open_client(url, mint_token(SECRET, user)) as client,
            trio.open_nursery() as nursery,
        ):
            for _ in range(count):
                await inflight.acquire()
                nursery.start_soon(one, client, inflight)

    async def one(client: Client, inflight: trio.Semaphore) -> None:
        try:
            await client.create(kind, input)
        finally:
            inflight.release()

    began = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for user, count in plan:
            while count > 0:
                nursery.start_soon(connection, user, min(count, PER_CONNECTION))
                count -= PER_CONNECTION
    return time.perf_counter() - began


async def queue(args: argparse.Namespace, workdir: Path) -> list[Row]:
    jobs, capacity, hold = args.queue_jobs, args.queue_capacity, args.queue_hold
    label = f"queue {jobs:,}"
    plan = users_for(jobs)
    config = f"[runtime]\nmax_running = {capacity}\nmax_waiting_per_user = {jobs}\n"
    async with (
        server(workdir, config=config) as served,
        open_client(served.url, mint_token(SECRET, "admin", admin=True)) as admin,
    ):
        await trio.sleep(1)
        rss_empty = served.rss()
        gate = workdir / f"gate-{time.monotonic_ns()}"
        await enqueue(served.url, [("gate", capacity)], "hold", {"go_file": str(gate)})
        await poll_until(admin.stats, lambda s: s["running"] >= capacity, 120)
        await trio.sleep(1)
        rss_gate = served.rss()
        progress_line(f"[{label}] enqueueing {jobs:,} jobs")
        took = await enqueue(served.url, plan, "hold", {"seconds": hold})
        stats = await admin.stats()
        assert stats["created"] == jobs, stats
        await trio.sleep(1)
        rss_waiting = served.rss()

        # Drain until every job ended; who ran when is read from the event log afterwards.
        drain_began = time.time()
        gate.touch()
        while True:
            total = await admin.stats()
            done = total["completed"] + total["failed"] + total["cancelled"]
            progress_line(f"[{label}] draining: {done:,} ended, {total['running']} running")
            if done >= jobs + capacity:
                break
            await trio.sleep(0.5)
        drained = time.time() - drain_began
        runs = read_runs(served.db)

        # create -> start with capacity free: one job at a time, nothing else waiting.
        token = mint_token(SECRET, "latency")
        async with open_client(served.url, token) as client:
            count = args.queue_latency_jobs
            for _ in range(count):
                await client.create("hold", {"seconds": 0}, tags=["latency"])
                await trio.sleep(0.005)
            await poll_until(
                lambda: client.my_stats(),
                lambda s: s["completed"] == count,
                60,
            )
            records = await client.list(tag="latency", limit=500)
        latencies = [1000 * (j["started_at"] - j["created_at"]) for j in records]

    # Dispatch rate: the queued jobs' starts, first to last.
    starts = sorted(start for user, start, _ in runs if user != "gate")
    rate = (len(starts) - 1) / (starts[-1] - starts[0]) if len(starts) > 1 else math.nan
    # Shares: time-weighted running jobs per user while every user still had jobs waiting:
    # from the first slot a gate job freed (the slots not held by gate jobs are all contended
    # by the 10 users) to the last start of the user whose queue ran out first.
    window = (
        min(end for user, _, end in runs if user == "gate"),
        min(max(s for u, s, _ in runs if u == user) for user, _ in plan),
    )
    shares = running_shares(runs, window, [user for user, _ in plan])
    fair = 100 / len(plan)
    contended = window[1] > window[0]
    small = [shares[user] for user, _ in plan[1:]]
    worst = max(abs(share - fair) for share in shares.values()) if contended else math.nan
    over = (rss_waiting - rss_gate) / MB
    p99 = percentile(latencies, 0.99)
    bound = f"<= {capacity / hold:,.0f}" if hold else ""
    return [
        Row(label, "enqueue rate (create over websockets)", jobs / took, "jobs/s"),
        Row(label, "dispatch rate (jobs started/s)", rate, "jobs/s", goal=bound),
        Row(label, "drain: gate opened -> all ended", drained, "s"),
        Row(
            label,
            "create -> start p50 (capacity free)",
            percentile(latencies, 0.5),
            "ms",
        ),
        Row(label, "create -> start p99 (capacity free)", p99, "ms", goal="< 5 ms", ok=p99 < 5),
        Row(
            label,
            "user0 (90% of jobs): share of running",
            shares["user0"],
            "%",
            goal=f"{fair:.0f}%",
        ),
        Row(label, "users 1-9: lowest share of running", min(small, default=math.nan), "%"),
        Row(label, "users 1-9: highest share of running", max(small, default=math.nan), "%"),
        Row(
            label,
            f"largest share gap to fair (over {max(0, window[1] - window[0]):.1f} s)",
            worst,
            "pts",
            goal="< 2 pts",
            ok=worst < 2 if contended else None,
        ),
        Row(label, "RSS of the empty server", rss_empty / MB, "MB"),
        Row(
            label,
            "RSS: the waiting jobs (over before enqueue)",
            over,
            "MB",
            goal="< 100 MB",
            ok=over < 100,
        ),
        Row(
            label,
            "RSS: with them, over the empty server",
            (rss_waiting - rss_empty) / MB,
            "MB",
        ),
    ]


def read_runs(db: Path) -> list[tuple[str, float, float]]:
    """(user, start, end) of every attempt, from the server's durable event log (read-only;
    the bench measures, it never writes)."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        rows = conn.execute(
            "SELECT job_id, user_id, type, json_extract(record, '$.at') FROM events"
            " WHERE type IN ('started', 'completed', 'failed', 'retrying', 'paused',"
            " 'cancelled', 'recovery') ORDER BY job_id, seq"
        ).fetchall()
    runs = []
    began: dict[str, float] = {}
    for job_id, user, kind, at in rows:
        if kind == "started":
            began[job_id] = at
        elif job_id in began:
            runs.append((user, began.pop(job_id), at))
    return runs


def running_shares(
    runs: list[tuple[str, float, float]], window: tuple[float, float], users: list[str]
) -> dict[str, float]:
    """Each user's share (%) of the running-job time within ``window``."""
    low, high = window
    held = dict.fromkeys(users, 0.0)
    for user, start, end in runs:
        if user in held:
            held[user] += max(0.0, min(end, high) - max(start, low))
    total = sum(held.values())
    return {user: 100 * t / total if total else math.nan for user, t in held.items()}


async def retry_storm(args: argparse.Namespace, workdir: Path) -> list[Row]:
    jobs = args.retry_jobs
    label = f"retry storm {jobs:,}"
    plan = [(f"user{n}", jobs // 10 + (1 if n < jobs % 10 else 0)) for n in range(10)]
    events: dict[str, list[JobEvent]] = {}
    ended = trio.Event()
    finished = 0

    async def follow(user: str, *, task_status: trio.TaskStatus[None]) -> None:
        nonlocal finished
        async with open_client(served.url, mint_token(SECRET, user)) as client:
            await client.subscribe(f"user:{user}")
            task_status.started()
            async for item in client.events():
                if not isinstance(item, JobEvent):
                    continue
                events.setdefault(item.job_id, []).append(item)
                if item.type in (EventType.COMPLETED, EventType.FAILED):
                    finished += 1
                    if finished == jobs:
                        ended.set()

    async with server(workdir) as served, trio.open_nursery() as nursery:
        for user, _ in plan:
            await nursery.start(follow, user)
        began = time.perf_counter()
        await enqueue(served.url, plan, "flaky", {})
        with trio.move_on_after(args.retry_timeout):
            while not ended.is_set():
                progress_line(f"[{label}] {finished:,} of {jobs:,} jobs ended")
                with trio.move_on_after(1):
                    await ended.wait()
        took = time.perf_counter() - began
        nursery.cancel_scope.cancel()

    completed = sum(1 for evs in events.values() if evs[-1].type is EventType.COMPLETED)
    three = sum(
        1
        for evs in events.values()
        if [e.type for e in evs].count(EventType.STARTED) == 3
        and [e.type for e in evs].count(EventType.RETRYING) == 2
    )
    outside = 0
    early = 0
    lateness: list[float] = []
    ratios: list[float] = []
    policy = FLAKY_RETRY
    for evs in events.values():
        for n, event in enumerate(evs):
            if event.type is not EventType.RETRYING:
                continue
            failed = event.data["failed_attempts"]
            base = min(
                policy.maximum_interval,
                policy.initial_interval * policy.backoff_coefficient ** (failed - 1),
            )
            delay = event.data["delay"]
            low, high = (
                base * (1 - policy.jitter),
                min(policy.maximum_interval, base * (1 + policy.jitter)),
            )
            if not low - 1e-6 <= delay <= high + 1e-6:
                outside += 1
            started = next((e for e in evs[n:] if e.type is EventType.STARTED), None)
            if started is None:
                continue
            if started.at < event.data["next_attempt_at"] - 1e-3:
                early += 1
            lateness.append(1000 * (started.at - event.data["next_attempt_at"]))
            ratios.append((started.at - event.at) / delay)
    retries = sum(1 for evs in events.values() for e in evs if e.type is EventType.RETRYING)
    return [
        Row(label, "jobs completed", completed, "jobs", goal=f"{jobs:,}", ok=completed == jobs),
        Row(label, "jobs lost or unfinished", jobs - completed, "", goal="0", ok=completed == jobs),
        Row(
            label,
            "jobs with attempts != 3 (3 starts, 2 retries)",
            jobs - three,
            "",
            goal="0",
            ok=three == jobs,
        ),
        Row(
            label,
            f"backoff outside jitter bounds (of {retries:,})",
            outside,
            "",
            goal="0",
            ok=outside == 0 and retries == 2 * jobs,
        ),
        Row(label, "retries started before next_attempt_at", early, "", goal="0", ok=early == 0),
        Row(label, "retry start after next_attempt_at p50", percentile(lateness, 0.5), "ms"),
        Row(label, "retry start after next_attempt_at p99", percentile(lateness, 0.99), "ms"),
        Row(label, "observed / planned backoff, lowest", min(ratios, default=math.nan), "x"),
        Row(label, "all jobs ended in", took, "s"),
    ]
