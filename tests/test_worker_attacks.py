"""A worker that misbehaves on purpose or by a bug harms only itself: a repeated drain starts
nothing more, and what its reports hold while they wait for the store stays within the bound
the protocol states, however its frames mix them."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import trio

import transport._workers
from actors import JobState

from .conftest import wait_for_state
from .test_worker_protocol import (
    answers_by_id,
    assigned_steps_job,
    held_checkpoints,
    raw_worker,
    receive_flat,
    send,
)
from .test_workers import event_types
from .worker_support import served


async def test_a_repeated_drain_hands_each_attempt_back_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A batch of drains is answered drain by drain, but the attempts are stopped and handed
    back once: each drain stopped them all again (a log line per drain and a refused re-queue
    per drain and attempt: 1,000 drains in a frame made a million hand-backs of a full
    worker)."""
    caplog.set_level(logging.INFO)
    async with (
        served(tmp_path / "db", "in_process", in_process_handlers=False) as s,
        raw_worker(s.running.url, ["steps"], capacity=2, batch=True) as ws,
    ):
        rt = s.runtime
        jobs = {(await rt.create_job("steps", "alice", {"n": 1})).id for _ in range(2)}
        assigned = 0
        while assigned < 2:
            messages, _ = await receive_flat(ws, 1)
            assigned += sum(m["type"] == "assign" for m in messages)
        await send(ws, {"op": "batch", "requests": [{"op": "drain", "id": i} for i in range(50)]})
        answers: list[str] = []
        stops: list[dict[str, object]] = []
        while len(answers) < 50 or len(stops) < 2:
            messages, _ = await receive_flat(ws, 1)
            answers += [m["type"] for m in messages if m["type"] in ("reply", "error")]
            stops += [m for m in messages if m["type"] == "stop"]
        assert answers == ["reply"] * 50 and {stop["job_id"] for stop in stops} == jobs
        for stop in stops:
            ref = {"job_id": stop["job_id"], "attempt": stop["attempt"]}
            await send(ws, {"op": "stopped", "id": "s", **ref})
        for job_id in jobs:
            await wait_for_state(rt, job_id, {JobState.CREATED}, timeout=10)
        await trio.sleep(0.2)  # room for a second hand-back, were one running
        for job_id in jobs:
            assert await event_types(rt, job_id) == ["created", "started", "recovery"]
    lines = [record.getMessage() for record in caplog.records]
    assert sum("drains: handing back" in line for line in lines) == 1
    assert not [line for line in lines if "not re-queued" in line]


async def test_a_large_report_counts_its_whole_frame_while_it_waits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Large checkpoints, each sent in a frame with 999 heartbeats (served at once), while the
    database is slow: each frame counts whole towards the bound while its checkpoint waits.
    A report counted its share of its frame: 117 bytes for a 117 KB checkpoint, so that all
    ten waited here, and under the real bound a worker could park 64 GiB in the server."""
    monkeypatch.setattr(transport._workers, "MAX_WAITING_BYTES", 200_000)
    async with assigned_steps_job(tmp_path) as (s, ws, job):
        ref = {"job_id": job.id, "attempt": 1}
        fillers = [{"op": "heartbeat"}] * 999
        async with held_checkpoints(monkeypatch):
            for i in range(10):
                checkpoint = {"op": "checkpoint", "id": i, **ref, "data": "x" * 100_000}
                await send(ws, {"op": "batch", "requests": [checkpoint, *fillers]})
            busy, _ = await answers_by_id(ws, 9)
            assert busy == dict.fromkeys(range(1, 10), "busy")
        answers, _ = await answers_by_id(ws, 1)
        assert answers == {0: "reply"}
        assert (await s.runtime.get_job(job.id)).checkpoint_version == 1
