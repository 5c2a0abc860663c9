"""The dashboard's files on the server's HTTP port: content types, caching, the
Content-Security-Policy, HEAD, a websocket upgrade refused, nothing from other sites, and the
files shipped as package data."""

from __future__ import annotations

import http.client
import math
import os
import re
import socket
import subprocess
import sys
import threading
import tomllib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio

import transport._app
from actors import RuntimeConfig, open_runtime
from transport import RunningServer, ServerConfig, open_server
from transport._dashboard import CONTENT_TYPES, content_security_policy
from transport._health import (
    MAX_CONNECTIONS,
    Admission,
    Body,
    Request,
    request_path,
    serve_health,
)
from transport._ui import dashboard_url, hand_over

from .serving import HANDLERS, SECRET, free_port, token

ROOT = Path(__file__).parent.parent
STATIC = ROOT / "transport" / "dashboard" / "static"


async def exchange(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of one raw HTTP/1.1 request to ``port``."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request)
        data = b""
        while chunk := await stream.receive_some():
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, body


def get(path: str, host: str = "127.0.0.1", method: str = "GET", extra: str = "") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nhost: {host}\r\n{extra}\r\n".encode()


@asynccontextmanager
async def served_http(tmp_path: Path) -> AsyncIterator[tuple[RunningServer, int]]:
    """A server with its HTTP port (any free one): (the server, that port)."""
    config = ServerConfig(secret=SECRET, port=0)
    runtime = RuntimeConfig(sqlite_synchronous="NORMAL")
    async with open_server(
        tmp_path / "db", config, handlers=HANDLERS, runtime_config=runtime, health_port=0
    ) as running:
        assert running.health_port is not None
        yield running, running.health_port


async def test_every_file_is_served_with_its_type_and_policy(tmp_path: Path) -> None:
    async with served_http(tmp_path) as (running, http):
        files = sorted(p for p in STATIC.iterdir() if p.suffix in CONTENT_TYPES)
        assert {p.name for p in files} >= {"index.html", "app.js", "conn.js", "style.css"}
        for path in files:
            status, headers, body = await exchange(http, get(f"/{path.name}"))
            assert status == 200 and body == path.read_bytes(), path
            assert headers["content-type"] == CONTENT_TYPES[path.suffix]
            assert headers["content-length"] == str(len(body))
            assert headers["cache-control"] == "no-cache"
            assert headers["x-content-type-options"] == "nosniff"
            assert headers["referrer-policy"] == "no-referrer"
            assert headers["content-security-policy"] == content_security_policy(
                "127.0.0.1", running.port
            )

        status, headers, body = await exchange(http, get("/?x=1", host="localhost:9"))
        assert status == 200 and body == (STATIC / "index.html").read_bytes()
        policy = headers["content-security-policy"]
        assert f"connect-src 'self' ws://localhost:{running.port} " in policy
        assert "script-src 'self';" in policy and "default-src 'none'" in policy
        assert "'unsafe-inline'" not in policy and "*" not in policy
        # A Host header that could smuggle a directive is not used.
        _, headers, _ = await exchange(http, get("/", host="a;script-src *"))
        assert f"ws://127.0.0.1:{running.port} " in headers["content-security-policy"]
        _, headers, _ = await exchange(http, get("/", host="[::1]:8766"))
        assert f"ws://[::1]:{running.port} " in headers["content-security-policy"]

        status, headers, body = await exchange(http, get("/dashboard.json"))
        assert status == 200 and headers["cache-control"] == "no-store"
        assert orjson.loads(body) == {"websocket_port": running.port, "protocol": 1}

        # HEAD: the headers of a GET, no body; the server goes on serving.
        status, headers, body = await exchange(http, get("/", method="HEAD"))
        assert status == 200 and body == b""
        assert headers["content-length"] == str(len((STATIC / "index.html").read_bytes()))
        for route in ("/healthz", "/readyz", "/status", "/metrics"):
            status, headers, _ = await exchange(http, get(route))
            assert status == 200 and headers["cache-control"] == "no-store", route

        # Websockets have their own port: an upgrade here is a 404. Another method on a
        # path that exists is a 405 naming what is served (it was a 404 listing that path).
        upgrade = "upgrade: websocket\r\nconnection: upgrade\r\n"
        assert (await exchange(http, get("/", extra=upgrade)))[0] == 404
        for method, route in (("POST", "/"), ("OPTIONS", "/healthz"), ("DELETE", "/metrics")):
            status, headers, body = await exchange(http, get(route, method=method))
            assert (status, headers["allow"]) == (405, "GET, HEAD"), (method, route)
            assert orjson.loads(body)["error"] == f"{method} {route}: only GET and HEAD are served"
        assert (await exchange(http, get("/nope.js", method="POST")))[0] == 404
        assert (await exchange(http, get("/nope.js")))[0] == 404
        assert (await exchange(http, get("/healthz")))[0] == 200


async def test_the_health_port_answers_while_the_database_opens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A schema migration or the recovery of running jobs can take minutes: meanwhile
    ``/healthz`` answers 200 (alive) and ``/readyz`` 503 (not ready yet), where the port took
    connections and never answered them (a liveness probe restarted the server, and with it
    the migration). Once the runtime is open, the server's own routes answer."""
    opening, opened, done = trio.Event(), trio.Event(), trio.Event()
    real_open = open_runtime  # what transport._app calls

    @asynccontextmanager
    async def slow_open(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        opening.set()
        await opened.wait()
        async with real_open(*args, **kwargs) as runtime:
            yield runtime

    monkeypatch.setattr(transport._app, "open_runtime", slow_open)
    port = free_port()
    config = ServerConfig(secret=SECRET, port=0)
    runtime = RuntimeConfig(sqlite_synchronous="NORMAL")
    serving = trio.Event()

    async def serve() -> None:
        async with open_server(
            tmp_path / "db", config, handlers=HANDLERS, runtime_config=runtime, health_port=port
        ) as running:
            assert running.health_port == port
            serving.set()
            await done.wait()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        await opening.wait()
        with trio.fail_after(10):  # the port used to take the connection and never answer
            status, _, body = await exchange(port, get("/healthz"))
        assert status == 200 and orjson.loads(body)["status"] == "starting"
        for route in ("/readyz", "/metrics", "/status"):
            status, headers, body = await exchange(port, get(route))
            assert status == 503 and orjson.loads(body)["status"].startswith("starting"), route
            assert headers["cache-control"] == "no-store"
        assert (await exchange(port, get("/")))[0] == 200  # the dashboard's page
        opened.set()
        await serving.wait()
        status, _, body = await exchange(port, get("/readyz"))
        assert status == 200 and orjson.loads(body)["status"] == "ready"
        assert b"supervisor" in (await exchange(port, get("/status")))[2]
        done.set()


@pytest.mark.parametrize("sent", [b"", b"GET /healthz HTTP/1.1\r\nhost: x\r\n"])
async def test_a_flood_of_idle_connections_holds_a_bounded_number_of_descriptors(
    tmp_path: Path, sent: bytes
) -> None:
    """The HTTP port serves at most ``MAX_CONNECTIONS`` at once (each read for up to 5 s);
    more wait in the kernel's accept queue, holding none of the server's descriptors. A flood
    of connections that send nothing, or a request's head without its end, took them all (a
    server still opening its database then failed to open its files). Once they go,
    requests are answered again."""
    async with served_http(tmp_path) as (_, http):

        def descriptors() -> int:
            return len(os.listdir("/proc/self/fd"))

        before = descriptors()
        idle = [await trio.open_tcp_stream("127.0.0.1", http) for _ in range(MAX_CONNECTIONS + 100)]
        for stream in idle:
            if sent:
                await stream.send_all(sent)
        await trio.sleep(0.5)  # the server accepts what it will
        # The test's own ends, plus the server's (without a bound: one per connection).
        assert descriptors() - before <= len(idle) + MAX_CONNECTIONS + 5
        for stream in idle:
            await stream.aclose()
        with trio.fail_after(5):
            assert (await exchange(http, get("/healthz")))[0] == 200


def test_nothing_is_fetched_from_another_site() -> None:
    """No file names another origin (a CDN, a font service): the page works offline."""
    for path in STATIC.iterdir():
        text = path.read_text()
        urls = re.findall(r"""(?:https?:)?//[A-Za-z0-9.-]+\.[a-z]{2,}""", text)
        # The SVG namespace is a name, never fetched.
        assert [u for u in urls if u != "http://www.w3.org"] == [], path
        assert "<script>" not in text and " on" + "click=" not in text, path  # no inline code


def test_files_are_package_data() -> None:
    """pyproject.toml ships every file of the folder in the wheel."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    globs = config["tool"]["setuptools"]["package-data"]["transport"]
    package = ROOT / "transport"
    shipped = {p for pattern in globs for p in package.glob(pattern)}
    assert set(STATIC.iterdir()) <= shipped


def test_ui_url_and_missing_token() -> None:
    """``jobspine ui`` opens the websocket server's host on the HTTP port; https for wss; with
    no token it stops with the authentication status and says how to get one."""
    assert dashboard_url("ws://127.0.0.1:8765", 8766) == "http://127.0.0.1:8766/"
    assert dashboard_url("wss://jobs.example:443/", 8443) == "https://jobs.example:8443/"
    assert dashboard_url("ws://[::1]:8765", 8766) == "http://[::1]:8766/"
    env = {"PATH": "/usr/bin:/bin", "JOBSPINE_TOKEN": "", "HOME": "/nonexistent"}
    command = [sys.executable, "-m", "transport._cli", "ui"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 5 and "jobspine token --user NAME" in done.stderr


TARGET = "http://127.0.0.1:8766/#token=SECRET-TOKEN"


def fetch(url: str, method: str = "GET", path: str | None = None) -> tuple[int, str | None]:
    """One request, as a browser's first (no redirect followed): its status and Location."""
    parts = url.split("/", 3)
    connection = http.client.HTTPConnection(parts[2], timeout=10)
    try:
        connection.request(method, path if path is not None else "/" + parts[3])
        response = connection.getresponse()
        return response.status, response.getheader("location")
    finally:
        connection.close()


async def test_ui_hands_the_token_over_through_a_one_use_address() -> None:
    """``jobspine ui`` gave the browser the signed-in URL as its argument, which stayed in the
    browser's command line, readable by every local user (``ps``), for as long as it ran.
    The browser now gets a one-use local address holding no token: its first GET is
    redirected to the signed-in URL, fragment and all; a wrong path, a HEAD or garbage
    does not use it up, and once used it answers 404."""
    seen: dict[str, Any] = {}
    fetched = threading.Event()

    def browser(url: str) -> bool:  # a browser command that fetches before it returns
        seen["url"] = url
        seen["wrong"] = fetch(url, path="/elsewhere")
        seen["head"] = fetch(url, "HEAD")
        host, port = url.split("/")[2].split(":")
        with socket.create_connection((host, int(port)), timeout=10) as raw:
            raw.sendall(b"\x00\xff not http\r\n\r\n")
            raw.recv(100)
        seen["first"] = fetch(url)
        fetched.set()
        return True

    with trio.fail_after(20):
        assert await hand_over(TARGET, browser, timeout=15) is True
        assert await trio.to_thread.run_sync(fetched.wait, 10)
    assert seen["url"].startswith("http://127.0.0.1:") and "SECRET" not in seen["url"]
    assert len(seen["url"].rsplit("/", 1)[1]) >= 40  # a random path: 32 bytes
    assert seen["wrong"] == (404, None) and seen["head"] == (404, None)
    assert seen["first"] == (303, TARGET)
    with pytest.raises(ConnectionRefusedError):  # used up: nothing answers there any more
        fetch(seen["url"])


async def test_ui_says_when_no_browser_starts_or_asks() -> None:
    with trio.fail_after(20):
        assert await hand_over(TARGET, lambda url: False, timeout=15) is False
        started = trio.current_time()
        assert await hand_over(TARGET, lambda url: True, timeout=0.5) is None
        assert trio.current_time() - started < 5


#: Runs hand_over with few descriptors left: prints the one-use address, then the outcome.
_SCARCE = """
import os, resource, sys, trio
from transport._ui import hand_over

async def main():
    # Room for a few connections only, as when a local user holds a thousand open.
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 6, hard))

    def browser(url):
        print(url, flush=True)
        return True

    print(await hand_over(sys.argv[1], browser, timeout=20), flush=True)

trio.run(main)
"""


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts descriptors in /proc")
def test_ui_hands_over_when_connections_use_up_its_descriptors() -> None:
    """Connections to the one-use address holding every descriptor ``jobspine ui`` may open
    (any local user can make them): accept() failed with EMFILE, which ended ``jobspine ui``
    with a traceback. It waits for descriptors to come back, as the health port does, and the
    browser's request, waiting in the backlog meanwhile, is answered."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-c", _SCARCE, TARGET]
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as ui:  # fmt: skip
        assert ui.stdout is not None
        url = ui.stdout.readline().strip()
        address = ("127.0.0.1", int(url.split("/")[2].split(":")[1]))
        idle = [socket.create_connection(address, timeout=10) for _ in range(30)]

        def let_go() -> None:  # the holder goes away: descriptors come back
            for each in idle:
                each.close()

        try:
            with socket.create_connection(address, timeout=10) as browser:
                browser.sendall(f"GET /{url.split('/', 3)[3]} HTTP/1.0\r\n\r\n".encode())
                threading.Timer(1, let_go).start()
                answer = b""
                while chunk := browser.recv(4096):
                    answer += chunk
        finally:
            let_go()
        out, err = ui.communicate(timeout=20)
    assert (ui.returncode, out, err) == (0, "True\n", ""), err
    assert answer.startswith(b"HTTP/1.1 303 ") and f"location: {TARGET}".encode() in answer


async def test_ui_asks_the_server_for_its_http_port(tmp_path: Path) -> None:
    """Without ``--health-port`` of its own, ``jobspine ui`` connects to ``--url`` and opens
    the HTTP port that server announces (it took the default, 8766: maybe another server's,
    which the token would then be pasted into); nothing answering is exit 4, a refused token
    exit 5, and a server without an HTTP port says so."""
    config = ServerConfig(secret=SECRET, port=0)
    runtime = RuntimeConfig(sqlite_synchronous="NORMAL")
    env = {**os.environ, "HOME": str(tmp_path), "JOBSPINE_TOKEN": token("alice")}
    env.pop("JOBSPINE_HEALTH_PORT", None)

    async def ui(url: str, *more: str, token_env: dict[str, str] = env) -> Any:
        command = [sys.executable, "-m", "transport._cli", "ui", "--print-url", "--url", url]
        command += ["--connect-timeout", "1", *more]
        return await trio.run_process(
            command, env=token_env, capture_stdout=True, capture_stderr=True, check=False,
            cwd=ROOT,
        )  # fmt: skip

    async with open_server(
        tmp_path / "db", config, handlers=HANDLERS, runtime_config=runtime, health_port=0
    ) as running:
        asked = await ui(running.url)
        assert asked.returncode == 0, asked.stderr
        assert asked.stdout.decode().startswith(f"http://127.0.0.1:{running.health_port}/#token=")
        told = await ui(running.url, "--health-port", "9999")  # given: replaces the port
        assert told.stdout.decode().startswith("http://127.0.0.1:9999/#token=")
        # 0 (a config file shared with serve: any free port) is the port the server took.
        zero = await ui(running.url, "--health-port", "0")
        assert zero.stdout.decode().startswith(f"http://127.0.0.1:{running.health_port}/#"), zero
        refused = await ui(running.url, token_env={**env, "JOBSPINE_TOKEN": "forged"})
        assert refused.returncode == 5, refused.stderr
    async with open_server(
        tmp_path / "db", config, handlers=HANDLERS, runtime_config=runtime
    ) as running:
        none = await ui(running.url)
        assert none.returncode == 6 and b"serves no dashboard" in none.stderr
    nobody = await ui(f"ws://127.0.0.1:{free_port()}")
    assert nobody.returncode == 4 and b"cannot connect" in nobody.stderr


async def test_a_request_that_cannot_be_parsed_gets_an_answer(tmp_path: Path) -> None:
    """Malformed requests of every kind get a status and a JSON reason, not a dropped or reset
    connection; the server answers the next request as usual."""
    async with served_http(tmp_path) as (_, http):
        malformed = {
            b"GARBAGE\r\n\r\n": 400,  # no HTTP version
            b"GET /\r\n\r\n": 400,  # HTTP/0.9
            b"GET / HTTP/1.1\r\nhost: a b\r\nno colon here\r\n\r\n": 400,
            b"GET /\xc3\xa9 HTTP/1.1\r\nhost: x\r\n\r\n": 400,  # a target that is not ASCII
            b"GET / HTTP/1.1\r\nhost: x\r\nx: " + b"a" * 20000 + b"\r\n\r\n": 431,
        }
        for request, expected in malformed.items():
            status, headers, body = await exchange(http, request)
            assert status == expected, request[:40]
            assert headers["content-type"] == "application/json"
            assert orjson.loads(body)["error"].startswith("bad request")
        status, _, _ = await exchange(http, get("/"))
        assert status == 200


async def test_idle_connections_give_way_to_a_prompt_request(tmp_path: Path) -> None:
    """A full port closes the connection that has waited longest for its request: more idle
    connections than it holds (nothing sent, or a request's head without its end) delay a
    prompt request by no more than its own sending. Each held its slot for 5 s, and a probe
    queued behind them in the kernel waited as long (a liveness probe with a 1 s timeout
    failed, and a supervisor restarted a healthy server). A burst of prompt requests, more
    than the port holds, is answered in full: a new connection keeps its slot for a grace."""
    async with served_http(tmp_path) as (_, http):
        idle = []
        for n in range(MAX_CONNECTIONS + 20):
            stream = await trio.open_tcp_stream("127.0.0.1", http)
            await stream.send_all(b"GET /healthz HTTP/1.1\r\n" if n % 2 else b"")
            idle.append(stream)
        await trio.sleep(0.2)  # the server accepts them all, closing the oldest
        for _ in range(3):
            with trio.fail_after(2.5):  # about ADMISSION_GRACE; it was REQUEST_TIMEOUT (5 s)
                assert (await exchange(http, get("/healthz")))[0] == 200
        with trio.fail_after(1):  # the oldest were closed: their reads end at once
            assert await idle[0].receive_some() == b""
        for stream in idle:
            await stream.aclose()
        answered = []

        async def probe() -> None:
            answered.append((await exchange(http, get("/healthz")))[0])

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                for _ in range(3 * MAX_CONNECTIONS):
                    nursery.start_soon(probe)
        assert answered == [200] * 3 * MAX_CONNECTIONS


def test_admission_closes_the_longest_waiting_connection_first() -> None:
    """The decision alone: a connection being answered is chosen only when none waits for its
    request, none within its grace; each is chosen once; below the limit nothing is."""
    admission: Admission[str] = Admission(3, grace=1.5, answer_grace=4)
    for at, key in enumerate("abc"):
        admission.opened(key, now=at)
    admission.answering("a", now=0.5)
    assert admission.to_close(now=2) is None  # "b" came at 1: its grace runs to 2.5
    assert admission.next_choice() == 2.5
    assert admission.to_close(now=5) == "b"  # waiting for its request: before "a"
    assert admission.to_close(now=5) == "c"
    admission.answering("c", now=5)  # chosen already: its cancellation is on its way
    assert admission.to_close(now=9) == "a"  # answered since 0.5, none waits any more
    assert admission.to_close(now=9) is None and admission.next_choice() == math.inf
    admission.closed("b")
    assert admission.open == 2 and admission.to_close(now=9) is None
    for key in "ac":
        admission.closed(key)
    for at, key in enumerate("def", start=10):
        admission.opened(key, now=at)
    admission.answering("d", now=10)
    assert admission.to_close(now=20) == "e"  # waiting for its request: before "d"
    assert admission.to_close(now=20) == "f"
    for key in "ef":
        admission.closed(key)
    assert admission.to_close(now=20) is None  # the port is not full
    admission.opened("g", now=20)
    admission.opened("h", now=20)
    admission.answering("g", now=20.1)
    assert admission.next_choice() == 21.5  # "h" waits for its request: its grace first
    admission.answering("h", now=20.2)
    assert admission.next_choice() == 14  # then "d", answered since 10
    assert admission.to_close(now=20.3) == "d" and admission.next_choice() == 24.1


async def test_a_route_that_raises_fails_its_request_only() -> None:
    """A route's fault answers 500 with a JSON reason and is logged; the port serves the
    next request. It ended the port's task, and with it the whole server."""

    def broken(request: Request) -> tuple[int, Any]:
        raise RuntimeError("a bug in a route")

    def fine(request: Request) -> tuple[int, Any]:
        return 200, {"status": "ok"}

    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_health, "127.0.0.1", 0, {"/b": broken, "/f": fine})
        status, headers, body = await exchange(port, get("/b"))
        assert status == 500 and headers["cache-control"] == "no-store"
        assert orjson.loads(body) == {"error": "/b: internal error (see the server log)"}
        assert (await exchange(port, get("/f")))[0] == 200
        nursery.cancel_scope.cancel()


async def test_the_absolute_form_of_a_target_names_its_path(tmp_path: Path) -> None:
    """HTTP/1.1 servers must accept ``GET http://host/path`` (proxies and some probes send
    it): it was a 404. The query and the fragment are not part of the path."""
    async with served_http(tmp_path) as (_, http):
        assert (await exchange(http, get(f"http://127.0.0.1:{http}/healthz")))[0] == 200
    assert request_path("http://127.0.0.1:8766/healthz?x=1") == "/healthz"
    assert request_path("HTTPS://jobs.example/") == "/"
    assert request_path("http://jobs.example") == "/"
    assert request_path("/readyz#top") == "/readyz"
    assert request_path("/a://b") == "/a://b"  # a path, not an absolute form


async def test_clients_that_do_not_take_their_answer_give_way_to_a_probe() -> None:
    """A full port of connections whose answers are stuck (a request for a large file, then
    nothing read: a tiny receive window) closes the one stuck longest for a new connection,
    once no connection waits for its request. Being answered, they could never be chosen: each
    held its slot for 5 s, and 64 of them, sent again every 5 s, made every probe wait as long
    (the flood the port's admission was made against, in another form)."""
    large = Body("application/octet-stream", b"x" * (1 << 20))

    def healthz(request: Request) -> tuple[int, Any]:
        return 200, {"status": "ok"}

    async with trio.open_nursery() as nursery:
        port = await nursery.start(
            serve_health, "127.0.0.1", 0, {"/large": lambda _: (200, large), "/h": healthz}
        )
        stuck = []
        for _ in range(MAX_CONNECTIONS):
            sock = trio.socket.socket()
            sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, 1)
            await sock.connect(("127.0.0.1", port))
            await sock.send(get("/large"))
            stuck.append(sock)
        await trio.sleep(0.2)  # every request is read: its answer is being sent
        with trio.fail_after(2):  # about ANSWER_GRACE; it was REQUEST_TIMEOUT (5 s)
            assert (await exchange(port, get("/h")))[0] == 200
        for sock in stuck:
            sock.close()
        nursery.cancel_scope.cancel()
