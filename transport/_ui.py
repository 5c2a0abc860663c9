"""``jobspine ui``: open the dashboard in a browser, signed in.

The token goes in the URL's *fragment* (``http://HOST:PORT/#token=...``): a browser never sends
a fragment to a server, so it reaches no request line, access log or proxy; the page moves it
to the tab's sessionStorage and removes it from the address bar at once."""

from __future__ import annotations

import argparse
import webbrowser
from urllib.parse import quote, urlsplit

import trio

from actors._errors import shown

from ._commands import NO_TOKEN, check_url, client_error, connect
from ._display import write
from ._exit import CLIError, ExitCode
from .client import ClientError

__all__ = ["dashboard_url", "run_ui"]


async def _http_port(args: argparse.Namespace, given: int | None) -> int:
    """The HTTP port of the dashboard: ``given`` (``--health-port``), else the one the server
    at ``args.url`` announces in its hello's reply. The server is connected to either way, so
    that the token is put in a URL only once a server answers there and takes it (exit 4, 5
    otherwise): a ``--health-port`` replaces the port, never that check (it skipped it, and
    printed a URL holding any token, for no server at all). :class:`CLIError` ``REFUSED``
    when no port is given and the server announces none, or a value that is not a port (an
    int in 1..65535)."""
    try:
        async with connect(args, follow=False) as client:
            port = client.welcome.get("http_port")
    except ClientError as exc:  # the token refused
        raise client_error(exc) from None
    if given is not None:
        return given
    if port is None:
        raise CLIError(
            ExitCode.REFUSED,
            f"the server at {args.url} serves no dashboard (it runs without an HTTP port)"
            if "http_port" in client.welcome
            else f"the server at {args.url} does not say its HTTP port: give --health-port",
        )
    # A bool is an int to Python: true would have made http://HOST:True/.
    if type(port) is not int or not 1 <= port <= 65535:
        raise CLIError(
            ExitCode.REFUSED,
            f"the server at {args.url} announces an HTTP port that is not one ({shown(port)}):"
            " give --health-port",
        )
    return port


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


def run_ui(args: argparse.Namespace, *, asked: bool = False) -> int:
    """Opens the dashboard signed in with the client token (``--token``, ``JOBSPINE_TOKEN``,
    the config file); ``--print-url`` prints the signed-in URL instead, for a browser on
    another machine. It connects to the server at ``--url`` first, always. The HTTP port is
    the one that server announces, unless ``asked`` (``--health-port`` was set: a flag,
    variable or the config file) and not 0 (for ``serve``, any free port: the one it took is
    the one it announces). Exit status 5 without a token (or refused), 4 when the server
    cannot be reached, 2 when no browser can be started."""
    if not args.token:
        raise CLIError(ExitCode.AUTH, NO_TOKEN)
    port = trio.run(_http_port, args, args.health_port if asked and args.health_port else None)
    base = dashboard_url(args.url, port)
    signed_in = f"{base}#token={quote(args.token, safe='')}"
    if args.print_url:
        write(signed_in + "\n")
        return ExitCode.OK
    if not webbrowser.open(signed_in):
        # A usage error, as documented: on this machine, the command to run is --print-url.
        raise CLIError(
            ExitCode.USAGE,
            f"no browser could be started: open {base} and paste your token there, or use"
            " jobspine ui --print-url",
        )
    write(f"opened {base} in your browser (signed in; the token is not sent in any request)\n")
    return ExitCode.OK
