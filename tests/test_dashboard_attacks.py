"""Attacks on the server's HTTP port (health, metrics, the dashboard's files): requests a
client may send that the port must answer, each with a clear status, without harming the
next request."""

from __future__ import annotations

import contextlib
from typing import Any

import orjson
import trio

from transport._health import Request, serve_health

from .test_dashboard_http import exchange, get


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
