"""Protocol v1 messages, error codes and close codes (documented in ``transport/PROTOCOL.md``).

A client frame is a JSON object ``{"op": ..., "id": ..., <fields>}``. Requests are parsed into
attrs classes through the one converter, strictly: an unknown field, a missing field or a field
of the wrong type is a ``bad_request`` error naming the field.
"""

from __future__ import annotations

from typing import Any

import attrs
import cattrs
import orjson

from actors._codec import converter

__all__ = [
    "CLOSE",
    "OPS",
    "PROTOCOL_VERSION",
    "Cursor",
    "ProtocolError",
    "Request",
    "encode",
    "error_message",
    "parse_request",
    "reply_message",
]

PROTOCOL_VERSION = 1

#: Close codes the server uses, with the reason text it sends.
CLOSE = {
    "normal": 1000,
    "going_away": 1001,  # the server is shutting down
    "too_big": 1009,  # a frame over max_frame_size (sent by the websocket layer)
    "hello_timeout": 4001,
    "protocol_error": 4002,  # the first frame was not a valid hello
    "auth_failed": 4003,
    "token_expired": 4004,
    "slow_consumer": 4008,
    "too_many_connections": 4009,
    "flood": 4029,
}


class ProtocolError(Exception):
    """A request that cannot be served; becomes an error reply ``{code, message}``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@attrs.frozen
class Cursor:
    epoch: str
    seq: int


@attrs.frozen
class Hello:
    token: str
    protocol: int = PROTOCOL_VERSION


@attrs.frozen
class Refresh:
    token: str


@attrs.frozen
class NoArgs:
    pass


@attrs.frozen
class Subscribe:
    room: str
    cursor: Cursor | None = None


@attrs.frozen
class Unsubscribe:
    room: str


@attrs.frozen
class Create:
    kind: str
    input: Any = None


@attrs.frozen
class JobRef:
    job_id: str


@attrs.frozen
class PayloadRef:
    """A payload left out of a message: a job's field, or with ``seq`` a field of the
    ``data`` of that event of the job."""

    job_id: str
    field: str
    seq: int | None = None


@attrs.frozen
class Restart:
    job_id: str
    modifications: dict[str, Any] | None = None


@attrs.frozen
class ListJobs:
    state: str | None = None
    kind: str | None = None
    limit: int = 50
    user_id: str | None = None  # admins only


OPS: dict[str, type] = {
    "hello": Hello,
    "refresh": Refresh,
    "ping": NoArgs,
    "subscribe": Subscribe,
    "unsubscribe": Unsubscribe,
    "create": Create,
    "get": JobRef,
    "get_payload": PayloadRef,
    "list": ListJobs,
    "cancel": JobRef,
    "pause": JobRef,
    "resume": JobRef,
    "restart": Restart,
    "recovery_options": JobRef,
    "checkpoint_details": JobRef,
    "stats": NoArgs,
    "my_stats": NoArgs,
}


@attrs.frozen
class Request:
    op: str
    id: str | int | None
    body: Any


def parse_request(frame: str | bytes) -> Request:
    """Parse one client frame; raises :class:`ProtocolError` (with the request id when known)."""
    if isinstance(frame, bytes):
        raise ProtocolError(
            "bad_frame", "binary frames are not part of the protocol; send JSON text"
        )
    try:
        data = orjson.loads(frame)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError("bad_json", f"the frame is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ProtocolError("bad_request", f"a request is a JSON object, not {type(data).__name__}")
    request_id = data.pop("id", None)
    if request_id is not None and (
        isinstance(request_id, bool) or not isinstance(request_id, str | int)
    ):
        raise ProtocolError("bad_request", "id must be a string or an integer")
    op = data.pop("op", None)
    if not isinstance(op, str):
        raise RequestError(request_id, "bad_request", "missing field 'op'")
    cls = OPS.get(op)
    if cls is None:
        raise RequestError(request_id, "unknown_op", f"unknown op {op!r}; ops: {', '.join(OPS)}")
    known = {field.name for field in attrs.fields(cls)}
    extra = sorted(set(data) - known)
    if extra:
        raise RequestError(request_id, "bad_request", f"{op}: unknown field {extra[0]!r}")
    try:
        body: Any = converter.structure(data, cls)
    except (cattrs.BaseValidationError, TypeError, ValueError) as exc:
        details = (
            "; ".join(cattrs.transform_error(exc))
            if isinstance(exc, cattrs.BaseValidationError)
            else str(exc)
        )
        raise RequestError(request_id, "bad_request", f"{op}: {details}") from None
    return Request(op, request_id, body)


class RequestError(ProtocolError):
    """A :class:`ProtocolError` for a frame whose request id could be read."""

    def __init__(self, request_id: str | int | None, code: str, message: str) -> None:
        super().__init__(code, message)
        self.request_id = request_id


def encode(message: Any) -> bytes:
    return orjson.dumps(converter.unstructure(message))


def reply_message(request_id: str | int | None, result: Any) -> bytes:
    return orjson.dumps(
        {"type": "reply", "id": request_id, "result": converter.unstructure(result)}
    )


def error_message(request_id: str | int | None, code: str, message: str) -> bytes:
    return orjson.dumps({"type": "error", "id": request_id, "code": code, "message": message})
