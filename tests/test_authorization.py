"""The authorization matrix: every request type and room, for users A and B and an admin, and
for every kind of bad token. ``EXPECTED`` states each cell's outcome."""

from __future__ import annotations

import base64
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jwt
import orjson
import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from actors import TERMINAL_STATES, JobState
from transport import CLOSE, RunningServer, mint_token

from .conftest import wait_for_state
from .serving import SECRET, raw, request, send, serving

OK, FORBIDDEN = "ok", "forbidden"

# Each request is made against a job owned by A (where it names one). Outcome per actor.
# "illegal" is an allowed request refused by the job's state (it is authorized).
EXPECTED: dict[str, dict[str, str]] = {
    #  op                    A (owner)   B (other)   admin
    "get":                {"A": OK, "B": FORBIDDEN, "admin": OK},
    "get_payload":        {"A": OK, "B": FORBIDDEN, "admin": OK},
    "recovery_options":   {"A": OK, "B": FORBIDDEN, "admin": OK},
    "checkpoint_details": {"A": OK, "B": FORBIDDEN, "admin": OK},
    "pause":              {"A": OK, "B": FORBIDDEN, "admin": OK},
    "resume":             {"A": OK, "B": FORBIDDEN, "admin": OK},
    "cancel":             {"A": OK, "B": FORBIDDEN, "admin": OK},
    "restart":            {"A": OK, "B": FORBIDDEN, "admin": OK},
    "subscribe job":      {"A": OK, "B": FORBIDDEN, "admin": OK},
    "subscribe user":     {"A": OK, "B": FORBIDDEN, "admin": OK},
    "list other user":    {"A": OK, "B": FORBIDDEN, "admin": OK},
    "stats":              {"A": FORBIDDEN, "B": FORBIDDEN, "admin": OK},
    "my_stats":           {"A": OK, "B": OK, "admin": OK},
    "prune":              {"A": FORBIDDEN, "B": FORBIDDEN, "admin": OK},
    "create":             {"A": OK, "B": OK, "admin": OK},
    "list":               {"A": OK, "B": OK, "admin": OK},
    "ping":               {"A": OK, "B": OK, "admin": OK},
    "children":           {"A": OK, "B": FORBIDDEN, "admin": OK},
    "queue_stats":        {"A": OK, "B": OK, "admin": OK},
    "queue_stats of user": {"A": OK, "B": FORBIDDEN, "admin": OK},
    "list by parent":     {"A": OK, "B": OK, "admin": OK},
}  # fmt: skip

# Tokens: what a hello with each gets.
TOKENS = {
    "valid": None,
    "expired": CLOSE["token_expired"],
    "wrongly signed": CLOSE["auth_failed"],
    "alg none": CLOSE["auth_failed"],
    "alg HS512": CLOSE["auth_failed"],
    "missing": CLOSE["protocol_error"],
    "empty": CLOSE["auth_failed"],
}


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(data)).rstrip(b"=").decode()


def make_token(kind: str) -> str | None:
    claims = {"sub": "alice", "exp": int(time.time()) + 60}
    if kind == "valid":
        return mint_token(SECRET, "alice")
    if kind == "expired":
        return mint_token(SECRET, "alice", ttl=-5)
    if kind == "wrongly signed":
        return mint_token("another-secret-of-the-same-length-ok!!", "alice")
    if kind == "alg none":
        return f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(claims)}."
    if kind == "alg HS512":  # the right key with another algorithm
        return jwt.encode(claims, SECRET, algorithm="HS512")
    if kind == "empty":
        return ""
    return None


def who(actor: str) -> tuple[str, dict[str, Any]]:
    return {"A": ("alice", {}), "B": ("bob", {}), "admin": ("root", {"admin": True})}[actor]


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[RunningServer]:
    async with serving(tmp_path / "authz.db") as running:
        yield running


async def _job_of_alice(running: RunningServer, hold: bool) -> str:
    input = {"query": "q", "depth": 50 if hold else 1, "delay": 0.05 if hold else 0}
    job = await running.runtime.create_job("research", "alice", input)
    # Started by the dispatcher (a held job runs on; the other finishes).
    states = {JobState.RUNNING} if hold else TERMINAL_STATES
    await wait_for_state(running.runtime, job.id, states)
    return job.id


async def _call(ws: Any, case: str, job_id: str) -> Any:
    ops: dict[str, tuple[str, dict[str, Any]]] = {
        "get": ("get", {"job_id": job_id}),
        "get_payload": ("get_payload", {"job_id": job_id, "field": "input"}),
        "recovery_options": ("recovery_options", {"job_id": job_id}),
        "checkpoint_details": ("checkpoint_details", {"job_id": job_id}),
        "pause": ("pause", {"job_id": job_id}),
        "resume": ("resume", {"job_id": job_id}),
        "cancel": ("cancel", {"job_id": job_id}),
        "restart": ("restart", {"job_id": job_id}),
        "subscribe job": ("subscribe", {"room": f"job:{job_id}"}),
        "subscribe user": ("subscribe", {"room": "user:alice"}),
        "list other user": ("list", {"user_id": "alice"}),
        "stats": ("stats", {}),
        "my_stats": ("my_stats", {}),
        "prune": ("prune", {"older_than": 0}),
        "create": (
            "create",
            {"kind": "trade", "input": {"symbol": "X", "side": "buy", "quantity": 1}},
        ),
        "list": ("list", {}),
        "ping": ("ping", {}),
        "children": ("children", {"job_id": job_id}),
        "queue_stats": ("queue_stats", {}),
        "queue_stats of user": ("queue_stats", {"user_id": "alice"}),
        "list by parent": ("list", {"parent_id": job_id}),
    }
    op, fields = ops[case]
    return await request(ws, op, 7, **fields)


@pytest.mark.parametrize("actor", ["A", "B", "admin"])
@pytest.mark.parametrize("case", sorted(EXPECTED))
async def test_matrix(served: RunningServer, case: str, actor: str) -> None:
    # pause needs a running job; resume a paused one; restart a cancelled one; others any job.
    job_id = await _job_of_alice(served, hold=case in ("pause", "resume", "cancel", "restart"))
    if case == "resume":
        await served.runtime.pause(job_id)
    if case == "restart":
        await served.runtime.cancel(job_id)
    child = None
    if case in ("children", "list by parent"):
        small = {"query": "q", "depth": 1, "delay": 0}
        child = await served.runtime.create_job(
            "research", "alice", small, parent_id=job_id, delay=3600
        )
    before = await served.runtime.get_job(job_id)
    user, claims = who(actor)
    async with raw(served, None) as ws:
        await send(ws, {"op": "hello", "id": 0, "token": mint_token(SECRET, user, **claims)})
        assert orjson.loads(await ws.get_message())["type"] == "reply"
        reply = await _call(ws, case, job_id)
    expected = EXPECTED[case][actor]
    if expected == OK:
        assert reply["type"] == "reply", reply
    else:
        assert (reply["type"], reply["code"]) == ("error", FORBIDDEN), reply
        after = await served.runtime.get_job(job_id)
        assert (after.state, after.attempt) == (before.state, before.attempt)  # nothing changed
        assert not [e for e in await served.runtime.get_audit(job_id) if e.actor == "bob"]
    if case == "list other user" and actor != "B":
        assert {j["user_id"] for j in reply["result"]} == {"alice"}
    if case == "list" and actor == "B":
        assert all(j["user_id"] == "bob" for j in reply["result"])
    if case == "queue_stats" and actor == "B":
        assert set(reply["result"]["waiting_by_user"]) <= {"bob"}
    if child is not None and reply["type"] == "reply":
        # another user's children are not listed (B lists only its own jobs)
        expected_ids = [] if actor == "B" else [child.id]
        assert [j["id"] for j in reply["result"]] == expected_ids


@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")
@pytest.mark.parametrize("kind", sorted(TOKENS))
async def test_tokens(served: RunningServer, kind: str) -> None:
    async with open_websocket_url(served.url) as ws:
        token = make_token(kind)
        hello: dict[str, Any] = {"op": "hello", "id": 0}
        if token is not None:
            hello["token"] = token
        await send(ws, hello)
        expected = TOKENS[kind]
        if expected is None:
            assert orjson.loads(await ws.get_message())["result"]["user_id"] == "alice"
            return
        with trio.fail_after(5), pytest.raises(ConnectionClosed) as info:
            while True:
                await ws.get_message()
        assert info.value.reason is not None and info.value.reason.code == expected, kind
