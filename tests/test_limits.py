"""Resource limits: each has a documented default and a clear error when exceeded."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from actors import InvalidInputError, JobContext, RuntimeConfig, TooManyJobsError
from transport import CLOSE, ServerConfig

from .conftest import memory_runtime
from .serving import free_port, raw, request, send, serving, token
from .test_cli import COMMAND


async def forever(ctx: JobContext, input: Any) -> Any:
    await ctx.checkpoint({"started": True})
    await trio.sleep_forever()


def test_documented_defaults() -> None:
    server = ServerConfig(secret="s")
    assert (server.max_frame_size, server.request_rate, server.request_burst) == (65536, 50, 100)
    assert (server.max_inflight, server.max_subscriptions) == (16, 256)
    assert server.max_connections_per_user == 32
    runtime = RuntimeConfig()
    assert runtime.max_running == 1000 and runtime.max_running_per_user is None
    assert runtime.max_waiting_per_user == 100_000 and runtime.checkpoint_limit == 1024 * 1024


async def test_waiting_jobs_per_user() -> None:
    """too_many_jobs guards the user's waiting quota: nothing is stored, others unaffected."""
    async with memory_runtime({"forever": forever}, max_waiting_per_user=2, stop_grace=0.1) as rt:
        first = await rt.create_job("forever", "alice", None, delay=60)
        await rt.create_job("forever", "alice", None, delay=60)
        before = await rt.get_stats()
        with pytest.raises(TooManyJobsError, match="already has 2 jobs waiting"):
            await rt.create_job("forever", "alice", None, delay=60)
        assert await rt.get_stats() == before  # nothing was created
        await rt.create_job("forever", "bob", None, delay=60)  # other users are not affected
        await rt.cancel(first.id)  # a place frees up
        await rt.create_job("forever", "alice", None, delay=60)
        with pytest.raises(TooManyJobsError):
            await rt.create_job("forever", "alice", None, delay=60)


async def test_connections_per_user(tmp_path: Path) -> None:
    async with (
        serving(tmp_path / "c.db", max_connections_per_user=2) as running,
        raw(running, "alice"),
        raw(running, "alice"),
        open_websocket_url(running.url) as third,
    ):
        await send(third, {"op": "hello", "token": token("alice")})
        with pytest.raises(ConnectionClosed) as info:
            await third.get_message()
        assert info.value.reason is not None
        assert info.value.reason.code == CLOSE["too_many_connections"]
        async with raw(running, "bob") as bob:  # other users are not affected
            assert (await request(bob, "ping"))["type"] == "reply"


async def test_subscriptions_per_connection(tmp_path: Path) -> None:
    async with serving(tmp_path / "s.db", max_subscriptions=2) as running, raw(running) as ws:
        created = [
            (
                await request(
                    ws,
                    "create",
                    n,
                    kind="trade",
                    input={"symbol": "X", "side": "buy", "quantity": 1},
                )
            )["result"]["id"]
            for n in range(3)
        ]
        assert (await request(ws, "subscribe", 10, room=f"job:{created[0]}"))["type"] == "reply"
        assert (await request(ws, "subscribe", 11, room="user:alice"))["type"] == "reply"
        refused = await request(ws, "subscribe", 12, room=f"job:{created[1]}")
        assert refused["code"] == "too_many_subscriptions"
        # Subscribing to a room again does not count twice.
        assert (await request(ws, "subscribe", 13, room="user:alice"))["type"] == "reply"


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"max_running": 0}, "max_running"),
        ({"max_running": -5}, "max_running"),
        ({"max_running": 2.5}, "max_running"),
        ({"max_running": True}, "max_running"),
        ({"max_running_per_user": 0}, "max_running_per_user"),
        ({"max_running_per_kind": {"unknown_kind": 0}}, "max_running_per_kind['unknown_kind']"),
        ({"max_waiting_per_user": 0}, "max_waiting_per_user"),
        ({"lease_ttl": 0}, "lease_ttl"),
        ({"lease_renew_interval": 0}, "lease_renew_interval"),
        ({"lease_renew_interval": float("nan")}, "lease_renew_interval"),
        ({"lease_renew_interval": 5.0}, "lease_renew_interval"),  # not shorter than lease_ttl
        ({"idempotency_window": -1}, "idempotency_window"),
        ({"kinds": {"k": 3}}, "kinds['k']"),
    ],
)
def test_queue_settings_that_would_stop_or_spin_the_queue_are_refused(
    settings: dict[str, Any], named: str
) -> None:
    # max_running 0 ran nothing, silently; lease_renew_interval 0 renewed leases in a busy loop.
    with pytest.raises(InvalidInputError) as refused:
        RuntimeConfig(**settings)
    assert str(refused.value).startswith(named), refused.value


def test_a_bad_queue_setting_in_the_config_file_is_a_usage_error(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text("[runtime]\nmax_running = 0\n")
    served = subprocess.run(
        [*COMMAND, "serve", "--config", str(config), "--db", str(tmp_path / "db"),
         "--port", str(free_port()), "--health-port", str(free_port())],
        env={k: v for k, v in os.environ.items() if not k.startswith("JOBSPINE_")},
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert served.returncode == 2, served
    assert "must be an integer in 1..2147483647, not 0 (runtime.max_running)" in served.stderr
