"""The ``jobspine`` command: the server, tokens, and a client for people."""

from __future__ import annotations

import argparse
import getpass
import importlib
import logging
import math
import os
import secrets
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import orjson
import trio

from actors import (
    DEMO_HANDLERS,
    TERMINAL_STATES,
    DatabaseLockedError,
    EventType,
    JobEvent,
    JobspineError,
    RuntimeConfig,
    StoreError,
)

from ._app import PortUnavailableError, open_server
from ._auth import mint_token
from ._server import ServerConfig
from .client import ClientError, Reset, RoomCursor, open_client

log = logging.getLogger("jobspine")

DEFAULT_PORT = 8765
DEFAULT_HEALTH_PORT = 8766


def data_dir() -> Path:
    return Path(os.environ.get("JOBSPINE_DATA") or Path.home() / ".local" / "share" / "jobspine")


def default_db() -> Path:
    return data_dir() / "jobspine.db"


def _secret_file(db: Path) -> Path:
    return db.parent / "secret"


def load_secret(db: Path, *, create: bool) -> str:
    """``JOBSPINE_SECRET``, else the development secret stored beside the database."""
    secret = os.environ.get("JOBSPINE_SECRET")
    if secret:
        return secret
    path = _secret_file(db)
    if path.exists():
        return path.read_text().strip()
    if not create:
        raise SystemExit(
            f"no JOBSPINE_SECRET and no development secret at {path}: start the server once"
            " (jobspine serve) or set JOBSPINE_SECRET"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret)
    log.warning(
        "no JOBSPINE_SECRET set: generated a development secret in %s (not for production)", path
    )
    return secret


# -- serve ---------------------------------------------------------------------------------------


#: Exit statuses of ``jobspine serve`` when it cannot start (argparse's own is 2 too).
EXIT_USAGE = 2
EXIT_DATABASE_IN_USE = 3
EXIT_PORT_UNAVAILABLE = 4
EXIT_DATABASE_UNUSABLE = 5


class UsageError(Exception):
    """A command-line value that cannot be used (reported as one line, exit status 2)."""


def run_serve(args: argparse.Namespace) -> int:
    """``jobspine serve``: a failure to start is one line on stderr and a distinct status."""
    try:
        return trio.run(serve, args)
    except UsageError as exc:
        return _fail(exc, EXIT_USAGE)
    except DatabaseLockedError as exc:
        return _fail(exc, EXIT_DATABASE_IN_USE)
    except PortUnavailableError as exc:
        return _fail(exc, EXIT_PORT_UNAVAILABLE)
    except StoreError as exc:
        return _fail(exc, EXIT_DATABASE_UNUSABLE)
    except OSError as exc:  # the data directory or the secret beside it
        return _fail(exc, EXIT_DATABASE_UNUSABLE)
    except JobspineError as exc:
        return _fail(exc, 1)


def _fail(error: Exception, status: int) -> int:
    print(f"jobspine: error: {error}", file=sys.stderr, flush=True)
    return status


async def serve(args: argparse.Namespace) -> int:
    handlers = dict(DEMO_HANDLERS)
    for spec in args.handlers:
        handlers.update(load_handlers(spec))
    db = Path(args.db)
    db.parent.mkdir(parents=True, exist_ok=True)
    secret = load_secret(db, create=True)
    config = ServerConfig(
        secret=secret,
        host=args.host,
        port=args.port,
        request_rate=args.request_rate,
        request_burst=int(2 * args.request_rate),
    )
    runtime_config = RuntimeConfig(
        heartbeat_timeout=args.heartbeat_timeout, stop_grace=args.stop_grace
    )
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with open_server(
            db,
            config,
            handlers=handlers,
            runtime_config=runtime_config,
            health_port=args.health_port,
        ) as running:
            log.info(
                "jobspine listening on %s (health http://%s:%s/healthz), database %s, epoch %s",
                running.url,
                args.host,
                running.health_port,
                db,
                running.runtime.epoch,
            )
            async for signum in signals:
                log.info("%s: shutting down", signal.Signals(signum).name)
                break
    log.info("stopped cleanly")
    return 0


def load_handlers(spec: str) -> dict[str, Any]:
    """``module:attribute`` (default attribute ``HANDLERS``) naming a dict of kind -> async
    handler, registered beside the demos; :class:`UsageError` if it cannot be used."""
    module_name, _, attribute = spec.partition(":")
    attribute = attribute or "HANDLERS"
    if not module_name:
        raise UsageError(f"--handlers {spec}: expected MODULE:DICT")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any error raised while importing the user's module
        raise UsageError(
            f"--handlers {spec}: cannot import {module_name}: {type(exc).__name__}: {exc}"
        ) from None
    found = getattr(module, attribute, None)
    if found is None:
        raise UsageError(f"--handlers {spec}: module {module_name} has no {attribute}")
    if not isinstance(found, dict):
        raise UsageError(
            f"--handlers {spec}: {attribute} is a {type(found).__name__},"
            " expected a dict of kind -> handler"
        )
    for kind, handler in found.items():
        if not isinstance(kind, str) or not callable(handler):
            raise UsageError(
                f"--handlers {spec}: {kind!r}: expected a kind name mapped to a handler function"
            )
    return found


# -- client commands -----------------------------------------------------------------------------


def client_token(args: argparse.Namespace) -> str:
    token = args.token or os.environ.get("JOBSPINE_TOKEN")
    if token:
        return str(token)
    return mint_token(load_secret(Path(args.db), create=False), args.user)


def _print_json(value: Any) -> None:
    sys.stdout.write(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode() + "\n")


def _bar(progress: float, step: str | None, width: int = 30) -> str:
    filled = int(width * progress / 100)
    return f"[{'#' * filled}{'.' * (width - filled)}] {progress:5.1f}%  {step or ''}"


async def watch_job(client: Any, job_id: str) -> int:
    """Show a job's progress live until it ends; exit status 0 only if it completed."""
    job = await client.get(job_id)
    await client.subscribe(f"job:{job_id}", RoomCursor(client.welcome["epoch"], 0))
    tty = sys.stdout.isatty()
    progress, step = 0.0, None
    async for item in client.events():
        if isinstance(item, Reset):
            job = item.snapshot["job"]
            print(f"\nresynchronized ({item.reason})")
            if job["state"] in TERMINAL_STATES:
                return _finish(job)
            continue
        assert isinstance(item, JobEvent)
        if item.type is EventType.PROGRESS:
            progress, step = item.data["progress"], item.data["step"]
            line = _bar(progress, step)
            print(("\r" + line) if tty else line, end="" if tty else "\n", flush=True)
        elif item.type in (EventType.RECOVERY, EventType.PAUSED):
            reason = item.data.get("reason", "")
            print(f"\npaused ({reason}); resume with: jobspine resume {job_id}", flush=True)
        elif item.type in (EventType.RESUMED, EventType.STARTED, EventType.RESTARTED):
            print(f"\n{item.type.value} (attempt {item.data.get('attempt', '-')})", flush=True)
        if item.state in TERMINAL_STATES:
            return _finish(await client.get(job_id))
    return 1


def _finish(job: dict[str, Any]) -> int:
    print()
    if job["state"] == "completed":
        print("completed: " + orjson.dumps(job["result"]).decode(), flush=True)
        return 0
    if job["state"] == "failed":
        error = job["error"] or {}
        print(f"failed: {error.get('type')}: {error.get('message')}", flush=True)
        return 1
    print(job["state"], flush=True)
    return 2


async def run_client_command(args: argparse.Namespace) -> int:
    url = args.url
    try:
        async with open_client(url, client_token(args)) as client:
            command = args.command
            if command == "submit":
                try:
                    input = orjson.loads(args.input)
                except orjson.JSONDecodeError as exc:
                    raise SystemExit(f"INPUT must be JSON: {exc}") from None
                job = await client.create(args.kind, input)
                print(job["id"], flush=True)
                return await watch_job(client, job["id"]) if args.watch else 0
            if command == "watch":
                return await watch_job(client, args.job_id)
            if command == "jobs":
                for job in await client.list(state=args.state, kind=args.kind, limit=args.limit):
                    print(
                        f"{job['id']}  {job['kind']:<10} {job['state']:<10} "
                        f"{job['progress']:5.1f}%  {job['step'] or ''}"
                    )
                return 0
            if command == "restart":
                modifications = orjson.loads(args.modifications) if args.modifications else None
                _print_json(await client.restart(args.job_id, modifications))
                return 0
            if command == "recovery":
                _print_json(await client.recovery_options(args.job_id))
                return 0
            method = getattr(client, command)
            _print_json(await method(args.job_id))
            return 0
    except ClientError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: cannot reach {url}: {exc}", file=sys.stderr)
        return 1


# -- argument parsing ----------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """Reports a bad option as one line (no usage dump) with exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} is outside 0-65535")
    return port


def _seconds(minimum: float, *, inclusive: bool) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not math.isfinite(value) or value < minimum or (value == minimum and not inclusive):
            bound = f">= {minimum:g}" if inclusive else f"> {minimum:g}"
            raise argparse.ArgumentTypeError(f"{text} must be a finite number {bound}")
        return value

    return parse


def _log_level(text: str) -> str:
    if not isinstance(logging.getLevelName(text.upper()), int):
        raise argparse.ArgumentTypeError(
            f"unknown log level {text!r} (DEBUG, INFO, WARNING, ERROR or CRITICAL)"
        )
    return text.upper()


def parser() -> argparse.ArgumentParser:
    top = _Parser(prog="jobspine", description="Supervised, resumable jobs.")
    top.add_argument("--log-level", type=_log_level, default=os.environ.get("JOBSPINE_LOG", "INFO"))
    sub = top.add_subparsers(dest="command", required=True)

    def with_db(p: argparse.ArgumentParser) -> None:
        p.add_argument("--db", default=str(default_db()), help="SQLite database file")

    serve_p = sub.add_parser("serve", help="run the server")
    with_db(serve_p)
    serve_p.add_argument("--host", default="127.0.0.1")
    serve_p.add_argument("--port", type=_port, default=DEFAULT_PORT)
    serve_p.add_argument("--health-port", type=_port, default=DEFAULT_HEALTH_PORT)
    positive = _seconds(0, inclusive=False)
    serve_p.add_argument("--heartbeat-timeout", type=positive, default=30.0)
    serve_p.add_argument("--stop-grace", type=_seconds(0, inclusive=True), default=5.0)
    serve_p.add_argument(
        "--request-rate", type=positive, default=50.0, help="requests/s per connection"
    )
    serve_p.add_argument(
        "--handlers",
        action="append",
        default=[],
        metavar="MODULE:DICT",
        help="register more job kinds (a dict of kind -> handler); repeatable",
    )

    token_p = sub.add_parser("token", help="mint a development token")
    with_db(token_p)
    token_p.add_argument("--user", required=True)
    token_p.add_argument("--admin", action="store_true")
    token_p.add_argument("--ttl", type=float, default=24 * 3600, help="seconds")

    def client(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        with_db(p)
        p.add_argument(
            "--url", default=os.environ.get("JOBSPINE_URL", f"ws://127.0.0.1:{DEFAULT_PORT}")
        )
        p.add_argument("--token", help="a token (default: JOBSPINE_TOKEN, else minted for --user)")
        p.add_argument("--user", default=os.environ.get("JOBSPINE_USER") or getpass.getuser())
        return p

    submit_p = client("submit", "create a job")
    submit_p.add_argument("kind")
    submit_p.add_argument("input", help="JSON input")
    submit_p.add_argument("--watch", action="store_true", help="follow it live until it ends")
    client("watch", "follow a job live").add_argument("job_id")
    jobs_p = client("jobs", "list your jobs")
    jobs_p.add_argument("--state")
    jobs_p.add_argument("--kind")
    jobs_p.add_argument("--limit", type=int, default=50)
    for name in ("pause", "resume", "cancel", "get"):
        client(name, f"{name} a job").add_argument("job_id")
    restart_p = client("restart", "run a job again from scratch")
    restart_p.add_argument("job_id")
    restart_p.add_argument("modifications", nargs="?", help="JSON object merged into the input")
    client("recovery", "recovery options of a job").add_argument("job_id")
    sub.add_parser("bench", help="run the load benchmarks (jobspine bench --help)", add_help=False)
    return top


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        from bench.run import main as bench_main

        return bench_main(argv[1:])
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.command == "serve":
        return run_serve(args)
    if args.command == "token":
        db = Path(args.db)
        print(mint_token(load_secret(db, create=False), args.user, admin=args.admin, ttl=args.ttl))
        return 0
    return trio.run(run_client_command, args)


if __name__ == "__main__":
    sys.exit(main())
