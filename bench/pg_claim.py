"""Claim cost against the number of waiting jobs (PostgreSQL backend).

    .venv/bin/python -m bench.pg_claim [--url postgresql://postgres@127.0.0.1:5432]
        [--waiting 100,100000] [--users 10] [--kinds 2] [--priorities 3]

For each size, a fresh database (created on the server of ``--url`` and dropped afterwards)
is filled with waiting jobs of ``--users`` users (one of them 90% of the jobs), ``--kinds``
kinds and ``--priorities`` priorities, then ``Backend.claim`` is timed for 1 and for 100 free
slots (each claim marks its jobs; a commit puts them back, so every round sees the same
queue). Also prints ``EXPLAIN ANALYZE`` of the groups statement and of the window statement
of the largest size (the highest priority's groups, 100 slots). Prints a table and a JSON
line. Figures (with the machine's load average) are in the docstring of
``actors/_postgres_queue.py`` and in the README.
"""

from __future__ import annotations

import argparse
import json
import secrets
import statistics
import time
from typing import Any

import attrs
import psycopg
import trio
from psycopg import sql

from actors import ClaimLimits, ClaimRequest, PostgresBackend
from actors._ops import create
from actors._options import CreateOptions
from actors._postgres_queue import GROUPS_SQL, PLAN_SQL, WINDOW_SQL
from bench.args import amount


def explain(url: str, now: float) -> list[str]:
    with psycopg.connect(url, autocommit=True) as conn:
        groups = conn.execute(GROUPS_SQL).fetchall()
        top = max(priority for priority, _, _ in groups)
        mine = [(user, kind) for priority, user, kind in groups if priority == top]
        params: dict[str, Any] = {
            "users": [user for user, _ in mine],
            "kinds": [kind for _, kind in mine],
            "after_at": [float("-inf")] * len(mine),
            "after_id": [""] * len(mine),
            "priority": top,
            "now": now,
            "owner": "bench",
            # As a claim of 100 slots sizes it: twice each group's fair part, 8..64.
            "window": min(64, 100, max(8, -(-200 // len(mine)))),
        }
        with conn.transaction():
            conn.execute(PLAN_SQL)  # as the claim does
            rows = conn.execute(
                sql.SQL("EXPLAIN (ANALYZE, COSTS OFF) ") + sql.SQL(WINDOW_SQL), params
            ).fetchall()
            groups_plan = conn.execute(
                sql.SQL("EXPLAIN (ANALYZE, COSTS OFF) ") + sql.SQL(GROUPS_SQL)
            ).fetchall()
    return [f"groups: {len(groups)}"] + [r[0] for r in groups_plan] + [r[0] for r in rows]


async def measure(server: str, waiting: int, args: argparse.Namespace) -> dict[str, Any]:
    name = f"jobspine_bench_claim_{secrets.token_hex(4)}"
    with psycopg.connect(f"{server}/postgres", autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = f"{server}/{name}"
    try:
        backend = PostgresBackend(url)
        async with backend.opened():
            now = time.time()
            jobs = []
            for n in range(waiting):
                light = f"u{(n // 10) % (args.users - 1)}" if args.users > 1 else "heavy"
                user = "heavy" if n % 10 < 9 else light
                options = CreateOptions(priority=(n // 7 % args.priorities) * 10)
                kind = f"k{n % args.kinds}"
                jobs.append(create(f"{n:026}", user, kind, {"n": n}, now - waiting + n, options)[0])
                if len(jobs) == 5000:
                    await backend.commit(jobs, [], (), {})
                    jobs = []
            await backend.commit(jobs, [], (), {})
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute("VACUUM ANALYZE jobs")
            result: dict[str, Any] = {"waiting": waiting}
            for slots in (1, 100):
                timings = []
                for _ in range(args.rounds):
                    request = ClaimRequest("node", time.time(), time.time() + 5, ClaimLimits(slots))
                    started = time.perf_counter()
                    claimed = await backend.claim(request)
                    timings.append(time.perf_counter() - started)
                    assert len(claimed.jobs) == min(slots, waiting)
                    released = [
                        attrs.evolve(j, owner=None, lease_expires_at=None) for j in claimed.jobs
                    ]
                    await backend.commit(released, [], (), {})
                timings.sort()
                result[f"claim_{slots}_ms_p50"] = statistics.median(timings) * 1000
                result[f"claim_{slots}_ms_p90"] = timings[int(len(timings) * 0.9)] * 1000
            result["plan"] = await trio.to_thread.run_sync(explain, url, time.time())
        return result
    finally:
        with psycopg.connect(f"{server}/postgres", autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="postgresql://postgres@127.0.0.1:5432")
    parser.add_argument("--waiting", default="100,100000")
    parser.add_argument("--users", type=amount(int, 1), default=10)
    parser.add_argument("--kinds", type=amount(int, 1), default=2)
    parser.add_argument("--priorities", type=amount(int, 1), default=3)
    parser.add_argument("--rounds", type=amount(int, 1), default=30)
    args = parser.parse_args()
    rows = [await measure(args.url, int(n), args) for n in args.waiting.split(",")]
    print("\n".join(rows[-1]["plan"]))
    print(
        f"{'waiting':>10} {'claim 1 p50 (ms)':>17} {'p90':>7} {'claim 100 p50 (ms)':>19} {'p90':>7}"
    )
    for row in rows:
        print(
            f"{row['waiting']:>10,} {row['claim_1_ms_p50']:>17.2f} {row['claim_1_ms_p90']:>7.2f}"
            f" {row['claim_100_ms_p50']:>19.2f} {row['claim_100_ms_p90']:>7.2f}"
        )
    print(json.dumps([{k: v for k, v in row.items() if k != "plan"} for row in rows]))


if __name__ == "__main__":
    trio.run(main)
