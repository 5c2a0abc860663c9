"""``jobspine ui``: open the dashboard in a browser, signed in.

The token goes in the URL's *fragment* (``http://HOST:PORT/#token=...``): a browser never sends
a fragment to a server, so it reaches no request line, access log or proxy; the page moves it
to the tab's sessionStorage and removes it from the address bar at once.

Nor is it put on a command line: a browser started with that URL kept it in its arguments,
which every local user reads (``ps``, ``/proc/PID/cmdline``) for as long as the browser runs.
The browser is given a one-use address on this machine instead (``http://127.0.0.1:PORT/`` and
a random path, :func:`hand_over`), which answers its first request with a redirect to the
signed-in URL and then nothing: what is left in the browser's arguments opens nothing.
"""

from __future__ import annotations

import argparse
import secrets
import webbrowser
from collections.abc import Callable
from urllib.parse import quote, urlsplit

import h11
import trio

from actors._errors import shown

from ._commands import NO_TOKEN, check_url, client_error, connect
from ._display import write
from ._exit import CLIError, ExitCode
from ._health import _ACCEPT_CAPACITY_ERRNOS
from .client import ClientError

__all__ = ["dashboard_url", "hand_over", "run_ui"]

#: Seconds ``jobspine ui`` waits for the browser to ask for its one-use address.
HANDOVER_TIMEOUT = 60.0
#: Bytes of a request the one-use address reads, at most.
_MAX_REQUEST = 8192


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


async def hand_over(
    target: str,
    open_browser: Callable[[str], bool],
    timeout: float = HANDOVER_TIMEOUT,  # noqa: ASYNC109 - the browser's time to ask
) -> bool | None:
    """Serve ``target`` (the signed-in URL) once, at a one-use address on 127.0.0.1 that
    ``open_browser`` is called with (in a thread: a browser command may not return until the
    browser does). The first ``GET`` of that address gets a redirect (303) to ``target``,
    fragment and all, never cached or sent on as a referrer; any other request, and every
    request after it, gets 404. Returns True once the redirect is sent, False if
    ``open_browser`` returned false (no browser started), None after ``timeout`` seconds
    without the request."""
    path = "/" + secrets.token_urlsafe(32)
    outcome: list[bool] = []  # the first of: redirect sent (True), no browser (False)
    done = trio.Event()
    answering = False  # a request of the address is being answered
    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listener.socket.getsockname()[1]

    async def answer(stream: trio.SocketStream) -> None:
        """One request; a client that sends garbage or goes away harms only itself."""
        nonlocal answering
        first = False
        async with stream:
            connection = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_REQUEST)
            try:
                with trio.move_on_after(5):
                    event = connection.next_event()
                    while event is h11.NEED_DATA:
                        connection.receive_data(await stream.receive_some(_MAX_REQUEST))
                        event = connection.next_event()
                if not isinstance(event, h11.Request):
                    return
                first = event.method == b"GET" and event.target == path.encode()
                first = first and not answering and not done.is_set()
                headers = [("cache-control", "no-store"), ("content-length", "0")]
                if first:  # marked before any await: a second request finds it taken
                    answering = True
                    headers += [("location", target), ("referrer-policy", "no-referrer")]
                response = h11.Response(status_code=303 if first else 404, headers=headers)
                await stream.send_all(
                    (connection.send(response) or b"")
                    + (connection.send(h11.EndOfMessage()) or b"")
                )
            except (h11.RemoteProtocolError, trio.BrokenResourceError):
                return
            finally:
                answering = answering and not first
            if first:  # sent: the address is used up (a browser that went away may ask again)
                outcome.append(True)
                done.set()

    async def serve(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with listener, trio.open_nursery() as connections:
            task_status.started()
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    # Out of descriptors (any local user can hold connections open): each
                    # connection held ends within 5 s, and the browser's waits in the
                    # listen backlog meanwhile; it crashed jobspine ui with a traceback.
                    if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                        raise
                    await trio.sleep(0.1)
                    continue
                connections.start_soon(answer, stream)

    async def start_browser() -> None:
        url = f"http://127.0.0.1:{port}{path}"
        if not await trio.to_thread.run_sync(open_browser, url, abandon_on_cancel=True):
            outcome.append(False)
            done.set()

    async with trio.open_nursery() as nursery:
        await nursery.start(serve)
        nursery.start_soon(start_browser)
        with trio.move_on_after(timeout):
            await done.wait()
        nursery.cancel_scope.cancel()
    return outcome[0] if outcome else None


def run_ui(args: argparse.Namespace, *, asked: bool = False) -> int:
    """Opens the dashboard signed in with the client token (``--token``, ``JOBSPINE_TOKEN``,
    the config file), through a one-use local address (:func:`hand_over`); ``--print-url``
    prints the signed-in URL instead, for a browser on another machine. It connects to the
    server at ``--url`` first, always. The HTTP port is the one that server announces, unless
    ``asked`` (``--health-port`` was set: a flag, variable or the config file) and not 0 (for
    ``serve``, any free port: the one it took is the one it announces). Exit status 5 without
    a token (or refused), 4 when the server cannot be reached, 2 when no browser can be
    started or none asks for the address within :data:`HANDOVER_TIMEOUT` seconds."""
    if not args.token:
        raise CLIError(ExitCode.AUTH, NO_TOKEN)
    port = trio.run(_http_port, args, args.health_port if asked and args.health_port else None)
    base = dashboard_url(args.url, port)
    signed_in = f"{base}#token={quote(args.token, safe='')}"
    if args.print_url:
        write(signed_in + "\n")
        return ExitCode.OK
    handed = trio.run(hand_over, signed_in, webbrowser.open)
    if handed is None or not handed:
        # A usage error, as documented: on this machine, the command to run is --print-url.
        why = (
            "no browser could be started"
            if handed is not None
            else f"no browser asked for the page within {HANDOVER_TIMEOUT:.0f} s"
        )
        raise CLIError(
            ExitCode.USAGE,
            f"{why}: open {base} and paste your token there, or use jobspine ui --print-url",
        )
    write(
        f"opened {base} in your browser (signed in; the token is on no command line and in no"
        " request)\n"
    )
    return ExitCode.OK
