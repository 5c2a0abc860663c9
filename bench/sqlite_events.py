"""The events table's layout on SQLite: schema v4's against v5's, commits and reads.

    python -m bench.sqlite_events [--jobs 100] [--per-commit 62] [--commits 300] [--json FILE]

v4 kept events in a WITHOUT ROWID table keyed by ``(job_id, seq)``: each job's rows (about
450 bytes, as a progress event's record) together, so a commit of events of N jobs rewrote N
leaf pages. v5 appends them to a rowid table and finds them by job through an index. Each
commit inserts the events of ``--per-commit`` jobs picked at random among ``--jobs`` (each
its next ``seq``; users: one per 10 jobs) with ``synchronous=FULL`` in WAL mode, as the store
does; after as many commits to warm up, ``--commits`` are timed: wall time and the thread's
CPU. Then the 5,000 events of one job are read back in order (the job room's replay from the
log), for a job that ran alone and for one that ran beside 49 others. Prints a table and
writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from actors._sqlite import MIGRATIONS
from bench.args import amount

RECORD = "x" * 450  # a progress event's record, about

V4 = [
    """CREATE TABLE events (job_id TEXT NOT NULL, seq INTEGER NOT NULL,
        user_id TEXT NOT NULL, user_seq INTEGER NOT NULL, type TEXT NOT NULL,
        record TEXT NOT NULL, PRIMARY KEY (job_id, seq)) WITHOUT ROWID""",
    "CREATE UNIQUE INDEX events_by_user ON events (user_id, user_seq)",
]
#: v5's statements that shape the new table, renamed ``events`` (MIGRATIONS[4] copies into it).
V5 = [
    MIGRATIONS[4][0].replace("events_v5", "events"),
    *(s for s in MIGRATIONS[4] if s.startswith("CREATE UNIQUE INDEX")),
]
INSERT = "INSERT INTO events (job_id, seq, user_id, user_seq, type, record) VALUES (?,?,?,?,?,?)"
READ = "SELECT record FROM events WHERE job_id = ? AND seq > ? ORDER BY seq LIMIT ?"


def ms(values: list[float], q: float) -> float:
    return 1000 * sorted(values)[min(len(values) - 1, int(q * len(values)))]


def measure(layout: list[str], jobs: int, per_commit: int, commits: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "events.db"
        db = sqlite3.connect(path)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        for statement in layout:
            db.execute(statement)
        rng = random.Random(1)
        ids = sorted(f"01M8{rng.randrange(10**21):022d}" for _ in range(jobs))
        seq = dict.fromkeys(ids, 0)
        user_seq: dict[str, int] = {}

        def commit(batch: list[str]) -> None:
            rows = []
            for job_id in batch:
                seq[job_id] += 1
                user = f"u{ids.index(job_id) % 10}"
                user_seq[user] = user_seq.get(user, 0) + 1
                rows.append((job_id, seq[job_id], user, user_seq[user], "progress", RECORD))
            db.executemany(INSERT, rows)
            db.commit()

        for _ in range(commits):  # warm up: the tables as they are after a while
            commit(rng.sample(ids, per_commit))
        walls, cpus = [], []
        for _ in range(commits):
            batch = rng.sample(ids, per_commit)
            wall, cpu = time.perf_counter(), time.thread_time()
            commit(batch)
            walls.append(time.perf_counter() - wall)
            cpus.append(time.thread_time() - cpu)
        # One job alone, then 50 at once (each event a commit of its own, in turn).
        db.executemany(INSERT, [("alone", n, "r", n, "progress", RECORD) for n in range(1, 5001)])
        db.commit()
        db.executemany(
            INSERT,
            [(f"beside{n % 50}", n // 50 + 1, "s", n, "progress", RECORD) for n in range(250_000)],
        )
        db.commit()
        reads = {}
        for job_id in ("alone", "beside7"):
            times = []
            for _ in range(5):
                started = time.perf_counter()
                got = db.execute(READ, (job_id, 0, 5000)).fetchall()
                times.append(time.perf_counter() - started)
                assert len(got) == 5000
            reads[job_id] = 1000 * statistics.median(times)
        db.close()
    return {
        "commit_p50_ms": ms(walls, 0.5),
        "commit_p90_ms": ms(walls, 0.9),
        "commit_p99_ms": ms(walls, 0.99),
        "commit_cpu_p50_ms": ms(cpus, 0.5),
        "read_5000_alone_ms": reads["alone"],
        "read_5000_beside_49_ms": reads["beside7"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--jobs", type=amount(int, 1), default=100)
    parser.add_argument("--per-commit", type=amount(int, 1), default=62)
    parser.add_argument("--commits", type=amount(int, 1), default=300)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    per_commit = min(args.per_commit, args.jobs)
    results: dict[str, Any] = {
        "cores": os.cpu_count(),
        "machine": platform.machine(),
        "sqlite": sqlite3.sqlite_version,
        "jobs": args.jobs,
        "per_commit": per_commit,
    }
    for name, layout in (("v4", V4), ("v5", V5)):
        results[name] = measure(layout, args.jobs, per_commit, args.commits)
    print(
        f"bench.sqlite_events: {results['cores']} cores ({results['machine']}), SQLite"
        f" {results['sqlite']}; {per_commit} of {args.jobs} jobs' events per commit"
    )
    print(f"{'figure':28} {'v4 (WITHOUT ROWID)':>20} {'v5 (rowid + index)':>20} {'v5/v4':>7}")
    for key in results["v4"]:
        old, new = results["v4"][key], results["v5"][key]
        print(f"{key:28} {old:20.2f} {new:20.2f} {new / old:7.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
