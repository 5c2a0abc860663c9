"""``jobspine nodes``: the database's nodes, their leases and running jobs, read directly from
the store (no server needed, nothing written).

PostgreSQL is read with the database's clock (lease ages and expiry as the nodes see them);
a SQLite file is opened read-only (``mode=ro``), beside a server that may own it.
"""

from __future__ import annotations

import argparse
import sqlite3
import time
from pathlib import Path
from typing import Any

import attrs

from actors import NodeInfo
from actors._backend import POSTGRES_URL_SCHEMES

from ._display import write, write_json
from ._exit import CLIError, ExitCode

__all__ = ["read_nodes", "run_nodes"]

_COLUMNS = (
    "node_id, incarnation, host, pid, started_at, renewed_at, lease_expires_at, state,"
    " running, taken_over_by"
)


def read_nodes(database: str) -> tuple[float, list[NodeInfo]]:
    """``(now, nodes)``: the database's clock (Unix s) and every node row, by node id then
    start. Raises :class:`CLIError` (``DATABASE_UNUSABLE``) if it cannot be read."""
    query = f"SELECT {_COLUMNS} FROM nodes ORDER BY node_id, started_at"
    if database.startswith(POSTGRES_URL_SCHEMES):
        import psycopg

        from actors._postgres import redact_url

        try:
            with psycopg.connect(database, connect_timeout=5, autocommit=True) as conn:
                row = conn.execute("SELECT extract(epoch FROM clock_timestamp())").fetchone()
                now = float(row[0]) if row else time.time()
                if conn.execute("SELECT to_regclass('nodes')").fetchone() in (None, (None,)):
                    return now, []
                rows: list[Any] = conn.execute(query).fetchall()
        except psycopg.Error as exc:
            message = " ".join(str(exc).split())
            raise CLIError(
                ExitCode.DATABASE_UNUSABLE, f"database {redact_url(database)}: {message}"
            ) from None
        return now, [NodeInfo(*row) for row in rows]
    if not Path(database).is_file():
        raise CLIError(ExitCode.DATABASE_UNUSABLE, f"database {database}: no such file")
    try:
        db = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
        try:
            found = db.execute("SELECT 1 FROM sqlite_master WHERE name = 'nodes'").fetchall()
            rows = db.execute(query).fetchall() if found else []
            # A file's node never renews its row: its running jobs are counted now.
            running = dict(
                db.execute(
                    "SELECT owner, count(*) FROM jobs WHERE state = 'running'"
                    " AND owner IS NOT NULL GROUP BY owner"
                ).fetchall()
                if found
                else []
            )
        finally:
            db.close()
    except sqlite3.Error as exc:
        raise CLIError(ExitCode.DATABASE_UNUSABLE, f"database {database}: {exc}") from None
    nodes = [NodeInfo(*row) for row in rows]
    return time.time(), [attrs.evolve(n, running=running.get(n.owner, 0)) for n in nodes]


def _shown_state(node: NodeInfo, now: float, shared: bool) -> str:
    """On a shared database ``alive`` only while the lease holds: a row alive past its lease
    is ``expired``. A SQLite file's node never renews (its owner lock proves it alive): its
    state is as recorded (``alive`` until it leaves or the next start takes it over)."""
    if shared and node.state == "alive" and node.lease_expires_at < now:
        return "expired"
    return node.state


def run_nodes(args: argparse.Namespace) -> int:
    """Print the nodes of ``--store URL`` (else ``--db FILE``) as a table or ``--json``
    (``[{node_id, incarnation, owner, host, pid, state, lease_age, lease_expires_in, running,
    started_at, taken_over_by}]``, seconds; a SQLite file's node holds the file's lock instead
    of a lease: its lease fields are null, its running jobs counted now)."""
    database = args.store or args.db
    now, nodes = read_nodes(database)
    shared = database.startswith(POSTGRES_URL_SCHEMES)
    shown = [
        {
            "node_id": n.node_id,
            "incarnation": n.incarnation,
            "owner": n.owner,
            "host": n.host,
            "pid": n.pid,
            "state": _shown_state(n, now, shared),
            "lease_age": round(now - n.renewed_at, 3) if shared else None,
            "lease_expires_in": round(n.lease_expires_at - now, 3) if shared else None,
            "running": n.running if n.state == "alive" else 0,
            "started_at": n.started_at,
            "taken_over_by": n.taken_over_by,
        }
        for n in nodes
    ]
    if args.json:
        write_json(shown)
        return ExitCode.OK
    if not shown:
        write("no nodes\n")
        return ExitCode.OK
    header = ("NODE", "HOST", "PID", "STATE", "LEASE AGE", "RUNNING", "INCARNATION")
    rows = [
        (
            str(n["node_id"]),
            str(n["host"]),
            str(n["pid"]),
            str(n["state"]) + (f" (by {n['taken_over_by']})" if n["taken_over_by"] else ""),
            # A SQLite file's node holds the file's lock instead: its lease is never renewed.
            f"{n['lease_age']:.1f} s" if shared else "- (file lock)",
            str(n["running"]),
            str(n["incarnation"]),
        )
        for n in shown
    ]
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    for row in (header, *rows):
        write("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() + "\n")
    return ExitCode.OK
