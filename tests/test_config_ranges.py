"""Settings an operator gets wrong: every number of the config classes reachable from the
file only (``[server]``/``[runtime]`` fields beyond the documented ones) is checked against
its range, a file that is not UTF-8 is a usage error, never a traceback, ``ServerConfig``
checks itself, a low request rate still lets requests through, and a duration in ``M`` is
refused."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from actors import InvalidInputError, RuntimeConfig, parse_duration
from transport import ServerConfig
from transport._config import (
    _EXPLICIT,
    SETTINGS,
    load_config_file,
    resolve,
    runtime_config_kwargs,
)
from transport._exit import CLIError, ExitCode

ROOT = Path(__file__).parent.parent
_NAMED = {setting.name for setting in _EXPLICIT}
#: The config-file-only numbers: ``(section, name, type)``.
FIELDS = [
    (setting.section, setting.name, setting.type)
    for setting in SETTINGS
    if setting.name not in _NAMED and setting.type in (int, float)
]


def test_there_are_config_file_only_numbers() -> None:
    names = {name for _, name, _ in FIELDS}
    assert {"heartbeat_interval", "send_timeout", "max_connections_per_user"} <= names
    assert {"shutdown_timeout", "checkpoint_limit", "max_running_per_user"} <= names


@pytest.mark.parametrize(("section", "name", "kind"), FIELDS)
def test_a_config_file_only_number_out_of_range_is_a_usage_error(
    section: str, name: str, kind: type
) -> None:
    """Each was only type-checked: ``heartbeat_interval = 0.0`` spun the server's CPU and
    flooded every client with heartbeats, ``send_timeout = nan`` or ``hello_timeout = -1``
    failed every connection with a traceback in the log, ``max_connections_per_user = 0``
    refused every user; ``jobspine config`` and ``serve`` took them without a word."""
    bad: list[Any] = [-1.0, float("nan"), float("inf")] if kind is float else [-1, 2**31, 10**30]
    if name not in ZERO_ALLOWED:
        bad.append(0.0 if kind is float else 0)
    for value in bad:
        with pytest.raises(CLIError) as refused:
            resolve({}, {}, {section: {name: value}}, "c.toml")
        assert refused.value.code == ExitCode.USAGE
        assert f"{section}.{name}" in str(refused.value) and "c.toml" in str(refused.value)
    good = 0.5 if kind is float else 7
    assert resolve({}, {}, {section: {name: good}})[name].value == good


#: 0 means something for these: a stalled job fails at once; no envelope margin; a shutdown
#: that cancels every job with no pause; a locked SQLite database not waited for.
ZERO_ALLOWED = {
    "max_recovery_attempts",
    "envelope_margin",
    "shutdown_timeout",
    "sqlite_busy_timeout",
}


@pytest.mark.parametrize("name", sorted(ZERO_ALLOWED))
def test_zero_is_a_setting_where_it_means_something(name: str) -> None:
    section = "server" if name == "envelope_margin" else "runtime"
    assert resolve({}, {}, {section: {name: 0}})[name].value == 0


def test_a_config_file_that_is_not_utf8_is_a_usage_error(tmp_path: Path) -> None:
    """TOML is UTF-8: a file in Latin-1 (or a binary file named by mistake) stopped the
    command with a UnicodeDecodeError traceback and exit status 1."""
    path = tmp_path / "config.toml"
    path.write_bytes(b'log_level = "INFO"\n# caf\xe9\n')
    with pytest.raises(CLIError) as refused:
        load_config_file(path)
    assert refused.value.code == ExitCode.USAGE
    assert (
        str(refused.value)
        == f"config file {path}: not UTF-8 text (byte 24): invalid continuation byte"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JOBSPINE_CONFIG": str(path)}
    command = [sys.executable, "-m", "transport._cli", "config"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == ExitCode.USAGE, done.stderr
    assert "Traceback" not in done.stderr and "not UTF-8 text" in done.stderr


@pytest.mark.parametrize(
    ("digits", "said"),
    [
        # A float setting given an integer beyond any float: float() raised OverflowError.
        (400, "runtime.heartbeat_timeout must be float, got 1000"),
        # Over Python's 4,300 digits: tomllib's int() raised ValueError.
        (5000, "Exceeds the limit (4300 digits) for integer string conversion"),
    ],
)
def test_a_huge_integer_in_the_config_file_is_a_usage_error(
    tmp_path: Path, digits: int, said: str
) -> None:
    """Each stopped ``jobspine config`` (and ``serve``) with a traceback and exit status 1."""
    path = tmp_path / "config.toml"
    path.write_text(f"[runtime]\nheartbeat_timeout = 1{'0' * digits}\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JOBSPINE_CONFIG": str(path)}
    command = [sys.executable, "-m", "transport._cli", "config"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == ExitCode.USAGE, done.stderr
    assert "Traceback" not in done.stderr and said in done.stderr, done.stderr
    assert len(done.stderr) < 400, done.stderr  # the value is cut short, not quoted whole


@pytest.mark.parametrize(("rate", "burst"), [("0.01", 1), ("0.4", 1), ("0.5", 1), ("7", 14)])
def test_a_low_request_rate_still_lets_requests_through(rate: str, burst: int) -> None:
    """``request_burst`` defaults to twice ``request_rate``, and to one request at least: a
    rate under 0.5/s (one request every few seconds, a legitimate limit) made the bucket 0,
    and the server refused every request of every user with ``rate_limited``."""
    values = resolve({}, {"JOBSPINE_REQUEST_RATE": rate}, {})
    assert values["request_burst"].value == burst
    assert values["request_burst"].source == "default (2 x request_rate, at least 1)"


@pytest.mark.parametrize("rate", [1e10, 1e308, 1.7976931348623157e308])
def test_a_huge_request_rate_makes_a_burst_that_fits(rate: float) -> None:
    """The burst that follows the rate is bounded as a file's is (2**31 - 1): twice a rate
    over 9e307 was infinite, and ``config`` and ``serve --request-rate 1e308`` stopped with an
    OverflowError traceback, exit 1."""
    values = resolve({"request_rate": rate}, {}, {})
    assert values["request_burst"].value == 2**31 - 1
    ServerConfig(secret="s", **{n: values[n].value for n in ("request_rate", "request_burst")})


def test_sqlite_synchronous_is_checked_as_the_file_is_read() -> None:
    """A value SQLite does not know (a typo, its number 2) passed ``config`` and stopped
    ``serve`` with a ValueError traceback, exit 1, once the database was being opened."""
    for value in ("bogus", "2", ""):
        with pytest.raises(CLIError) as refused:
            resolve({}, {}, {"runtime": {"sqlite_synchronous": value}}, "c.toml")
        assert refused.value.code == ExitCode.USAGE
        assert str(refused.value) == (
            f"file c.toml: must be OFF, NORMAL, FULL or EXTRA, not {value!r}"
            " (runtime.sqlite_synchronous)"
        )
    for value in ("normal", "FULL", "Off", "EXTRA"):
        file = {"runtime": {"sqlite_synchronous": value}}
        assert resolve({}, {}, file)["sqlite_synchronous"].value == value


@pytest.mark.parametrize(
    "setting",
    [
        {"send_timeout": float("nan")},
        {"hello_timeout": -1.0},
        {"heartbeat_interval": 0},
        {"request_rate": float("inf")},
        {"request_burst": 0},
        {"max_connections_per_user": 0},
        {"max_frame_size": True},
        {"port": -1},
        {"envelope_margin": 2 * 1024 * 1024},  # no reply fits in max_message_size
    ],
)
def test_an_embedders_server_config_refuses_what_breaks_every_connection(
    setting: dict[str, Any],
) -> None:
    """``ServerConfig`` checks itself, as ``RuntimeConfig`` does: an embedder's NaN timeout
    failed each connection with a traceback once serving, a burst of 0 refused every
    request."""
    with pytest.raises(InvalidInputError) as refused:
        ServerConfig(secret="s", **setting)
    assert next(iter(setting)) in str(refused.value)
    assert ServerConfig(secret="s", send_timeout=3, envelope_margin=0, port=0).send_timeout == 3


def test_serve_refuses_settings_that_fit_apart_but_not_together(tmp_path: Path) -> None:
    """A usage error naming the setting, before any port or database is opened."""
    path = tmp_path / "config.toml"
    path.write_text("[server]\nenvelope_margin = 3000000\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JOBSPINE_CONFIG": str(path)}
    command = [sys.executable, "-m", "transport._cli", "serve", "--db", str(tmp_path / "db")]
    command += ["--port", "0", "--health-port", "0"]
    try:  # it served (every reply too large to send) until stopped
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail("serve started with settings that break every reply")
    assert done.returncode == ExitCode.USAGE, done.stderr
    assert done.stderr.startswith("jobspine: error: server settings: envelope_margin (3000000)")
    assert not (tmp_path / "db").exists()


@pytest.mark.parametrize("text", ["6M", "1.5M", " 6M "])
def test_a_duration_in_capital_m_is_refused(text: str) -> None:
    """``M`` reads as months to many people: ``prune --older-than 6M`` removed every job
    that finished more than six minutes ago. Other units may be upper case; ``m`` is
    minutes."""
    with pytest.raises(ValueError, match="M is ambiguous"):
        parse_duration(text)
    assert parse_duration("6m") == 360.0 and parse_duration("2W") == 14 * 86400.0


def test_a_kinds_capacity_is_set_in_the_config_file() -> None:
    """``[runtime.max_running_per_kind]`` (the README's capacity setting) was refused as an
    unknown setting; it now reaches ``RuntimeConfig``, each limit checked as the file is read."""
    values = resolve({}, {}, {"runtime": {"max_running_per_kind": {"research": 2, "trade": 1}}})
    kwargs = runtime_config_kwargs(values)
    assert kwargs["max_running_per_kind"] == {"research": 2, "trade": 1}
    assert RuntimeConfig(**kwargs).max_running_per_kind == {"research": 2, "trade": 1}
    assert runtime_config_kwargs(resolve({}, {}, {}))["max_running_per_kind"] == {}
    for bad in ({"research": 0}, {"research": True}, {"research": 1.5}, {"": 2}, {"a\x00b": 1}):
        with pytest.raises(CLIError) as refused:
            resolve({}, {}, {"runtime": {"max_running_per_kind": bad}}, "c.toml")
        assert refused.value.code == ExitCode.USAGE
        assert "max_running_per_kind" in str(refused.value) and "c.toml" in str(refused.value)
