"""The ``jobspine`` client commands: connect (with a deadline), run one request or follow a
job, show the answer, and map every failure to its exit status (:mod:`transport._exit`)."""

from __future__ import annotations

import argparse
import math
import re
import shlex
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import orjson
import trio

from actors import (
    TERMINAL_STATES,
    InvalidInputError,
    JobEvent,
    JobState,
    parse_duration,
)
from actors._codec import MAX_INPUT_BYTES
from actors._errors import shown
from actors._options import CreateOptions

from ._display import (
    JsonView,
    PlainView,
    WatchView,
    describe_job,
    jobs_table,
    one_line,
    stats_text,
    write,
    write_json,
)
from ._exit import CLIError, ExitCode, exit_code_for
from ._json import RefusedJsonError, loads_strict
from ._reconnect import FATAL_CLOSE
from ._wire import loggable
from ._workers import WORKER_PATH
from .client import (
    Client,
    ClientError,
    ConnectionLostError,
    Reset,
    RoomCursor,
    RoomRefused,
    is_omitted,
    new_key,
    open_client,
)

__all__ = ["run_client_command"]

NO_TOKEN = (
    "no token: set JOBSPINE_TOKEN (or --token, or token in the [client] section of the config"
    " file). Mint a development token where the server runs, with the same data directory:\n"
    "  export JOBSPINE_TOKEN=$(jobspine token --user NAME)"
)

_HINTS = {
    "auth_failed": (
        "the server refused the token; it was likely minted with another secret (another"
        " JOBSPINE_DATA directory, --db or JOBSPINE_SECRET than the server's): mint one"
        " with the server's settings: jobspine token --user NAME"
    ),
    "token_expired": "the token has expired: mint a new one with jobspine token --user NAME",
    "wrong_role": "this is a worker token (for jobspine worker): mint a user's token with"
    " jobspine token --user NAME",
}

_STATES = [state.value for state in JobState]
#: Words for a state that other job systems (Celery, BullMQ, Oban, Temporal) or this CLI's own
#: table use, and the state that has them here: ``jobs`` shows a delayed job as ``scheduled
#: 4m59s``, whose state is ``created``.
_STATE_WORDS = {
    **dict.fromkeys(
        ("scheduled", "waiting", "queued", "pending", "delayed", "retrying", "available",
         "retryable", "ready", "new"),
        "created",
    ),
    **dict.fromkeys(("active", "executing", "started", "in_progress", "in-progress"), "running"),
    **dict.fromkeys(("suspended", "on_hold", "on-hold"), "paused"),
    **dict.fromkeys(("succeeded", "success", "done", "complete", "finished"), "completed"),
    **dict.fromkeys(("error", "errored", "failure", "discarded", "dead"), "failed"),
    **dict.fromkeys(("canceled", "aborted", "revoked", "killed"), "cancelled"),
}  # fmt: skip


def _state_hint(word: str) -> str:
    """What a ``--state`` word that is no state means here, if anything (the word itself is
    quoted once, by the message): a waiting job, scheduled for later or not, is created."""
    state = _STATE_WORDS.get(word.lower())
    if state is None:
        return ""
    if state == "created":
        return (
            "; a waiting job, ready or scheduled for later (jobs shows `scheduled 4m59s`),"
            " is created: --state created"
        )
    return f"; did you mean --state {state}?"


_FLAGS = {
    "priority": "--priority",
    "delay": "--delay",
    "max_attempts": "--max-attempts",
    "timeout": "--timeout",
    "tags": "--tag",
    "parent_id": "--parent",
    "idempotency_key": "--idempotency-key",
}

#: The text arguments sent to the server as they are: an undecodable byte in one (read as a
#: lone surrogate) cannot be sent as JSON.
_TEXT_ARGS = {
    "kind": "KIND",
    "job_id": "JOB_ID",
    "tag": "--tag",
    "parent": "--parent",
    "idempotency_key": "--idempotency-key",
}

_FINAL_EXIT = {"completed": ExitCode.OK, "failed": ExitCode.JOB_FAILED}


def check_url(url: str) -> None:
    """A usable ``ws://`` or ``wss://`` URL, else a :class:`CLIError` (exit 4) saying why."""
    problem = None
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError as exc:  # a port out of range, an unclosed IPv6 bracket
        problem = str(exc)
    else:
        if parts.scheme not in ("ws", "wss") or not parts.hostname:
            problem = "not a websocket URL"
    if problem is not None:
        raise CLIError(
            ExitCode.CANNOT_CONNECT,
            f"{url}: {problem}: use ws://HOST:PORT or wss://HOST:PORT"
            " (the server's default is ws://127.0.0.1:8765)",
        )


def check_client_url(url: str) -> None:
    """:func:`check_url`, for a client command: not the worker endpoint (``…/worker``, for
    ``jobspine worker``), a usage error (exit 2) that names the URL to use. Sent there, the
    client's hello was refused for want of a worker's fields (``protocol_error: closed with
    4002: hello: required field missing @ $.kinds``, exit 4)."""
    check_url(url)
    parts = urlsplit(url)
    path = parts.path.rstrip("/")
    if path.endswith(WORKER_PATH):
        server = urlunsplit((parts.scheme, parts.netloc, path[: -len(WORKER_PATH)], "", ""))
        raise CLIError(
            ExitCode.USAGE,
            f"--url {url} is the worker endpoint, for jobspine worker; client commands"
            f" connect to the server's URL: --url {server}",
        )


def client_error(exc: ClientError) -> CLIError:
    hint = _HINTS.get(exc.code)
    if exc.code == "auth_failed" and "ignature" not in exc.message:
        hint = None  # only a bad signature points at another secret
    message = f"{exc.code}: {exc.message}" + (f"\n{hint}" if hint else "")
    return CLIError(exit_code_for(exc.code), message)


def watch_refused(exc: ClientError, job_id: str) -> CLIError:
    """A follower's connection refused for good once it watched (``token_expired`` at the
    token's end, ``auth_failed``, ``protocol_error``, ``wrong_role``): one line, the status of
    the refusal; the job itself goes on."""
    again = f"then follow it again: jobspine watch {job_id}"
    if exc.code == "token_expired":
        said = (
            f"the token expired while watching job {job_id} (the job goes on): mint a new one"
            f" with jobspine token --user NAME, {again}"
        )
    else:
        hint = _HINTS.get(exc.code)
        if exc.code == "auth_failed" and "ignature" not in exc.message:
            hint = None  # as in client_error
        said = (
            f"the server ended the watch of job {job_id} ({exc.message}; the job goes on)"
            + (f": {hint}" if hint else "")
            + f"; {again}"
        )
    return CLIError(exit_code_for(exc.code), f"{exc.code}: {said}")


@asynccontextmanager
async def connect(args: argparse.Namespace, *, follow: bool) -> AsyncIterator[Client]:
    """A connected client. Its first connection is retried until ``connect_timeout`` (an HTTP
    answer, not a jobspine endpoint, gives up at once): a server that was never reached is an
    error for every command. One-shot commands do not reconnect afterwards; followers
    (``watch``, ``submit --watch``) reconnect for as long as they run."""
    check_client_url(args.url)
    if not args.token:
        raise CLIError(ExitCode.AUTH, NO_TOKEN)
    connected = False
    problem = "no answer"
    delay = 0.1
    with trio.CancelScope(deadline=trio.current_time() + args.connect_timeout) as scope:
        while True:
            try:
                async with open_client(args.url, args.token, reconnect=False) as client:
                    connected = True
                    scope.deadline = math.inf
                    # Read at each disconnect: a follower reconnects from now on.
                    client.reconnect = follow
                    yield client
                    return
            except ConnectionLostError as exc:
                if connected:
                    raise
                problem = _connect_problem(args.url, exc.message)
            await trio.sleep(delay)
            delay = min(1.0, delay * 2)
    raise _cannot_connect(args, problem)


def _connect_problem(url: str, message: str) -> str:
    """Why a first connection failed, in a user's words; an HTTP answer stops at once."""
    problem = message.removeprefix("could not connect: ")
    status = re.search(r"answered HTTP (\d+)", problem)
    if status:
        raise CLIError(
            ExitCode.CANNOT_CONNECT,
            f"cannot connect to {url}: it answered HTTP {status.group(1)}, so it"
            " is not a jobspine websocket endpoint (the health port?)",
        )
    return problem


def _cannot_connect(args: argparse.Namespace, problem: str) -> CLIError:
    return CLIError(
        ExitCode.CANNOT_CONNECT,
        f"cannot connect to {args.url} within {args.connect_timeout:g} s ({problem});"
        " is the server running? (--connect-timeout, JOBSPINE_CONNECT_TIMEOUT)",
    )


#: The most a ``-`` or ``@FILE`` argument reads. No input over MAX_INPUT_BYTES (1 MiB) is
#: stored and JSON's whitespace does not make one sixteen times longer; a stream with no end
#: (``yes |``, a device) is refused here rather than filling the memory.
MAX_ARGUMENT_FILE = 16 * MAX_INPUT_BYTES


def _json_source(text: str, what: str) -> Any:
    """The JSON argument ``what`` (:func:`_json_arg`) given as ``text``, or for ``-`` read
    from stdin, for ``@FILE`` from that file (UTF-8): a value too long for a command line
    (the kernel refuses an argument over 128 KiB: 'Argument list too long'). Neither ``-``
    nor anything starting with ``@`` is JSON, so neither shadows a JSON argument."""
    if text == "-":
        source = "stdin"
        data: bytes
        stream = getattr(sys.stdin, "buffer", None)  # None: the process has no stdin
        try:
            if stream is None:
                raise OSError("there is no stdin")
            data = stream.read(MAX_ARGUMENT_FILE + 1)
        except (OSError, ValueError) as exc:  # ValueError: stdin was closed
            raise CLIError(ExitCode.USAGE, f"{what} -: cannot read stdin: {exc}") from None
    elif text.startswith("@"):
        source = repr(text[1:])
        try:
            with open(text[1:], "rb") as file:
                data = file.read(MAX_ARGUMENT_FILE + 1)
        except OSError as exc:
            raise CLIError(
                ExitCode.USAGE, f"{what} @FILE: cannot read {source}: {exc.strerror or exc}"
            ) from None
    else:
        return _json_arg(text, what)
    if len(data) > MAX_ARGUMENT_FILE:
        raise CLIError(
            ExitCode.USAGE, f"{what} from {source}: over {MAX_ARGUMENT_FILE} bytes, not read"
        )
    try:
        decoded = data.decode()
    except UnicodeDecodeError as exc:
        raise CLIError(ExitCode.USAGE, f"{what} from {source}: not UTF-8: {exc}") from None
    return _json_arg(decoded, f"{what} from {source}")


def _json_arg(text: str, what: str) -> Any:
    """``text`` read as the server reads a frame (:func:`loads_strict`): JSON that a lenient
    parser would change is a usage error, where orjson sent an integer beyond 64 bits as a
    float (``123456789012345678901234567890`` became ``1.2345678901234568e+29``) and the last
    of a key given twice, without a word."""
    try:
        return loads_strict(text)
    except RefusedJsonError as exc:
        if exc.code == "bad_json":
            problem = exc.message.removeprefix("the frame is not valid JSON: ")
            raise CLIError(ExitCode.USAGE, f"{what} must be JSON: {problem}") from None
        raise CLIError(
            ExitCode.USAGE, f"{what} must be JSON the server takes as it is: {exc.message}"
        ) from None


def _show(args: argparse.Namespace, value: Any) -> None:
    """A request's answer: one JSON document with ``--json``, else ``key  value`` lines."""
    if args.json:
        write_json(value)
        return
    width = max((len(k) for k in value), default=0)
    for key, item in value.items():
        if key.endswith("_at") and isinstance(item, int | float):
            shown = datetime.fromtimestamp(item).isoformat(sep=" ", timespec="seconds")
        elif isinstance(item, float):
            shown = f"{item:.1f}"
        else:
            shown = one_line(item) if isinstance(item, str) else orjson.dumps(item).decode()
        write(f"{key:<{width}}  {shown}\n")


def _view(args: argparse.Namespace, job_id: str) -> WatchView:
    if args.json:
        return JsonView()
    if sys.stdout.isatty():
        from ._live import LiveView  # rich is imported only where it draws

        return LiveView(job_id)
    return PlainView(job_id)


async def watch_job(client: Client, job_id: str, view: WatchView, *, exit_on_pause: bool) -> int:
    """Follow a job until it ends: 0 completed, 1 failed, 3 cancelled (or paused, with
    ``exit_on_pause``). Events are replayed from the job's first one.

    A replayed event before the job's ``seq`` at the start is history: a ``failed`` or
    ``cancelled`` event that a restart has since superseded does not end the watch. Each event
    carries the job's state after it, so the event at that ``seq`` or later decides."""
    job = await client.get(job_id)
    current: int = job["seq"]
    await client.subscribe(f"job:{job_id}", RoomCursor(client.welcome["epoch"], 0))
    connects = client.counters.connects
    with view:
        view.start(job)
        async for item in client.events():
            if client.counters.connects != connects:  # the client's own log says when it left
                connects = client.counters.connects
                view.note("reconnected")
            if isinstance(item, RoomRefused):
                raise _job_gone(client, job_id, item)
            if isinstance(item, Reset):
                view.reset(item)
                job = (item.snapshot or {}).get("job") or await client.get(job_id)
                if job["state"] in TERMINAL_STATES or (exit_on_pause and job["state"] == "paused"):
                    return _final(view, job)
                continue
            assert isinstance(item, JobEvent)
            view.event(item)
            if item.state.value in TERMINAL_STATES and item.seq >= current:
                return _final(view, await _outcome(client, job, item))
            if exit_on_pause and item.state is JobState.PAUSED and item.seq >= current:
                # Decided by the event alone, like an end: no request after it, which a
                # server pausing its jobs as it shuts down would not answer.
                return _final(view, {**job, "state": item.state.value})
    if client.failure is not None:
        # The server refused this connection for good (an expired token, another secret): the
        # same error the client's own task ended with, so the two stand for one.
        raise client.failure
    raise CLIError(ExitCode.CANNOT_CONNECT, "the event stream ended")


def _job_gone(client: Client, job_id: str, refused: RoomRefused) -> CLIError:
    """The watched job's room refused for good on a resubscription: ``unknown_job`` when the
    server came back on another database (a new epoch), or removed the job meanwhile. The
    watch stops there, with the status of the refusal (6 for an unknown job), as the
    dashboard closes the job (it retried every nine seconds, forever)."""
    error = refused.error
    if error.code != "unknown_job":
        return CLIError(exit_code_for(error.code), f"{error.code}: {error.message}")
    if refused.cursor.epoch != refused.server_epoch:
        why = (
            f"the server came back on another database (epoch {refused.cursor.epoch}, now"
            f" {refused.server_epoch}), which has no such job"
        )
    else:
        why = "the server no longer has it (removed by retention?)"
    return CLIError(
        exit_code_for(error.code),
        f"unknown_job: job {job_id} is not on the server at {client.url} any more: {why}",
    )


async def _outcome(client: Client, job: dict[str, Any], final: JobEvent) -> dict[str, Any]:
    """The job as its final event left it. The event carries the outcome, so a refused request
    (a busy or rate-limited server) never stands between it and the exit status; the job's
    other fields come from a ``get`` when it is answered. A result or error the server left
    out of the message is fetched, or replaced by a note of its size."""
    try:
        outcome: dict[str, Any] = await client.get(final.job_id)
    except ClientError:
        outcome = {**job, "state": final.state.value, **final.data}
    for field in ("result", "error"):
        value = outcome.get(field)
        if isinstance(value, dict) and is_omitted(value):
            try:
                outcome[field] = await client.get_payload(final.job_id, field)
            except ClientError as exc:
                note = f"<{field} of {value['size']} bytes not shown: {exc}>"
                outcome[field] = {"type": "omitted", "message": note} if field == "error" else note
    return outcome


def _final(view: WatchView, job: dict[str, Any]) -> int:
    view.finish(job)
    return _FINAL_EXIT.get(job["state"], ExitCode.JOB_STOPPED)


async def _command(client: Client, args: argparse.Namespace) -> int:
    command = args.command
    if command == "submit":
        try:
            job = await client.create(args.kind, args.input, **args.create_options)
        except (ConnectionLostError, trio.TooSlowError) as exc:
            # The server may have stored the job: the same key makes a re-run safe.
            raise CLIError(
                ExitCode.CANNOT_CONNECT,
                # A timeout has no message of its own: said here, never an empty reason.
                f"{str(exc) or f'no answer within {client.request_timeout:g} s'}; the job may"
                " have been created: run the"
                " same command with --idempotency-key"
                f" {shlex.quote(args.create_options['idempotency_key'])} to submit it at"
                " most once",
            ) from None
        if args.watch:
            if not args.json:
                write(job["id"] + "\n")
            args.watched = job["id"]
            view = _view(args, job["id"])
            return await watch_job(client, job["id"], view, exit_on_pause=args.exit_on_pause)
        write_json(job) if args.json else write(job["id"] + "\n")
        return ExitCode.OK
    if command == "watch":
        args.watched = args.job_id
        view = _view(args, args.job_id)
        return await watch_job(client, args.job_id, view, exit_on_pause=args.exit_on_pause)
    if command == "jobs":
        jobs = await client.list(
            states=args.state, kind=args.kind, tag=args.tag, parent_id=args.parent, limit=args.limit
        )
        if args.json:
            write_json(jobs)
        else:
            jobs_table(jobs, terminal=sys.stdout.isatty())
        return ExitCode.OK
    if command == "get":
        _show(args, await client.get(args.job_id))
        return ExitCode.OK
    if command == "prune":
        report = await client.prune(args.older_than, dry_run=args.dry_run)
        if args.json:
            write_json(report)
        elif report["dry_run"]:
            write(f"would remove {report['jobs']} finished jobs\n")
        else:
            write(
                f"removed {report['jobs']} finished jobs and {report['events']} events"
                f" ({report['batches']} {'batch' if report['batches'] == 1 else 'batches'})\n"
            )
        return ExitCode.OK
    if command == "stats":
        try:
            counts = await (client.stats() if args.all else client.my_stats())
        except ClientError as exc:
            if exc.code != "forbidden":
                raise
            raise CLIError(
                ExitCode.AUTH,
                "forbidden: stats --all is for admins (jobspine token --user NAME --admin);"
                " jobspine stats shows your own jobs",
            ) from None
        queue = await client.queue_stats(None if args.all else client.welcome["user_id"])
        write_json({"jobs": counts, "queue": queue}) if args.json else stats_text(counts, queue)
        return ExitCode.OK
    if command == "recovery":
        _show(args, await client.recovery_options(args.job_id))
        return ExitCode.OK
    if command == "restart":
        job = await client.restart(args.job_id, args.modifications)
    else:
        job = await getattr(client, command)(args.job_id)
    write_json(job) if args.json else write(describe_job(job) + "\n")
    return ExitCode.OK


def _int_arg(text: str | None, flag: str) -> int | None:
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        raise CLIError(
            ExitCode.USAGE, f"{flag} {loggable(text, 100)}: must be an integer"
        ) from None


def _duration_arg(text: str | None, flag: str) -> float | None:
    if text is None:
        return None
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise CLIError(ExitCode.USAGE, f"{flag}: {exc}") from None


def create_options(args: argparse.Namespace) -> dict[str, Any]:
    """``submit``'s queue options as :meth:`Client.create` keywords, checked with the
    server's own rules (a bad value is a usage error and nothing is sent); the idempotency
    key is generated when not given."""
    options: dict[str, Any] = {
        "priority": _int_arg(args.priority, "--priority"),
        "delay": _duration_arg(args.delay, "--delay"),
        "max_attempts": _int_arg(args.max_attempts, "--max-attempts"),
        "timeout": _duration_arg(args.timeout, "--timeout"),
        "tags": args.tag,
        "parent_id": args.parent,
        "idempotency_key": args.idempotency_key,
    }
    for name, value in options.items():
        if value is None:
            continue
        try:
            CreateOptions.check(time.time(), **{name: value})
        except InvalidInputError as exc:
            raise CLIError(ExitCode.USAGE, f"{_FLAGS[name]}: {exc}") from None
    if options["idempotency_key"] is None:
        options["idempotency_key"] = new_key()
    return options


def parse_inputs(args: argparse.Namespace) -> None:
    """Check arguments before connecting: a typo is a usage error, not a traceback, and
    nothing is sent."""
    for name, flag in _TEXT_ARGS.items():
        value = getattr(args, name, None)
        for text in value if isinstance(value, list) else [value]:
            if not isinstance(text, str):
                continue
            try:
                text.encode()
            except UnicodeEncodeError:
                raise CLIError(
                    ExitCode.USAGE,
                    f"{flag} {shown(text)}: not valid UTF-8 (check the terminal's locale)",
                ) from None
    if args.command == "submit":
        args.input = _json_source(args.input, "INPUT")
        args.create_options = create_options(args)
    if args.command == "jobs":
        for state in args.state or ():
            if state not in _STATES:
                raise CLIError(
                    ExitCode.USAGE,
                    f"--state {loggable(state, 100)}: not a state; states: {', '.join(_STATES)}"
                    + _state_hint(state),
                )
        if args.state and len(set(args.state)) != len(args.state):
            raise CLIError(ExitCode.USAGE, "--state: each state once")
        if not 1 <= args.limit <= 500:
            raise CLIError(ExitCode.USAGE, f"--limit {args.limit}: must be in 1..500")
        for flag, value in (("--tag", args.tag), ("--parent", args.parent)):
            if value is not None and not value:
                raise CLIError(ExitCode.USAGE, f"{flag}: must not be empty")
    if args.command == "prune" and args.older_than is not None:
        try:
            args.older_than = parse_duration(args.older_than)
        except ValueError as exc:
            raise CLIError(ExitCode.USAGE, f"--older-than: {exc}") from None
    if args.command == "restart" and args.modifications is not None:
        args.modifications = _json_source(args.modifications, "MODIFICATIONS")
        if not isinstance(args.modifications, dict):
            raise CLIError(ExitCode.USAGE, "MODIFICATIONS must be a JSON object")


async def run_client_command(args: argparse.Namespace) -> int:
    parse_inputs(args)
    follow = args.command == "watch" or (args.command == "submit" and args.watch)
    args.watched = None  # the job a follower watches, once connected
    try:
        async with connect(args, follow=follow) as client:
            return await _command(client, args)
    except ClientError as exc:
        if args.watched is not None and exc.code in FATAL_CLOSE.values():
            raise watch_refused(exc, args.watched) from None
        raise client_error(exc) from None
    except trio.TooSlowError:
        raise CLIError(ExitCode.CANNOT_CONNECT, f"{args.url} did not answer within 30 s") from None
