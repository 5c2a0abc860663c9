"""Claim cost against the number of waiting jobs (SQLite backend).

    .venv/bin/python -m bench.claim [--waiting 1000,100000] [--users 10]

Fills a fresh database with waiting jobs of ``--users`` users (one of them 90% of them, the
others sharing the rest), then
times ``Backend.claim`` for 1 and for 100 free slots (each claim marks its jobs; they are put
back by a commit so every round sees the same queue). Prints a table and a JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import attrs
import trio

from actors import ClaimLimits, ClaimRequest, SqliteBackend
from actors._ops import create
from bench.args import amount


async def measure(waiting: int, users: int, rounds: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        backend = SqliteBackend(Path(tmp) / "claim.db", synchronous="OFF")
        async with backend.opened():
            now = time.time()
            jobs = []
            for n in range(waiting):
                # The other users share the last tenth, in turn.
                user = "heavy" if n % 10 < 9 or users == 1 else f"u{n // 10 % (users - 1)}"
                jobs.append(create(f"{n:026}", user, "k", {"n": n}, now - waiting + n)[0])
                if len(jobs) == 5000:
                    await backend.commit(jobs, [], (), {})
                    jobs = []
            await backend.commit(jobs, [], (), {})
            result: dict[str, float] = {"waiting": waiting}
            for slots in (1, 100):
                timings = []
                for _ in range(rounds):
                    request = ClaimRequest("node", time.time(), time.time() + 5, ClaimLimits(slots))
                    started = time.perf_counter()
                    claimed = await backend.claim(request)
                    timings.append(time.perf_counter() - started)
                    assert len(claimed.jobs) == min(slots, waiting)
                    released = [
                        attrs.evolve(j, owner=None, lease_expires_at=None) for j in claimed.jobs
                    ]
                    await backend.commit(released, [], (), {})
                result[f"claim_{slots}_ms_p50"] = statistics.median(timings) * 1000
            return result


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--waiting", default="1000,100000")
    parser.add_argument("--users", type=amount(int, 1), default=10)
    parser.add_argument("--rounds", type=amount(int, 1), default=30)
    args = parser.parse_args()
    rows = [await measure(int(n), args.users, args.rounds) for n in args.waiting.split(",")]
    print(f"{'waiting':>10} {'claim 1 (ms p50)':>18} {'claim 100 (ms p50)':>20}")
    for row in rows:
        print(
            f"{row['waiting']:>10,.0f} {row['claim_1_ms_p50']:>18.2f}"
            f" {row['claim_100_ms_p50']:>20.2f}"
        )
    print(json.dumps(rows))


if __name__ == "__main__":
    trio.run(main)
