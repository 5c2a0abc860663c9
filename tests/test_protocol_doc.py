"""PROTOCOL.md names every op, error code and close code the server can produce."""

from __future__ import annotations

import re
from pathlib import Path

import attrs

import actors
import actors._remote
from actors import EventType, Job, JobspineError, _ops
from transport import CLOSE, OPS, WORKER_OPS, _server
from transport._workers import WorkerHello

DOC = (Path(__file__).parent.parent / "transport" / "PROTOCOL.md").read_text()
SERVER_SOURCE = Path(_server.__file__).read_text()
PROTOCOL_SOURCE = "".join(
    Path(_server.__file__).with_name(name).read_text()
    for name in ("_protocol.py", "_json.py", "_auth.py", "_workers.py")
)


def test_every_op_is_documented() -> None:
    documented = set(re.findall(r"^\| `(\w+)` \|", DOC, re.MULTILINE))
    assert set(OPS) - {"hello"} <= documented


def test_every_close_code_is_documented() -> None:
    for code in CLOSE.values():
        assert re.search(rf"^\| {code} \|", DOC, re.MULTILINE), code


def test_every_error_code_is_documented() -> None:
    codes = {
        cls.code
        for cls in vars(actors).values()
        if isinstance(cls, type) and issubclass(cls, JobspineError) and cls.code != "error"
    }
    sources = SERVER_SOURCE + PROTOCOL_SOURCE
    codes |= set(re.findall(r'ProtocolError\(\s*"(\w+)"', sources))
    codes |= set(re.findall(r'RequestError\(\s*[\w()]+,\s*"(\w+)"', sources))
    codes |= set(re.findall(r'RefusedJsonError\(\s*"(\w+)"', sources))
    codes |= set(re.findall(r'return "(\w+)", f?"', sources))  # _id_problem's (code, message)
    codes |= set(re.findall(r'_reply_error\([^,]+,\s*"(\w+)"', sources))
    # Codes that only ever close the connection are in the close-code table.
    codes -= {"protocol_error", "too_many_connections"}
    codes -= {"runtime_crashed", "lagged"}
    # Refusals to start never reach a client.
    codes -= {"database_in_use"}
    for code in sorted(codes):
        assert f"`{code}`" in DOC, code


WORKER_SECTION = DOC[DOC.index("## 9. Worker protocol") :]
WORKERS_SOURCE = Path(_server.__file__).with_name("_workers.py").read_text()


def test_every_worker_op_and_message_is_documented() -> None:
    documented = set(re.findall(r"^\| `(\w+)` \|", WORKER_SECTION, re.MULTILINE))
    assert set(WORKER_OPS) - {"hello"} <= documented
    sent = set(re.findall(r'"type": "(\w+)"', Path(actors._remote.__file__).read_text()))
    assert sent == {"assign", "stop", "cancel"}
    assert sent <= documented


def test_every_worker_error_and_close_code_is_documented() -> None:
    codes = set(re.findall(r'ProtocolError\(\s*"(\w+)"', WORKERS_SOURCE)) - {"protocol_error"}
    assert {"not_assigned", "stale_attempt", "not_stopping", "wrong_role"} <= codes
    for code in sorted(codes - {"wrong_role"}):
        assert f"`{code}`" in WORKER_SECTION, code
    for name in ("wrong_role", "worker_stalled", "try_again_later"):
        assert re.search(rf"^\| {CLOSE[name]} \|", WORKER_SECTION, re.MULTILINE), name
    # Every field of every worker op is named in its row.
    for op, cls in WORKER_OPS.items():
        if op == "hello":
            continue
        row = re.search(rf"^\| `{op}` \|(.*)$", WORKER_SECTION, re.MULTILINE)
        assert row is not None, op
        for field in attrs.fields(cls):
            assert f"`{field.name}`" in row.group(1), (op, field.name)
    for field in attrs.fields(WorkerHello):
        assert f'"{field.name}"' in WORKER_SECTION, field.name


def _row(name: str) -> str:
    """The table row (of the ops or events table) whose first cell names ``name``."""
    for line in DOC.splitlines():
        first = line.split("|")[1] if line.startswith("| ") else ""
        if f"`{name}`" in first:
            return line
    raise AssertionError(f"no table row for {name!r}")


def test_every_request_field_is_documented_in_its_ops_row() -> None:
    for op, cls in OPS.items():
        if op == "hello":
            continue  # section 1
        row = _row(op)
        for field in attrs.fields(cls):
            assert f"`{field.name}`" in row, (op, field.name)


def test_every_job_field_is_documented() -> None:
    """Every field is in the example job object (and the new queue fields are described)."""
    section = DOC[DOC.index("## 5. The job object") : DOC.index("## 6.")]
    example = section[section.index("```json") : section.index("```\n\nStates")]
    for field in attrs.fields(Job):
        assert f'"{field.name}":' in example, field.name


def test_every_event_type_and_its_data_are_documented() -> None:
    """Each event type has a row in the events table naming every ``data`` key the store
    writes for it (read from the sans-I/O mutations in ``actors/_ops.py``)."""
    events = DOC[DOC.index("## 3. Events") : DOC.index("### Frames and batches")]
    rows = {
        name: line
        for line in events.splitlines()
        if line.startswith("| `")
        for name in re.findall(r"`(\w+)`", line.split("|")[1])
    }
    assert set(EventType) <= set(rows), set(EventType) - set(rows)
    source = Path(_ops.__file__).read_text()
    for function in re.split(r"\n(?=def )", source):
        types = set(re.findall(r"EventType\.(\w+)", function))
        keys = set(re.findall(r'"(\w+)":', function)) | set(
            re.findall(r'data\["(\w+)"\]', function)
        )
        for name in types:
            row = rows[EventType[name].value]
            for key in keys:
                assert f"`{key}`" in row or key in re.findall(r"\w+", row), (name, key)
