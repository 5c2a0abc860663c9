"""The worker endpoint refuses what the protocol refuses, with the documented codes, and
nothing stored changes: roles, hellos, malformed frames, another worker's job, a stale
attempt, an unprompted ``stopped``; a worker written from PROTOCOL.md with another library
runs jobs."""

from __future__ import annotations

import logging
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from functools import partial
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio
import trio.testing
from trio_websocket import (
    ConnectionClosed,
    WebSocketConnection,
    WebSocketRequest,
    open_websocket_url,
    serve_websocket,
)

import actors._remote
import actors._supervisor
import actors._worker
import transport._workers
from actors import Job, JobContext, JobState, RuntimeConfig, UnknownKindError
from actors._errors import shown_names
from actors._options import options_of
from transport import CLOSE, ServerConfig, open_server
from transport._json import MAX_DEPTH
from transport._protocol import MAX_BATCH_REQUESTS
from transport._worker_process import (
    BATCH_BYTES,
    WorkerFatalError,
    WorkerProcess,
    _Attempt,
    _batch_frame,
    _Session,
)

from .conftest import wait_for_state
from .serving import SECRET, eventually, token
from .test_workers import event_types
from .worker_handlers import HANDLERS
from .worker_support import (
    Served,
    close_of,
    run_jobspine_worker,
    served,
    wait_connected,
    worker_token,
)

HANDLER_KINDS = set(HANDLERS)


async def send(ws: WebSocketConnection, message: Any) -> None:
    await ws.send_message(orjson.dumps(message).decode())


async def receive(ws: WebSocketConnection, type_: str | None = None) -> Any:
    with trio.fail_after(10):
        while True:
            message = orjson.loads(await ws.get_message())
            if type_ is None or message["type"] == type_:
                return message


async def wait_checkpoint(rt: Any, job_id: str, version: int) -> None:
    with trio.fail_after(10):
        async with rt.events() as stream:
            if (await rt.get_job(job_id)).checkpoint_version >= version:
                return
            async for event in stream:
                if event.job_id == job_id and event.data.get("version", 0) >= version:
                    return


async def closed_with(ws: WebSocketConnection) -> int:
    return (await close_of(ws)).code


@asynccontextmanager
async def raw_worker(
    url: str,
    kinds: list[str],
    capacity: int = 1,
    tok: str | None = None,
    options: dict[str, Any] | None = None,
    batch: bool | None = None,
) -> AsyncIterator[WebSocketConnection]:
    async with open_websocket_url(url + "/worker", max_message_size=4 * 2**20) as ws:
        await send(
            ws,
            {
                "op": "hello",
                "id": "h",
                "token": tok or worker_token(),
                "kinds": kinds,
                "capacity": capacity,
                **({} if options is None else {"options": options}),
                **({} if batch is None else {"batch": batch}),
            },
        )
        welcome = await receive(ws)
        assert welcome["type"] == "reply" and welcome["id"] == "h", welcome
        assert welcome["result"]["batch"] is True  # the server reads batch frames
        yield ws


@asynccontextmanager
async def assigned_steps_job(
    tmp_path: Path, batch: bool | None = True
) -> AsyncIterator[tuple[Served, WebSocketConnection, Job]]:
    """A server running no handlers itself, a raw worker of ``steps`` (``batch`` in its
    hello) and a ``steps`` job of alice's, assigned to it (attempt 1)."""
    async with (
        served(tmp_path / "db", "in_process", in_process_handlers=False) as s,
        raw_worker(s.running.url, ["steps"], batch=batch) as ws,
    ):
        job = await s.runtime.create_job("steps", "alice", {"n": 1})
        await receive(ws, "assign")
        yield s, ws, job


async def receive_flat(ws: WebSocketConnection, count: int) -> tuple[list[Any], int]:
    """The next ``count`` messages, batches opened; and how many frames were batches."""
    messages: list[Any] = []
    batches = 0
    with trio.fail_after(10):
        while len(messages) < count:
            message = orjson.loads(await ws.get_message())
            if message["type"] == "batch":
                batches += 1
                messages.extend(message["messages"])
            else:
                messages.append(message)
    return messages, batches


async def answers_by_id(ws: WebSocketConnection, count: int) -> tuple[dict[Any, str], int]:
    """The next ``count`` answers, each id's type (``reply``) or error code; and how many
    frames were batches."""
    messages, batches = await receive_flat(ws, count)
    return {m["id"]: m.get("code", m["type"]) for m in messages}, batches


async def test_a_worker_that_leaves_with_replies_queued_harms_no_one(tmp_path: Path) -> None:
    """A worker that sends requests and closes without reading their replies: the server
    drops what it had queued for it and serves on, the running job of another worker with
    it (the failed flush of that queue once stopped the server, every connection with it)."""
    async with assigned_steps_job(tmp_path) as (s, honest, job):
        for _ in range(5):
            async with raw_worker(s.running.url, ["other"]) as ws:
                requests = [{"op": "nop", "id": i} for i in range(10)]
                await send(ws, {"op": "batch", "requests": requests})
        await send(honest, {"op": "progress", "id": 1, "job_id": job.id, "attempt": 1,
                            "progress": 50, "step": "still here"})  # fmt: skip
        (reply,), _ = await receive_flat(honest, 1)
        assert reply["type"] == "reply", reply
        assert (await committed(s.runtime, job.id, 50)).step == "still here"


async def test_a_heartbeat_names_at_most_the_workers_capacity(tmp_path: Path) -> None:
    """A worker runs at most its capacity: a heartbeat naming more jobs is one refusal and
    beats nothing; entries refused cost one error per heartbeat, not one per entry."""
    async with assigned_steps_job(tmp_path) as (s, ws, job):
        ref = {"job_id": job.id, "attempt": 1}
        await send(ws, {"op": "heartbeat", "id": 1, "jobs": [ref] + [{**ref, "attempt": 2}] * 999})
        (error,), _ = await receive_flat(ws, 1)
        assert (error["id"], error["code"]) == (1, "bad_request"), error
        assert "1000 jobs, more than this worker's capacity (1)" in error["message"]
        await send(ws, {"op": "heartbeat", "id": 2, "jobs": [{**ref, "attempt": 2}]})
        (stale,), _ = await receive_flat(ws, 1)
        assert (stale["id"], stale["code"]) == (2, "stale_attempt"), stale
        # Refused entries, in a batch of heartbeats: one error per heartbeat, not per entry.
        async with raw_worker(s.running.url, ["other"], capacity=3) as other:
            unknown = [{"job_id": f"nope{i}", "attempt": 1} for i in range(3)]
            beats = [{"op": "heartbeat", "id": i, "jobs": unknown} for i in range(5)]
            await send(other, {"op": "batch", "requests": beats})
            errors, _ = await receive_flat(other, 5)
            assert [(e["id"], e["code"]) for e in errors] == [(i, "not_assigned") for i in range(5)]
            assert errors[0]["message"].endswith(" (and 2 more refused)"), errors[0]
            with pytest.raises(trio.TooSlowError), trio.fail_after(0.3):
                await other.get_message()  # nothing more


async def test_a_fault_in_one_connection_closes_that_connection_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Whatever a connection's handler raises (a bug, say) closes that connection and is
    logged with its traceback; the server and its other connections go on."""
    async with assigned_steps_job(tmp_path) as (s, honest, job):

        async def broken(self: Any) -> bool:
            raise RuntimeError("a bug in one connection")

        monkeypatch.setattr(transport._workers.WorkerConnection, "_hello", broken)
        async with open_websocket_url(s.running.url + "/worker") as ws:
            with pytest.raises(ConnectionClosed), trio.fail_after(10):
                await ws.get_message()
        monkeypatch.undo()
        assert "a connection's handler failed" in caplog.text
        assert "RuntimeError: a bug in one connection" in caplog.text
        await send(honest, {"op": "progress", "id": 1, "job_id": job.id, "attempt": 1,
                            "progress": 50})  # fmt: skip
        (reply,), _ = await receive_flat(honest, 1)
        assert reply["type"] == "reply", reply


@pytest.mark.parametrize("named", [True, False])
async def test_a_worker_that_disconnects_is_logged_with_the_attempts_it_lost(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, named: bool
) -> None:
    """An operator sees a worker go as they saw it come: a warning naming it and the running
    attempts lost with it (handed to the stall rule, or back in the queue if the worker never
    named them), a plain line when it had none."""
    caplog.set_level("INFO", logger="jobspine.workers")
    async with assigned_steps_job(tmp_path) as (s, ws, job):
        async with raw_worker(s.running.url, ["other"]) as idle:
            await idle.aclose()
            await eventually(lambda: "disconnected" in caplog.text)
        if named:
            await send(ws, {"op": "heartbeat", "jobs": [{"job_id": job.id, "attempt": 1}]})
            await eventually(lambda: s.runtime.supervisor.workers[job.id].handler.started)
        await ws.aclose()
        await eventually(lambda: caplog.text.count("disconnected") == 2)
    lines = [(r.levelname, r.getMessage()) for r in caplog.records if "disconnected" in r.msg]
    lost = "1 running attempt lost, handled as stalls" if named else (
        "1 attempt not started yet, back in the queue"
    )  # fmt: skip
    assert lines == [
        ("INFO", "worker w disconnected (closed with 1000)"),
        ("WARNING", f"worker w disconnected (closed with 1000): {lost}"),
    ]


@pytest.mark.parametrize("batch", [True, False])
async def test_a_batch_frame_is_served_request_by_request(tmp_path: Path, batch: bool) -> None:
    """Each request of a batch gets the answer it would get in a frame of its own, and one
    bad request refuses no other; the server batches its replies only for a worker whose
    hello said it reads batches."""
    async with assigned_steps_job(tmp_path, batch) as (s, ws, job):
        rt = s.runtime
        ref = {"job_id": job.id, "attempt": 1}
        requests: list[Any] = [
            {"op": "progress", "id": 1, **ref, "progress": 10, "step": "a"},
            {"op": "progress", "id": 2, **ref, "attempt": 7, "progress": 5},
            {"op": "nope", "id": 3},
            5,
            {"op": "hello", "id": 4, "token": "t", "kinds": ["a"], "capacity": 1},
            {"op": "batch", "id": 5, "requests": []},
            {"op": "progress", "id": 6, **ref, "progress": 500},
            {"op": "progress", "id": 7, **ref, "progress": 20, "step": "b"},
            {"op": "checkpoint", "id": 8, **ref, "data": {"i": 1}},
        ]
        await send(ws, {"op": "batch", "requests": requests})
        answers, batches = await answers_by_id(ws, len(requests))
        assert answers == {
            1: "reply",
            2: "stale_attempt",
            3: "unknown_op",
            None: "bad_request",
            4: "bad_request",
            5: "bad_request",
            6: "invalid_input",
            7: "reply",
            8: "reply",
        }
        assert (batches > 0) is batch
        stored = await committed(rt, job.id, 20)
        assert (stored.progress, stored.step, stored.checkpoint) == (20, "b", {"i": 1})
        # Frames that are not a batch of requests: one error, nothing changed.
        for frame in [
            {"op": "batch", "requests": [], "id": 9},
            {"op": "batch", "requests": []},
            {"op": "batch", "requests": {"op": "heartbeat"}},
            {"op": "batch"},
            {"op": "batch", "requests": [{"op": "heartbeat", "jobs": []}] * 1001},
        ]:
            await send(ws, frame)
            (error,), _ = await receive_flat(ws, 1)
            assert (error["type"], error["id"], error["code"]) == ("error", None, "bad_request")
        assert await rt.get_job(job.id) == stored


async def test_roles_are_kept_apart(tmp_path: Path) -> None:
    async with served(tmp_path / "db", "in_process") as s:
        url = s.running.url
        async with open_websocket_url(url + "/worker") as ws:
            hello = {"op": "hello", "token": token("alice"), "kinds": ["steps"], "capacity": 1}
            await send(ws, hello)
            assert await closed_with(ws) == CLOSE["wrong_role"] == 4010
        async with open_websocket_url(url) as ws:
            await send(ws, {"op": "hello", "id": 0, "token": worker_token()})
            assert await closed_with(ws) == CLOSE["wrong_role"]
        assert s.running.server.workers.workers == []


@pytest.mark.parametrize(
    ("hello", "code"),
    [
        ({"kinds": [], "capacity": 1}, 4002),
        ({"kinds": ["a", "a"], "capacity": 1}, 4002),
        ({"kinds": ["a"], "capacity": 0}, 4002),
        ({"kinds": ["a"], "capacity": 1001}, 4002),
        ({"kinds": "a", "capacity": 1}, 4002),
        ({"kinds": ["a"], "capacity": 1, "extra": 1}, 4002),
        ({"kinds": ["a"], "capacity": 1, "token": "x.y.z"}, 4003),
        ({"kinds": ["a"], "capacity": 1, "protocol": 2}, 4002),
        ({"kinds": ["a"], "capacity": 1, "options": {"b": {}}}, 4002),
        ({"kinds": ["a"], "capacity": 1, "options": {"a": {"max_attempts": 0}}}, 4002),
        ({"kinds": ["a"], "capacity": 1, "options": {"a": {"max_attempts": True}}}, 4002),
        ({"kinds": ["a"], "capacity": 1, "options": {"a": {"tries": 2}}}, 4002),
        ({"kinds": ["a"], "capacity": 1, "options": {"a": {"timeout": -1}}}, 4002),
        ({"kinds": ["a"], "capacity": 1, "options": {"a": {"non_retryable": "E"}}}, 4002),
        ({"kinds": ["a"], "capacity": 1, "options": {"a": {"requeue_stalled": 1}}}, 4002),
        ({"kinds": ["a"], "capacity": 1, "options": {"a": {"retry": {"jitter": 2}}}}, 4002),
        ({"kinds": ["a"], "capacity": 1, "options": {"a": {"retry": {"x": 1}}}}, 4002),
        (
            {
                "kinds": ["a"],
                "capacity": 1,
                "options": {"a": {"retry": {"initial_interval": True}}},
            },
            4002,
        ),
        ({"kinds": ["a"], "capacity": 1, "options": {"a": []}}, 4002),
        # Logged and shown: no control character forges a log line or drives a terminal.
        ({"kinds": ["a"], "capacity": 1, "name": "w\n2026-11-30 ERROR forged"}, 4002),
        ({"kinds": ["a"], "capacity": 1, "name": "\x1b[31mred"}, 4002),
        ({"kinds": ["a\x00b"], "capacity": 1}, 4002),
        ({"kinds": ["a\u0085"], "capacity": 1}, 4002),
        ({"kinds": ["a\u202e"], "capacity": 1}, 4002),
        ({"kinds": ["a"], "capacity": 1, "name": "w\u2028forged"}, 4002),
    ],
)
async def test_bad_hellos_close(tmp_path: Path, hello: dict[str, Any], code: int) -> None:
    async with served(tmp_path / "db", "in_process") as s:
        async with open_websocket_url(s.running.url + "/worker") as ws:
            await send(ws, {"op": "hello", "token": worker_token(), **hello})
            assert await closed_with(ws) == code
        assert s.running.server.workers.workers == []


async def test_a_worker_hello_may_declare_the_most_kinds_but_no_more_bytes(
    tmp_path: Path,
) -> None:
    """A hello declaring 256 kinds of 1,024 characters (the most allowed) is read; one over
    ``MAX_WORKER_HELLO`` bytes closes with 1009 before the server reads it all (nobody is
    known before the hello: the endpoint's 2 MiB frames are for authenticated workers)."""
    from transport._workers import MAX_KINDS, MAX_WORKER_HELLO

    async with served(tmp_path / "db", "in_process") as s:
        kinds = [f"{i:04d}" + "k" * 1020 for i in range(MAX_KINDS)]
        async with open_websocket_url(s.running.url + "/worker") as ws:
            hello = {"op": "hello", "id": 0, "token": worker_token(), "capacity": 1}
            await send(ws, {**hello, "kinds": kinds})
            reply = await receive(ws)
            assert reply["type"] == "reply", reply
        async with open_websocket_url(s.running.url + "/worker") as ws:
            padding = "p" * MAX_WORKER_HELLO
            with trio.move_on_after(5):
                with suppress(ConnectionClosed):
                    await send(ws, {"op": "hello", "token": worker_token(), "name": padding})
            assert await closed_with(ws) == CLOSE["too_big"]


async def test_reports_are_fenced_and_malformed_frames_refused(tmp_path: Path) -> None:
    async with served(tmp_path / "db", "in_process", in_process_handlers=False) as s:
        rt = s.runtime
        url = s.running.url
        async with raw_worker(url, ["steps"]) as mine, raw_worker(url, ["other"]) as theirs:
            job = await rt.create_job("steps", "alice", {"n": 1})
            assign = await receive(mine, "assign")
            assert (assign["job_id"], assign["attempt"], assign["kind"]) == (job.id, 1, "steps")
            assert assign["input"] == {"n": 1} and assign["checkpoint"] is None
            before = await rt.get_job(job.id)
            ref = {"job_id": job.id, "attempt": 1}
            refusals = [
                (theirs, {"op": "progress", "id": 1, **ref, "progress": 50}, "not_assigned"),
                (
                    mine,
                    {"op": "progress", "id": 2, **ref, "attempt": 7, "progress": 5},
                    "stale_attempt",
                ),
                (
                    mine,
                    {"op": "checkpoint", "id": 3, "job_id": "nope", "attempt": 1, "data": {}},
                    "not_assigned",
                ),
                (mine, {"op": "stopped", "id": 4, **ref}, "not_stopping"),
                (mine, {"op": "progress", "id": 5, **ref, "progress": 500}, "invalid_input"),
                (mine, {"op": "progress", "id": 6, **ref, "progress": "5"}, "bad_request"),
                (mine, {"op": "complete", "id": 7, **ref}, "bad_request"),
                (mine, {"op": "fail", "id": 8, **ref, "error": {"type": "X"}}, "bad_request"),
                (mine, {"op": "nope", "id": 9}, "unknown_op"),
                (
                    mine,
                    {"op": "hello", "id": 10, "token": "t", "kinds": ["a"], "capacity": 1},
                    "bad_request",
                ),
            ]
            for ws, frame, code in refusals:
                await send(ws, frame)
                error = await receive(ws, "error")
                assert (error["id"], error["code"]) == (frame["id"], code), error
            await mine.send_message("{not json")
            assert (await receive(mine, "error"))["code"] == "bad_json"
            await mine.send_message(b"{}")
            assert (await receive(mine, "error"))["code"] == "bad_frame"
            await send(theirs, {"op": "heartbeat", "jobs": [ref]})
            assert (await receive(theirs, "error"))["code"] == "not_assigned"
            after = await rt.get_job(job.id)
            assert after == before  # nothing stored changed
            freed: list[int] = []  # what the queue's dispatcher will listen to
            rt.supervisor.capacity_listeners.append(
                lambda: freed.append(s.running.server.workers.capacity("steps"))
            )
            await send(mine, {"op": "complete", "id": 11, **ref, "result": {"ok": 1}})
            assert (await receive(mine, "reply"))["id"] == 11
            assert freed[0] == 1  # the slot was free when the listener was told
            done = await wait_for_state(rt, job.id)
            assert done.state is JobState.COMPLETED and done.result == {"ok": 1}
            # The attempt is over: a late report from it is refused.
            await send(mine, {"op": "progress", "id": 12, **ref, "progress": 1})
            assert (await receive(mine, "error"))["code"] == "not_assigned"


async def test_complete_and_fail_are_answered_once_their_outcome_is_durable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker may let go of what a job did once its ``complete`` is answered: the answer
    waits for the outcome's commit (it came at once, before the outcome was stored). An
    outcome the database refuses is answered ``store_error``."""
    async with assigned_steps_job(tmp_path) as (s, ws, job):
        backend = s.runtime.store_actor.backend
        commit = backend.commit
        refuse = False

        async def slow_outcomes(jobs: Any, *args: Any, **kwargs: Any) -> Any:
            if any(j.state is not JobState.RUNNING and j.attempt for j in jobs):
                await trio.sleep(0.5)  # an outcome's write: a slow disk
                if refuse:
                    raise ValueError("refused (test)")
            return await commit(jobs, *args, **kwargs)

        monkeypatch.setattr(backend, "commit", slow_outcomes)

        def stored_state(job_id: str) -> str:
            with sqlite3.connect(tmp_path / "db") as db:
                row = db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            return str(row[0])

        sent_at = trio.current_time()
        await send(ws, {"op": "complete", "id": 1, "job_id": job.id, "attempt": 1, "result": 7})
        assert (await receive(ws, "reply"))["id"] == 1
        assert trio.current_time() - sent_at >= 0.5
        assert stored_state(job.id) == "completed"

        failing = await s.runtime.create_job("steps", "alice", {"n": 1})
        await receive(ws, "assign")
        error = {"type": "Boom", "message": "no"}
        ref = {"job_id": failing.id, "attempt": 1}
        await send(ws, {"op": "fail", "id": 2, **ref, "error": error, "permanent": True})
        assert (await receive(ws, "reply"))["id"] == 2
        assert stored_state(failing.id) == "failed"

        refused = await s.runtime.create_job("steps", "alice", {"n": 1})
        await receive(ws, "assign")
        refuse = True
        await send(ws, {"op": "complete", "id": 3, "job_id": refused.id, "attempt": 1, "result": 7})
        answer = await receive(ws, "error")
        assert (answer["id"], answer["code"]) == (3, "store_error"), answer
        assert stored_state(refused.id) == "running"  # the stall rule recovers it


async def test_a_complete_that_a_stop_overtakes_is_not_answered_ok(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pause's grace runs out just as the worker's ``complete`` arrives: the attempt is
    cancelled after the report was taken and before its outcome was stored, and the pause is
    stored instead. The worker is told so (``not_assigned``), not ``ok`` (found in review: a
    fifth of such races were answered ok while the job was stored paused). A duplicate report
    waits for the first one's answer, in order."""
    async with assigned_steps_job(tmp_path) as (s, ws, job):
        real_complete = actors._remote.RemoteAttempt.complete

        def overtaken(attempt: actors._remote.RemoteAttempt, result: Any) -> None:
            real_complete(attempt, result)
            assert attempt.ctx is not None
            attempt.ctx._worker.scope.cancel()  # type: ignore[attr-defined] # grace ran out

        monkeypatch.setattr(actors._remote.RemoteAttempt, "complete", overtaken)
        ref = {"job_id": job.id, "attempt": 1}
        await send(ws, {"op": "complete", "id": 1, **ref, "result": 7})
        await send(ws, {"op": "complete", "id": 2, **ref, "result": 8})
        (first, second), _ = await receive_flat(ws, 2)
        assert (first["id"], first["code"]) == (1, "not_assigned"), first
        assert "before its outcome was stored" in first["message"]
        assert (second["id"], second["code"]) == (2, "not_assigned"), second
        stored = await s.runtime.get_job(job.id)
        assert stored.state is JobState.RUNNING and stored.result is None  # nothing of it


async def test_jobs_wait_for_a_free_slot_of_a_worker_serving_their_kind(tmp_path: Path) -> None:
    async with served(tmp_path / "db", "in_process", in_process_handlers=False) as s:
        rt = s.runtime
        with pytest.raises(UnknownKindError):  # nobody serves it: refused, nothing stored
            await rt.create_job("nope", "alice", {"n": 1})
        assert (await rt.get_stats())["total"] == 0
        # Registered for its input check only and no worker connected: it waits.
        first = await rt.create_job("steps", "alice", {"n": 1})
        await trio.sleep(0.3)
        assert (await rt.get_job(first.id)).state is JobState.CREATED
        async with raw_worker(s.running.url, ["steps"], capacity=1) as ws:
            assign = await receive(ws, "assign")  # claimed once a worker connects
            assert (assign["job_id"], assign["attempt"]) == (first.id, 1)
            second = await rt.create_job("steps", "alice", {"n": 2})
            await trio.sleep(0.3)  # the one slot is taken: the second job waits
            assert (await rt.get_job(second.id)).state is JobState.CREATED
            ref = {"job_id": first.id, "attempt": 1}
            await send(ws, {"op": "complete", "id": 1, **ref, "result": {"ok": 1}})
            assign = await receive(ws, "assign")  # the freed slot takes the next job
            assert (assign["job_id"], assign["attempt"]) == (second.id, 1)
            # Input is still checked by the registered handler's rules where there are any.
            assert rt.kinds == sorted(HANDLER_KINDS)


async def test_a_slot_that_serves_two_kinds_is_claimed_once(tmp_path: Path) -> None:
    async with served(tmp_path / "db", "in_process", in_process_handlers=False) as s:
        rt = s.runtime
        jobs = [await rt.create_job(kind, "alice", None) for kind in ("silent", "spin")]
        async with raw_worker(s.running.url, ["silent", "spin"], capacity=1) as ws:
            assign = await receive(ws, "assign")
            assert assign["job_id"] == jobs[0].id  # the older one
            await trio.sleep(0.3)
            other = await rt.get_job(jobs[1].id)
            # Waiting, never claimed: no attempt started and sent back for want of a slot.
            assert (other.state, other.attempt) == (JobState.CREATED, 0)
            assert [e.type.value for e in await rt.read_events(other.id)] == ["created"]


async def test_a_claim_whose_worker_is_gone_goes_back_to_waiting(tmp_path: Path) -> None:
    async with served(tmp_path / "db", "in_process", in_process_handlers=False) as s:
        rt = s.runtime
        job = await rt.create_job("steps", "alice", {"n": 1})
        # As the dispatcher does: the start is stored, then the slot it counted on is gone
        # (the worker disconnected meanwhile) when the attempt is launched.
        started = await rt._store.start(job.id)
        await rt.supervisor.launch(started, started.checkpoint)
        back = await rt.get_job(job.id)
        assert back.state is JobState.CREATED and back.owner is None
        assert (back.attempt, back.failed_attempts, back.recovery_attempts) == (1, 0, 0)
        last = (await rt.read_events(job.id))[-1]
        assert last.type.value == "recovery"
        assert last.data == {
            "reason": "worker_gone",
            "recovery_attempts": 0,
            "checkpoint_version": 0,
            "requeued": True,
        }
        async with raw_worker(s.running.url, ["steps"]) as ws:
            assign = await receive(ws, "assign")  # the next attempt, on the next worker
            assert (assign["job_id"], assign["attempt"]) == (job.id, 2)


async def test_a_dropped_connection_loses_its_jobs_at_once(tmp_path: Path) -> None:
    async with served(tmp_path / "db", "in_process", in_process_handlers=False) as s:
        rt = s.runtime
        async with raw_worker(s.running.url, ["steps"]) as ws:
            job = await rt.create_job("steps", "alice", {"n": 1})
            await receive(ws, "assign")
            await send(
                ws, {"op": "checkpoint", "id": 1, "job_id": job.id, "attempt": 1, "data": {"i": 7}}
            )
            assert (await receive(ws, "reply"))["id"] == 1
        with trio.fail_after(2):  # far sooner than heartbeat_timeout (30 s)
            recovered = await wait_for_state(rt, job.id, {JobState.PAUSED})
        assert recovered.pause_reason == "recovery" and recovered.checkpoint == {"i": 7}


async def test_a_dropped_connection_retries_a_job_with_no_checkpoint_and_attempts_left(
    tmp_path: Path,
) -> None:
    """A worker gone (killed) before its attempt's first checkpoint, after naming it: that
    attempt is a failed attempt of type ``Stalled`` by the stall rule the server applies to
    any stall, and the job (``flaky``: 3 attempts) goes back to the queue for the next worker.
    (One it never named goes back uncounted: ``tests/test_worker_gone.py``.)"""
    async with served(tmp_path / "db", "in_process", in_process_handlers=False) as s:
        rt = s.runtime
        async with raw_worker(s.running.url, ["flaky"]) as ws:
            job = await rt.create_job("flaky", "alice", {"n": 1, "succeed_at": 1})
            await receive(ws, "assign")
            await send(ws, {"op": "heartbeat", "jobs": [{"job_id": job.id, "attempt": 1}]})
            await eventually(lambda: rt.supervisor.workers[job.id].handler.started)
        with trio.fail_after(2):  # far sooner than heartbeat_timeout (30 s)
            back = await wait_for_state(rt, job.id, {JobState.CREATED})
        assert (back.failed_attempts, back.recovery_attempts) == (1, 1)
        last = (await rt.read_events(job.id))[-1]
        assert last.type.value == "retrying"
        assert last.data["error"]["type"] == "Stalled"
        assert "connection closed" in last.data["error"]["message"]
        async with raw_worker(s.running.url, ["flaky"]) as ws:
            assign = await receive(ws, "assign")  # after the kind's backoff
            assert (assign["job_id"], assign["attempt"]) == (job.id, 2)


async def test_a_worker_that_stops_sending_is_closed_and_its_jobs_recovered(
    tmp_path: Path,
) -> None:
    async with served(
        tmp_path / "db", "in_process", in_process_handlers=False, heartbeat_timeout=0.5
    ) as s:
        rt = s.runtime
        async with raw_worker(s.running.url, ["steps"]) as ws:
            job = await rt.create_job("steps", "alice", {"n": 1})
            await receive(ws, "assign")
            # Nothing more is sent or read: a hung process with its socket open. It never
            # named the attempt: the job goes back to the queue, nothing counted.
            with trio.fail_after(5):
                back = await wait_for_state(rt, job.id, {JobState.CREATED})
            assert back.failed_attempts == 0, back
            assert await closed_with(ws) == CLOSE["worker_stalled"] == 4011
        assert s.running.server.workers.workers == []


async def test_a_worker_written_from_the_document(tmp_path: Path) -> None:
    async with served(tmp_path / "db", "in_process", in_process_handlers=False) as s:
        rt = s.runtime
        plain = Path(__file__).with_name("plain_worker.py")
        async with trio.open_nursery() as nursery:
            command = [sys.executable, str(plain), s.running.url, worker_token("plain")]
            run = partial(trio.run_process, command, check=False, stderr=subprocess.PIPE)
            process: trio.Process = await nursery.start(run)
            await wait_connected(s.running)
            job = await rt.create_job("count", "alice", {"n": 3})
            assert job.max_attempts == 2  # as the worker declared
            done = await wait_for_state(rt, job.id)
            assert done.state is JobState.COMPLETED, done
            assert done.result == {"counted": 3, "resumed_at": 0}
            assert done.checkpoint == {"i": 3} and done.progress == 100
            # Pause: it checkpoints within the grace and stops; resume continues from there.
            job = await rt.create_job("count", "alice", {"n": 1000, "delay": 0.01})
            await wait_checkpoint(rt, job.id, 3)
            paused = await rt.pause(job.id)
            assert paused.state is JobState.PAUSED and paused.checkpoint["i"] >= 3
            await rt.resume(job.id)
            await trio.sleep(0.2)
            cancelled = await rt.cancel(job.id)
            assert cancelled.state is JobState.CANCELLED
            process.terminate()


async def wait_no_worker(running: Any) -> None:
    with trio.fail_after(10):
        while running.server.workers.workers:  # noqa: ASYNC110 - no event for it
            await trio.sleep(0.01)


@asynccontextmanager
async def worker_only_server(db: Path) -> AsyncIterator[Any]:
    """A server with no handler of its own: every kind runs only in connected workers."""
    config = RuntimeConfig(stop_grace=0.5, sqlite_synchronous="NORMAL")
    async with open_server(db, ServerConfig(secret=SECRET, port=0), runtime_config=config) as r:
        yield r


async def test_a_worker_only_kind_runs_with_the_options_its_worker_declares(
    tmp_path: Path,
) -> None:
    """``jobspine worker``'s hello carries each handler's ``@kind_options``: a kind the
    server has no handler or options for is stored with the declared ``max_attempts`` and
    retried with the declared policy."""
    async with worker_only_server(tmp_path / "db") as running, trio.open_nursery() as nursery:
        rt = running.runtime
        worker = WorkerProcess(running.url, worker_token(), HANDLERS, concurrency=2)
        nursery.start_soon(worker.run)
        await wait_connected(running)
        assert rt.kind_options("flaky") == options_of(HANDLERS["flaky"])
        job = await rt.create_job("flaky", "alice", {"n": 2, "succeed_at": 3})
        assert job.max_attempts == 3
        done = await wait_for_state(rt, job.id)
        assert done.state is JobState.COMPLETED, done
        assert done.result == {"attempt": 3, "from": 2}
        assert (await event_types(rt, job.id)).count("retrying") == 2
        nursery.cancel_scope.cancel()


async def test_a_worker_only_kinds_input_check_runs_in_its_worker(tmp_path: Path) -> None:
    """The server has no code of a kind only workers serve: ``jobspine worker`` runs the
    handler's ``@validates`` check before the handler, and input it refuses fails the job at
    once (``InvalidInputError``, no retry, the handler never ran); good input runs."""
    async with worker_only_server(tmp_path / "db") as running, trio.open_nursery() as nursery:
        rt = running.runtime
        worker = WorkerProcess(running.url, worker_token(), HANDLERS, concurrency=2)
        nursery.start_soon(worker.run)
        await wait_connected(running)
        bad = await rt.create_job("counted", "alice", {"n": 3000})
        failed = await wait_for_state(rt, bad.id)
        assert failed.state is JobState.FAILED and failed.attempt == 1, failed
        assert failed.error is not None and failed.error.type == "InvalidInputError"
        assert "n must be in 1..100" in failed.error.message
        assert "progress" not in await event_types(rt, bad.id)
        # A check that trips over the input (a KeyError) refuses it; the worker serves on.
        tripped = await wait_for_state(rt, (await rt.create_job("counted", "alice", {})).id)
        assert tripped.state is JobState.FAILED and tripped.error is not None
        assert tripped.error.message == "counted: invalid input: KeyError: 'n'"
        good = await rt.create_job("counted", "alice", {"n": 3})
        assert (await wait_for_state(rt, good.id)).result == {"counted": 3}
        nursery.cancel_scope.cancel()


async def test_a_declared_kind_stays_known_while_no_worker_serves_it(tmp_path: Path) -> None:
    """PROTOCOL.md section 9: create, resume and restart of a kind a worker declared are
    never refused for want of a worker: the job waits, with the declared options; a kind
    never registered nor declared is ``unknown_kind`` and nothing is stored."""
    async with worker_only_server(tmp_path / "db") as running:
        rt = running.runtime
        flaky = {"max_attempts": 3, "retry": {"initial_interval": 0.05, "maximum_interval": 0.1}}
        async with raw_worker(running.url, ["flaky"], capacity=1, options={"flaky": flaky}) as ws:
            failed = await rt.create_job("flaky", "alice", {"n": 1, "succeed_at": 9})
            assign = await receive(ws, "assign")
            error = {"type": "RuntimeError", "message": "no"}
            ref = {"job_id": failed.id, "attempt": assign["attempt"]}
            await send(ws, {"op": "fail", "id": 1, **ref, "error": error, "permanent": True})
            assert (await wait_for_state(rt, failed.id)).state is JobState.FAILED
            paused = await rt.create_job("flaky", "alice", {"n": 1, "succeed_at": 1})
            await receive(ws, "assign")
            await rt.pause(paused.id)
            stop = await receive(ws, "stop")
            await send(
                ws, {"op": "stopped", "id": 2, "job_id": paused.id, "attempt": stop["attempt"]}
            )
            assert (await wait_for_state(rt, paused.id, {JobState.PAUSED})).state is JobState.PAUSED
        await wait_no_worker(running)
        created = await rt.create_job("flaky", "alice", {"n": 1, "succeed_at": 1})
        assert created.state is JobState.CREATED and created.max_attempts == 3
        assert (await rt.restart(failed.id)).state is JobState.CREATED
        assert (await rt.resume(paused.id)).state is JobState.CREATED
        total = (await rt.get_stats())["total"]
        with pytest.raises(UnknownKindError):
            await rt.create_job("never", "alice", {})
        assert (await rt.get_stats())["total"] == total
        await trio.sleep(0.3)  # no worker: they wait
        for job_id in (created.id, failed.id, paused.id):
            assert (await rt.get_job(job_id)).state is JobState.CREATED


async def test_conflicting_option_declarations_are_refused(tmp_path: Path) -> None:
    """One kind runs with one set of options: a hello declaring other options for a kind a
    connected worker serves closes 4002 (nothing changes); the same options are accepted;
    once no worker serves the kind, a new declaration replaces the old one. The server's own
    options (a handler registered in it) win over any declaration."""
    three, two = {"flaky": {"max_attempts": 3}}, {"flaky": {"max_attempts": 2}}
    async with worker_only_server(tmp_path / "db") as running:
        rt, url = running.runtime, running.url
        async with raw_worker(url, ["flaky"], options=three):
            async with open_websocket_url(url + "/worker") as ws:
                hello = {"op": "hello", "token": worker_token(), "kinds": ["flaky"], "capacity": 1}
                await send(ws, {**hello, "options": two})
                assert await closed_with(ws) == 4002
            async with open_websocket_url(url + "/worker") as ws:
                await send(ws, hello)  # no options: the defaults, which differ too
                assert await closed_with(ws) == 4002
            assert len(running.server.workers.workers) == 1
            assert rt.kind_options("flaky").max_attempts == 3
            async with raw_worker(url, ["flaky"], options=three):
                assert len(running.server.workers.workers) == 2
        await wait_no_worker(running)
        async with raw_worker(url, ["flaky"], options=two):
            assert rt.kind_options("flaky").max_attempts == 2
    async with (
        served(tmp_path / "db2", "in_process", in_process_handlers=False) as s,
        raw_worker(s.running.url, ["flaky"], options=two),
    ):
        assert s.runtime.kind_options("flaky") == options_of(HANDLERS["flaky"])
        job = await s.runtime.create_job("flaky", "alice", {"n": 1, "succeed_at": 1})
        assert job.max_attempts == 3


async def test_jobspine_worker_refused_for_its_options_says_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``jobspine worker`` whose ``@kind_options`` differ from a connected worker's: one line
    with the server's reason and exit status 2 (its code, not its token, is at fault), and a
    warning in the server's log."""
    async with (
        worker_only_server(tmp_path / "db") as running,
        raw_worker(running.url, ["flaky"], options={"flaky": {"max_attempts": 2}}),
    ):
        status, err = await run_jobspine_worker(running.url, worker_token())
    assert status == 2, err
    assert err.strip() == (
        "jobspine: error: the server refused this worker's hello: hello: options.flaky differ"
        " from those a connected worker declared for it; one kind runs with one set of options"
    )
    assert "refused a worker's hello (w): options.flaky differ" in caplog.text


async def test_jobspine_worker_gives_up_on_a_url_it_cannot_use() -> None:
    """Its first connection waits ``--connect-timeout``, as the client commands' do, then it
    exits 4 saying why; an HTTP answer that is no websocket endpoint (a health port) stops
    it at once. Before, it retried for ever, logging the HTTP answer's raw tuple."""
    with trio.socket.socket() as sock:  # a port nothing listens on
        await sock.bind(("127.0.0.1", 0))
        dead = sock.getsockname()[1]
    start = trio.current_time()
    status, err = await run_jobspine_worker(
        f"ws://127.0.0.1:{dead}", worker_token(), "--connect-timeout", "1"
    )
    assert status == 4, err
    assert f"cannot connect to ws://127.0.0.1:{dead}/worker within 1 s (" in err, err
    # The timeout and the start of a Python process: the last backoff stops at the timeout.
    assert "is the server running?" in err and trio.current_time() - start < 4

    async def not_found(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)
        await stream.send_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, not_found, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        status, err = await run_jobspine_worker(f"ws://127.0.0.1:{port}", worker_token())
        nursery.cancel_scope.cancel()
    assert status == 4, err
    assert "answered HTTP 404: it is not a jobspine server's websocket port" in err, err
    for bad in ("http://127.0.0.1:1", "ws://127.0.0.1:99999", "ws://[::1"):  # at once
        status, err = await run_jobspine_worker(bad, worker_token())
        assert status == 4 and "Traceback" not in err, err
        assert "use ws://HOST:PORT" in err


async def test_a_refused_hello_is_logged_on_one_short_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The server's warning quotes what was wrong, which may be the worker's own text (an
    options key): escaped and cut, it forges no line and floods no log."""
    forged = "k1\n2026-11-30 10:00:00,000 WARNING jobspine: FORGED\x1b[2J" + "x" * 100_000
    async with (
        worker_only_server(tmp_path / "db") as running,
        open_websocket_url(running.url + "/worker") as ws,
    ):
        hello = {"op": "hello", "token": worker_token(), "kinds": ["k1"], "capacity": 1}
        await send(ws, {**hello, "options": {forged: {}}})
        assert await closed_with(ws) == 4002
    (record,) = [r for r in caplog.records if "refused a worker's hello" in r.getMessage()]
    line = record.getMessage()
    assert line.isprintable() and len(line) < 400, line[:500]
    assert "FORGED\\x1b[2J" in line


async def test_the_kinds_workers_declare_are_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Declared kinds stay known after their workers leave, so their number is bounded: a
    hello that would pass the bound with every kind nothing holds forgotten is refused for
    now (1013, try again later; nothing changes); kinds known already may be declared again;
    once the workers serving them left, the least recently used are forgotten to make room.
    The connect log line names a few kinds and counts the rest."""
    monkeypatch.setattr(actors._supervisor, "MAX_DECLARED_KINDS", 3)
    caplog.set_level("INFO", logger="jobspine.workers")
    async with worker_only_server(tmp_path / "db") as running:
        rt = running.runtime
        async with raw_worker(running.url, ["a", "b"]):
            async with open_websocket_url(running.url + "/worker") as ws:
                hello = {"op": "hello", "token": worker_token(), "kinds": ["c", "d"], "capacity": 1}
                await send(ws, hello)
                assert await closed_with(ws) == 1013
            with pytest.raises(UnknownKindError):
                await rt.create_job("c", "alice", {})
            async with raw_worker(running.url, ["b", "a", "c"]):
                await rt.create_job("c", "alice", {})
        await wait_no_worker(running)
        for kind in ("c", "a", "b"):  # used in this order: "c" the least recently
            await rt.create_job(kind, "alice", {})
        async with raw_worker(running.url, ["d"]):
            pass
        with pytest.raises(UnknownKindError):
            await rt.create_job("c", "alice", {})
        for kind in ("a", "b", "d"):
            await rt.create_job(kind, "alice", {})
    assert "2 new kinds would make more than 3 known from workers' declarations" in caplog.text
    assert shown_names([f"k{i}" for i in range(10)], 8) == (
        "k0, k1, k2, k3, k4, k5, k6, k7 and 2 more"
    )
    assert shown_names(["x" * 100], 8) == f"'{'x' * 64}'… (100 characters)"


def test_a_worker_batch_frame_fits_its_limits() -> None:
    one = orjson.dumps({"op": "progress", "id": 1, "job_id": "j", "attempt": 1, "progress": 1})
    frame, count = _batch_frame([one])
    assert (frame, count) == (one.decode(), 1)  # alone: a plain request
    frame, count = _batch_frame([one] * 3)
    assert count == 3 and orjson.loads(frame) == {
        "op": "batch",
        "requests": [orjson.loads(one)] * 3,
    }
    # At most BATCH_BYTES, at most MAX_BATCH_REQUESTS; a larger request goes alone.
    frame, count = _batch_frame([one] * 5000)
    assert count == min(MAX_BATCH_REQUESTS, count) and len(frame) <= BATCH_BYTES
    assert 1 < count < 5000
    big = b'"' + b"x" * BATCH_BYTES + b'"'
    assert _batch_frame([big, one]) == (big.decode(), 1)
    assert _batch_frame([one, big])[1] == 1


async def test_a_worker_sends_a_burst_of_reports_in_few_frames(tmp_path: Path) -> None:
    """Reports made while a frame is being sent go out together in the next one: each
    caller's send returns once its own report is out, none is sent twice, and the server
    reads them all."""
    async with served(tmp_path / "db", "in_process", in_process_handlers=False) as s:
        process = WorkerProcess(s.running.url, worker_token(), {})
        async with open_websocket_url(s.running.url + "/worker") as ws:
            hello = {"op": "hello", "id": 0, "token": worker_token(), "kinds": ["x"], "capacity": 1}
            await send(ws, hello)
            assert (await receive(ws))["result"]["batch"] is True
            frames: list[str] = []
            real_send = ws.send_message

            async def counting_send(message: str | bytes) -> None:
                assert isinstance(message, str)
                frames.append(message)
                await real_send(message)

            ws.send_message = counting_send  # type: ignore[method-assign]
            session = _Session(process, ws)
            session.batch = True
            returned: list[int] = []

            async def report(i: int) -> None:
                # A checkpoint of a job this worker does not run: refused, with this id.
                ref = {"job_id": f"j{i}", "attempt": 1}
                await session.send({"op": "checkpoint", "id": i, **ref, "data": {}})
                returned.append(i)

            async with trio.open_nursery() as nursery:
                for i in range(200):
                    nursery.start_soon(report, i)
            assert sorted(returned) == list(range(200))
            assert session._sent == 200 and not session._outgoing
            sent = [orjson.loads(frame) for frame in frames]
            ids = [r["id"] for m in sent for r in (m["requests"] if m["op"] == "batch" else [m])]
            assert sorted(ids) == list(range(200))  # each once
            assert len(frames) < 20  # most went out together
            answers, _ = await receive_flat(ws, 200)
            assert sorted(a["id"] for a in answers) == list(range(200))
            assert {a["code"] for a in answers} == {"not_assigned"}


async def committed(rt: Any, job_id: str, progress: float) -> Any:
    """The job once its progress ``progress`` is committed (a progress is answered once
    ordered, before its commit; reads see committed state)."""
    with trio.fail_after(10):
        while (job := await rt.get_job(job_id)).progress != progress:  # noqa: ASYNC110
            await trio.sleep(0.01)
    return job


def nested(lists: int) -> Any:
    """``lists`` arrays, each holding the next (the innermost holds 1)."""
    value: Any = 1
    for _ in range(lists):
        value = [value]
    return value


async def test_a_jobs_reports_are_served_in_the_order_they_came(tmp_path: Path) -> None:
    """In one batch or pipelined in frames of their own, one job's checkpoints and its
    ``stopped`` reach the store in order: the job pauses at the last checkpoint."""
    async with served(tmp_path / "db", "in_process", in_process_handlers=False) as s:
        rt = s.runtime
        async with raw_worker(s.running.url, ["steps"], batch=True) as ws:
            for batched in (True, False):
                job = await rt.create_job("steps", "alice", {"n": 1})
                await receive(ws, "assign")
                ref = {"job_id": job.id, "attempt": 1}
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(rt.pause, job.id)
                    assert (await receive(ws, "stop"))["job_id"] == job.id
                    requests: list[Any] = [
                        {"op": "checkpoint", "id": i, **ref, "data": {"i": i}} for i in range(1, 21)
                    ]
                    requests.append({"op": "progress", "id": 98, **ref, "progress": 70})
                    requests.append({"op": "stopped", "id": 99, **ref})
                    if batched:
                        await send(ws, {"op": "batch", "requests": requests})
                    else:
                        for request in requests:
                            await send(ws, request)
                    answers, _ = await receive_flat(ws, len(requests))
                assert [a["type"] for a in answers] == ["reply"] * len(requests)
                assert [a["id"] for a in answers] == [*range(1, 21), 98, 99]
                paused = await wait_for_state(rt, job.id, {JobState.PAUSED})
                assert paused.checkpoint == {"i": 20} and paused.progress == 70


async def test_each_request_of_a_batch_is_read_as_strictly_as_alone(tmp_path: Path) -> None:
    """What strict reading refuses in one request of a batch (a value out of range, a key
    given twice, nesting too deep) refuses that request alone, with its own id; the others
    are served. A request as deep as a frame of its own may be is served in a batch too."""
    async with assigned_steps_job(tmp_path) as (s, ws, job):
        rt = s.runtime
        ref = f'"job_id":"{job.id}","attempt":1'
        # With its data in MAX_DEPTH - 1 arrays a request is MAX_DEPTH levels deep: as
        # deep as a frame of its own may be (the batch's envelope adds two levels).
        deepest, too_deep = (orjson.dumps(nested(n)).decode() for n in (MAX_DEPTH - 1, MAX_DEPTH))

        items = [
            '{"op":"progress","id":1,' + ref + ',"progress":1,"progress":2}',
            '{"op":"progress","id":2,' + ref + ',"progress":9223372036854775808}',
            '{"op":"progress","id":3,' + ref + ',"progress":1,"step":"\\ud800"}',
            '{"op":"progress","id":4,' + ref + ',"progress":1e400}',
            '{"op":"checkpoint","id":5,' + ref + ',"data":' + too_deep + "}",
            '{"op":"checkpoint","id":6,' + ref + ',"data":' + deepest + "}",
            '{"op":"progress","id":7,' + ref + ',"progress":40,"step":"kept"}',
            '{"op":"progress","id":8,"id":9,' + ref + ',"progress":1}',
        ]
        await ws.send_message('{"op":"batch","requests":[' + ",".join(items) + "]}")
        got, _ = await answers_by_id(ws, len(items))
        assert got == {
            1: "bad_request",
            2: "invalid_input",
            3: "invalid_input",
            4: "invalid_input",
            5: "invalid_input",
            6: "reply",
            7: "reply",
            None: "bad_request",  # its id is the key given twice: not echoed
        }
        stored = await committed(rt, job.id, 40)
        assert (stored.step, stored.checkpoint) == ("kept", nested(MAX_DEPTH - 1))


class HeldSocket:
    """A connection's sending end that holds every frame until ``release`` is set, then
    keeps it (decoded) in ``frames``."""

    def __init__(self, release: trio.Event) -> None:
        self.release = release
        self.frames: list[Any] = []

    async def send_message(self, message: str) -> None:
        await self.release.wait()
        self.frames.append(orjson.loads(message))


async def test_a_cancelled_report_is_taken_back_before_it_is_sent() -> None:
    """A caller cancelled while another's frame is going out takes its message back; the
    messages queued with it are sent, each once, and their callers return."""
    release = trio.Event()
    socket = HeldSocket(release)
    frames = socket.frames

    session = _Session(WorkerProcess("ws://unused", "t", {}), socket)  # type: ignore[arg-type]
    session.batch = True
    returned: list[int] = []

    async def report(i: int) -> None:
        await session.send({"op": "heartbeat", "jobs": [], "id": i})
        returned.append(i)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(report, 0)
        await trio.testing.wait_all_tasks_blocked()  # 0 holds the lock, its frame going out
        with trio.CancelScope() as cancelled:
            nursery.start_soon(report, 1)
            nursery.start_soon(report, 2)
            await trio.testing.wait_all_tasks_blocked()
            async with trio.open_nursery() as inner:
                inner.start_soon(report, 3)
                await trio.testing.wait_all_tasks_blocked()
                inner.cancel_scope.cancel()  # 3 is taken back
            cancelled.cancel()
        release.set()
    ids = [r["id"] for f in frames for r in (f["requests"] if f["op"] == "batch" else [f])]
    assert sorted(ids) == [0, 1, 2] and sorted(returned) == [0, 1, 2]
    assert not session._outgoing and session._sent == 3


async def test_a_jobspine_worker_batch_with_a_deep_checkpoint_completes(tmp_path: Path) -> None:
    """Reports of one handler at once go out in one batch frame; a checkpoint as deep as a
    frame of its own may be is served in it, and the job completes."""

    async def handler(ctx: JobContext, input: Any) -> Any:
        async with trio.open_nursery() as nursery:  # the last two go out together
            nursery.start_soon(ctx.progress, 10.0)
            nursery.start_soon(ctx.progress, 20.0)
            nursery.start_soon(ctx.checkpoint, nested(MAX_DEPTH - 1))
        return {"ok": True}

    async with served(tmp_path / "db", "in_process", in_process_handlers=False) as s:
        async with trio.open_nursery() as nursery:
            process = WorkerProcess(s.running.url, worker_token(), {"deep": handler})
            nursery.start_soon(process.run)
            await wait_connected(s.running)
            job = await s.runtime.create_job("deep", "alice", {})
            done = await wait_for_state(s.runtime, job.id)
            nursery.cancel_scope.cancel()
        assert done.state is JobState.COMPLETED and done.checkpoint == nested(MAX_DEPTH - 1)


async def test_a_worker_that_stops_reading_mid_frame_sees_the_connection_drop(
    tmp_path: Path,
) -> None:
    """Past 32 MiB queued, a worker that does not read is closed; the frame being sent was
    cut off, so nothing follows it (no close frame spliced into it): the worker, reading at
    last, sees the connection drop, not garbage. (Error replies quote a request's values
    bounded, so assignments fill the queue: each carries its job's input.)"""
    async with served(tmp_path / "db", "in_process", in_process_handlers=False) as s:
        async with raw_worker(s.running.url, ["steps"], capacity=64, batch=True) as ws:
            pad = "x" * 1_000_000  # each assignment carries its input: 1 MB apiece
            for _ in range(48):
                await s.runtime.create_job("steps", "alice", {"pad": pad})
            await eventually(lambda: not s.running.server.worker_connections, 30)
            with trio.fail_after(10):
                with pytest.raises(ConnectionClosed) as closed:
                    while True:
                        message = orjson.loads(await ws.get_message())
                        assert message["type"] in ("assign", "batch"), message
            reason = closed.value.reason
            assert reason is not None and reason.code == 1006
        async with raw_worker(s.running.url, ["steps"]):  # the server serves on
            pass


@asynccontextmanager
async def held_checkpoints(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[None]:
    """Checkpoint writes wait (a slow database) until the body ends."""
    opened = trio.Event()
    write = actors._worker.JobContext.checkpoint

    async def held(ctx: actors._worker.JobContext, data: Any) -> None:
        await opened.wait()
        await write(ctx, data)

    monkeypatch.setattr(actors._worker.JobContext, "checkpoint", held)
    try:
        yield
    finally:
        opened.set()


async def test_reports_waiting_past_their_byte_bound_are_refused_busy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker flooding one job with reports while the database is slow: what waits to be
    served is bounded by the bytes of the frames it came in; past it a report gets ``busy``
    with its id, and what was accepted is served in order."""
    monkeypatch.setattr(transport._workers, "MAX_WAITING_BYTES", 3000)
    async with assigned_steps_job(tmp_path) as (s, ws, job):
        rt = s.runtime
        ref = {"job_id": job.id, "attempt": 1}
        requests = [
            {"op": "checkpoint", "id": i, **ref, "data": {"i": i, "pad": "x" * 40}}
            for i in range(100)
        ]
        async with held_checkpoints(monkeypatch):
            for request in requests:
                await send(ws, request)
            busy, _ = await answers_by_id(ws, 30)  # answered at once: nothing was stored
            assert set(busy.values()) == {"busy"}
        answers, _ = await answers_by_id(ws, len(requests) - len(busy))
        answers.update(busy)
        accepted = [i for i in range(100) if answers[i] == "reply"]
        assert {answers[i] for i in range(100)} == {"reply", "busy"}
        assert accepted == list(range(len(accepted))) and 10 < len(accepted) < 70
        stored = await rt.get_job(job.id)
        assert stored.checkpoint == {"i": accepted[-1], "pad": "x" * 40}
        # Once served, the bound is free again.
        await send(ws, {"op": "progress", "id": "p", **ref, "progress": 5})
        assert (await receive(ws))["id"] == "p"


async def test_a_worker_gives_up_at_its_connect_timeout_not_after_a_last_backoff() -> None:
    """Nothing listens: the retries' backoff grows, and the last wait ends at the timeout
    (``--connect-timeout 3`` took 5.3 to 5.9 s)."""

    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        dead = sock.getsockname()[1]
    for timeout in (3, 5):  # past the 4th and the 5th retry, whose backoff ran 2 and 5 s over
        process = WorkerProcess(
            f"ws://127.0.0.1:{dead}", worker_token(), {}, connect_timeout=timeout
        )
        start = trio.current_time()
        with pytest.raises(WorkerFatalError, match=f"within {timeout} s"):
            await process.run()
        assert timeout <= trio.current_time() - start < timeout + 0.5


async def test_a_worker_handler_fenced_out_by_a_cancel_ends_without_a_traceback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """In a worker process as in the server: the job is cancelled before its worker is
    stopped, the handler's next report is refused (the attempt is over) and propagates. One
    line, no traceback (there were 9 in 18 s of clients racing cancels and restarts)."""
    go = trio.Event()

    async def reporting(ctx: JobContext, input: Any) -> Any:
        await go.wait()
        await ctx.checkpoint({"at": 1})

    async with (
        served(tmp_path / "db", "in_process", in_process_handlers=False) as s,
        trio.open_nursery() as nursery,
    ):
        process = WorkerProcess(s.running.url, worker_token(), {"reporting": reporting})
        nursery.start_soon(process.run)
        await wait_connected(s.running)
        job = await s.runtime.create_job("reporting", "alice", {})
        await wait_for_state(s.runtime, job.id, {JobState.RUNNING})
        await s.runtime._store.cancel(job.id, "bob")  # stored; the worker not told yet
        with caplog.at_level(logging.INFO, logger="jobspine"):
            go.set()
            await eventually(lambda: not process.session or not process.session.attempts)
        nursery.cancel_scope.cancel()
    ended = [r.getMessage() for r in caplog.records if " ended: " in r.getMessage()]
    assert ended and ended[0].startswith(f"job {job.id} attempt 1 ended: "), ended
    assert all(r.exc_info is None for r in caplog.records), [
        r.getMessage() for r in caplog.records if r.exc_info
    ]


def test_a_worker_url_may_name_the_worker_endpoint() -> None:
    """The worker logs the endpoint's URL (``…/worker``); given back as ``--url`` it reached
    ``/worker/worker``, the client endpoint, which refused the hello ("unknown field 'batch'")."""
    for url in ("ws://h:1", "ws://h:1/", "ws://h:1/worker", "ws://h:1/worker/"):
        assert WorkerProcess(url, "t", {}).url == "ws://h:1/worker", url


async def test_the_hello_reply_reaches_a_worker_first_and_alone(tmp_path: Path) -> None:
    """Whatever is sent to a worker the moment its slots appear (the launches of a claim,
    placed on the worker with the most free slots, which a worker that just connected is)
    comes after the hello's reply, never before it or in one batch with it. Before, such a
    launch could share the reply's frame: ``jobspine worker`` read a batch as its welcome,
    exited, and the jobs assigned in it failed (a flaky fanout of the bench smoke test)."""
    async with served(tmp_path / "db", "in_process", in_process_handlers=False) as s:
        placement = s.running.server.workers

        def send_at_once() -> None:  # a launch's assignment, as soon as a slot is free
            for worker in placement.workers:
                if worker.free:
                    worker.link.send({"type": "cancel", "job_id": "x", "attempt": 1})

        s.runtime.supervisor.capacity_listeners.append(send_at_once)
        async with open_websocket_url(s.running.url + "/worker") as ws:
            hello = {"op": "hello", "id": "h", "token": worker_token(), "kinds": ["steps"],
                     "capacity": 2, "batch": True}  # fmt: skip
            await send(ws, hello)
            with trio.fail_after(10):
                first = orjson.loads(await ws.get_message())
            assert (first["type"], first.get("id")) == ("reply", "h"), first
            (sent,), _ = await receive_flat(ws, 1)
            assert sent == {"type": "cancel", "job_id": "x", "attempt": 1}


WELCOME = {"type": "reply", "id": 0, "result": {"heartbeat_interval": 1.0, "stop_grace": 1.0}}


async def worker_against(first_frame: dict[str, Any]) -> tuple[list[Any], BaseException | None]:
    """A ``WorkerProcess`` against a server that answers its hello with ``first_frame``: the
    requests it then sends (a second), and the error its run ended with."""
    received: list[Any] = []

    async def serve(request: WebSocketRequest) -> None:
        ws = await request.accept()
        await ws.get_message()
        await ws.send_message(orjson.dumps(first_frame).decode())
        with suppress(ConnectionClosed), trio.move_on_after(1):
            while True:
                received.append(orjson.loads(await ws.get_message()))

    ended: BaseException | None = None
    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve_websocket, serve, "127.0.0.1", 0, None)
        worker = WorkerProcess(f"ws://127.0.0.1:{server.port}", worker_token(), HANDLERS)
        with trio.move_on_after(1.5):
            try:
                await worker.run()
            except WorkerFatalError as exc:
                ended = exc
        nursery.cancel_scope.cancel()
    flat = [r for m in received for r in (m["requests"] if m.get("op") == "batch" else [m])]
    return flat, ended


async def test_a_worker_whose_server_does_not_welcome_it_says_so() -> None:
    """A first frame that is not the hello's reply is refused as for a URL that is no
    jobspine endpoint, the frame quoted: not a ``KeyError`` that took the worker process
    down. A reply batched with the first assignments (as a server could send before the reply
    went out alone) is a welcome, and the assignments run."""
    for first in ({"type": "batch", "messages": [{"type": "cancel"}]}, {"type": "reply", "id": 0}):
        _, ended = await worker_against(first)
        assert isinstance(ended, WorkerFatalError) and ended.code == "not_jobspine", ended
        assert "first frame is not the hello's reply: '{\"type\":" in str(ended)
    assign = {"type": "assign", "job_id": "j", "attempt": 1, "kind": "steps", "user_id": "u",
              "input": {"n": 1}, "checkpoint": None}  # fmt: skip
    sent, ended = await worker_against({"type": "batch", "messages": [WELCOME, assign]})
    assert ended is None
    assert [r["op"] for r in sent if r["op"] != "heartbeat"][:1] == ["progress"], sent


async def test_a_heartbeat_never_names_an_attempt_whose_outcome_is_on_its_way() -> None:
    """Once an attempt's outcome is queued, the server takes the attempt off the worker when
    it reads it: a heartbeat sent after it that still named the attempt was refused
    (``not_assigned``, logged), and with the next assignment already running, named more jobs
    than the worker's capacity, which refused the whole heartbeat."""
    release = trio.Event()
    socket = HeldSocket(release)
    frames = socket.frames
    named = trio.Event()
    named.set()
    naming = HeldSocket(named)  # the heartbeat naming the attempt goes out before it runs

    held = socket.send_message

    async def send_message(message: str) -> None:
        await (naming.send_message if not naming.frames else held)(message)

    async def done(ctx: JobContext, input: Any) -> Any:
        return "done"

    socket.send_message = send_message  # type: ignore[method-assign]
    session = _Session(WorkerProcess("ws://unused", "t", {"done": done}), socket)  # type: ignore[arg-type]
    session.batch = True
    session.heartbeat_interval = 0.01
    assign = {"job_id": "j1", "attempt": 1, "kind": "done", "user_id": "u", "input": None}
    attempt = session.attempts["j1"] = _Attempt(session, assign)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session._run, attempt)
        await trio.testing.wait_all_tasks_blocked()  # its outcome is going out
        nursery.start_soon(session._heartbeats)
        await trio.sleep(0.05)
        release.set()
        await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    assert naming.frames == [{"op": "heartbeat", "jobs": [{"job_id": "j1", "attempt": 1}]}]
    sent = [r for f in frames for r in (f["requests"] if f["op"] == "batch" else [f])]
    assert sent[0]["op"] == "complete", sent
    beats = [r["jobs"] for r in sent if r["op"] == "heartbeat"]
    assert beats and all(jobs == [] for jobs in beats), beats


async def test_a_heartbeat_never_names_an_attempt_the_server_cancelled() -> None:
    """A cancelled attempt whose handler is still unwinding (inside ``keep_alive()``, in a
    thread a cancel cannot interrupt) is the server's no more: its slot went to the next
    assignment, and a heartbeat naming both was one past the capacity, refused whole, so the
    next job stalled (found in review)."""
    released = trio.Event()
    released.set()
    socket = HeldSocket(released)

    async def unwinds_slowly(ctx: JobContext, input: Any) -> Any:
        with ctx.keep_alive():
            try:
                await trio.sleep_forever()
            finally:
                with trio.CancelScope(shield=True):
                    await trio.sleep(0.2)  # a thread's work a cancel cannot interrupt

    process = WorkerProcess("ws://unused", "t", {"slow": unwinds_slowly}, concurrency=1)
    session = _Session(process, socket)  # type: ignore[arg-type]
    assign = {"type": "assign", "job_id": "a", "attempt": 1, "kind": "slow", "user_id": "u",
              "input": None}  # fmt: skip
    async with trio.open_nursery() as nursery:
        session._receive(assign, nursery)
        await trio.testing.wait_all_tasks_blocked()
        assert session.heartbeat_jobs() == [{"job_id": "a", "attempt": 1}]
        session._receive({"type": "cancel", "job_id": "a", "attempt": 1}, nursery)
        await trio.sleep(0.05)
        assert "a" in session.attempts  # still unwinding
        session._receive({**assign, "job_id": "b"}, nursery)
        await trio.testing.wait_all_tasks_blocked()
        assert session.heartbeat_jobs() == [{"job_id": "b", "attempt": 1}]
        nursery.cancel_scope.cancel()
