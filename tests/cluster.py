"""The cluster tests' harness: nodes as real processes (:mod:`bench.cluster`), clients that
follow their rooms from any node and move to another one with their cursor, and the
invariants, read straight from the PostgreSQL log.

The invariants (:func:`check_log`) are what issue 11 promises of a cluster under faults:
none lost (every created job is in the database), every job's ``seq`` and every user's
``user_seq`` gap-free, the log and the row agree, no job ran two attempts at once and nothing
was written for an attempt once it ended (a fenced-out node wrote nothing), and once settled
every job completed, failed with a reason, or paused at no older than its latest
acknowledged checkpoint, none left running on a dead node. How an owner names its node
(:func:`owner_node`) is kept in one place: the fencing token's format.
"""

from __future__ import annotations

import contextlib
import os
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import orjson
import psycopg
import trio

from actors import EventType, JobEvent
from bench.cluster import Cluster, cluster_supported, open_cluster
from transport import Client, ClientError, Reset, mint_token, open_client

SECRET = "cluster-secret-cluster-secret-cluster"
HANDLERS = "tests.cluster_handlers:HANDLERS"
USERS = ["u0", "u1", "u2", "u3", "u4", "u5"]
#: Events a job's handler writes only while its attempt runs.
RUN_EVENTS = {"progress", "checkpoint", "heartbeat"}


def owner_node(owner: str) -> str:
    """The node id in a claim's owner (fencing token ``"<node id>#<incarnation>"``)."""
    return owner.split("#", 1)[0]


def token(user: str, admin: bool = False) -> str:
    return mint_token(SECRET, user, admin=admin)


@asynccontextmanager
async def cluster_of(
    workdir: Path, nodes: int, *, lease_ttl: float = 3.0, max_running: int = 8, **kw: Any
) -> AsyncIterator[Cluster]:
    """``nodes`` nodes with the tests' handlers, ``max_running`` slots each. The lease is
    short for brief tests, long enough that a node starved of CPU on a loaded 2-core machine
    keeps it (renewed every TTL / 4)."""
    kw.setdefault("redis", cluster_supported())  # today's serve has no --redis to give it
    async with open_cluster(
        workdir,
        nodes,
        secret=SECRET,
        handlers=HANDLERS,
        lease_ttl=lease_ttl,
        lease_renew_interval=lease_ttl / 4,
        config=f"[runtime]\nmax_running = {max_running}\n",
        extra=("--heartbeat-timeout", "2", "--stop-grace", "0.5"),
        **kw,
    ) as cluster:
        yield cluster


@attrs.define
class Follower:
    """One user's client following ``user:<user>`` from node ``node``; ``received`` holds
    the ``user_seq`` of every event delivered, ``acked`` the highest checkpoint version it saw
    per job (durable: the event is sent after the commit)."""

    user: str
    node: str
    client: Client | None = None
    received: list[int] = attrs.field(factory=list)
    acked: dict[str, int] = attrs.field(factory=dict)
    resets: list[Reset] = attrs.field(factory=list)
    events: list[JobEvent] = attrs.field(factory=list)

    async def run(self, cluster: Cluster, *, task_status: trio.TaskStatus[None]) -> None:
        url = cluster.url(self.node)
        async with open_client(url, token(self.user), max_backoff=0.2) as client:
            self.client = client
            await client.subscribe(f"user:{self.user}")
            task_status.started()
            async for item in client.events():
                if isinstance(item, Reset):
                    self.resets.append(item)
                    continue
                self.received.append(item.user_seq)
                self.events.append(item)
                if item.type is EventType.CHECKPOINT:
                    version = item.data["version"]
                    self.acked[item.job_id] = max(self.acked.get(item.job_id, 0), version)

    def move(self, cluster: Cluster, node: str) -> None:
        """Reconnect to ``node`` from now on (the next reconnect goes there, with the
        client's cursors: same database, same epoch, nothing replayed twice or missed)."""
        assert self.client is not None
        self.node = node
        self.client.url = cluster.url(node)


async def start_followers(
    nursery: trio.Nursery, cluster: Cluster, users: list[str] = USERS
) -> list[Follower]:
    """One follower per user, spread over the nodes."""
    names = sorted(cluster.nodes)
    followers = [Follower(user, names[n % len(names)]) for n, user in enumerate(users)]
    for follower in followers:
        await nursery.start(follower.run, cluster)
    return followers


def move_off(cluster: Cluster, followers: list[Follower], victim: str) -> None:
    """Followers connected to ``victim`` move to the other live nodes (round robin)."""
    others = sorted(n.name for n in cluster.alive() if n.name != victim)
    moving = [f for f in followers if f.node == victim]
    for n, follower in enumerate(moving):
        follower.move(cluster, others[n % len(others)])


def merged_acks(followers: list[Follower]) -> dict[str, int]:
    acked: dict[str, int] = {}
    for follower in followers:
        for job_id, version in follower.acked.items():
            acked[job_id] = max(acked.get(job_id, 0), version)
    return acked


async def create_jobs(
    cluster: Cluster, specs: list[tuple[str, str, dict[str, Any]]], on: list[str] | None = None
) -> list[dict[str, Any]]:
    """Create ``(user, kind, input)`` jobs, each user's through its own client on a node of
    its own (round robin over ``on``, default: the live nodes); returns the jobs in order."""
    names = on or sorted(n.name for n in cluster.alive())
    users = sorted({user for user, _, _ in specs})
    created: list[dict[str, Any]] = [{}] * len(specs)

    async def for_user(user: str, node: str) -> None:
        async with open_client(cluster.url(node), token(user)) as client:
            for index, (who, kind, input) in enumerate(specs):
                if who == user:
                    created[index] = await client.create(kind, input)

    async with trio.open_nursery() as nursery:
        for n, user in enumerate(users):
            nursery.start_soon(for_user, user, names[n % len(names)])
    return created


@asynccontextmanager
async def admin(cluster: Cluster, node: str | None = None) -> AsyncIterator[Client]:
    """An admin client on ``node`` (default: the first live one), not reconnecting."""
    name = node or sorted(n.name for n in cluster.alive())[0]
    async with open_client(cluster.url(name), token("ops", admin=True), reconnect=False) as c:
        yield c


async def resume_paused(cluster: Cluster) -> int:
    """Resume every paused job (on any live node); returns how many were resumed."""
    paused = [i for i, job in read_jobs(cluster.store).items() if job["state"] == "paused"]
    resumed = 0
    async with admin(cluster) as client:
        for job_id in paused:
            with contextlib.suppress(ClientError):  # it moved on meanwhile
                await client.resume(job_id)
                resumed += 1
    return resumed


def read_jobs(store: str) -> dict[str, dict[str, Any]]:
    """Every job's record, with its claim's ``owner`` from its column (authoritative: a
    renewal or a claim updates the column only)."""
    return read_snapshot(store)[0]


def read_events(store: str) -> list[dict[str, Any]]:
    """Every event in the durable log, by job then seq, as recorded (with ``job_id``,
    ``user_id``, ``seq``, ``user_seq`` from the columns)."""
    return read_snapshot(store)[1]


def read_snapshot(store: str) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """:func:`read_jobs` and :func:`read_events` from one snapshot (REPEATABLE READ): the
    rows and the log agree even while live nodes write."""
    with psycopg.connect(store) as conn:
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        with conn.transaction():
            job_rows = conn.execute("SELECT id, record, owner FROM jobs").fetchall()
            event_rows = conn.execute(
                "SELECT job_id, user_id, seq, user_seq, record FROM events ORDER BY job_id, seq"
            ).fetchall()
    jobs = {job_id: {**orjson.loads(record), "owner": owner} for job_id, record, owner in job_rows}
    events = []
    for job_id, user_id, seq, user_seq, record in event_rows:
        event = orjson.loads(record)
        event.update(job_id=job_id, user_id=user_id, seq=seq, user_seq=user_seq)
        events.append(event)
    return jobs, events


@attrs.define
class LogSummary:
    jobs: dict[str, dict[str, Any]]
    #: Per user, the highest ``user_seq`` in the log.
    heads: dict[str, int]
    states: Counter[str]
    #: Per job, the owner of each attempt, in order.
    owners: dict[str, list[str]]
    retries: int
    recoveries: int
    #: Events that took a job over from another node (``taken_over_from``).
    takeovers: int
    events: int


def check_log(
    store: str, created: set[str], acked: dict[str, int], *, settled: bool = False
) -> LogSummary:
    """Check the invariants (module docstring) on the durable log; with ``settled``, also
    that every job has ended (completed, failed with a reason, or paused no older than its
    acknowledged checkpoint). Returns what was read, for more specific checks."""
    jobs, events = read_snapshot(store)
    assert set(jobs) == created, ("jobs lost or unexpected", created ^ set(jobs))
    by_job: dict[str, list[dict[str, Any]]] = {}
    by_user: dict[str, list[int]] = {}
    for event in events:
        by_job.setdefault(event["job_id"], []).append(event)
        by_user.setdefault(event["user_id"], []).append(event["user_seq"])
    for user, seqs in by_user.items():
        assert sorted(seqs) == list(range(1, len(seqs) + 1)), ("user_seq gap", user)
    owners: dict[str, list[str]] = {}
    retries = recoveries = takeovers = 0
    for job_id, job in jobs.items():
        log = by_job.get(job_id, [])
        assert [e["seq"] for e in log] == list(range(1, len(log) + 1)), ("seq gap", job_id)
        assert log and log[-1]["seq"] == job["seq"], ("row and log disagree", job_id)
        assert log[-1]["state"] == job["state"], ("row and log disagree", job_id)
        running = False
        attempts: list[int] = []
        for event in log:
            kind = event["type"]
            if kind == "started":
                # An attempt starts only once the previous one ended: never two at once.
                assert not running, ("attempts overlap", job_id, event)
                attempts.append(event["data"]["attempt"])
                owners.setdefault(job_id, []).append(event["data"]["owner"])
            elif kind in RUN_EVENTS:
                # Written for an attempt that had ended: a fenced-out owner wrote.
                assert running, ("written after its attempt ended", job_id, event)
            if "taken_over_from" in event["data"]:
                # A takeover ends the attempt that was running, of the owner that started it,
                # once: a second takeover of the same attempt would find it ended.
                assert running, ("taken over twice", job_id, event)
                taken_from = event["data"]["taken_over_from"]
                assert taken_from == owners[job_id][-1], ("taken from another owner", job_id)
                assert event["data"]["taken_over_by"] != event["data"]["taken_over_from"]
                takeovers += 1
            retries += kind == "retrying"
            recoveries += kind == "recovery"
            running = event["state"] == "running"
        assert attempts == list(range(1, len(attempts) + 1)), ("attempts", job_id, attempts)
        assert job["checkpoint_version"] >= acked.get(job_id, 0), ("checkpoint lost", job_id)
        if settled:
            assert job["state"] in ("completed", "failed", "paused"), ("not ended", job)
            if job["state"] == "failed":
                assert job["error"]["message"], ("failed without a reason", job)
    return LogSummary(
        jobs,
        {user: max(seqs) for user, seqs in by_user.items()},
        Counter(job["state"] for job in jobs.values()),
        owners,
        retries,
        recoveries,
        takeovers,
        len(events),
    )


def check_deliveries(followers: list[Follower], heads: dict[str, int]) -> None:
    """Every follower got every event of its user exactly once, in order, no reset."""
    for follower in followers:
        assert not follower.resets, (follower.user, follower.resets)
        expected = list(range(1, heads.get(follower.user, 0) + 1))
        assert follower.received == expected, (follower.user, follower.node)


async def settle(cluster: Cluster, created: set[str], seconds: float = 90) -> None:
    """Wait until no job is waiting or running (reading the database)."""

    def ended() -> bool:
        jobs = read_jobs(cluster.store)
        return set(jobs) == created and all(
            job["state"] in ("completed", "failed", "paused") for job in jobs.values()
        )

    with trio.fail_after(seconds):
        while not await trio.to_thread.run_sync(ended):  # noqa: ASYNC110 - the database
            await trio.sleep(0.2)


async def caught_up(followers: list[Follower], heads: dict[str, int], seconds: float = 30) -> None:
    with trio.fail_after(seconds):
        while any(len(f.received) < heads.get(f.user, 0) for f in followers):  # noqa: ASYNC110
            await trio.sleep(0.05)


def cycles(default: int) -> int:
    """``JOBSPINE_CLUSTER_CYCLES`` for a long run, else ``default``."""
    return int(os.environ.get("JOBSPINE_CLUSTER_CYCLES", default))


def node_pg_backends(store: str, pid: int) -> list[int]:
    """The PostgreSQL backend pids serving process ``pid``'s connections to ``store``'s
    database: its TCP sockets (from ``/proc/<pid>/fd``) matched by client port."""
    inodes = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = []
    for table in ("tcp", "tcp6"):
        with open(f"/proc/{pid}/net/{table}") as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[9] in inodes:
                    ports.append(int(fields[1].rsplit(":", 1)[1], 16))
    with psycopg.connect(store, autocommit=True) as conn:
        rows: list[Any] = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
            " AND client_port = ANY(%s)",
            (ports,),
        ).fetchall()
    return [row[0] for row in rows]


def terminate_backends(store: str, backends: list[int]) -> None:
    """``pg_terminate_backend`` each (waiting until it has ended), as an outage would."""
    with psycopg.connect(store, autocommit=True) as conn:
        for backend in backends:
            conn.execute("SELECT pg_terminate_backend(%s, 5000)", (backend,))
