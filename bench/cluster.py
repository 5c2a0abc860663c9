"""Several ``jobspine serve`` nodes on one PostgreSQL database and one Redis, as real processes.

Used by ``jobspine bench --scenario multinode`` and by the cluster tests (``tests/cluster.py``
adds the invariant checks and the clients). Everything here is a real process or a real
server: a fresh database per cluster (created on the local PostgreSQL, dropped at the end), a
``redis-server`` of its own on a free port (so it can be killed and restarted without touching
anyone else's Redis), and nodes started, signalled (SIGKILL, SIGSTOP, SIGCONT, SIGTERM) and
restarted on the same ports, so a client can come back to a restarted node where it was.

A node is ready when its ``/readyz`` answers 200: it has opened the database and (with
``--redis``) reached Redis. Processes are started with ``trio.lowlevel.open_process`` and
killed at the end of the block whatever happened, so none outlives its cluster.
"""

from __future__ import annotations

import itertools
import os
import secrets
import signal
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import cache
from pathlib import Path

import attrs
import psycopg
import trio
from psycopg import sql

__all__ = [
    "PG_SERVER",
    "Cluster",
    "Node",
    "RedisServer",
    "cluster_supported",
    "open_cluster",
    "open_redis",
    "pg_database",
]

#: The local PostgreSQL server (trust auth); cluster databases are created on it.
PG_SERVER = os.environ.get("JOBSPINE_TEST_PG", "postgresql://postgres@127.0.0.1:5432")
COMMAND = [sys.executable, "-m", "transport._cli", "--log-level", "WARNING", "serve"]
_numbers = itertools.count()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@cache
def cluster_supported() -> bool:
    """Whether ``jobspine serve`` takes ``--node-id`` and ``--redis`` (the scale-out)."""
    from transport._cli import parser

    sub = next(a for a in parser()._actions if a.dest == "command")
    serve = sub.choices["serve"]  # type: ignore[index]
    flags = serve._option_string_actions
    return "--node-id" in flags and "--redis" in flags


@asynccontextmanager
async def pg_database(prefix: str = "cluster_") -> AsyncIterator[str]:
    """A new, empty database on :data:`PG_SERVER` (``<prefix><pid>_<hex>_<n>``); its URL.
    Dropped at the end (``WITH (FORCE)``: a killed node's sessions do not keep it)."""
    name = f"{prefix}{os.getpid()}_{secrets.token_hex(3)}_{next(_numbers)}"

    def admin(statement: sql.Composed) -> None:
        with psycopg.connect(f"{PG_SERVER}/postgres", autocommit=True) as conn:
            conn.execute(statement)

    await trio.to_thread.run_sync(admin, sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield f"{PG_SERVER}/{name}"
    finally:
        with trio.move_on_after(30, shield=True):
            drop = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
            await trio.to_thread.run_sync(admin, drop.format(sql.Identifier(name)))


async def _answers(port: int, request: bytes, expect: bytes) -> bool:
    """Whether 127.0.0.1:``port`` answers ``request`` with something starting ``expect``."""
    try:
        with trio.fail_after(2):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(request)
                data = b""
                while len(data) < len(expect) and (chunk := await stream.receive_some()):
                    data += chunk
    except (OSError, trio.TooSlowError, trio.BrokenResourceError):
        return False
    return data.startswith(expect)


@attrs.define
class RedisServer:
    """A ``redis-server`` of this cluster's own (no persistence), on a fixed free port."""

    workdir: Path
    port: int = attrs.field(factory=free_port)
    process: trio.Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    async def start(self) -> None:
        """Start it (again, on the same port) and wait until it answers PING."""
        log = (self.workdir / f"redis-{self.port}.log").open("ab")
        with log:
            self.process = await trio.lowlevel.open_process(
                [
                    *("redis-server", "--port", str(self.port), "--bind", "127.0.0.1"),
                    *("--save", "", "--appendonly", "no"),
                ],
                stdout=log,
                stderr=log,
            )
        with trio.fail_after(20):
            while not await _answers(self.port, b"PING\r\n", b"+PONG"):
                assert self.process.poll() is None, "redis-server exited"
                await trio.sleep(0.05)

    async def kill(self) -> None:
        """SIGKILL: every connection to it breaks at once, every message in flight is lost."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            await self.process.wait()


@asynccontextmanager
async def open_redis(workdir: Path) -> AsyncIterator[RedisServer]:
    redis = RedisServer(workdir)
    try:
        await redis.start()
        yield redis
    finally:
        with trio.move_on_after(10, shield=True):
            await redis.kill()


@attrs.define
class Node:
    """One ``jobspine serve`` process; ``port`` and ``health`` stay the same across restarts."""

    name: str
    port: int
    health: int
    log: Path
    process: trio.Process | None = None
    #: Bumped at every start: a restarted node is a new incarnation of the same node id.
    starts: int = 0

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    async def ready(self) -> bool:
        return await _answers(
            self.health, b"GET /readyz HTTP/1.1\r\nhost: cluster\r\n\r\n", b"HTTP/1.1 200"
        )


@attrs.define
class Cluster:
    """Nodes ``n0``, ``n1``... serving one database (``store``) and one Redis (``redis``)."""

    workdir: Path
    store: str
    redis: RedisServer | None
    secret: str
    handlers: str
    lease_ttl: float
    lease_renew_interval: float
    #: TOML for every node's config file (``[runtime] max_running = 8``...).
    config: str = ""
    extra: tuple[str, ...] = ()
    nodes: dict[str, Node] = attrs.field(factory=dict)

    def command(self, node: Node) -> list[str]:
        cluster = (
            [
                "--node-id",
                node.name,
                "--lease-ttl",
                str(self.lease_ttl),
                "--lease-renew-interval",
                str(self.lease_renew_interval),
                *(["--redis", self.redis.url] if self.redis else []),
            ]
            if cluster_supported()
            else []
        )
        return [
            *COMMAND,
            "--store",
            self.store,
            "--port",
            str(node.port),
            "--health-port",
            str(node.health),
            "--handlers",
            self.handlers,
            "--no-demo",
            "--config",
            str(self.workdir / "config.toml"),
            *cluster,
            *self.extra,
        ]

    def add(self, name: str) -> Node:
        node = Node(name, free_port(), free_port(), self.workdir / f"{name}.log")
        self.nodes[name] = node
        return node

    async def start(self, name: str, *, within: float = 60) -> Node:
        """Start (or restart) node ``name`` and wait until it is ready."""
        node = self.nodes.get(name) or self.add(name)
        assert not node.alive, f"{name} is running"
        await trio.Path(self.workdir / "config.toml").write_text(self.config)
        env = {**os.environ, "JOBSPINE_SECRET": self.secret}
        with node.log.open("ab") as log:
            log.write(f"--- start {node.starts + 1}\n".encode())
            log.flush()
            node.process = await trio.lowlevel.open_process(
                self.command(node), env=env, stdout=log, stderr=log
            )
        node.starts += 1
        with trio.fail_after(within):
            while not await node.ready():
                if not node.alive:
                    raise RuntimeError(f"node {name} exited at start: {self.log_tail(name)}")
                await trio.sleep(0.05)
        return node

    def log_tail(self, name: str, lines: int = 20) -> str:
        text = self.nodes[name].log.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def signal(self, name: str, signum: signal.Signals) -> None:
        node = self.nodes[name]
        assert node.alive, f"{name} is not running"
        node.process.send_signal(signum)  # type: ignore[union-attr]

    async def kill(self, name: str) -> None:
        """SIGKILL (a SIGSTOPped node too) and reap it."""
        node = self.nodes[name]
        if node.alive:
            assert node.process is not None
            node.process.kill()
            await node.process.wait()

    async def terminate(self, name: str, within: float = 30) -> int:
        """SIGTERM (a graceful shutdown); returns the exit status."""
        node = self.nodes[name]
        assert node.process is not None
        node.process.terminate()
        with trio.fail_after(within):
            return await node.process.wait()

    def alive(self) -> list[Node]:
        return [node for node in self.nodes.values() if node.alive]

    def url(self, name: str) -> str:
        return self.nodes[name].url

    async def stop_all(self) -> None:
        for node in self.nodes.values():
            if node.alive:
                assert node.process is not None
                node.process.send_signal(signal.SIGCONT)  # a stopped one cannot die otherwise
                node.process.kill()
            if node.process is not None:
                await node.process.wait()


@asynccontextmanager
async def open_cluster(
    workdir: Path,
    nodes: int,
    *,
    secret: str,
    handlers: str,
    lease_ttl: float = 5.0,
    lease_renew_interval: float = 1.0,
    config: str = "",
    redis: bool = True,
    extra: tuple[str, ...] = (),
) -> AsyncIterator[Cluster]:
    """A fresh database, a Redis of its own (unless ``redis`` is false) and ``nodes`` ready
    nodes ``n0``... (started one after another: the first one creates the schema). Every
    process is killed and the database dropped at the end."""
    async with pg_database() as store:
        redis_server = RedisServer(workdir) if redis else None
        cluster = Cluster(
            workdir, store, redis_server, secret, handlers, lease_ttl, lease_renew_interval,
            config, extra,
        )  # fmt: skip
        try:
            if redis_server is not None:
                await redis_server.start()
            for n in range(nodes):
                await cluster.start(f"n{n}")
            yield cluster
        finally:
            with trio.move_on_after(30, shield=True):
                await cluster.stop_all()
                if redis_server is not None:
                    await redis_server.kill()
