"""The ``jobspine`` command's exit statuses, and the error that carries one to ``main``."""

from __future__ import annotations

import enum

__all__ = ["EXIT_HELP", "CLIError", "ExitCode", "exit_code_for"]


class ExitCode(enum.IntEnum):
    """Distinct, documented exit statuses (README "Exit codes"; ``jobspine --help``)."""

    OK = 0
    #: The job ended ``failed`` (``--watch`` / ``watch``).
    JOB_FAILED = 1
    #: Bad command line, configuration or input (argparse's own status); the server refused
    #: the input (``invalid_input``, ``unknown_kind``, ``bad_request``, ...); ``ui`` could
    #: start no browser, or none asked for the page (the command to run instead:
    #: ``ui --print-url``).
    USAGE = 2
    #: The job ended ``cancelled`` or is ``paused`` (``--watch`` / ``watch``).
    JOB_STOPPED = 3
    #: No server answered at the URL within ``--connect-timeout``, the URL is not a
    #: ``ws://``/``wss://`` URL or not a jobspine endpoint (an HTTP status), or it went away.
    CANNOT_CONNECT = 4
    #: No token, or the server refused it (bad signature, expired, another user's job).
    AUTH = 5
    #: The server refused the request for another reason (``unknown_job``,
    #: ``illegal_transition``, ``rate_limited``, ``store_error``, ...).
    REFUSED = 6
    #: ``serve``: another live process owns the database, or holds its node id (the message
    #: names it): at start, or later once this node lost its lease (``node_replaced``).
    DATABASE_IN_USE = 7
    #: ``serve``: a port is in use or cannot be bound.
    PORT_UNAVAILABLE = 8
    #: ``serve``: the database cannot be used (not a database, corrupt, a newer schema, a
    #: directory), its data directory cannot be written, or its PostgreSQL server cannot be
    #: reached (down, wrong host or port, no such database, authentication refused).
    DATABASE_UNUSABLE = 9
    #: Ctrl-C (SIGINT), as shells report it.
    INTERRUPTED = 130
    #: The reader of stdout went away (``jobspine jobs | head -1``): what a Unix tool killed
    #: by SIGPIPE reports, without a message.
    BROKEN_PIPE = 141


EXIT_HELP = """\
exit status:
  0    success
  1    the job failed (--watch, watch)
  2    usage error: bad arguments, configuration or JSON; the server refused the input;
       ui: no browser could be started (use --print-url)
  3    the job was cancelled or is paused (--watch, watch)
  4    cannot connect: nothing answered within --connect-timeout, not a ws:// URL,
       not a jobspine endpoint, or the connection was lost
  5    authentication: no token, or the token was refused
  6    the server refused the request (unknown job, illegal transition, rate limit, ...)
  7    serve: another live process owns the database (pid, host and since when are named)
       or holds its --node-id (at start, or after this node lost its lease)
  8    serve: a port is in use or cannot be bound
  9    serve: the database cannot be used (corrupt, not a database, newer schema)
       or its PostgreSQL server cannot be reached
  130  interrupted (Ctrl-C)
  141  stdout was closed by its reader (like a tool killed by SIGPIPE)"""

_BY_ERROR_CODE = {
    "auth_failed": ExitCode.AUTH,
    "token_expired": ExitCode.AUTH,
    "forbidden": ExitCode.AUTH,
    "wrong_role": ExitCode.AUTH,
    "invalid_input": ExitCode.USAGE,
    "unknown_kind": ExitCode.USAGE,
    "not_serializable": ExitCode.USAGE,
    "bad_request": ExitCode.USAGE,
    "bad_json": ExitCode.USAGE,
    "checkpoint_too_large": ExitCode.USAGE,
    "request_too_large": ExitCode.USAGE,
    "invalid_parent": ExitCode.USAGE,
    "connection_lost": ExitCode.CANNOT_CONNECT,
    "runtime_closed": ExitCode.CANNOT_CONNECT,
    "protocol_error": ExitCode.CANNOT_CONNECT,
}


def exit_code_for(error_code: str) -> ExitCode:
    """The exit status for a server error code (``transport/PROTOCOL.md``, errors)."""
    return _BY_ERROR_CODE.get(error_code, ExitCode.REFUSED)


class CLIError(Exception):
    """Ends a command with ``message`` on stderr and exit status ``code``."""

    def __init__(self, code: ExitCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
