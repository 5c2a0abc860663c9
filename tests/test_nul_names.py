"""Names holding a NUL character: refused or unknown alike on every backend (a reviewer's F8).

PostgreSQL's text type cannot hold NUL: a tag, a key or a job id with one reached a text column
and failed there as ``store_error``, with an ERROR and its traceback logged per request, while
memory and SQLite stored or matched it. Every name (job id, parent id, room, tag, kind,
idempotency key, list filter) holding one now gets a typed answer, the same on every backend:
``invalid_input`` naming the field where it is given to be stored or matched, ``unknown_job``
where it names a job to look up. Inside JSON values (input, step labels) NUL stays storable.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from trio_websocket import open_websocket_url

from actors import (
    InvalidInputError,
    JobQuery,
    JobState,
    UnknownJobError,
    parse_room,
)
from actors._backend import Backend
from actors._options import CreateOptions

from .backends import new_backend
from .conftest import wait_for_state
from .serving import raw, receive, send, serving, token
from .serving import request as ask
from .test_store import open_store

NUL = "\x00"
BAD_ID = f"01{NUL}"


@pytest.fixture(params=["memory", "sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    return new_backend(request, tmp_path / "store.db")


def errors_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


async def test_names_holding_nul_are_refused_or_unknown_on_every_backend(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    """Through the store, which every backend sits behind: a create naming a tag, parent or
    key with NUL is ``InvalidInputError`` naming the field, and nothing is stored; a job id
    with NUL is unknown to every lookup and write; a list or stats filter with NUL is
    ``InvalidInputError``; a heartbeat for such an id is dropped. Another user's job, its
    input holding NUL (JSON, storable), is written and changed meanwhile; nothing is logged
    as an error."""
    async with open_store(backend) as (store, _, _):
        job = await store.create("bob", "research", {"q": f"nul {NUL} inside"}, CreateOptions())
        await store.start(job.id)
        with caplog.at_level(logging.WARNING):
            for field, options in {
                "tags": CreateOptions(tags=("ok", f"a{NUL}b")),
                "parent_id": CreateOptions(parent_id=BAD_ID),
                "idempotency_key": CreateOptions(idempotency_key=f"k{NUL}"),
            }.items():
                with pytest.raises(InvalidInputError, match=f"{field} must not contain a NUL"):
                    await store.create("evil", "research", {}, options)
            lookups: dict[str, Callable[[], Awaitable[Any]]] = {
                "get": lambda: store.get(BAD_ID),
                "start": lambda: store.start(BAD_ID),
                "cancel": lambda: store.cancel(BAD_ID, "evil"),
                "pause": lambda: store.pause(BAD_ID, None, "evil"),
                "resume": lambda: store.resume(BAD_ID, "evil"),
                "restart": lambda: store.restart(BAD_ID, "evil"),
                "progress": lambda: store.set_progress(BAD_ID, 1, 5, None),
                "reset_recovery": lambda: store.reset_recovery_attempts(BAD_ID, "evil"),
                "delete": lambda: store.delete(BAD_ID),
            }
            for name, lookup in lookups.items():
                with pytest.raises(UnknownJobError, match="no job with id"):
                    await lookup()
                    pytest.fail(f"{name} found a job")
            for field, query in {
                "user_id": JobQuery(user_id=f"x{NUL}"),
                "kind": JobQuery(kind=f"x{NUL}"),
                "tag": JobQuery(tag=f"x{NUL}"),
                "parent_id": JobQuery(parent_id=f"x{NUL}"),
                "parent_ids": JobQuery(parent_ids=frozenset({job.id, BAD_ID})),
            }.items():
                with pytest.raises(InvalidInputError, match=f"{field} must not contain a NUL"):
                    await store.list_jobs(query)
            with pytest.raises(InvalidInputError, match="user_id must not contain a NUL"):
                await store.get_stats(f"x{NUL}")
            with pytest.raises(InvalidInputError, match="user_id must not contain a NUL"):
                await store.queue_stats(time.time(), f"x{NUL}")
            store.heartbeat(BAD_ID, 1)  # no such job: dropped, never in a commit
            store.heartbeat(job.id, 1)
            done = await store.set_progress(job.id, 1, 50, f"step {NUL}")
        assert (done.progress, done.step, done.input) == (
            50,
            f"step {NUL}",
            {"q": f"nul {NUL} inside"},
        )
        assert [j.id for j in await store.list_jobs(JobQuery())] == [job.id]
        assert (await store.get_stats("evil"))["total"] == 0
        assert store.health.ok
    assert errors_logged(caplog) == []


def test_a_room_holding_nul_is_refused() -> None:
    for room in (f"job:{BAD_ID}", f"user:al{NUL}ice", f"job{NUL}:01"):
        with pytest.raises(InvalidInputError, match="room must not contain a NUL"):
            parse_room(room)


#: The reviewer's requests holding NUL (``attack/bad_input.py``), each with the error it gets.
CASES: list[tuple[str, dict[str, Any], str, str]] = [
    ("create", {"tags": [f"a{NUL}b"]}, "invalid_input", "tags must not contain a NUL"),
    ("create", {"idempotency_key": f"k{NUL}"}, "invalid_input", "idempotency_key must not"),
    ("create", {"parent_id": BAD_ID}, "invalid_input", "parent_id must not contain a NUL"),
    ("create", {"kind": f"sized{NUL}"}, "unknown_kind", "no handler registered"),
    ("get", {"job_id": BAD_ID}, "unknown_job", "no job with id"),
    ("cancel", {"job_id": BAD_ID}, "unknown_job", "no job with id"),
    ("pause", {"job_id": BAD_ID}, "unknown_job", "no job with id"),
    ("resume", {"job_id": BAD_ID}, "unknown_job", "no job with id"),
    ("restart", {"job_id": BAD_ID}, "unknown_job", "no job with id"),
    ("get_payload", {"job_id": BAD_ID, "field": "input"}, "unknown_job", "no job with id"),
    ("children", {"job_id": BAD_ID}, "unknown_job", "no job with id"),
    ("recovery_options", {"job_id": BAD_ID}, "unknown_job", "no job with id"),
    ("checkpoint_details", {"job_id": BAD_ID}, "unknown_job", "no job with id"),
    ("list", {"tag": f"t{NUL}"}, "invalid_input", "tag must not contain a NUL"),
    ("list", {"kind": f"sized{NUL}"}, "invalid_input", "kind must not contain a NUL"),
    ("list", {"parent_id": f"p{NUL}"}, "invalid_input", "parent_id must not contain a NUL"),
    ("subscribe", {"room": f"job:{BAD_ID}"}, "invalid_input", "room must not contain a NUL"),
    (
        "subscribe",
        {"room": f"job:{BAD_ID}", "cursor": {"epoch": "x", "seq": 1}},
        "invalid_input",
        "room must not contain a NUL",
    ),
    ("unsubscribe", {"room": f"job:{BAD_ID}"}, "invalid_input", "room must not contain a NUL"),
]


@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
async def test_requests_naming_nul_get_typed_errors_and_others_are_unaffected(
    store: str, request: pytest.FixtureRequest, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Over the protocol, on a server of each store: every request of the reviewer's list
    gets its typed error (never ``store_error``), nothing of the sender's is stored, an
    admin's user filters with NUL are ``invalid_input`` too, another user's job runs to its
    end meanwhile, and no ERROR is logged."""
    db: str | Path = (
        request.getfixturevalue("pg_url") if store == "postgresql" else tmp_path / "j.db"
    )
    with caplog.at_level(logging.WARNING):
        async with serving(db) as running:
            async with raw(running, "alice") as alice, raw(running, "evil") as evil:
                created = await request_ok(
                    alice, "create", kind="sized", input={"value": f"nul {NUL} ok"}
                )
                for n, (op, fields, code, message) in enumerate(CASES, start=2):
                    if op == "create":
                        fields = {"kind": "sized", "input": {"value": 1}, **fields}
                    reply = await ask(evil, op, n, **fields)
                    assert (reply["type"], reply.get("code")) == ("error", code), (
                        op,
                        fields,
                        reply,
                    )
                    assert message in reply["message"], reply
                assert await request_ok(evil, "list") == []
                done = await wait_for_state(running.runtime, created["id"])
                assert (done.state, done.result) == (JobState.COMPLETED, f"nul {NUL} ok")
            async with open_websocket_url(running.url) as admin:
                await send(admin, {"op": "hello", "id": 0, "token": token("root", admin=True)})
                assert (await receive(admin))["type"] == "reply"
                for op, fields in (
                    ("list", {"user_id": f"evil{NUL}"}),
                    ("queue_stats", {"user_id": f"evil{NUL}"}),
                    ("subscribe", {"room": f"user:evil{NUL}"}),
                ):
                    reply = await ask(admin, op, 2, **fields)
                    assert (reply["type"], reply.get("code")) == ("error", "invalid_input"), reply
                    assert "must not contain a NUL" in reply["message"], reply
    assert errors_logged(caplog) == []


async def request_ok(ws: Any, op: str, **fields: Any) -> Any:
    reply = await ask(ws, op, 1, **fields)
    assert reply["type"] == "reply", reply
    return reply["result"]
