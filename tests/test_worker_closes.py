"""How the worker endpoint closes, and what each side makes of it: a hello with no room for
its kinds now is a passing refusal (1013) that ``jobspine worker`` retries with its backoff;
a hello meant for the other endpoint says which URL to use; every close a worker gets is
logged with its code, its reason and, for 1009, the limit."""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio
from trio_websocket import CloseReason, open_websocket_url

import actors._supervisor
from actors import JobContext, JobState
from transport import ClientError, open_client
from transport._reconnect import FATAL_CLOSE, RECURRING_CLOSE, ReconnectPolicy
from transport._worker_process import WorkerFatalError, WorkerProcess

from .conftest import wait_for_state
from .serving import eventually, free_port, token
from .test_worker_protocol import raw_worker, wait_no_worker, worker_only_server
from .worker_support import close_of, run_command, run_jobspine_worker, worker_token

QUICK = ReconnectPolicy(min_backoff=0.01, max_backoff=0.05)


async def closed_by(url: str, hello: dict[str, Any]) -> CloseReason:
    """The close a first frame ``hello`` gets at ``url``."""
    async with open_websocket_url(url) as ws:
        await ws.send_message(orjson.dumps(hello).decode())
        return await close_of(ws)


async def echo(ctx: JobContext, input: Any) -> Any:
    return input


# -- 1. no room for a worker's kinds now: try again later ----------------------------------------


async def test_a_hello_with_no_room_for_its_kinds_now_is_retried_not_fatal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The declared kinds' table full of kinds that connected workers hold: a new kind's
    hello is closed with 1013 (try again later), not 4002, and ``jobspine worker`` keeps
    retrying with its backoff, logging why, until the kinds are let go; then its kind runs.
    Before, the close was 4002, which ``jobspine worker`` takes as a bad hello: it exited
    for good (status 2) though the same hello was welcome a moment later."""
    monkeypatch.setattr(actors._supervisor, "MAX_DECLARED_KINDS", 2)
    caplog.set_level(logging.INFO, logger="jobspine")
    async with worker_only_server(tmp_path / "db") as running:
        url = running.url
        async with trio.open_nursery() as nursery:
            async with raw_worker(url, ["a", "b"]):
                hello = {"op": "hello", "token": worker_token(), "kinds": ["c"], "capacity": 1}
                closed = await closed_by(url + "/worker", hello)
                assert closed.code == 1013, closed
                assert closed.reason == (
                    "hello: no room now for this worker's new kinds (the known kinds are all"
                    " held): try again later"
                )
                process = WorkerProcess(url, worker_token(), {"c": echo}, policy=QUICK)
                nursery.start_soon(process.run)  # a WorkerFatalError would fail the test
                await eventually(lambda: caplog.text.count("refused the hello: 1013") >= 3)
                assert process.connections == 0
            await eventually(lambda: process.connections == 1)
            job = await running.runtime.create_job("c", "alice", {"x": 1})
            done = await wait_for_state(running.runtime, job.id, {JobState.COMPLETED})
            assert done.result == {"x": 1}
            nursery.cancel_scope.cancel()
    retried = [r for r in caplog.records if "refused the hello: 1013" in r.getMessage()]
    assert retried[0].levelname == "WARNING"
    first = retried[0].getMessage()
    assert first.startswith(
        f"worker: {url}/worker refused the hello: 1013 (hello: no room now for this worker's"
        " new kinds (the known kinds are all held): try again later): the server has no room"
    ), first
    assert "try again later; reconnecting in " in first
    assert "refused a worker's hello for now (w): kinds: 1 new kinds" in caplog.text


def test_try_again_later_is_retried_after_the_full_backoff() -> None:
    """1013 is no fatal close (the refusal passes), and one that recurs at once if retried
    at once: the full backoff, not 50 ms."""
    assert 1013 not in FATAL_CLOSE and 1013 in RECURRING_CLOSE
    policy = ReconnectPolicy(max_backoff=8.0, rng=__import__("random").Random(0))
    assert policy.next_delay(0.0, 1013) >= 4.0


async def test_a_hello_whose_options_conflict_is_still_fatal(tmp_path: Path) -> None:
    """The other refusals of a hello stay 4002, fatal: options that differ from a connected
    worker's for its kind are a worker of other code, which retrying does not mend."""
    async with (
        worker_only_server(tmp_path / "db") as running,
        raw_worker(running.url, ["echo"], options={"echo": {"max_attempts": 2}}),
    ):
        process = WorkerProcess(running.url, worker_token(), {"echo": echo}, policy=QUICK)
        with trio.fail_after(10), pytest.raises(WorkerFatalError) as raised:
            await process.run()
        assert raised.value.code == "protocol_error"
        assert "options.echo differ" in str(raised.value)


async def test_a_conflict_is_fatal_also_while_the_table_is_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hello whose options conflict with a connected worker's and that brings a new kind
    while the table is full: told the conflict (4002, for good), not 1013, after which the
    worker would have retried for ever a hello that can never be accepted."""
    monkeypatch.setattr(actors._supervisor, "MAX_DECLARED_KINDS", 2)
    async with (
        worker_only_server(tmp_path / "db") as running,
        raw_worker(running.url, ["echo", "b"], options={"echo": {"max_attempts": 2}}),
    ):
        hello = {"op": "hello", "token": worker_token(), "kinds": ["echo", "c"], "capacity": 1}
        closed = await closed_by(running.url + "/worker", hello)
        assert closed.code == 4002 and "options.echo differ" in (closed.reason or ""), closed


# -- 2. a URL naming the other endpoint -----------------------------------------------------------


async def run_cli(*args: str, tok: str) -> tuple[int, str]:
    """``jobspine ARGS`` run to its end: its exit status and stderr."""
    return await run_command([sys.executable, "-m", "transport._cli", *args], tok, seconds=30)


async def test_a_client_command_given_the_worker_endpoint_says_which_url_to_use(
    tmp_path: Path,
) -> None:
    """``--url ws://HOST:PORT/worker`` for a client command is a usage error (status 2)
    saying it is the worker endpoint and which URL to use. Before, the worker endpoint
    refused the client's hello and the command stopped with status 4 and
    ``protocol_error: closed with 4002: hello: required field missing @ $.kinds``."""
    async with worker_only_server(tmp_path / "db") as running:
        base = running.url.rstrip("/")
        for command in (["get", "01M8JYD88CZBQT519Y69S0YB4G"], ["stats"], ["jobs"]):
            for url in (f"{base}/worker", f"{base}/worker/"):
                status, err = await run_cli("--url", url, *command, tok=token("alice"))
                assert status == 2, (command, url, err)
                assert err.strip() == (
                    f"jobspine: error: --url {url} is the worker endpoint, for jobspine worker;"
                    f" client commands connect to the server's URL: --url {base}"
                ), err
        status, err = await run_cli(
            "--url", f"{base}/worker", "submit", "k", "{}", "--watch", tok=token("alice")
        )
        assert status == 2 and "is the worker endpoint" in err, err


async def test_a_hello_at_the_other_endpoint_is_told_which_one_to_use(tmp_path: Path) -> None:
    """A client's hello on ``/worker`` and a worker's on the client endpoint are refused
    (4002) with a reason naming the endpoint, not the first field missing or unknown
    (``required field missing @ $.kinds``; ``unknown field 'batch'``, which ``jobspine
    worker --url ws://HOST:PORT/api`` printed, its ``/worker`` added after ``/api``)."""
    async with worker_only_server(tmp_path / "db") as running:
        base = running.url.rstrip("/")
        client_hello = {"op": "hello", "id": 0, "token": token("alice")}
        closed = await closed_by(f"{base}/worker", client_hello)
        assert (closed.code, closed.reason) == (
            4002,
            "hello: no kinds or capacity: this is the worker endpoint (/worker); clients"
            " connect to the server's URL without /worker",
        )
        with pytest.raises(ClientError) as raised:
            async with open_client(f"{base}/worker", token("alice"), reconnect=False):
                pass
        assert raised.value.code == "protocol_error"
        assert "this is the worker endpoint (/worker)" in raised.value.message
        worker_hello = {"op": "hello", "id": 0, "token": worker_token(), "kinds": ["k"],
                        "capacity": 1, "batch": True}  # fmt: skip
        for url in (base, f"{base}/api/worker"):
            closed = await closed_by(url, worker_hello)
            assert (closed.code, closed.reason) == (
                4002,
                "hello: kinds and capacity are a worker's: this is the client endpoint;"
                " workers connect to ws://HOST:PORT/worker",
            )
        # Fields wrong otherwise are still named: only the endpoint is in question here.
        closed = await closed_by(f"{base}/worker", {**worker_hello, "capacity": "1"})
        assert closed.code == 4002 and "$.capacity" in (closed.reason or ""), closed
        status, err = await run_jobspine_worker(f"{base}/api", worker_token())
        assert status == 2, err
        assert err.strip() == (
            "jobspine: error: the server refused this worker's hello: hello: kinds and capacity"
            " are a worker's: this is the client endpoint; workers connect to"
            " ws://HOST:PORT/worker"
        ), err


# -- 3. every close a worker gets, logged with its code and reason -------------------------------


async def too_big(ctx: JobContext, input: Any) -> Any:
    return "x" * (3 * 2**20)  # over the server's max_frame_size for a worker (2 MiB)


async def test_a_worker_closed_for_a_frame_over_the_limit_logs_the_code_reason_and_limit(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A frame over the server's frame limit closes the worker's connection with 1009. The
    worker's log said nothing of it (it reconnected silently) and the server's said
    ``worker w disconnected (connection closed)``; now both name the code, the reason and
    the limit, as does the error of the attempt lost with the connection. (A ``jobspine
    worker`` checks its reports against the limit its hello's reply gave: the frame here is a
    result it takes to fit a larger limit, as a worker of other code could send; see
    tests/test_worker_report_sizes.py for one that knows the limit.)"""
    caplog.set_level(logging.INFO, logger="jobspine")
    async with worker_only_server(tmp_path / "db") as running, trio.open_nursery() as nursery:
        process = WorkerProcess(running.url, worker_token(), {"too_big": too_big}, policy=QUICK)
        nursery.start_soon(process.run)
        await eventually(lambda: process.connections == 1)
        assert process.session is not None
        process.session.max_frame_size = 4 * 2**20  # not the server's: the frame goes out
        job = await running.runtime.create_job("too_big", "alice", {})
        await eventually(lambda: "closed the connection: 1009" in caplog.text)
        failed = await wait_for_state(running.runtime, job.id, {JobState.FAILED})
        await eventually(lambda: process.connections == 2)  # and it reconnected
        nursery.cancel_scope.cancel()
    said = "Exceeded maximum message size: 2097152 bytes"
    (line,) = [r for r in caplog.records if "closed the connection: 1009" in r.getMessage()]
    assert line.name == "jobspine.worker" and line.levelname == "WARNING"
    assert line.getMessage().startswith(
        f"worker: {running.url}/worker closed the connection: 1009 ({said}): a frame over a"
        " size limit: the server takes frames of up to 2,097,152 bytes (its max_frame_size;"
    ), line.getMessage()
    assert "; reconnecting in " in line.getMessage()
    limit = "(the worker sent a frame over max_frame_size, 2,097,152 bytes)"
    assert f"worker w disconnected (closed with 1009: {said} {limit}): 1 running" in caplog.text
    assert failed.error is not None
    assert failed.error.message.startswith(
        f"the worker's connection closed with 1009: {said} {limit}"
    ), failed.error.message


@pytest.mark.parametrize(
    ("code", "reason", "logged"),
    [
        (1000, None, "1000 (normal closure)"),
        (1001, "server shutdown", "1001 (server shutdown): the server is shutting down"),
        (1006, None, "1006 (the connection dropped without a close frame (the server stopped"),
        (1011, "", "1011 (the server failed)"),
        (1013, "hello: kinds: …", "1013 (hello: kinds: …): the server has no room for this"),
        (4011, "worker stalled: a send timed out", "4011 (worker stalled: a send timed out): "),
        (4999, "new\nline", "4999 ('new\\nline')"),
        (4998, None, "4998 (no reason given)"),
    ],
)
def test_every_close_is_described_with_its_code_and_reason(
    code: int, reason: str | None, logged: str
) -> None:
    described = WorkerProcess("ws://h:1", "t", {}).describe_close(CloseReason(code, reason))
    assert described.startswith(logged), described
    assert described.isprintable()


async def test_a_server_shutdown_is_logged_as_information_with_its_code(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The server stopping closes its workers with 1001: one line of information, with the
    code and the server's reason, and the worker tries again."""
    caplog.set_level(logging.INFO, logger="jobspine.worker")
    async with trio.open_nursery() as nursery:
        async with worker_only_server(tmp_path / "db") as running:
            process = WorkerProcess(running.url, worker_token(), {"echo": echo}, policy=QUICK)
            nursery.start_soon(process.run)
            await eventually(lambda: process.connections == 1)
        await wait_no_worker(running)
        await eventually(lambda: "closed the connection: 1001" in caplog.text)
        nursery.cancel_scope.cancel()
    (line,) = [r for r in caplog.records if "closed the connection: 1001" in r.getMessage()]
    assert line.levelname == "INFO"
    assert "1001 (server shutdown): the server is shutting down; reconnecting in" in (
        line.getMessage()
    )


hold_release = trio.Event()


async def hold(ctx: JobContext, input: Any) -> Any:
    await hold_release.wait()
    return "held"


async def test_a_connection_ending_with_jobs_running_says_what_becomes_of_them(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A new user's trial: when the connection ended, the worker logged the close and
    "reconnecting", nothing of the job it was running. It now names the jobs stopped with
    the connection and what the server does with them."""
    caplog.set_level(logging.INFO, logger="jobspine")
    async with worker_only_server(tmp_path / "db") as running, trio.open_nursery() as nursery:
        process = WorkerProcess(running.url, worker_token(), {"hold": hold}, policy=QUICK)
        nursery.start_soon(process.run)
        await eventually(lambda: process.connections == 1)
        job = await running.runtime.create_job("hold", "alice", {})
        await eventually(
            lambda: (
                process.session is not None
                and job.id in process.session.attempts
                and process.session.attempts[job.id].named
            )  # its handler starts
        )
        assert process.session is not None
        await process.session.ws.aclose()
        await eventually(lambda: process.connections == 2)
        nursery.cancel_scope.cancel()
    (line,) = [r for r in caplog.records if "running here" in r.getMessage()]
    assert line.levelname == "WARNING"
    assert line.getMessage() == (
        f"worker: the connection ended with 1 job running here ({job.id}): stopped here; the"
        " server handles each as a stall (its kind's stall rule: paused at its checkpoint,"
        " back in the queue, or failed)"
    )


async def test_a_failed_connection_names_the_worker_and_when_it_tries_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``serve --worker-processes 2`` stopped, each worker logged ``worker: connection to URL
    failed: ...`` on every try, the two alike and neither saying when it would try again (a
    close said both). Each failure names the worker and the delay before its next try."""
    caplog.set_level(logging.INFO, logger="jobspine")
    url = f"ws://127.0.0.1:{free_port()}"  # nothing listens
    process = WorkerProcess(url, worker_token(), {"c": echo}, name="w7", policy=QUICK)
    with trio.move_on_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(process.run)
            await eventually(lambda: caplog.text.count("connection to") >= 2)
            nursery.cancel_scope.cancel()
    failed = [r.getMessage() for r in caplog.records if "connection to" in r.getMessage()]
    assert len(failed) >= 2, caplog.text
    for message in failed:
        assert message.startswith(f"worker w7: connection to {url}/worker failed: "), message
        assert re.search(r"; reconnecting in \d+\.\d\d s$", message), message
