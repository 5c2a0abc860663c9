"""The dashboard's files, served at ``/`` of the server's HTTP port.

The dashboard is plain ES modules and CSS in ``transport/dashboard/static`` (package data: a
wheel ships them; no build step, nothing fetched from elsewhere at run time). It is a client of
the websocket protocol like any other: the only thing the HTTP port tells it beyond its files is
the websocket port (``/dashboard.json``). Every file is read once, at start.

Each file is answered with its content type (``nosniff``, as every answer of the port),
``Cache-Control: no-cache`` (the browser may keep it but asks again every time, so an upgraded
server is never shown with old files) and a Content-Security-Policy that allows scripts,
styles and images from this origin only and connections to this origin and the server's
websocket port on the same host: no inline script, no other site, no framing.
"""

from __future__ import annotations

import re
from importlib.resources import files
from typing import Any

from ._health import Body, Request, Route

__all__ = ["dashboard_routes"]

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}

#: A ``Host`` header's host part that may stand in the policy (a name, IPv4 or bracketed IPv6).
_HOST = re.compile(r"^(?:[A-Za-z0-9.-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\])$")


def _host_part(header: str, fallback: str) -> str:
    host = header.rsplit(":", 1)[0] if not header.endswith("]") else header
    if header.startswith("[") and "]" in header:
        host = header[: header.index("]") + 1]
    return host if _HOST.match(host) else fallback


def content_security_policy(host: str, websocket_port: int) -> str:
    """The policy for a page served to a browser that asked for ``host``: itself, plus the
    websocket port of that same host."""
    sockets = f"ws://{host}:{websocket_port} wss://{host}:{websocket_port}"
    return (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self';"
        f" connect-src 'self' {sockets}; base-uri 'none'; form-action 'none';"
        " frame-ancestors 'none'"
    )


def load_files() -> dict[str, tuple[str, bytes]]:
    """``{"/name": (content type, bytes)}`` for every file of the dashboard; ``/`` is
    ``index.html``."""
    static = files("transport").joinpath("dashboard", "static")
    found: dict[str, tuple[str, bytes]] = {}
    for entry in static.iterdir():
        suffix = "." + entry.name.rsplit(".", 1)[-1]
        if entry.is_file() and suffix in CONTENT_TYPES:
            found["/" + entry.name] = (CONTENT_TYPES[suffix], entry.read_bytes())
    found["/"] = found["/index.html"]
    return found


def dashboard_routes(websocket_port: int, default_host: str) -> dict[str, Route]:
    """Routes for the dashboard's files and ``/dashboard.json`` (``{"websocket_port": N,
    "protocol": 1}``), for a server whose websockets listen on ``websocket_port``;
    ``default_host`` stands in the policy when a request's ``Host`` header is unusable."""

    def route(content_type: str, data: bytes) -> Route:
        def answer(request: Request) -> tuple[int, Body]:
            host = _host_part(request.host, default_host)
            headers = (
                ("cache-control", "no-cache"),
                ("content-security-policy", content_security_policy(host, websocket_port)),
                ("referrer-policy", "no-referrer"),
                ("x-frame-options", "DENY"),
            )
            return 200, Body(content_type, data, headers)

        return answer

    def config(request: Request) -> tuple[int, dict[str, Any]]:
        return 200, {"websocket_port": websocket_port, "protocol": 1}

    routes: dict[str, Route] = {
        path: route(content_type, data) for path, (content_type, data) in load_files().items()
    }
    routes["/dashboard.json"] = config
    return routes
