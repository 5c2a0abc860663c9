"""The queue from the command line: ``submit``'s queue flags (checked before anything is sent),
the generated idempotency key that makes a re-run safe, ``jobs`` filters, ``stats``."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import time
from pathlib import Path

import orjson
import pytest
import trio

from actors import EventType, JobEvent, JobState
from transport import open_client
from transport._commands import _command
from transport._display import change_line
from transport._exit import CLIError, ExitCode

from .serving import free_port, serving, token
from .test_cli import COMMAND, serve_process
from .test_queue_surface import DropFirstJobReply, jobs_of

SMALL = '{"query": "q", "depth": 1, "delay": 0}'


async def cli(url: str, user_token: str, *args: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("JOBSPINE_")}
    result = await trio.run_process(
        [*COMMAND, *args],
        env={**environment, "JOBSPINE_URL": url, "JOBSPINE_TOKEN": user_token},
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    return subprocess.CompletedProcess(
        result.args, result.returncode, result.stdout.decode(), result.stderr.decode()
    )


BAD = [
    ("submit", "research", SMALL, "--priority", "1001"),
    ("submit", "research", SMALL, "--priority", "high"),
    ("submit", "research", SMALL, "--delay", "-5"),
    ("submit", "research", SMALL, "--delay", "2y"),
    ("submit", "research", SMALL, "--delay", "400d"),
    ("submit", "research", SMALL, "--max-attempts", "0"),
    ("submit", "research", SMALL, "--max-attempts", "2.5"),
    ("submit", "research", SMALL, "--timeout", "0"),
    ("submit", "research", SMALL, "--timeout", "8d"),
    ("submit", "research", SMALL, "--tag", ""),
    ("submit", "research", SMALL, "--tag", "a", "--tag", "a"),
    ("submit", "research", SMALL, "--tag", "x" * 65),
    ("submit", "research", SMALL, "--parent", ""),
    ("submit", "research", SMALL, "--idempotency-key", "k" * 257),
    ("jobs", "--state", "waiting"),
    ("jobs", "--state", "created", "--state", "created"),
    ("jobs", "--limit", "0"),
    ("jobs", "--tag", ""),
    # an undecodable byte in an argument (a lone surrogate in Python): not valid UTF-8
    ("submit", "research", SMALL, "--tag", "\udcff"),
    ("submit", "research", SMALL, "--parent", "p\udcff"),
    ("submit", "research", SMALL, "--idempotency-key", "k\udcff"),
    ("submit", "r\udcff", SMALL),
    ("jobs", "--tag", "\udcff"),
    ("jobs", "--parent", "\udcff"),
    ("cancel", "\udcff"),
]


async def test_bad_queue_flags_exit_2_with_one_line_and_send_nothing() -> None:
    # Nothing listens there: a command that tried to connect would end with status 4.
    url = f"ws://127.0.0.1:{free_port()}"
    results: dict[tuple[str, ...], subprocess.CompletedProcess[str]] = {}
    limit = trio.CapacityLimiter(4)

    async def one(args: tuple[str, ...]) -> None:
        async with limit:
            results[args] = await cli(url, token("alice"), *args, "--connect-timeout", "5")

    async with trio.open_nursery() as nursery:
        for args in BAD:
            nursery.start_soon(one, args)
    for args, result in results.items():
        assert result.returncode == ExitCode.USAGE, (args, result)
        assert result.stdout == ""
        lines = result.stderr.splitlines()
        named = tuple(f"jobspine: error: {name}" for name in ("--", "KIND", "JOB_ID"))
        assert len(lines) == 1 and lines[0].startswith(named), (args, lines)


async def test_a_state_word_of_other_job_systems_is_refused_with_the_state_it_is_here() -> None:
    """``jobspine jobs`` shows a delayed job as ``scheduled 4m59s``, but ``--state scheduled``
    (or ``waiting``, ``queued``, Celery's ``pending``...) was refused with the list of states
    alone, which a user then searched for the one that holds it: the refusal names it."""
    url = f"ws://127.0.0.1:{free_port()}"
    words = {
        "scheduled": "created",
        "waiting": "created",
        "Queued": "created",
        "pending": "created",
        "retrying": "created",
        "canceled": "cancelled",
        "succeeded": "completed",
        "active": "running",
        "errored": "failed",
    }
    for word, state in words.items():
        result = await cli(url, token("alice"), "jobs", "--state", word, "--connect-timeout", "5")
        assert result.returncode == ExitCode.USAGE, (word, result)
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"jobspine: error: --state {word}"), lines
        assert lines[0].endswith(f"--state {state}" + ("" if state == "created" else "?")), lines
    bogus = await cli(url, token("alice"), "jobs", "--state", "bogus", "--connect-timeout", "5")
    assert bogus.stderr.rstrip().endswith("cancelled"), bogus.stderr  # no guess


async def test_submit_flags_jobs_filters_and_stats(tmp_path: Path) -> None:
    async with serve_process(tmp_path / "data") as served:
        submit = (
            "submit", "research", SMALL, "--priority", "7", "--delay", "1h", "--max-attempts",
            "3", "--timeout", "10m", "--tag", "nightly", "--tag", "eu", "--json",
        )  # fmt: skip
        first = await served.cli(*submit)
        assert first.returncode == 0, first.stderr
        job = orjson.loads(first.stdout)
        assert job["state"] == "created"
        assert (job["priority"], job["max_attempts"], job["timeout"]) == (7, 3, 600.0)
        assert job["tags"] == ["nightly", "eu"] and job["run_at"] > job["created_at"] + 3500
        key = job["idempotency_key"]
        assert key  # generated

        # the same command with the job's key: the same job, nothing new
        again = await served.cli(*submit, "--idempotency-key", key)
        assert again.returncode == 0, again.stderr
        assert orjson.loads(again.stdout)["id"] == job["id"]
        child = await served.cli("submit", "research", SMALL, "--delay", "1h", "--parent",
                                 job["id"])  # fmt: skip
        assert child.returncode == 0, child.stderr
        child_id = child.stdout.strip()  # without --json: the id alone, for scripts
        conflict = await served.cli("submit", "trade", '{"symbol": "X", "side": "buy",'
                                    ' "quantity": 1}', "--idempotency-key", key)  # fmt: skip
        assert conflict.returncode == ExitCode.REFUSED
        assert "idempotency_conflict" in conflict.stderr

        async def listed(*args: str) -> list[str]:
            out = await served.cli("jobs", "--json", *args)
            assert out.returncode == 0, out.stderr
            return [j["id"] for j in orjson.loads(out.stdout)]

        assert await listed("--tag", "eu") == [job["id"]]
        assert await listed("--parent", job["id"]) == [child_id]
        assert await listed("--state", "created", "--state", "running") == [child_id, job["id"]]
        assert await listed("--state", "completed") == []
        table = await served.cli("jobs", "--tag", "nightly")
        assert job["id"] in table.stdout and child_id not in table.stdout
        # A waiting job whose start is ahead is not shown as ready: its time left is.
        rows = {line.split()[0]: line for line in (await served.cli("jobs")).stdout.splitlines()}
        assert re.search(r"  scheduled (59m\d\ds|1h00m)  ", rows[child_id]), rows[child_id]

        stats = await served.cli("stats", "--json")
        assert stats.returncode == 0, stats.stderr
        shown = orjson.loads(stats.stdout)
        assert shown["jobs"]["created"] == 2 and shown["jobs"]["total"] == 2
        assert shown["jobs"]["waiting_by_kind"] == {"research": 2}
        assert shown["queue"]["waiting"] == shown["queue"]["scheduled"] == 2
        plain = await served.cli("stats")
        assert "queue: 2 waiting (0 ready, 2 scheduled), 0 running" in plain.stdout
        assert "waiting by kind: research 2" in plain.stdout
        refused = await served.cli("stats", "--all")
        assert refused.returncode == ExitCode.AUTH and "admins" in refused.stderr
        assert "jobspine stats shows your own jobs" in refused.stderr  # not a protocol op's name


async def test_a_lost_reply_prints_the_key_and_the_rerun_makes_no_second_job(
    tmp_path: Path,
) -> None:
    async with serving(tmp_path / "db.sqlite") as running, trio.open_nursery() as nursery:
        proxy = DropFirstJobReply(running.port)
        port = await nursery.start(proxy.run)
        args = ("submit", "research", SMALL, "--delay", "1h")
        lost = await cli(f"ws://127.0.0.1:{port}", token("alice"), *args)
        assert lost.returncode == ExitCode.CANNOT_CONNECT, lost
        assert proxy.dropped == 1
        message = lost.stderr.strip()
        assert "the job may have been created" in message, message
        key = message.split("--idempotency-key ")[1].split()[0]
        rerun = await cli(running.url, token("alice"), *args, "--idempotency-key", key)
        assert rerun.returncode == 0, rerun.stderr
        stored = await jobs_of(running, "alice")
        assert [j["id"] for j in stored] == [rerun.stdout.strip()]
        assert stored[0]["idempotency_key"] == key
        nursery.cancel_scope.cancel()


async def test_a_create_never_answered_says_so_and_prints_the_key(tmp_path: Path) -> None:
    # A server that does not answer within the client's request timeout (a create waiting
    # out a full disk for store_retry_timeout, as long as that timeout): the message said
    # "jobspine: error: ; the job may have been created...", an empty reason.
    async with serving(tmp_path / "db.sqlite") as running, trio.open_nursery() as nursery:
        proxy = DropFirstJobReply(running.port, hold=True)
        port = await nursery.start(proxy.run)
        args = argparse.Namespace(
            command="submit",
            kind="research",
            input={"query": "q", "depth": 1},
            create_options={"idempotency_key": "k-never-answered"},
            watch=False,
            json=False,
        )
        url = f"ws://127.0.0.1:{port}"
        async with open_client(url, token("alice"), reconnect=False, request_timeout=0.5) as c:
            with pytest.raises(CLIError) as raised:
                await _command(c, args)
        assert raised.value.code == ExitCode.CANNOT_CONNECT
        assert raised.value.message.startswith(
            "no answer within 0.5 s; the job may have been created: run the same command"
            " with --idempotency-key k-never-answered"
        ), raised.value.message
        nursery.cancel_scope.cancel()


def test_watch_says_when_a_retry_comes() -> None:
    data = {
        "error": {"type": "ValueError", "message": "flaky upstream"},
        "failed_attempts": 1,
        "max_attempts": 3,
        "next_attempt_at": 1795931490.4,
        "delay": 0.4,
    }
    event = JobEvent("J", "alice", 4, EventType.RETRYING, JobState.CREATED, 1795931490.0, data)
    assert change_line(event, "J") == (
        "retrying in 0.4 s: attempt failed (1 of 3): ValueError: flaky upstream"
    )
    started = JobEvent("J", "alice", 5, EventType.STARTED, JobState.RUNNING, 1795931490.4,
                       {"attempt": 2, "owner": "n", "resumed_from_checkpoint": 3})  # fmt: skip
    assert change_line(started, "J") == "resumed (attempt 2)"


def test_watch_says_what_a_recovery_did_by_the_state_it_left() -> None:
    """A recovery that hands the job back to the queue (a worker's SIGTERM) is not a pause:
    "resume" would be refused (illegal transition created -> created)."""

    def recovery(state: JobState, reason: str) -> str | None:
        data = {"reason": reason, "recovery_attempts": 1, "checkpoint_version": 2}
        event = JobEvent("J", "alice", 9, EventType.RECOVERY, state, 1795931490.0, data)
        return change_line(event, "J")

    requeued = recovery(JobState.CREATED, "worker_shutdown")
    assert requeued == "back in the queue (worker_shutdown): it runs again when a worker is free"
    assert recovery(JobState.FAILED, "stalled") == "failed (stalled)"
    assert recovery(JobState.PAUSED, "stalled") == (
        "paused (stalled)\n  resume with: jobspine resume J"
    )


def test_watch_says_when_a_delayed_job_is_due() -> None:
    """A delayed job's watcher said only "created" (the jobs table shows no time either):
    its created event carries run_at, shown in local time."""
    due = 1795935090.0
    data = {"kind": "k", "input": {}, "run_at": due, "max_attempts": 1, "tags": []}
    event = JobEvent("J", "alice", 1, EventType.CREATED, JobState.CREATED, due - 3600, data)
    expected = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(due))
    assert change_line(event, "J") == f"created: waits until {expected}"
    now = JobEvent(
        "J", "alice", 1, EventType.CREATED, JobState.CREATED, due, {**data, "run_at": None}
    )
    assert change_line(now, "J") == "created"
