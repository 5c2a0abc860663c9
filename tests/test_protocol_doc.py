"""PROTOCOL.md names every op, error code and close code the server can produce."""

from __future__ import annotations

import re
from pathlib import Path

import actors
from actors import JobspineError
from transport import CLOSE, OPS, _server

DOC = (Path(__file__).parent.parent / "transport" / "PROTOCOL.md").read_text()
SERVER_SOURCE = Path(_server.__file__).read_text()
PROTOCOL_SOURCE = "".join(
    Path(_server.__file__).with_name(name).read_text()
    for name in ("_protocol.py", "_json.py", "_auth.py")
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
