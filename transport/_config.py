"""Settings of the ``jobspine`` command: one precedence, flags > environment > file > defaults.

Every setting is a row of :data:`SETTINGS` (its command-line flag, environment variable, key
in the TOML config file and default); :func:`resolve` applies the precedence once, sans-I/O,
to the parsed flags, an environment mapping and the parsed file. The config file is
``--config``, else ``JOBSPINE_CONFIG``, else ``config.toml`` in platformdirs' user config
directory (``~/.config/jobspine/config.toml`` on Linux); the default file may be absent.

File layout (every key optional)::

    log_level = "INFO"                  # top-level keys: settings of every command
    [client]                            # url, token, connect_timeout
    [server]                            # db, store, secret, host, port, health_port, handlers,
                                        # and every field of transport.ServerConfig
    [runtime]                           # every field of actors.RuntimeConfig but kinds,
                                        # and retention_* (below)
    [runtime.max_running_per_kind]      # a kind's own capacity
    research = 2
    [runtime.retention_kinds.research]  # a kind's own retention rule
    days = 1                            # keep finished jobs 1 day ("inf": no age limit)
    max_count = 1000                    # at most 1000 finished jobs of the kind
"""

from __future__ import annotations

import logging
import math
import os
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs
import platformdirs

from actors import InvalidInputError, RetentionPolicy, RetentionRule, RuntimeConfig
from actors._backend import POSTGRES_URL_SCHEMES
from actors._codec import check_kind
from actors._errors import shown
from actors._fanout import redis_url_problem
from actors._retention import DAY

from ._exit import CLIError, ExitCode
from ._server import ServerConfig

__all__ = [
    "SETTINGS",
    "Resolved",
    "config_path",
    "read_settings",
    "Setting",
    "default_config_path",
    "default_data_dir",
    "load_config_file",
    "resolve",
    "retention_policy",
    "runtime_config_kwargs",
    "server_config_kwargs",
]

DEFAULT_PORT = 8765
DEFAULT_HEALTH_PORT = 8766


def default_data_dir(env: Mapping[str, str]) -> Path:
    """``JOBSPINE_DATA``, else platformdirs' user data dir (``~/.local/share/jobspine``)."""
    return Path(env.get("JOBSPINE_DATA") or platformdirs.user_data_dir("jobspine"))


def default_config_path() -> Path:
    return Path(platformdirs.user_config_dir("jobspine")) / "config.toml"


@attrs.frozen
class Setting:
    #: Attribute name on the parsed arguments, and key in the config file.
    name: str
    #: Config file table: "" (top level), "client", "server" or "runtime".
    section: str
    #: The value's type: int, float, str, bool or list (of strings).
    type: type
    #: The default, or a function of the environment computing it (its docstring says how).
    default: Any
    help: str
    flag: str | None = None
    env: str | None = None
    #: Checks a value of the right type: returns what is wrong with it, or None.
    check: Callable[[Any], str | None] | None = None
    #: The environment variable a default computed from the environment reads, if any: the
    #: source then names it (``jobspine config`` said "default" for a database that
    #: ``JOBSPINE_DATA`` had moved).
    default_env: str | None = None

    @property
    def key(self) -> str:
        return f"{self.section}.{self.name}" if self.section else self.name


@attrs.frozen
class Resolved:
    value: Any
    #: "flag", "env JOBSPINE_X", "file <path>" or "default" (", in env JOBSPINE_X" when the
    #: default comes from that variable).
    source: str


def _port(value: int) -> str | None:
    return None if 0 <= value <= 65535 else f"port {value} is outside 0-65535"


def _seconds(minimum: float, *, inclusive: bool) -> Callable[[float], str | None]:
    def check(value: float) -> str | None:
        ok = math.isfinite(value) and (value >= minimum if inclusive else value > minimum)
        bound = f">= {minimum:g}" if inclusive else f"> {minimum:g}"
        return None if ok else f"must be a finite number {bound}, not {shown(value)}"

    return check


def _log_level(value: str) -> str | None:
    if isinstance(logging.getLevelName(value.upper()), int):
        return None
    return f"unknown log level {shown(value)} (DEBUG, INFO, WARNING, ERROR or CRITICAL)"


def _days(value: float) -> str | None:
    ok = value >= 0 and not math.isnan(value)
    return None if ok else f"must be a number of days >= 0 (inf: no age limit), not {shown(value)}"


def _count(value: int) -> str | None:
    return None if value >= 0 else f"must be >= 0, not {shown(value)}"


_RULE_KEYS = {"days": (int, float), "max_count": (int,)}


def _kinds(value: dict[str, Any]) -> str | None:
    for kind, rule in value.items():
        if not isinstance(rule, dict):
            return f"retention_kinds.{kind} must be a table (days, max_count), not {shown(rule)}"
        for key, item in rule.items():
            types = _RULE_KEYS.get(key)
            if types is None:
                return f"retention_kinds.{kind}: unknown key {shown(key)} (days, max_count)"
            if isinstance(item, bool) or not isinstance(item, types):
                return f"retention_kinds.{kind}.{key} must be a number, not {shown(item)}"
            problem = _days(item) if key == "days" else _count(int(item))
            if problem is not None:
                return f"retention_kinds.{kind}.{key} {problem}"
    return None


def _kind_limits(value: dict[str, Any]) -> str | None:
    for kind, limit in value.items():
        try:
            check_kind(kind)
        except InvalidInputError as exc:
            return f"max_running_per_kind: {exc}"
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 2**31 - 1:
            return (
                f"max_running_per_kind.{kind} must be a number of jobs from 1 to 2**31 - 1,"
                f" not {shown(limit)}"
            )
    return None


_POSITIVE = _seconds(0, inclusive=False)
_NON_NEGATIVE = _seconds(0, inclusive=True)


def _store_url(value: str) -> str | None:
    if not value.startswith(POSTGRES_URL_SCHEMES):
        return f"expected a postgresql:// URL (a SQLite file is --db), not {shown(value)}"
    # Loaded only when a URL is given: psycopg takes a while to import.
    from psycopg import Error, conninfo

    try:
        conninfo.conninfo_to_dict(value)
    except Error as exc:
        return f"not a PostgreSQL URL: {' '.join(str(exc).split())}"
    return None


def _node_id(value: str) -> str | None:
    if not value or len(value) > 200 or not value.isprintable() or "#" in value:
        return "must be 1-200 printable characters without '#'"
    return None


def _redis_url(value: str) -> str | None:
    return redis_url_problem(value)


def _db_default(env: Mapping[str, str]) -> str:
    """$JOBSPINE_DATA/jobspine.db, JOBSPINE_DATA defaulting to ~/.local/share/jobspine"""
    return str(default_data_dir(env) / "jobspine.db")


_EXPLICIT: tuple[Setting, ...] = (
    Setting("log_level", "", str, "INFO", "log level", "--log-level", "JOBSPINE_LOG",
            _log_level),
    Setting("log_format", "", str, "text", "log lines as text or as one JSON object each",
            "--log-format", "JOBSPINE_LOG_FORMAT"),
    Setting("url", "client", str, f"ws://127.0.0.1:{DEFAULT_PORT}", "server URL", "--url",
            "JOBSPINE_URL"),
    Setting("token", "client", str, None, "access token (mint one: jobspine token --user NAME)",
            "--token", "JOBSPINE_TOKEN"),
    Setting("connect_timeout", "client", float, 10.0,
            "seconds a one-shot command waits for the server", "--connect-timeout",
            "JOBSPINE_CONNECT_TIMEOUT", _POSITIVE),
    Setting("concurrency", "client", int, 4,
            "jobs `jobspine worker` runs at once (the capacity it declares)", "--concurrency",
            "JOBSPINE_CONCURRENCY", lambda n: None if 1 <= n <= 1000 else "must be in 1..1000"),
    Setting("db", "server", str, _db_default, "SQLite database file", "--db", "JOBSPINE_DB",
            default_env="JOBSPINE_DATA"),
    Setting("store", "server", str, None, "PostgreSQL database instead of the SQLite file: "
            "postgresql://USER@HOST:PORT/DBNAME (the database must exist)", "--store",
            "JOBSPINE_STORE", _store_url),
    Setting("redis", "server", str, None, "Redis for the cluster fan-out (several nodes on one "
            "PostgreSQL database): redis://HOST:PORT/DB", "--redis", "JOBSPINE_REDIS",
            _redis_url),
    Setting("secret", "server", str, None, "token signing secret (default: a development "
            "secret generated beside the database)", None, "JOBSPINE_SECRET"),
    Setting("host", "server", str, "127.0.0.1", "interface to listen on", "--host",
            "JOBSPINE_HOST"),
    Setting("port", "server", int, DEFAULT_PORT, "websocket port", "--port", "JOBSPINE_PORT",
            _port),
    Setting("health_port", "server", int, DEFAULT_HEALTH_PORT,
            "HTTP port: the dashboard, /healthz, /readyz, /metrics", "--health-port",
            "JOBSPINE_HEALTH_PORT", _port),
    Setting("request_rate", "server", float, 50.0, "requests/s per connection",
            "--request-rate", "JOBSPINE_REQUEST_RATE", _POSITIVE),
    Setting("handlers", "server", list, (), "MODULE:DICT registering more job kinds "
            "(repeatable; env: comma-separated)", "--handlers", "JOBSPINE_HANDLERS"),
    Setting("no_demo", "server", bool, False, "leave out the demo kinds (research, trade, "
            "analysis)", "--no-demo", "JOBSPINE_NO_DEMO"),
    Setting("worker_processes", "server", int, 0,
            "local `jobspine worker` processes to start and supervise; handlers then run only "
            "in them (0: in the server)", "--worker-processes", "JOBSPINE_WORKER_PROCESSES",
            lambda n: None if 0 <= n <= 256 else "must be in 0..256"),
    Setting("heap_trim_interval", "server", float, 5.0,
            "seconds between two returns of the heap memory the server freed to the operating "
            "system (glibc malloc_trim, in a thread; 0: never)", "--heap-trim-interval",
            "JOBSPINE_HEAP_TRIM_INTERVAL", _NON_NEGATIVE),
    Setting("gc_threshold", "server", int, 50_000,
            "net allocations between two young collections of Python's cyclic garbage "
            "collector, after what startup made is frozen out of them (0: Python's pace, 700)",
            "--gc-threshold", "JOBSPINE_GC_THRESHOLD",
            lambda n: None if n == 0 or 100 <= n <= 10_000_000 else "must be 0 or in "
            "100..10000000"),
    Setting("heartbeat_timeout", "runtime", float, 30.0,
            "seconds without a sign of life before a running job is stalled",
            "--heartbeat-timeout", "JOBSPINE_HEARTBEAT_TIMEOUT", _POSITIVE),
    Setting("stop_grace", "runtime", float, 5.0,
            "seconds a job gets to checkpoint when asked to stop", "--stop-grace",
            "JOBSPINE_STOP_GRACE", _NON_NEGATIVE),
    Setting("node_id", "runtime", str, None,
            "this node's id in the database's nodes table (default: a new random id at each "
            "start); one live node per id", "--node-id", "JOBSPINE_NODE_ID", _node_id),
    Setting("lease_ttl", "runtime", float, 5.0,
            "seconds this node's lease (and its claims) hold unrenewed; on PostgreSQL a node "
            "silent this long is taken over by another", "--lease-ttl", "JOBSPINE_LEASE_TTL",
            _POSITIVE),
    Setting("lease_renew_interval", "runtime", float, 1.0,
            "seconds between two renewals of the lease (shorter than --lease-ttl)",
            "--lease-renew-interval", "JOBSPINE_LEASE_RENEW_INTERVAL", _POSITIVE),
    Setting("retention_days", "runtime", float, 7.0,
            "days a finished job (completed, failed, cancelled) and its events are kept "
            "(inf: no age limit)", "--retention-days", "JOBSPINE_RETENTION_DAYS", _days),
    Setting("retention_max_per_kind", "runtime", int, None,
            "finished jobs kept per kind at most, oldest removed first (default: no limit)",
            "--retention-max-per-kind", "JOBSPINE_RETENTION_MAX_PER_KIND", _count),
    Setting("retention_interval", "runtime", float, 60.0,
            "seconds between two applications of the retention policy", None,
            "JOBSPINE_RETENTION_INTERVAL", _POSITIVE),
    Setting("retention_kinds", "runtime", dict, {},
            "per-kind retention rules: [runtime.retention_kinds.KIND] days, max_count "
            "(config file only)", check=_kinds),
    Setting("max_running_per_kind", "runtime", dict, {},
            "jobs of a kind running at once at most: [runtime.max_running_per_kind] KIND = n "
            "(config file only; default: max_running alone)", check=_kind_limits),
)  # fmt: skip


#: The largest count or size in bytes a config-file-only setting takes (2 GiB): past it, a
#: socket option or a buffer of that size fails where the value is used.
_MAX_FIELD_INT = 2**31 - 1
#: Config-file-only numbers for which 0 means something: no recovery after a stall (the job
#: fails at once), no room kept for a reply's envelope, a shutdown that cancels every job at
#: once with no pause, a locked SQLite database not waited for.
_ZERO_ALLOWED = {
    "max_recovery_attempts",
    "envelope_margin",
    "shutdown_timeout",
    "sqlite_busy_timeout",
}


#: Config-file-only strings that take one of a few words (any case).
_CHOICES = {"sqlite_synchronous": ("OFF", "NORMAL", "FULL", "EXTRA")}


def _choice(words: tuple[str, ...]) -> Callable[[str], str | None]:
    def check(value: str) -> str | None:
        ok = value.upper() in words
        return None if ok else f"must be {', '.join(words[:-1])} or {words[-1]}, not {shown(value)}"

    return check


def _field_check(name: str, kind: type) -> Callable[[Any], str | None] | None:
    """The range of a config-file-only number: every float of the config classes is a number
    of seconds (a timeout, an interval, a window), every int a count or a size. Out of
    range, each broke serving without a word at start: a heartbeat_interval of 0 spun the
    CPU and flooded every client, a NaN or negative timeout failed every connection with a
    traceback, a limit of 0 refused every user. A string in :data:`_CHOICES` is one of its
    words (an unknown sqlite_synchronous stopped serve with a traceback as it opened the
    database)."""
    if name in _CHOICES:
        return _choice(_CHOICES[name])
    low = 0 if name in _ZERO_ALLOWED else 1
    if kind is float:
        return _NON_NEGATIVE if low == 0 else _POSITIVE
    if kind is int:

        def check(value: int) -> str | None:
            ok = low <= value <= _MAX_FIELD_INT
            return (
                None if ok else f"must be an integer in {low}..{_MAX_FIELD_INT}, not {shown(value)}"
            )

        return check
    return None


def _field_settings(cls: type, section: str, taken: set[str]) -> list[Setting]:
    """Every other field of a config class, reachable from the config file only."""
    found = []
    for field in attrs.fields(cls):
        if field.name in taken or field.name == "secret":
            continue
        # Every such field has a non-null default of its own type (None only for "no limit").
        kind = int if field.default is None else type(field.default)
        found.append(
            Setting(
                field.name,
                section,
                kind,
                field.default,
                f"{cls.__name__}.{field.name}",
                check=_field_check(field.name, kind),
            )
        )
    return found


# ``retention`` is built from the retention_* settings (:func:`retention_policy`); a kind's
# options (``kinds``) are its handler's own (``@kind_options``) or the embedding API's.
_TAKEN = {s.name for s in _EXPLICIT} | {"retention", "kinds"}
#: Every setting, explicit ones first; request_burst defaults to twice request_rate (at
#: least 1).
SETTINGS: tuple[Setting, ...] = (
    *_EXPLICIT,
    *_field_settings(ServerConfig, "server", _TAKEN),
    *_field_settings(RuntimeConfig, "runtime", _TAKEN),
)
_BY_KEY = {s.key: s for s in SETTINGS}
_SECTIONS = {"", "client", "server", "runtime"}


def load_config_file(path: Path) -> dict[str, Any]:
    """Parse a TOML config file; :class:`CLIError` (usage) when it is not valid TOML."""
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise CLIError(ExitCode.USAGE, f"config file {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:  # TOML is UTF-8; tomllib decodes before it parses
        raise CLIError(
            ExitCode.USAGE, f"config file {path}: not UTF-8 text (byte {exc.start}): {exc.reason}"
        ) from None
    except ValueError as exc:
        # tomllib.TOMLDecodeError, or an integer over Python's 4,300 digits (int() refuses
        # it as tomllib reads it: a traceback before).
        raise CLIError(ExitCode.USAGE, f"config file {path}: {exc}") from None


def _flatten(data: Mapping[str, Any], where: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key in _SECTIONS - {""} and isinstance(value, dict):
            for inner, inner_value in value.items():
                out[f"{key}.{inner}"] = inner_value
        else:
            out[key] = value
    unknown = sorted(set(out) - set(_BY_KEY))
    if unknown:
        raise CLIError(ExitCode.USAGE, f"{where}: unknown setting {', '.join(unknown)}")
    return out


def _convert(setting: Setting, value: Any, where: str) -> Any:
    """Check (file values) or parse (environment strings) one value."""
    kind = setting.type
    try:
        if isinstance(value, str) and kind is not str:
            if kind is list:
                return tuple(part.strip() for part in value.split(",") if part.strip())
            if kind is bool:
                if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError(value)
                return value.lower() in ("1", "true", "yes")
            return kind(value)
        if kind is list and isinstance(value, list | tuple):
            if all(isinstance(v, str) for v in value):
                return tuple(value)
        elif kind is float and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        elif isinstance(value, kind) and (kind is bool or not isinstance(value, bool)):
            return value
    except (ValueError, OverflowError):  # OverflowError: an integer beyond any float
        pass
    raise CLIError(
        ExitCode.USAGE, f"{where}: {setting.key} must be {kind.__name__}, got {shown(value)}"
    )


def resolve(
    flags: Mapping[str, Any],
    env: Mapping[str, str],
    file: Mapping[str, Any],
    file_name: str = "config file",
) -> dict[str, Resolved]:
    """Every setting's value and where it came from: a flag given on the command line (in
    ``flags``, by name), else its environment variable, else the config file (parsed TOML),
    else the default. Raises :class:`CLIError` (usage) for an unknown file key or a value of
    the wrong type."""
    from_file = _flatten(file, file_name)
    # Every value in the file is checked, also one that a flag or variable overrides today:
    # a wrong file is wrong whatever else is set.
    in_file = {
        setting.key: _checked(setting, _convert(setting, from_file[setting.key], file_name),
                              "file " + file_name)
        for setting in SETTINGS
        if setting.key in from_file
    }  # fmt: skip
    out: dict[str, Resolved] = {}
    for setting in SETTINGS:
        if setting.name in flags and flags[setting.name] is not None:
            source = "flag " + (setting.flag or setting.name)
            value = _checked(setting, flags[setting.name], source)
        elif setting.env and env.get(setting.env):
            source = "env " + setting.env
            value = _checked(setting, _convert(setting, env[setting.env], setting.env), source)
        elif setting.key in in_file:
            value, source = in_file[setting.key], "file " + file_name
        elif setting.name == "request_burst" and "request_rate" in out:
            # Its default follows the rate the other settings chose, and holds one request at
            # least: a bucket of 0 refuses every request (a rate under 0.5/s made it 0). At
            # most what a file may set: twice a rate over 9e307 was infinite (a traceback).
            burst = max(1, int(min(2 * out["request_rate"].value, _MAX_FIELD_INT)))
            value, source = burst, "default (2 x request_rate, at least 1)"
        else:
            default = setting.default
            value = default(env) if callable(default) else default
            source = "default"
            if setting.default_env and env.get(setting.default_env):
                source = f"default, in env {setting.default_env}"
        out[setting.name] = Resolved(value, source)
    return out


def _checked(setting: Setting, value: Any, source: str) -> Any:
    problem = None if setting.check is None else setting.check(value)
    if problem is not None:
        raise CLIError(ExitCode.USAGE, f"{source}: {problem} ({setting.key})")
    return value


def _section_kwargs(values: Mapping[str, Resolved], cls: type) -> dict[str, Any]:
    names = {f.name for f in attrs.fields(cls)} - {"secret"}
    return {name: values[name].value for name in names if name in values}


def server_config_kwargs(values: Mapping[str, Resolved]) -> dict[str, Any]:
    """Keyword arguments for :class:`ServerConfig` (all but ``secret``)."""
    return _section_kwargs(values, ServerConfig)


def _rule(days: float, max_count: int | None) -> RetentionRule:
    return RetentionRule(None if math.isinf(days) else days * DAY, max_count)


def retention_policy(values: Mapping[str, Resolved]) -> RetentionPolicy:
    """The server's :class:`actors.RetentionPolicy` from the retention_* settings."""
    days, max_count = values["retention_days"].value, values["retention_max_per_kind"].value
    kinds = {
        kind: _rule(float(rule.get("days", days)), rule.get("max_count", max_count))
        for kind, rule in values["retention_kinds"].value.items()
    }
    return RetentionPolicy(
        _rule(days, max_count), kinds, interval=values["retention_interval"].value
    )


def runtime_config_kwargs(values: Mapping[str, Resolved]) -> dict[str, Any]:
    """Keyword arguments for :class:`actors.RuntimeConfig` (``retention`` included)."""
    return {**_section_kwargs(values, RuntimeConfig), "retention": retention_policy(values)}


def config_path(flag: str | None, env: Mapping[str, str]) -> tuple[Path, bool]:
    """The config file to read and whether it must exist (it was named)."""
    named = flag or env.get("JOBSPINE_CONFIG")
    return (Path(named), True) if named else (default_config_path(), False)


def read_settings(
    flags: Mapping[str, Any], env: Mapping[str, str] | None = None
) -> dict[str, Resolved]:
    """Resolve every setting, reading the config file the flags or environment name."""
    env = os.environ if env is None else env
    path, required = config_path(flags.get("config"), env)
    file: dict[str, Any] = {}
    if required or path.exists():
        file = load_config_file(path)
    return resolve(flags, env, file, str(path))
