"""Bad input gets a clear error: an embedder's config classes (``RuntimeConfig``,
``BroadcasterConfig``, ``StoreConfig``, ``SupervisorConfig``, ``FanoutConfig``,
``RetentionPolicy``, ``RetentionRule``) refuse a number out of range at construction, with
``InvalidInputError`` naming the field and the value; 0 stays a setting where it means
something; and a server's ports (``ServerConfig``, ``open_server``) outside 0..65535."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from actors import (
    BroadcasterConfig,
    FanoutConfig,
    InvalidInputError,
    RetentionPolicy,
    RetentionRule,
    RuntimeConfig,
    StoreConfig,
    SupervisorConfig,
)
from tests.conftest import memory_runtime
from transport import ServerConfig
from transport._app import open_server

NAN, INF = math.nan, math.inf


def _refused(make: Any, name: str, value: Any) -> str:
    with pytest.raises(InvalidInputError) as refused:
        make(**{name: value})
    message = str(refused.value)
    assert message.startswith(name), message
    assert repr(value) in message, message
    return message


@pytest.mark.parametrize(
    ("name", "value"),
    [
        # NaN crashed the runtime at its first job; -1 failed every job as stalled at once.
        ("heartbeat_timeout", NAN),
        ("heartbeat_timeout", -1.0),
        ("heartbeat_timeout", INF),
        ("heartbeat_timeout", 0),
        ("heartbeat_timeout", True),
        ("heartbeat_timeout", "30"),
        # NaN or negative hung every pause and shutdown for good.
        ("stop_grace", NAN),
        ("stop_grace", -1.0),
        ("stop_grace", INF),
        ("shutdown_timeout", NAN),
        ("shutdown_timeout", -0.5),
        ("heartbeat_flush_interval", 0.0),
        ("sqlite_busy_timeout", -1),
        ("store_retry_timeout", INF),
        ("checkpoint_limit", 0),
        ("result_limit", -1),
        ("checkpoint_warn_size", 1.5),
        ("max_recovery_attempts", -1),
        ("max_recovery_attempts", 2.0),
        ("idempotency_window", NAN),
        ("lease_ttl", INF),
    ],
)
def test_an_embedders_runtime_config_refuses_a_number_out_of_range(name: str, value: Any) -> None:
    _refused(RuntimeConfig, name, value)


def test_a_runtime_config_refuses_a_retention_that_is_no_policy() -> None:
    _refused(RuntimeConfig, "retention", 7)


@pytest.mark.parametrize(
    "setting",
    [
        {"stop_grace": 0},  # a stopped job is cancelled at once
        {"shutdown_timeout": 0},  # every job cancelled at once
        {"sqlite_busy_timeout": 0.0},  # a locked database not waited for
        {"max_recovery_attempts": 0},  # a stall fails the job
        {"heartbeat_timeout": 3600, "stop_grace": 0.25, "checkpoint_limit": 1},
    ],
)
async def test_a_runtime_config_takes_what_means_something(setting: dict[str, Any]) -> None:
    config = RuntimeConfig(**setting)
    assert all(getattr(config, k) == v for k, v in setting.items())
    async with memory_runtime({}, **setting) as rt:
        assert rt.config == config


@pytest.mark.parametrize(
    ("make", "name", "value"),
    [
        (BroadcasterConfig, "lag_window", NAN),
        (BroadcasterConfig, "lag_window", -1.0),
        (BroadcasterConfig, "page_size", 0),
        (BroadcasterConfig, "replay_builds", 0),
        (BroadcasterConfig, "backlog", -1),
        (BroadcasterConfig, "coalesce_after", 2.5),
        (StoreConfig, "retry_backoff", -1.0),
        (StoreConfig, "heartbeat_flush_interval", NAN),
        (StoreConfig, "max_batch", 0),
        (SupervisorConfig, "heartbeat_timeout", NAN),
        (SupervisorConfig, "stop_grace", -1.0),
        (SupervisorConfig, "beat_queue", 0),
        (RetentionPolicy, "interval", NAN),
        (RetentionPolicy, "interval", "60"),
        (RetentionPolicy, "batch_size", 2.5),
        (RetentionRule, "keep_for", "7d"),
        (RetentionRule, "keep_for", -1.0),
        (RetentionRule, "max_count", 1.5),
        (lambda **kw: FanoutConfig(None, **kw), "gap_wait", NAN),
        (lambda **kw: FanoutConfig(None, **kw), "outbox", 0),
    ],
)
def test_every_config_class_of_actors_refuses_a_number_out_of_range(
    make: Any, name: str, value: Any
) -> None:
    """Only RuntimeConfig, FanoutConfig and part of RetentionPolicy checked themselves, the
    latter with a plain ValueError (a string interval: a TypeError) and FanoutConfig without
    the value; a BroadcasterConfig or StoreConfig took NaN, negative or fractional values."""
    _refused(make, name, value)


def test_zero_stays_a_broadcaster_setting_where_it_means_something() -> None:
    config = BroadcasterConfig(coalesce_after=0, replay_bytes=0, backlog_bytes=0, max_lags=0)
    assert config.coalesce_after == config.replay_bytes == 0
    assert RetentionRule(keep_for=math.inf, max_count=0).max_count == 0
    assert StoreConfig(progress_window=0).progress_window == 0


# -- ports: outside 0..65535 (or no integer) refused as the server is configured, naming it,
# before anything is bound or opened


@pytest.mark.parametrize("port", [70000, 65536, -1, 8765.0, "8765", True])
def test_a_server_config_refuses_a_port_outside_0_to_65535(port: Any) -> None:
    """``ServerConfig(port=70000)`` was taken, and failed only once serving bound it."""
    message = _refused(lambda **kw: ServerConfig(secret="s", **kw), "port", port)
    assert "0..65535" in message


@pytest.mark.parametrize("port", [0, 1, 65535])
def test_a_server_config_takes_every_port(port: int) -> None:
    assert ServerConfig(secret="s", port=port).port == port


@pytest.mark.parametrize("port", [70000, -1, 8766.0])
async def test_open_server_refuses_a_health_port_before_it_binds_or_opens(
    tmp_path: Path, port: Any
) -> None:
    """A health_port of 70000 bound the websocket port first, then failed as
    PortUnavailableError; now InvalidInputError naming it, and nothing opened."""
    with pytest.raises(InvalidInputError, match=r"^health_port must be an integer in 0\.\.65535"):
        async with open_server(tmp_path / "db", ServerConfig(secret="s", port=0), health_port=port):
            pytest.fail("served with a bad health port")
    assert not (tmp_path / "db").exists()


# -- an integer beyond any float (10**400): every time computed with it raised OverflowError

HUGE = 10**400


@pytest.mark.parametrize(
    ("make", "name"),
    [
        (RuntimeConfig, "heartbeat_timeout"),
        (RuntimeConfig, "stop_grace"),
        (RuntimeConfig, "shutdown_timeout"),
        (RuntimeConfig, "idempotency_window"),
        (RuntimeConfig, "store_retry_timeout"),
        (RetentionPolicy, "interval"),
        (RetentionRule, "keep_for"),
        (BroadcasterConfig, "lag_window"),
        (lambda **kw: ServerConfig(secret="s", **kw), "hello_timeout"),
    ],
)
def test_a_number_of_seconds_beyond_any_float_is_refused(make: Any, name: str) -> None:
    """``check_number`` compared ``10**400 < inf`` (true for an int) and took it: then
    ``RuntimeConfig(heartbeat_timeout=10**400)`` crashed the runtime at its first job
    (RuntimeCrashedError: OverflowError), a ``stop_grace`` of it hung the first pause, and a
    ``keep_for`` of it failed every pass of the retention policy. The message names the
    field and shows the value cut short."""
    with pytest.raises(InvalidInputError) as refused:
        make(**{name: HUGE})
    message = str(refused.value)
    assert message.startswith(name) and "(401 characters)" in message, message


def test_a_count_too_long_to_show_is_refused_by_its_size() -> None:
    """An int over Python's 4,300 digits has no repr: the message quoting it raised a
    ValueError of its own instead of the InvalidInputError."""
    with pytest.raises(InvalidInputError, match=r"^max_running must be an integer >= 1, not an"):
        RuntimeConfig(max_running=-(10**5000))
    with pytest.raises(InvalidInputError, match=r"^heartbeat_timeout .* not an integer of"):
        RuntimeConfig(heartbeat_timeout=10**5000)


async def test_a_runtime_with_the_largest_float_seconds_runs(
    autojump_clock: Any,
) -> None:
    """What is refused above is not what is large: 1e308 seconds (a float) is a setting."""
    config: dict[str, Any] = {
        "heartbeat_timeout": 1e308,
        "stop_grace": 1e308,
        "idempotency_window": 1e308,
    }
    async with memory_runtime({"q": _echo}, **config) as rt:
        job = await rt.create_job("q", "alice", 3, idempotency_key="k")
        assert (await rt.wait_job(job.id)).result == 3


async def _echo(ctx: Any, input: Any) -> Any:
    return input
