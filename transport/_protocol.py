"""Protocol v1 messages, error codes and close codes (documented in ``transport/PROTOCOL.md``).

A client frame is a JSON object ``{"op": ..., "id": ..., <fields>}``, parsed once, strictly:

* the JSON itself by :func:`~transport._json.loads_strict` (numbers outside the signed 64-bit
  range, lone surrogates, repeated keys and deep nesting are refused, never changed);
* ``id``, when given, must be valid (:func:`_id_problem`);
* the fields into attrs classes through a copy of the one converter that refuses unknown keys
  at every level: an unknown, missing or mistyped field is ``bad_request`` naming its path;
* then the value ranges (:func:`_range_problem`): ``invalid_input`` naming the field.

Every refusal is a :class:`RequestError` that carries the request id whenever it can be read.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, get_args, get_origin

import attrs
import cattrs
import orjson
from cattrs.v import format_exception

from actors import InvalidInputError, JobState
from actors._clock import wall_time
from actors._codec import converter
from actors._errors import shown
from actors._options import CreateOptions
from actors._states import parse_states

from ._json import (
    INT_MAX,
    INT_MIN,
    RefusedJsonError,
    check_part,
    is_plain,
    loads_lenient,
    loads_parts,
    loads_strict,
    top_level_values,
)

__all__ = [
    "CLOSE",
    "MAX_BATCH_REQUESTS",
    "MAX_ID_LENGTH",
    "MAX_LIST_LIMIT",
    "MAX_QUEUE_USERS",
    "OPS",
    "PROTOCOL_VERSION",
    "WORKER_HELLO_FIELDS",
    "Cursor",
    "ProtocolError",
    "Request",
    "RequestError",
    "encode",
    "error_message",
    "parse_request",
    "parse_requests",
    "hello_fields",
    "read_request_id",
    "reply_message",
]

PROTOCOL_VERSION = 1
#: A string request id has 1 to this many characters.
MAX_ID_LENGTH = 128
#: The largest ``limit`` of a ``list`` or ``children`` request.
MAX_LIST_LIMIT = 500
#: ``queue_stats`` names at most this many users in ``waiting_by_user`` (those with the most
#: waiting jobs): one reply must fit in a message whatever the number of users.
MAX_QUEUE_USERS = 100
_STATES = tuple(state.value for state in JobState)

#: Close codes the server uses, with the reason text it sends.
CLOSE = {
    "normal": 1000,
    "going_away": 1001,  # the server is shutting down
    # Sent by the websocket layer (1002 and 1007 with the help of transport._wire):
    "websocket_protocol": 1002,  # a malformed websocket frame
    "invalid_utf8": 1007,  # a text frame that is not UTF-8
    "too_big": 1009,  # a frame over max_frame_size
    # Worker endpoint: a hello refused for a condition that passes (the declared kinds' table
    # is full of kinds that are held now): reconnect with the backoff.
    "try_again_later": 1013,
    "hello_timeout": 4001,
    "protocol_error": 4002,  # the first frame was not a valid hello
    "auth_failed": 4003,
    "token_expired": 4004,
    "slow_consumer": 4008,
    "too_many_connections": 4009,
    "wrong_role": 4010,  # a worker token on the client endpoint, or a user's on /worker
    "worker_stalled": 4011,  # a worker sent nothing for heartbeat_timeout
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
    """A job for the queue. The options' ranges are the embedding API's
    (:meth:`actors.Repository.create_job`), checked by :func:`_range_problem`."""

    kind: str
    input: Any  # required; JSON null is a value (the kind's handler decides if it accepts it)
    priority: int | None = None
    delay: float | None = None
    run_at: float | None = None
    max_attempts: int | None = None
    timeout: float | None = None
    tags: list[str] | None = None
    parent_id: str | None = None
    idempotency_key: str | None = None

    def options(self, now: float) -> CreateOptions:
        """The checked options; raises :class:`InvalidInputError` naming the field."""
        return CreateOptions.check(
            now,
            priority=0 if self.priority is None else self.priority,
            delay=self.delay,
            run_at=self.run_at,
            max_attempts=self.max_attempts,
            timeout=self.timeout,
            tags=self.tags or (),
            parent_id=self.parent_id,
            idempotency_key=self.idempotency_key,
        )


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
    """``state`` (one) or ``states`` (any of them), ``kind``, ``tag`` and ``parent_id``
    filters, all applying together."""

    state: str | None = None
    kind: str | None = None
    limit: int = 50
    user_id: str | None = None  # admins only
    states: list[str] | None = None
    tag: str | None = None
    parent_id: str | None = None

    def state_filter(self) -> list[JobState] | None:
        """The states asked for (parse_request checked them), None for all."""
        if self.state is not None:
            return [JobState(self.state)]
        return None if self.states is None else [JobState(s) for s in self.states]


@attrs.frozen
class Children:
    """A job's children (the jobs created with it as ``parent_id``), newest first."""

    job_id: str
    limit: int = 50


@attrs.frozen
class QueueStatsRequest:
    user_id: str | None = None  # admins only


@attrs.frozen
class Prune:
    """``older_than``: seconds (every kind's age limit replaced by it); ``dry_run``: count."""

    older_than: float | None = None
    dry_run: bool = False


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
    "children": Children,
    "cancel": JobRef,
    "pause": JobRef,
    "resume": JobRef,
    "restart": Restart,
    "recovery_options": JobRef,
    "checkpoint_details": JobRef,
    "stats": NoArgs,
    "my_stats": NoArgs,
    "queue_stats": QueueStatsRequest,
    "prune": Prune,
}


# The protocol's converter: the runtime's strict type hooks, and unknown keys refused at every
# level (the top level is checked first, for a message naming the op).
_converter = converter.copy(forbid_extra_keys=True)


def _strict_list(value: Any, type_: Any) -> list[Any]:
    """A JSON array only (cattrs would turn a string into a list of its characters)."""
    if not isinstance(value, list):
        raise TypeError(f"expected an array, not {_json_type(value)}")
    (item,) = get_args(type_) or (Any,)
    return [_converter.structure(v, item) for v in value]


def _is_list(type_: Any) -> bool:
    return get_origin(type_) is list


_converter.register_structure_hook_func(_is_list, _strict_list)


@attrs.frozen
class Request:
    op: str
    id: str | int | None
    body: Any


def parse_request(frame: str | bytes, ops: Mapping[str, type] = OPS) -> Request:
    """Parse one client frame strictly (see the module docstring) into one of ``ops`` (the
    worker endpoint passes its own); raises :class:`RequestError`, carrying the request id
    whenever the frame lets it be read."""
    return _parse_object(_load_frame(frame), ops)


#: The most requests one batch frame may carry (PROTOCOL.md section 9).
MAX_BATCH_REQUESTS = 1000


def parse_requests(frame: str | bytes, ops: Mapping[str, type]) -> list[Request | RequestError]:
    """Parse a worker frame: one request, or a batch ``{"op": "batch", "requests": [...]}``
    of requests (PROTOCOL.md section 9), each parsed as if it were a frame of its own: each
    item is its request or the :class:`RequestError` it gets (one bad request refuses no
    other). Raises :class:`RequestError` for a frame that is neither."""
    try:
        data = _load_frame(frame)
    except RequestError:
        # Refused whole (a value out of range, a key given twice, too deep): a batch is
        # judged request by request, each as if it had come alone.
        parts = _batch_parts(frame)
        if parts is None:
            raise
        return _parse_items(parts, ops, checked=False)
    if data.get("op") != "batch":
        try:
            return [_parse_object(data, ops)]
        except RequestError as exc:
            return [exc]
    return _parse_items(_batch_requests(data), ops, checked=True)


def _batch_requests(data: dict[str, Any]) -> list[Any]:
    """The requests of a batch frame's object; raises :class:`RequestError` (``id`` null)
    for an object that is not a valid batch."""
    extra = sorted(set(data) - {"op", "requests"})
    if extra:
        raise RequestError(None, "bad_request", f"batch: unknown field {shown(extra[0])}")
    requests = data.get("requests")
    if not isinstance(requests, list) or not 1 <= len(requests) <= MAX_BATCH_REQUESTS:
        raise RequestError(
            None,
            "bad_request",
            f"batch: 'requests' is an array of 1 to {MAX_BATCH_REQUESTS} requests",
        )
    return requests


def _batch_parts(frame: str | bytes) -> list[Any] | None:
    """The requests of a batch frame that strict reading refused, decoded with what was
    refused kept as markers; None when the frame is not a valid batch even so."""
    if isinstance(frame, bytes):
        return None
    try:
        data = loads_parts(frame)
    except RefusedJsonError:
        return None
    if not is_plain(data, "op") or data.get("op") != "batch":
        return None
    try:
        return _batch_requests(data)
    except RequestError:
        return None


def _parse_items(
    requests: list[Any], ops: Mapping[str, type], *, checked: bool
) -> list[Request | RequestError]:
    """Each request of a batch parsed on its own; ``checked``: read strictly already (else
    each is checked here, as :func:`loads_strict` would check it alone)."""
    parsed: list[Request | RequestError] = []
    for item in requests:
        try:
            if not checked:
                try:
                    check_part(item)
                except RefusedJsonError as exc:
                    request_id = item.get("id") if is_plain(item, "id") else None
                    if request_id is not None and _id_problem(request_id) is not None:
                        request_id = None
                    raise RequestError(request_id, exc.code, exc.message) from None
            if not isinstance(item, dict):
                raise RequestError(
                    None, "bad_request", f"a request is a JSON object, not {_json_type(item)}"
                )
            if item.get("op") in ("batch", "hello"):
                problem = _id_problem(item["id"]) if "id" in item else None
                if problem is not None:  # as the same request alone gets it
                    raise RequestError(None, *problem)
                raise RequestError(
                    item.get("id"), "bad_request", f"{item['op']}: not allowed inside a batch"
                )
            parsed.append(_parse_object(item, ops))
        except RequestError as exc:
            parsed.append(exc)
    return parsed


def _load_frame(frame: str | bytes) -> dict[str, Any]:
    if isinstance(frame, bytes):
        raise RequestError(
            read_request_id(frame),
            "bad_frame",
            "binary frames are not part of the protocol; send JSON text",
        )
    try:
        data = loads_strict(frame)
    except RefusedJsonError as exc:
        raise RequestError(read_request_id(frame), exc.code, exc.message) from None
    if not isinstance(data, dict):
        raise RequestError(
            None, "bad_request", f"a request is a JSON object, not {_json_type(data)}"
        )
    return data


def _parse_object(data: dict[str, Any], ops: Mapping[str, type]) -> Request:
    request_id = data.pop("id", None)  # optional: without one, the reply has "id": null
    problem = None if request_id is None else _id_problem(request_id)
    if problem is not None:
        raise RequestError(None, *problem)
    op = data.pop("op", None)
    if not isinstance(op, str):
        raise RequestError(request_id, "bad_request", "missing field 'op' (a string)")
    cls = ops.get(op)
    if cls is None:
        raise RequestError(
            request_id, "unknown_op", f"unknown op {shown(op)}; ops: {', '.join(ops)}"
        )
    known = {field.name for field in attrs.fields(cls)}
    extra = sorted(set(data) - known)
    if extra:
        raise RequestError(request_id, "bad_request", f"{op}: unknown field {shown(extra[0])}")
    try:
        body: Any = _converter.structure(data, cls)
    except (cattrs.BaseValidationError, TypeError, ValueError) as exc:
        details = (
            "; ".join(cattrs.transform_error(exc, format_exception=_field_problem))
            if isinstance(exc, cattrs.BaseValidationError)
            else str(exc)
        )
        raise RequestError(request_id, "bad_request", f"{op}: {details}") from None
    out_of_range = _range_problem(body)
    if out_of_range is not None:
        raise RequestError(request_id, "invalid_input", f"{op}: {out_of_range}")
    return Request(op, request_id, body)


def _field_problem(exc: BaseException, type_: type | None) -> str:
    """cattrs' words for a field refused (its default), but an unknown key named as
    :func:`shown` quotes it: cattrs lists every one as it is, however long, newlines
    included."""
    if isinstance(exc, cattrs.ForbiddenExtraKeysError):
        extra = sorted(exc.extra_fields)
        more = f" and {len(extra) - 1} more" if len(extra) > 1 else ""
        return f"unknown field {shown(extra[0])}{more}"
    return format_exception(exc, type_)


def _range_problem(body: Any) -> str | None:
    """What is out of range in a well-typed request body, naming the field, else None."""
    if isinstance(body, Subscribe) and body.cursor is not None and body.cursor.seq < 0:
        return f"$.cursor.seq must be at least 0, not {body.cursor.seq}"
    if isinstance(body, PayloadRef) and body.seq is not None and body.seq < 1:
        return f"$.seq must be at least 1, not {body.seq}"
    if isinstance(body, ListJobs | Children) and not 1 <= body.limit <= MAX_LIST_LIMIT:
        return f"$.limit must be in 1..{MAX_LIST_LIMIT}, not {body.limit}"
    if isinstance(body, ListJobs):
        if body.state is not None and body.state not in _STATES:
            return f"$.state: unknown state {shown(body.state)}; states: {', '.join(_STATES)}"
        if body.states is not None:
            if body.state is not None:
                return "give $.state or $.states, not both"
            try:
                parse_states(body.states, "$.states")  # the rule list_jobs applies
            except InvalidInputError as exc:
                return str(exc)
        if body.tag is not None and not body.tag:
            return "$.tag must not be empty"
        if body.parent_id is not None and not body.parent_id:
            return "$.parent_id must not be empty"
    if isinstance(body, Create):
        try:
            body.options(wall_time())
        except InvalidInputError as exc:
            return str(exc)  # names the field
    return None


def _id_problem(request_id: object) -> tuple[str, str] | None:
    """Why ``request_id`` cannot be a request id, as ``(code, message)``, else None."""
    if isinstance(request_id, bool) or not isinstance(request_id, str | int):
        return "bad_request", f"id must be a string or an integer, not {_json_type(request_id)}"
    if isinstance(request_id, int):
        if not INT_MIN <= request_id <= INT_MAX:
            return "invalid_input", "$.id: integer outside the signed 64-bit range"
    elif not 1 <= len(request_id) <= MAX_ID_LENGTH:
        return "invalid_input", f"$.id: a string id has 1 to {MAX_ID_LENGTH} characters"
    else:
        try:
            request_id.encode()
        except UnicodeEncodeError:
            return "invalid_input", "$.id: string has a lone surrogate"
    return None


def read_request_id(frame: str | bytes) -> str | int | None:
    """The id of a frame that will not be served, so that its sender is not left waiting:
    read leniently (any JSON the stdlib takes, text or UTF-8 bytes) but echoed only when it
    is unambiguous and valid (one ``id`` key at the top level, obeying the id rules)."""
    if isinstance(frame, bytes):
        try:
            frame = frame.decode()
        except UnicodeDecodeError:
            return None
    data = loads_lenient(frame)
    if data is None:  # not JSON, or nested too deeply to decode: the top level may still be
        ids = top_level_values(frame, "id")
        if ids is None:
            return None
    elif isinstance(data, list):
        # Objects decode as lists of (key, value) tuples; JSON arrays as lists of values.
        ids = [pair[1] for pair in data if isinstance(pair, tuple) and pair[0] == "id"]
    else:
        return None
    if len(ids) != 1 or ids[0] is None or _id_problem(ids[0]) is not None:
        return None
    request_id: str | int = ids[0]
    return request_id


#: The fields only a worker's hello has (PROTOCOL.md section 9): a hello with either came to
#: a worker, one with neither to a client.
WORKER_HELLO_FIELDS = frozenset({"kinds", "capacity"})


def hello_fields(frame: str | bytes) -> frozenset[str] | None:
    """The top-level keys of a refused first frame that is a hello (``"op": "hello"``), read
    leniently, else None: whether it was meant for the other endpoint (a client's hello on
    ``/worker``, a worker's on the client endpoint), to say so instead of naming a field."""
    if isinstance(frame, bytes):
        try:
            frame = frame.decode()
        except UnicodeDecodeError:
            return None
    data = loads_lenient(frame) if len(frame) <= 1024 * 1024 else None
    if not isinstance(data, list) or not all(isinstance(pair, tuple) for pair in data):
        return None
    if ("op", "hello") not in data:
        return None
    return frozenset(key for key, _ in data)


def _json_type(value: object) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


class RequestError(ProtocolError):
    """A :class:`ProtocolError` answering one frame: ``request_id`` is the frame's id when it
    could be read, else None."""

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
