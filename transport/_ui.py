"""``jobspine ui``: open the dashboard in a browser, signed in.

The token goes in the URL's *fragment* (``http://HOST:PORT/#token=...``): a browser never sends
a fragment to a server, so it reaches no request line, access log or proxy; the page moves it
to the tab's sessionStorage and removes it from the address bar at once."""

from __future__ import annotations

import argparse
import webbrowser
from urllib.parse import quote, urlsplit

from ._commands import NO_TOKEN, check_url
from ._display import write
from ._exit import CLIError, ExitCode

__all__ = ["dashboard_url", "run_ui"]


def dashboard_url(websocket_url: str, http_port: int) -> str:
    """The dashboard of the server whose websockets are at ``websocket_url``: the same host,
    on its HTTP port (``health_port``), ``https`` for a ``wss`` server."""
    check_url(websocket_url)
    parts = urlsplit(websocket_url)
    scheme = "https" if parts.scheme == "wss" else "http"
    host = parts.hostname or "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{http_port}/"


def run_ui(args: argparse.Namespace) -> int:
    """Opens the dashboard signed in with the client token (``--token``, ``JOBSPINE_TOKEN``,
    the config file); ``--print-url`` prints the signed-in URL instead, for a browser on
    another machine. Exit status 5 without a token, 2 when no browser can be started."""
    if not args.token:
        raise CLIError(ExitCode.AUTH, NO_TOKEN)
    base = dashboard_url(args.url, args.health_port)
    signed_in = f"{base}#token={quote(args.token, safe='')}"
    if args.print_url:
        write(signed_in + "\n")
        return ExitCode.OK
    if not webbrowser.open(signed_in):
        raise CLIError(
            ExitCode.USAGE,
            f"no browser could be started: open {base} and paste your token there, or use"
            " jobspine ui --print-url",
        )
    write(f"opened {base} in your browser (signed in; the token is not sent in any request)\n")
    return ExitCode.OK
