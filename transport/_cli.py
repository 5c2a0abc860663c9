"""The ``jobspine`` command: the server, tokens, and a client for people.

Settings come from flags, the environment, a TOML config file and defaults, in that order
(:mod:`transport._config`); client commands live in :mod:`transport._commands`, what they show
in :mod:`transport._display`, exit statuses in :mod:`transport._exit`."""

from __future__ import annotations

import argparse
import fcntl
import importlib
import io
import itertools
import logging
import os
import secrets
import select
import signal
import socket
import sys
import threading
import warnings
from collections.abc import AsyncIterator
from importlib.metadata import version
from pathlib import Path
from typing import Any, NoReturn

import attrs
import trio
from jwt.warnings import InsecureKeyLengthWarning

from actors import (
    DEMO_HANDLERS,
    DatabaseLockedError,
    FanoutConfig,
    InvalidInputError,
    JobspineError,
    NodeIdInUseError,
    RuntimeConfig,
    StoreError,
    parse_duration,
)
from actors._backend import POSTGRES_URL_SCHEMES
from actors._errors import shown, unwrap_group
from actors._fanout import redact_redis_url, redis_refusal
from actors._retention import DAY
from actors._worker import check_handler

from ._app import PortUnavailableError, open_server
from ._auth import MAX_TOKEN_TTL, mint_token, secret_problem, user_id_problem
from ._commands import check_url, run_client_command
from ._config import (
    SETTINGS,
    Resolved,
    Setting,
    default_config_path,
    read_settings,
    runtime_config_kwargs,
    server_config_kwargs,
)
from ._display import StdoutClosedError, write, write_json
from ._exit import EXIT_HELP, CLIError, ExitCode
from ._heap import HeapTrimmer, tune_collector
from ._inert import visible
from ._local_workers import PARENT_PIPE_ENV, LocalWorkers
from ._logging import LOG_FORMATS, configure_logging
from ._nodes_cmd import run_nodes
from ._server import ServerConfig
from ._ui import run_ui
from ._worker_process import WorkerFatalError, WorkerProcess

log = logging.getLogger("jobspine")


def _secret_file(db: Path) -> Path:
    return db.parent / "secret"


def stored_secret(db: Path, secret: str | None) -> str | None:
    """``secret`` (the ``secret`` setting: ``JOBSPINE_SECRET`` or the config file), else the
    development secret stored beside the database, else None."""
    if secret:
        return secret
    path = _secret_file(db)
    return path.read_text().strip() if path.exists() else None


def load_secret(db: Path, *, secret: str | None = None) -> str:
    """As :func:`stored_secret`; a usage :class:`CLIError` when there is none."""
    found = stored_secret(db, secret)
    if found is None:
        raise CLIError(
            ExitCode.USAGE,
            f"no JOBSPINE_SECRET and no development secret at {_secret_file(db)}: start the"
            " server once (jobspine serve) or set JOBSPINE_SECRET",
        )
    return found


class DevelopmentSecretLock:
    """Held by a server that starts without JOBSPINE_SECRET, from before it reads the
    development secret beside ``db`` until it saved the one it made (or its start failed):
    nodes started at once on one data directory used to make one secret each, and the second
    to save its own failed once serving (``[Errno 17] File exists``, exit status 9). The next
    one waits, then reads the secret the first kept."""

    def __init__(self, db: Path) -> None:
        self.path = db.parent / ".secret.lock"
        self.fd: int | None = None

    async def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            for tries in itertools.count():
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if tries == 20:
                        log.info(
                            "waiting for the server starting on %s to make its development secret",
                            self.path.parent,
                        )
                    await trio.sleep(0.05)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # and with it the lock
            self.fd = None


def save_development_secret(db: Path, secret: str) -> None:
    """Keep a generated secret beside the database (mode 0600) for ``jobspine token``; called
    once the server has started, so a refused start leaves nothing behind."""
    path = _secret_file(db)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret)
    log.warning(
        "no JOBSPINE_SECRET set: generated a development secret in %s (not for production)", path
    )


# -- serve ---------------------------------------------------------------------------------------


def run_serve(args: argparse.Namespace) -> int:
    """``jobspine serve``: a failure to start is one line on stderr and a distinct status,
    having changed nothing stored (handlers load and ports bind before the database opens,
    and the database's owner lock is taken before it is read). So is a node replaced while it
    served (status 7, see :class:`~actors.NodeReplacedError`)."""
    try:
        try:
            return trio.run(serve, args)
        except BaseExceptionGroup as group:
            leaf = unwrap_group(group)
            if leaf is group:
                raise
            raise leaf from None
    except (DatabaseLockedError, NodeIdInUseError) as exc:
        # NodeIdInUseError at start; its NodeReplacedError once serving: this node lost its
        # lease and another live process holds its node id, so it stops.
        raise CLIError(ExitCode.DATABASE_IN_USE, str(exc)) from None
    except PortUnavailableError as exc:
        raise CLIError(ExitCode.PORT_UNAVAILABLE, str(exc)) from None
    except StoreError as exc:
        raise CLIError(ExitCode.DATABASE_UNUSABLE, str(exc)) from None
    except OSError as exc:  # the data directory or the secret beside it
        raise CLIError(ExitCode.DATABASE_UNUSABLE, str(exc)) from None
    except JobspineError as exc:
        raise CLIError(ExitCode.REFUSED, str(exc)) from None


def _handlers(args: argparse.Namespace) -> dict[str, Any]:
    handlers = {} if args.no_demo else dict(DEMO_HANDLERS)
    for spec in args.handlers:
        handlers.update(load_handlers(spec))
    return handlers


async def serve(args: argparse.Namespace) -> int:
    handlers = _handlers(args)
    db = Path(args.db)
    # The development secret lives beside the SQLite file, also when the jobs are kept in
    # PostgreSQL (``--store``): ``jobspine token`` finds it there.
    db.parent.mkdir(parents=True, exist_ok=True)
    database = args.store or db
    secret = stored_secret(db, args.secret)
    if secret is not None:
        return await _serve(args, handlers, db, database, secret, None)
    lock = DevelopmentSecretLock(db)
    await lock.acquire()
    try:
        secret = stored_secret(db, None)  # kept by a server that started meanwhile
        if secret is not None:
            lock.release()
            return await _serve(args, handlers, db, database, secret, None)
        return await _serve(args, handlers, db, database, secrets.token_urlsafe(32), lock)
    finally:
        lock.release()


async def _serve(
    args: argparse.Namespace,
    handlers: dict[str, Any],
    db: Path,
    database: Path | str,
    secret: str,
    generated: DevelopmentSecretLock | None,
) -> int:
    """:func:`serve` with its secret; ``generated``: it was made now, under this lock on the
    data directory's secret, released once the secret is saved (serving) or the start failed."""
    weak = secret_problem(secret)
    if weak:
        log.warning("%s", weak)
    try:
        config = ServerConfig(secret=secret, **args.server_config)
    except InvalidInputError as exc:
        raise CLIError(ExitCode.USAGE, f"server settings: {exc}") from None
    try:
        runtime_config = RuntimeConfig(**args.runtime_config)
    except InvalidInputError as exc:
        raise CLIError(ExitCode.USAGE, f"runtime settings: {exc}") from None
    if args.redis:
        refusal = await redis_refusal(args.redis)
        if refusal is not None:
            raise CLIError(
                ExitCode.USAGE,
                f"--redis {redact_redis_url(args.redis)}: the Redis server refuses it"
                f" ({refusal}): check the URL's database index, user and password",
            )
    local = None
    if args.worker_processes:
        # Handlers run only in the worker processes; the server keeps their input checks.
        runtime_config = attrs.evolve(runtime_config, in_process_handlers=False)
        local = _local_workers(args, secret)
    life = _Lifecycle()
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as processes:
            processes.start_soon(life.watch, signals)
            with life.startup:
                async with open_server(
                    database,
                    config,
                    handlers=handlers,
                    runtime_config=runtime_config,
                    health_port=args.health_port,
                    fanout=FanoutConfig(args.redis, secret=secret) if args.redis else None,
                ) as running:
                    life.serving = True
                    if generated is not None:
                        save_development_secret(db, secret)
                        generated.release()  # the next server to start reads it
                    if local is not None:
                        local.command += ["--url", running.url]
                        await processes.start(local.run)
                    log.info(
                        "jobspine listening on %s; dashboard http://%s:%s/ (health /healthz),"
                        " database %s, epoch %s; pid %d (stop it with: kill %d)",
                        running.url,
                        _url_host(args.host),
                        running.health_port,
                        _shown_store(str(database)),
                        running.runtime.epoch,
                        os.getpid(),
                        os.getpid(),
                    )
                    tune_collector(args.gc_threshold)
                    async with trio.open_nursery() as housekeeping:
                        if args.heap_trim_interval > 0:
                            await housekeeping.start(HeapTrimmer(args.heap_trim_interval).run)
                        await life.stop.wait()
                        housekeeping.cancel_scope.cancel()
                # The server's shutdown paused the workers' jobs (each within its grace period).
                if local is not None:
                    await local.stop()
            processes.cancel_scope.cancel()  # the signal watcher
    if life.startup.cancelled_caught:
        log.info("stopped before serving: nothing was started")
        return 0
    log.info("stopped cleanly")
    return 0


class _Lifecycle:
    """``serve``'s signals: the first SIGINT or SIGTERM stops the server gracefully once it
    serves; before that (the database still opening: a migration, the recovery of running
    jobs) it cancels the startup, so nothing is served or run after it (the server used to
    finish starting, claim and run jobs, then stop)."""

    def __init__(self) -> None:
        self.startup = trio.CancelScope()
        self.serving = False
        self.stop = trio.Event()

    async def watch(self, signals: AsyncIterator[int]) -> None:
        async for signum in signals:
            name = signal.Signals(signum).name
            if self.serving:
                log.info("%s: shutting down", name)
                self.stop.set()
            else:
                log.info("%s while starting: stopping before serving", name)
                self.startup.cancel()
            return


def _url_host(host: str) -> str:
    """``host`` as it stands in a URL (an IPv6 address in brackets)."""
    return f"[{host}]" if ":" in host else host


def _shown_store(database: str) -> str:
    """``database`` as logs and ``jobspine config`` show it: a URL without its password."""
    if not database.startswith(POSTGRES_URL_SCHEMES):
        return database
    from actors._postgres import redact_url

    return redact_url(database)


#: How much lower the CPU priority of ``--worker-processes`` is than the server's: handlers
#: that compute then never delay the server's heartbeats, stall checks and event delivery.
LOCAL_WORKER_NICE = 5


def _local_workers(args: argparse.Namespace, secret: str) -> LocalWorkers:
    """``--worker-processes``: the same handler modules, a worker token from the secret."""
    worker_args = [
        *("--concurrency", str(args.concurrency), "--log-level", args.log_level),
        *("--nice", str(LOCAL_WORKER_NICE)),
    ]
    for spec in args.handlers:
        worker_args += ["--handlers", spec]
    if args.no_demo:
        worker_args.append("--no-demo")
    env = dict(os.environ)
    env["JOBSPINE_TOKEN"] = mint_token(secret, "local-worker", role="worker", ttl=10 * 365 * DAY)
    return LocalWorkers(args.worker_processes, worker_args, env)


#: ``jobspine worker --help``: the token it needs.
WORKER_TOKEN_HELP = "worker token (mint one: jobspine token --worker)"

#: What a refused ``jobspine worker`` says, by the close's meaning (PROTOCOL.md section 9).
_WORKER_REFUSALS = {
    "wrong_role": "this is not a worker token (a user's token?): mint one where the server"
    " runs, with the same data directory: jobspine token --worker",
    "auth_failed": "the server refused the token; it was likely minted with another secret"
    " (another JOBSPINE_DATA directory, --db or JOBSPINE_SECRET than the server's): mint one"
    " with the server's settings: jobspine token --worker",
    "token_expired": "the token has expired: mint a new one with jobspine token --worker",
}


def run_worker(args: argparse.Namespace) -> int:
    """``jobspine worker``: serve handlers for the server at ``--url`` until SIGTERM/SIGINT
    (the jobs are then handed back, each within its grace period)."""
    if not args.token:
        raise CLIError(
            ExitCode.AUTH,
            "no worker token: set JOBSPINE_TOKEN (mint one: jobspine token --worker)",
        )
    check_url(args.url)
    loaded = _exit_with_parent_while_loading() if os.environ.get(PARENT_PIPE_ENV) else None
    handlers = _handlers(args)
    if loaded is not None:
        loaded.set()  # from here on, _exit_with_parent stops it, handing its jobs back
    if not handlers:
        raise CLIError(ExitCode.USAGE, "no handlers: give --handlers MODULE:DICT")
    if not 0 <= args.nice <= 19:
        raise CLIError(ExitCode.USAGE, f"--nice {args.nice}: must be in 0..19")
    if args.nice:
        os.nice(args.nice)
    fatal = trio.run(_worker_main, args, handlers)
    if fatal is not None:
        if fatal.code in ("unreachable", "not_jobspine"):
            raise CLIError(ExitCode.CANNOT_CONNECT, str(fatal))
        if fatal.code == "protocol_error":  # the hello: its kinds, capacity or options
            raise CLIError(ExitCode.USAGE, f"the server refused this worker's hello: {fatal}")
        hint = _WORKER_REFUSALS.get(fatal.code, str(fatal))
        raise CLIError(ExitCode.AUTH, f"the server refused this worker ({fatal.code}): {hint}")
    return ExitCode.OK


async def _worker_main(
    args: argparse.Namespace, handlers: dict[str, Any]
) -> WorkerFatalError | None:
    """Serves until a signal's drain ends; returns the refusal that stops it (reconnecting
    cannot help), caught here rather than wrapped in the nursery's exception group."""
    try:
        process = WorkerProcess(
            args.url,
            args.token,
            handlers,
            concurrency=args.concurrency,
            connect_timeout=args.connect_timeout,
            name=args.name or f"{socket.gethostname()}-{os.getpid()}",
        )
    except InvalidInputError as exc:  # what it would serve (a hello too large): a traceback
        raise CLIError(ExitCode.USAGE, str(exc)) from None
    fatal: WorkerFatalError | None = None
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def drain_on_signal() -> None:
                async for signum in signals:
                    # Named: a local worker process logs into the server's log.
                    log.info(
                        "worker %s: %s: handing jobs back",
                        process.name,
                        signal.Signals(signum).name,
                    )
                    process.drain()
                    return

            nursery.start_soon(drain_on_signal)
            if os.environ.get(PARENT_PIPE_ENV):
                nursery.start_soon(_exit_with_parent, nursery.cancel_scope)
            try:
                await process.run()
            except WorkerFatalError as exc:
                fatal = exc
            nursery.cancel_scope.cancel()
    return fatal


def _exit_with_parent_while_loading() -> threading.Event:
    """Until the returned event is set (the handlers' modules are imported), end this process
    at once when the server that started it is gone (its stdin pipe ends): an import that
    hangs (a device or a share that never answers) kept a worker of a SIGKILLed server alive
    for good, before :func:`_exit_with_parent` could watch. Nothing is running yet, so there
    is nothing to hand back."""
    loaded = threading.Event()
    fd = os.dup(sys.stdin.fileno())

    def watch() -> None:
        # The running worker's FdStream on a dup of the same pipe sets O_NONBLOCK on the
        # shared file description: wait for data or the pipe's end before each read.
        while True:
            select.select([fd], [], [])
            try:
                if not os.read(fd, 4096):
                    break
            except BlockingIOError:
                continue
        if not loaded.is_set():
            log.warning("the server that started this worker is gone: stopping")
            os._exit(ExitCode.OK)

    threading.Thread(target=watch, name="jobspine-parent-watch", daemon=True).start()
    return loaded


async def _exit_with_parent(scope: trio.CancelScope) -> None:
    """A worker of ``serve --worker-processes`` reads its stdin, a pipe from the server: at
    its end (the server died, even by SIGKILL) the worker stops at once instead of lingering
    and joining whatever listens on the port next; the server recovers its jobs."""
    stream = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    async with stream:
        while await stream.receive_some(4096):
            pass
    log.warning("the server that started this worker is gone: stopping")
    scope.cancel()
    # A handler computing in a thread (trio.to_thread.run_sync) cannot be cancelled, and
    # Trio waits for it: the worker lived on, computing for nobody, until the thread's step
    # ended. Nothing it finishes can be reported now: end the process after a short grace.
    timer = threading.Timer(PARENT_GONE_GRACE, _exit_parent_gone)
    timer.daemon = True
    timer.start()


PARENT_GONE_GRACE = 2.0
"""Seconds a worker of ``serve --worker-processes`` whose server is gone gives its handlers
to end (an async one is cancelled at once; a thread's step cannot be) before it exits."""


def _exit_parent_gone() -> None:
    log.warning(
        "a handler still runs in a thread %g s after the server's death: exiting now",
        PARENT_GONE_GRACE,
    )
    logging.shutdown()
    os._exit(ExitCode.OK)


def load_handlers(spec: str) -> dict[str, Any]:
    """``module:attribute`` (default attribute ``HANDLERS``) naming a dict of kind -> async
    handler, registered beside the demos; a usage :class:`CLIError` if it cannot be used.

    The module is looked up in the current directory too (first), as ``python -m`` would."""
    module_name, _, attribute = spec.partition(":")
    attribute = attribute or "HANDLERS"
    if not module_name:
        raise CLIError(ExitCode.USAGE, f"--handlers {spec}: expected MODULE:DICT")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except (Exception, SystemExit) as exc:  # raised importing the user's module (a script)
        raise CLIError(
            ExitCode.USAGE,
            f"--handlers {spec}: cannot import {module_name}: {type(exc).__name__}: {exc}",
        ) from None
    found = getattr(module, attribute, None)
    if found is None:
        raise CLIError(
            ExitCode.USAGE, f"--handlers {spec}: module {module_name} has no {attribute}"
        )
    if not isinstance(found, dict):
        raise CLIError(
            ExitCode.USAGE,
            f"--handlers {spec}: {attribute} is a {type(found).__name__},"
            " expected a dict of kind -> handler",
        )
    for kind, handler in found.items():
        if not isinstance(kind, str) or not callable(handler):
            raise CLIError(
                ExitCode.USAGE,
                f"--handlers {spec}: {shown(kind)}: expected a kind name mapped to a handler"
                " function",
            )
        try:
            check_handler(kind, handler)  # as the runtime's registration and a worker check it
        except InvalidInputError as exc:
            raise CLIError(ExitCode.USAGE, f"--handlers {spec}: {exc}") from None
    return found


# -- argument parsing ----------------------------------------------------------------------------

PRECEDENCE_HELP = f"""\
settings: flags > environment variables > config file > defaults. The config file is
--config, else JOBSPINE_CONFIG, else {default_config_path()} (TOML; `jobspine config`
shows every setting, its value and where it came from)."""

EPILOG = PRECEDENCE_HELP + "\n\n" + EXIT_HELP

_BY_NAME = {s.name: s for s in SETTINGS}
_SECTION_ORDER = ["", "client", "server", "runtime"]


def _help(setting: Setting, about: str | None = None) -> str:
    default = setting.default
    if callable(default):
        shown = default.__doc__ or ""
    elif isinstance(default, tuple):
        shown = ", ".join(default) or "none"
    else:
        shown = "none" if default is None else str(default)
    text = f"{about or setting.help} (default: {shown}; env {setting.env}; config: {setting.key})"
    return text.replace("%", "%%")


def _add(
    p: argparse._ActionsContainer, name: str, *, about: str | None = None, **options: Any
) -> None:
    """A flag for a setting; absent unless given, so that :func:`read_settings` can tell;
    ``about`` replaces the setting's own help where a command reads it differently."""
    setting = _BY_NAME[name]
    assert setting.flag is not None
    if setting.type is list:
        options.setdefault("action", "append")
    elif setting.type is bool:
        options.setdefault("action", "store_true")
    elif setting.type is not str:
        options.setdefault("type", setting.type)
    p.add_argument(setting.flag, default=argparse.SUPPRESS, help=_help(setting, about), **options)


class _Parser(argparse.ArgumentParser):
    """Reports a bad option as one line (no usage dump) with the usage exit status."""

    def error(self, message: str) -> NoReturn:
        self.exit(ExitCode.USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _common() -> _Parser:
    common = _Parser(add_help=False)
    group = common.add_argument_group("global options (accepted before or after the command)")
    group.add_argument("--version", action="version", version=f"jobspine {version('jobspine')}")
    _add(group, "log_level", metavar="LEVEL")
    _add(group, "log_format", choices=LOG_FORMATS)
    group.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS,
        help="machine-readable output: one JSON document, or JSON lines for a watched job",
    )
    group.add_argument(
        "--config",
        metavar="FILE",
        default=argparse.SUPPRESS,
        help=f"TOML config file (default: JOBSPINE_CONFIG, else {default_config_path()})",
    )
    return common


def _client_options(*, worker: bool = False) -> _Parser:
    """The connection flags; ``worker``: those of ``jobspine worker``, whose token is a
    worker token (a user's is refused with 4010)."""
    client = _Parser(add_help=False)
    group = client.add_argument_group("connection")
    _add(group, "url")
    _add(group, "token", about=WORKER_TOKEN_HELP if worker else None)
    _add(group, "connect_timeout", metavar="SECONDS")
    return client


def _server_options(p: argparse.ArgumentParser) -> None:
    _add(p, "db", metavar="FILE")
    _add(p, "store", metavar="URL")
    _add(p, "redis", metavar="URL")
    _add(p, "host")
    _add(p, "port")
    _add(p, "health_port")
    _add(p, "heartbeat_timeout", metavar="SECONDS")
    _add(p, "stop_grace", metavar="SECONDS")
    _add(p, "request_rate", metavar="PER_SECOND")
    _add(p, "handlers", metavar="MODULE:DICT")
    _add(p, "no_demo", action="store_true")
    _add(p, "worker_processes", metavar="N")
    _add(p, "heap_trim_interval", metavar="SECONDS")
    _add(p, "gc_threshold", metavar="ALLOCATIONS")
    _add(
        p,
        "concurrency",
        metavar="N",
        about="with --worker-processes: jobs each worker process runs at once",
    )
    _add(p, "retention_days", metavar="DAYS")
    _add(p, "retention_max_per_kind", metavar="COUNT")
    _add(p, "node_id", metavar="NAME")
    _add(p, "lease_ttl", metavar="SECONDS")
    _add(p, "lease_renew_interval", metavar="SECONDS")


def parser() -> argparse.ArgumentParser:
    common, client, worker_client = _common(), _client_options(), _client_options(worker=True)
    formatter = argparse.RawDescriptionHelpFormatter
    top = _Parser(
        prog="jobspine",
        description="Supervised, durable, resumable jobs, streamed live.",
        epilog=EPILOG,
        formatter_class=formatter,
        parents=[common, client],
    )
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        name: str, help: str, *, clients: bool = True, worker: bool = False
    ) -> argparse.ArgumentParser:
        parents = [common, worker_client if worker else client] if clients else [common]
        return sub.add_parser(
            name,
            help=help,
            description=help[0].upper() + help[1:] + ".",
            epilog=EPILOG,
            formatter_class=formatter,
            parents=parents,
        )

    serve_p = command("serve", "run the server (stop it with Ctrl-C or SIGTERM)", clients=False)
    _server_options(serve_p)

    worker_p = command(
        "worker", "run job handlers in this process for the server at --url", worker=True
    )
    _add(worker_p, "handlers", metavar="MODULE:DICT")
    _add(worker_p, "no_demo", action="store_true")
    _add(worker_p, "concurrency", metavar="N")
    worker_p.add_argument(
        "--nice",
        type=int,
        default=0,
        metavar="N",
        help="lower this process's CPU priority by N (serve --worker-processes uses 5, so that"
        " the server's own work comes first on a busy machine)",
    )
    worker_p.add_argument(
        "--name",
        default=None,
        help="this worker's name in the server's log and status (default: HOST-PID)",
    )

    token_p = command("token", "mint a development token with the server's secret", clients=False)
    _add(token_p, "db", metavar="FILE")
    token_p.add_argument("--user", help="the user the token names (--worker: default worker)")
    token_p.add_argument("--admin", action="store_true", help="an admin token")
    token_p.add_argument(
        "--worker", action="store_true", help="a worker token (for jobspine worker)"
    )
    token_p.add_argument(
        "--ttl",
        default="1d",
        metavar="DURATION",
        help="lifetime, as other durations (90, 45s, 30m, 12h, 7d, 2w): 1 second to 100 years"
        " (default: 1d)",
    )

    nodes_p = command(
        "nodes",
        "list the database's nodes: state, lease age, running jobs (read from --store or --db)",
        clients=False,
    )
    _add(nodes_p, "db", metavar="FILE")
    _add(nodes_p, "store", metavar="URL")

    config_p = command("config", "show every setting, its value and its source")
    _server_options(config_p)

    submit_p = command("submit", "create a job (prints its id)")
    submit_p.add_argument("kind", help="job kind: research, trade, analysis, or registered")
    submit_p.add_argument(
        "input", help="the job's input, JSON; - reads it from stdin, @FILE from FILE"
    )
    submit_p.add_argument("--watch", action="store_true", help="follow it live until it ends")
    queue = submit_p.add_argument_group("queue options")
    queue.add_argument("--priority", metavar="N", help="0..1000, higher runs first (default: 0)")
    queue.add_argument(
        "--delay",
        metavar="DURATION",
        help="start no sooner than this from now (90, 45s, 30m, 12h, 7d; at most a year)",
    )
    queue.add_argument(
        "--max-attempts",
        metavar="N",
        help="attempts before the job fails for good, 1..100 (default: the kind's)",
    )
    queue.add_argument(
        "--timeout",
        metavar="DURATION",
        help="stop an attempt that runs longer, and count it as failed (up to 7d; default:"
        " the kind's)",
    )
    queue.add_argument(
        "--tag",
        action="append",
        metavar="TAG",
        help="a label to find the job by (jobs --tag); repeatable, up to 32",
    )
    queue.add_argument("--parent", metavar="ID", help="the job this one belongs to (yours)")
    queue.add_argument(
        "--idempotency-key",
        metavar="KEY",
        help="1..256 characters; the same key again returns the first job instead of a new"
        " one (default: a new key, printed if the outcome is unknown)",
    )
    submit_p.add_argument(
        "--exit-on-pause", action="store_true", help="with --watch: stop following (exit 3) "
        "when the job is paused instead of waiting for a resume",
    )  # fmt: skip
    watch_p = command("watch", "follow a job live until it ends (reconnects as needed)")
    watch_p.add_argument("job_id", help="the job's id (from submit or jobs)")
    watch_p.add_argument(
        "--exit-on-pause", action="store_true", help="stop following (exit 3) when the job is "
        "paused instead of waiting for a resume",
    )  # fmt: skip
    jobs_p = command("jobs", "list your jobs, newest first")
    jobs_p.add_argument(
        "--state",
        action="append",
        help="only jobs in this state (repeatable: any of them; created = waiting)",
    )
    jobs_p.add_argument("--kind", help="only jobs of this kind")
    jobs_p.add_argument("--tag", help="only jobs with this tag")
    jobs_p.add_argument("--parent", metavar="ID", help="only the children of this job")
    jobs_p.add_argument("--limit", type=int, default=50, help="at most this many (default: 50)")
    for name, what in (
        ("get", "show a job"),
        ("pause", "pause a job at a checkpoint"),
        ("resume", "resume a paused job from its checkpoint"),
        ("cancel", "cancel a job"),
        ("recovery", "show what can be done with a job: resumable, checkpoint, estimate"),
    ):
        command(name, what).add_argument("job_id", help="the job's id (from submit or jobs)")
    stats_p = command(
        "stats", "job counts by state and the queue: waiting (ready, scheduled) and running"
    )
    stats_p.add_argument(
        "--all", action="store_true", help="admins: everyone's jobs instead of your own"
    )
    restart_p = command("restart", "run a job again from scratch")
    restart_p.add_argument("job_id", help="the job's id (from submit or jobs)")
    restart_p.add_argument(
        "modifications",
        nargs="?",
        help="JSON object merged into the input; - reads it from stdin, @FILE from FILE",
    )
    ui_p = command("ui", "open the dashboard in a browser, signed in with your token")
    _add(ui_p, "health_port")
    ui_p.add_argument(
        "--print-url", action="store_true", help="print the signed-in URL (it holds your "
        "token, in the fragment a browser never sends) instead of opening a browser",
    )  # fmt: skip
    prune_p = command(
        "prune",
        "admins: remove the finished jobs (and their events) the retention policy says are due",
    )
    prune_p.add_argument(
        "--older-than",
        metavar="DURATION",
        help="remove finished jobs older than this instead (90, 45s, 30m, 12h, 7d, 2w; count "
        "limits still apply)",
    )
    prune_p.add_argument("--dry-run", action="store_true", help="only count what would be removed")
    sub.add_parser("bench", help="run the load benchmarks (jobspine bench --help)", add_help=False)
    return top


def apply_settings(args: argparse.Namespace, env: dict[str, str]) -> dict[str, Resolved]:
    """Resolve every setting (flags > env > file > defaults) onto ``args``."""
    flags = {s.name: getattr(args, s.name) for s in SETTINGS if hasattr(args, s.name)}
    flags["config"] = getattr(args, "config", None)
    settings = read_settings(flags, env)
    for name, resolved in settings.items():
        setattr(args, name, resolved.value)
    args.json = getattr(args, "json", False)
    args.server_config = server_config_kwargs(settings)
    args.runtime_config = runtime_config_kwargs(settings)
    return settings


def show_config(args: argparse.Namespace, settings: dict[str, Resolved]) -> int:
    hidden = {"token", "secret"}
    shown = {
        s.key: {
            "value": "***"
            if s.name in hidden and settings[s.name].value
            else _shown_store(settings[s.name].value)
            if s.name == "store" and settings[s.name].value
            else redact_redis_url(settings[s.name].value)
            if s.name == "redis" and settings[s.name].value
            else settings[s.name].value,
            "source": settings[s.name].source,
            "env": s.env,
        }
        for s in sorted(SETTINGS, key=lambda s: _SECTION_ORDER.index(s.section))
    }
    if args.json:
        write_json(shown)
        return ExitCode.OK
    width = max(len(key) for key in shown)
    for key, row in shown.items():
        value = row["value"]
        text = ",".join(value) if isinstance(value, tuple) else str(value)
        write(f"{key:<{width}}  {text:<28}  {row['source']}\n")
    return ExitCode.OK


def _token_ttl(text: str) -> float:
    """``token --ttl``: a duration as every other duration option reads it
    (:func:`~actors.parse_duration`: ``90``, ``45s``, ``30m``, ``12h``, ``7d``, ``2w``), from
    1 second to :data:`MAX_TOKEN_TTL`; a usage error shows it as given (``3153600001`` was
    shown as ``3.1536e+09``)."""
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise CLIError(ExitCode.USAGE, f"--ttl {text}: {exc}") from None
    if not 1 <= seconds <= MAX_TOKEN_TTL:
        raise CLIError(
            ExitCode.USAGE,
            f"--ttl {text}: must be 1 second to 100 years ({MAX_TOKEN_TTL} seconds)",
        )
    return seconds


def _check_db_directory(given: str, source: str) -> None:
    """A database path the user gave (``--db``, ``JOBSPINE_DB``, the config file's
    ``server.db``) must name a file (not end in ``/``, ``/.`` or ``/..``) in a directory that
    exists; raises a usage :class:`CLIError` naming it, what is wrong and where the path came
    from. A mistyped directory was created, and the server started on a new, empty database
    (every job seemingly gone) beside a new development secret that refused every token
    minted before. The default's data directory (``JOBSPINE_DATA``, else
    ``~/.local/share/jobspine``) is created as before."""
    if source.startswith("default"):
        return
    # Path() drops a trailing "/" and "/.": "/srv/jobz/" was the file /srv/jobz, a new
    # database beside a new secret in /srv when the directory meant did not exist. And an
    # existing directory (the data directory given as --db) failed only after a lock file
    # was left in its parent (exit status 9).
    last = given.replace(os.altsep or os.sep, os.sep).rsplit(os.sep, 1)[-1]
    if given and (last in ("", ".", "..") or os.path.isdir(given)):
        raise CLIError(
            ExitCode.USAGE,
            f"database {shown(given)} ({source}): names a directory, not the database file;"
            f" give the file, say {shown(str(Path(given, 'jobspine.db')))}",
        )
    db = Path(given)
    try:
        if db.parent.is_dir():
            return
        # A file there is no directory to create: "does not exist; create it" sent the user
        # looking for a directory the path names, and mkdir would fail.
        problem = (
            "is not a directory: correct"
            if db.parent.exists()
            else "does not exist; create it, or correct"
        )
    except OSError as exc:
        # is_dir() says False only for a missing path: a name too long, or a directory on
        # the way this user may not search, raised here (a traceback, exit status 1).
        problem = f"cannot be used ({exc.strerror or exc}); create it, or correct"
    raise CLIError(
        ExitCode.USAGE,
        f"database {shown(str(db))} ({source}): its directory {shown(str(db.parent))}"
        f" {problem} the path",
    )


def _run(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    settings = apply_settings(args, dict(os.environ))
    try:
        configure_logging(args.log_level, args.log_format)
    except ValueError as exc:
        raise CLIError(ExitCode.USAGE, f"--log-level/--log-format: {exc}") from None
    if args.command == "serve":
        _check_db_directory(args.db, settings["db"].source)
        return run_serve(args)
    if args.command == "worker":
        return run_worker(args)
    if args.command == "token":
        if args.user is None and not args.worker:
            raise CLIError(ExitCode.USAGE, "token: --user NAME is required (or --worker)")
        if args.worker and args.admin:
            raise CLIError(ExitCode.USAGE, "token: a worker token cannot be an admin's")
        args.user = args.user if args.user is not None else "worker"
        problem = user_id_problem(args.user)
        if problem:
            raise CLIError(ExitCode.USAGE, f"--user {shown(args.user)}: {problem}")
        ttl = _token_ttl(args.ttl)
        secret = load_secret(Path(args.db), secret=args.secret)
        weak = secret_problem(secret)
        if weak:
            sys.stderr.write(f"jobspine: warning: {weak}\n")
        role = "worker" if args.worker else "user"
        token = mint_token(secret, args.user, admin=args.admin, ttl=ttl, role=role)
        write_json(
            {"token": token, "user": args.user, "admin": args.admin, "role": role}
        ) if args.json else (write(token + "\n"))
        return ExitCode.OK
    if args.command == "config":
        return show_config(args, settings)
    if args.command == "nodes":
        return run_nodes(args)
    if args.command == "ui":
        return run_ui(args, asked=settings["health_port"].source != "default")
    # Ctrl-C lands in the command itself (at its next checkpoint), never in a background task
    # of the client, whose death would end the event stream first (exit 4, not 130).
    return trio.run(run_client_command, args, restrict_keyboard_interrupt_to_checkpoints=True)


def _quiet_stdout() -> None:
    """After the reader of stdout went away: nothing more is written, not even at exit."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def _show_unencodable() -> None:
    """A character that stdout's encoding cannot hold (an emoji in a step label, with
    ``LANG=en_US.ISO-8859-1`` or ``PYTHONIOENCODING=ascii``) is written as its escape
    (``\\U0001f600``), as Python writes it to stderr: it stopped the command with a traceback
    (``UnicodeEncodeError``) halfway through its output."""
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(errors="backslashreplace")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        from bench.run import main as bench_main

        return bench_main(argv[1:])
    _show_unencodable()
    # A short secret is said once, in a line of ours (``token``, ``serve``): PyJWT's own
    # warning at every signature printed a file, a line and the call that signed.
    warnings.filterwarnings("ignore", category=InsecureKeyLengthWarning)
    try:
        try:
            return _run(argv)
        except BaseExceptionGroup as group:
            # trio.run's nurseries wrap what they carry: Ctrl-C wherever it landed, else the
            # one exception the group stands for (a closed stdout, a CLIError), is handled
            # below.
            if group.subgroup(KeyboardInterrupt) is not None:
                raise KeyboardInterrupt from None
            leaf = unwrap_group(group)
            if leaf is group:
                raise
            raise leaf from None
    except CLIError as exc:
        # A message may quote what the server said, which may quote job data (a handler's
        # input check's words): shown, not obeyed.
        sys.stderr.write(f"jobspine: error: {visible(exc.message)}\n")
        return exc.code
    except KeyboardInterrupt:
        sys.stderr.write("\ninterrupted\n")
        return ExitCode.INTERRUPTED
    except (StdoutClosedError, BrokenPipeError):
        _quiet_stdout()
        return ExitCode.BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())
