"""Attacks on the server's HTTP port (health, metrics, the dashboard's files): requests a
client may send that the port must answer, each with a clear status, without harming the
next request."""

from __future__ import annotations

import contextlib
import os
import sys
from functools import partial
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketRequest, serve_websocket

from transport import mint_token
from transport._health import Request, serve_health

from .serving import token
from .test_dashboard_http import ROOT, exchange, get, served_http

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")


def _healthz(request: Request) -> tuple[int, Any]:
    return 200, {"status": "ok"}


async def _send_and_read(port: int, data: bytes) -> tuple[bytes, str | None]:
    """Sends ``data`` while reading the answer to the end, as a client uploading a body does:
    (what was read, the error that ended the read early or None)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    answer = b""
    failure: str | None = None

    async def upload() -> None:
        # The server may stop reading: what it answered is what counts.
        with contextlib.suppress(trio.BrokenResourceError):
            await stream.send_all(data)

    async with stream, trio.open_nursery() as nursery:
        nursery.start_soon(upload)
        try:
            while chunk := await stream.receive_some():
                answer += chunk
        except trio.BrokenResourceError as exc:
            failure = repr(exc.__cause__ or exc)
        nursery.cancel_scope.cancel()
    return answer, failure


async def test_a_request_with_a_body_gets_its_answer_not_a_reset() -> None:
    """A request with a body the port does not read (a ``POST`` of 1 MiB to ``/healthz``, a
    ``GET`` carrying a body, a second request sent behind the first) is answered, and the
    answer arrives whole: the port closed with the body unread, and the kernel answered that
    with a reset that destroyed the 405 on its way (the client saw ``Connection reset by
    peer``, not why it was refused)."""
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_health, "127.0.0.1", 0, {"/healthz": _healthz})
        body = b"x" * (1 << 20)
        cases = {
            b"POST /healthz HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n" % len(body) + body: (
                405,
                b"POST /healthz: only GET and HEAD are served",
            ),
            b"GET /healthz HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n" % len(body) + body: (
                200,
                b"ok",
            ),
            b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n" + get("/healthz") * 20000: (200, b"ok"),
        }
        for request, (status, says) in cases.items():
            for _ in range(3):
                with trio.fail_after(5):
                    answer, failure = await _send_and_read(port, request)
                assert failure is None, (request[:30], failure, answer[:60])
                head, _, payload = answer.partition(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 %d " % status), head
                assert says in orjson.dumps(orjson.loads(payload))
        assert (await exchange(port, get("/healthz")))[0] == 200
        nursery.cancel_scope.cancel()


async def test_an_upgrade_to_another_protocol_is_ignored() -> None:
    """``curl --http2 http://HOST:8766/healthz`` offers an upgrade to HTTP/2 (``Upgrade:
    h2c``), which a server may decline by answering in HTTP/1.1: it was a 404 ("no such
    endpoint") for a path that exists, so a probe or scrape made with such a client failed.
    Only a websocket upgrade is refused (websockets have a port of their own)."""
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_health, "127.0.0.1", 0, {"/healthz": _healthz})
        for offer in ("h2c", "HTTP/2.0", "TLS/1.2, HTTP/1.1"):
            extra = f"connection: Upgrade, HTTP2-Settings\r\nupgrade: {offer}\r\n"
            extra += "http2-settings: AAMAAABkAARAAAAAAAIAAAAA\r\n"
            status, _, body = await exchange(port, get("/healthz", extra=extra))
            assert (status, orjson.loads(body)) == (200, {"status": "ok"}), offer
        for offer in ("websocket", "WebSocket", "h2c, websocket"):
            extra = f"connection: upgrade\r\nupgrade: {offer}\r\n"
            assert (await exchange(port, get("/healthz", extra=extra)))[0] == 404, offer
        nursery.cancel_scope.cancel()


@pytest.mark.skipif(
    not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
    reason="needs Debian's chromium and chromium-driver (as tests/test_dashboard_browser.py)",
)
def test_a_worker_token_in_the_dashboard_leads_back_to_sign_in(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A worker's token (``jobspine token --worker``) pasted into the sign-in form is refused
    by the client endpoint with 4010, which PROTOCOL.md section 6 says not to reconnect after:
    the page reconnected with its backoff for as long as the tab stayed open, every attempt
    refused again, showing only "connection lost (close 4010)" and never why. It now leads
    back to the sign-in form, saying why the token was refused, and stops connecting."""
    from .test_dashboard_browser import Server, browser, by_id, text, wait

    server = Server(tmp_path / "data")
    server.start()
    driver = browser(tmp_path_factory.mktemp("chromium"))
    try:
        secret = (server.data / "secret").read_text().strip()
        worker = mint_token(secret, "w1", role="worker")
        driver.get(f"{server.page}#token={worker}")
        wait(driver, lambda d: by_id(d, "signin").is_displayed() and text(d, "signin-message"))
        assert "/worker" in text(driver, "signin-message")
        assert driver.execute_script("return sessionStorage.getItem('jobspine.token')") is None
    finally:
        driver.quit()
        server.stop()


async def test_a_route_whose_answer_cannot_be_sent_fails_its_request_only() -> None:
    """A route that returns what cannot be sent (a body that is not JSON, such as a set or an
    integer over 64 bits; a status HTTP has no phrase for) is the route's fault like one that
    raises: 500, logged, and the port serves the next request. The answer was encoded after
    the route's guard, and the error ended the port's task, and with it the whole server."""
    answers: dict[str, tuple[int, Any]] = {
        "/set": (200, {"kinds": {"a", "b"}}),
        "/huge": (200, {"count": 1 << 70}),
        "/status": (299, {"status": "ok"}),
    }
    routes = {path: (lambda _, answer=answer: answer) for path, answer in answers.items()}
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_health, "127.0.0.1", 0, {**routes, "/h": _healthz})
        for path in answers:
            with trio.fail_after(5):
                status, headers, body = await exchange(port, get(path))
            assert (status, headers["content-type"]) == (500, "application/json"), path
            assert orjson.loads(body) == {"error": f"{path}: internal error (see the server log)"}
            assert (await exchange(port, get("/h")))[0] == 200
        nursery.cancel_scope.cancel()


async def test_every_answer_is_marked_as_not_to_be_sniffed(tmp_path: Path) -> None:
    """Every answer of the port, not only the dashboard's files, says its content type is
    final (``nosniff``), and those that are not the dashboard's page allow nothing to run or
    load, nor to be framed. ``/status`` holds the names connected workers chose, and a JSON
    or metrics answer opened in a browser that sniffs could have been read as a page of this
    origin (where the dashboard keeps its token)."""
    async with served_http(tmp_path) as (_, http):
        requests = [get(path) for path in ("/healthz", "/readyz", "/status", "/metrics")]
        requests += [get("/dashboard.json"), get("/nope"), get("/healthz", method="POST")]
        requests += [b"GARBAGE\r\n\r\n"]
        for request in requests:
            _, headers, _ = await exchange(http, request)
            assert headers.get("x-content-type-options") == "nosniff", request
            policy = headers.get("content-security-policy", "")
            assert "default-src 'none'" in policy and "frame-ancestors 'none'" in policy, request
            assert "script-src" not in policy, request
        _, headers, _ = await exchange(http, get("/"))
        assert headers["x-content-type-options"] == "nosniff"
        assert "script-src 'self'" in headers["content-security-policy"]


async def test_ui_refuses_an_announced_http_port_that_is_not_one(tmp_path: Path) -> None:
    """``jobspine ui`` opens the HTTP port the server at ``--url`` announces in its hello's
    reply. An announcement that is no port (``true``, 0, 70000, -1: a server of another
    version, or not jobspine's) was put in the URL as it was, and the browser was handed
    ``http://127.0.0.1:True/#token=...`` with the token in it. It is now refused, exit 6,
    saying what the server announced, and no URL (no token) is printed or opened."""
    announced: list[Any] = []

    async def fake_server(request: WebSocketRequest) -> None:
        ws = await request.accept()
        hello = orjson.loads(await ws.get_message())
        result = {"protocol": 1, "user_id": "alice", "admin": False, "epoch": "E",
                  "expires_at": 2e9, "http_port": announced[0]}  # fmt: skip
        await ws.send_message(orjson.dumps({"type": "reply", "id": hello["id"], "result": result}))
        with contextlib.suppress(ConnectionClosed):
            await ws.get_message()

    env = {**os.environ, "HOME": str(tmp_path), "JOBSPINE_TOKEN": token("alice")}
    env.pop("JOBSPINE_HEALTH_PORT", None)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            partial(serve_websocket, fake_server, "127.0.0.1", 0, ssl_context=None)
        )
        url = f"ws://127.0.0.1:{listeners.port}"
        command = [sys.executable, "-m", "transport._cli", "ui", "--print-url", "--url", url]
        for port in (True, 0, 70000, -1, 8766.5):
            announced[:] = [port]
            done = await trio.run_process(
                command, env=env, capture_stdout=True, capture_stderr=True, check=False,
                cwd=ROOT,
            )  # fmt: skip
            assert (done.returncode, done.stdout) == (6, b""), (port, done.stdout, done.stderr)
            assert b"HTTP port" in done.stderr and b"--health-port" in done.stderr, port
        announced[:] = [8766]
        done = await trio.run_process(command, env=env, capture_stdout=True, cwd=ROOT)
        assert done.stdout.startswith(b"http://127.0.0.1:8766/#token=")
        nursery.cancel_scope.cancel()
