"""Helpers for transport tests: a served runtime on loopback and raw websocket access."""

from __future__ import annotations

import random
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import trio
from trio_websocket import WebSocketConnection, open_websocket_url

from actors import DEMO_HANDLERS, BroadcasterConfig, JobContext, RuntimeConfig
from transport import RunningServer, ServerConfig, mint_token, open_server

SECRET = "test-secret-which-is-long-enough-for-hs256"

#: Gates the ``emitter`` handler waits on, by name: tests open them to let a job emit events.
GATES: dict[str, trio.Event] = {}


async def emitter(ctx: JobContext, input: Any) -> Any:
    """Emits ``count`` progress events per phase, each phase after its gate opens (one per
    ``interval`` seconds if given, labels padded to ``pad`` characters)."""
    start = ctx.resumed_from["done"] if ctx.resumed_from else 0
    done = 0
    for phase in input["phases"]:
        await GATES.setdefault(phase["gate"], trio.Event()).wait()
        for i in range(phase["count"]):
            done += 1
            if done <= start:
                continue
            label = f"{phase['gate']} {i}".ljust(input.get("pad", 0), ".")
            await ctx.progress(min(100, done / 100), label)
            if input.get("interval"):
                await trio.sleep(input["interval"])
        await ctx.checkpoint({"done": done})
    if input.get("hold"):
        await trio.sleep_forever()
    return {"emitted": done}


async def sized(ctx: JobContext, input: Any) -> Any:
    """Saves a ``checkpoint`` of about that many bytes, then returns a ``result`` of about that
    many bytes (or ``value`` as the result, when given)."""
    if input.get("checkpoint"):
        await ctx.checkpoint({"blob": "c" * input["checkpoint"]})
    if "value" in input:
        return input["value"]
    return {"blob": "r" * input.get("result", 0)}


HANDLERS = {**DEMO_HANDLERS, "emitter": emitter, "sized": sized}


def token(user: str, **kw: Any) -> str:
    return mint_token(SECRET, user, **kw)


#: Ports :func:`free_port` handed out in this process: never handed out twice.
_HANDED_OUT: set[int] = set()


def _below_ephemeral() -> range:
    """Ports below the kernel's range for outgoing connections (where one can be free)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return range(0)
    return range(10_000, low) if low > 11_000 else range(0)


def free_port() -> int:
    """A port for a server a test starts (a subprocess binds it later): free now, never one
    this process handed out before, and below the kernel's range for outgoing connections.
    ``bind(0)`` gave a port from that range, which a client connection (a test's, or a flood
    test's hundreds) could take before the server bound it, and could give the same port to
    two calls in a row: the server then exited 8, port in use."""
    ports = _below_ephemeral()
    for _ in range(1000):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", random.choice(ports) if ports else 0))
            except OSError:
                continue
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port
    raise RuntimeError("no free port found for a test server")


@asynccontextmanager
async def serving(
    db: str | Path, port: int = 0, broadcast: BroadcasterConfig | None = None, **server: Any
) -> AsyncIterator[RunningServer]:
    config = ServerConfig(
        secret=SECRET,
        port=port,
        **{"heartbeat_interval": 0.2, "hello_timeout": 0.5, **server},
    )
    runtime = RuntimeConfig(stop_grace=0.2, sqlite_synchronous="NORMAL")
    async with open_server(
        db, config, handlers=HANDLERS, runtime_config=runtime, broadcast=broadcast
    ) as running:
        yield running


@asynccontextmanager
async def raw(
    running: RunningServer, user: str | None = "alice"
) -> AsyncIterator[WebSocketConnection]:
    """A websocket with no client logic; authenticated as ``user`` unless None."""
    async with open_websocket_url(running.url) as ws:
        if user is not None:
            await send(ws, {"op": "hello", "id": 0, "token": token(user)})
            welcome = await receive(ws)
            assert welcome["type"] == "reply", welcome
        yield ws


async def send(ws: WebSocketConnection, message: Any) -> None:
    await ws.send_message(orjson.dumps(message).decode())


async def receive(ws: WebSocketConnection, *, skip_heartbeats: bool = True) -> Any:
    while True:
        message = orjson.loads(await ws.get_message())
        if skip_heartbeats and message.get("type") == "heartbeat":
            continue
        return message


async def request(ws: WebSocketConnection, op: str, request_id: int = 1, **fields: Any) -> Any:
    """Send a request and return its reply (from a batch too); other messages are dropped."""
    await send(ws, {"op": op, "id": request_id, **fields})
    with trio.fail_after(10):
        while True:
            message = await receive(ws)
            for inner in message.get("messages", [message]):
                if inner.get("id") == request_id and inner["type"] in ("reply", "error"):
                    return inner


async def eventually(predicate: Callable[[], bool], seconds: float = 10) -> None:
    """Wait until ``predicate()`` holds (for state no event announces, like server internals)."""
    with trio.fail_after(seconds):
        while not predicate():  # noqa: ASYNC110 - polling state that has no event
            await trio.sleep(0.01)
