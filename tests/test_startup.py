"""A server or runtime that cannot start, or is left, says so and ends (issue 8, fault 2).

Every refusal of ``jobspine serve`` is one line on stderr, a distinct exit status, well within
the bound (the issue asks for a second; the bound here is loose for a loaded machine), and
the database is byte for byte what it was. Every way out of ``open_runtime`` closes the
database: no aiosqlite thread is left behind.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio

from actors import (
    DEMO_HANDLERS,
    JobContext,
    JobState,
    RuntimeConfig,
    StoreError,
    open_runtime,
)
from transport import open_client
from transport._exit import ExitCode

from .conftest import wait_for_state
from .serving import SECRET, free_port
from .test_cli import COMMAND

#: Wall-clock bound on a refused start: the process must end by itself, well before this.
BOUND = 5.0


async def _serve(
    data: Path, *args: str, env: dict[str, str] | None = None
) -> tuple[int, list[str], float]:
    """Run ``jobspine serve`` expecting it to refuse: (exit status, stderr lines, seconds)."""
    base = {**os.environ, "JOBSPINE_DATA": str(data), "JOBSPINE_SECRET": SECRET}
    start = trio.current_time()
    with trio.fail_after(20):  # the original fault: it never exits
        done = await trio.run_process(
            [*COMMAND, "serve", *args],
            env={**base, **(env or {})},
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    elapsed = trio.current_time() - start
    lines = done.stderr.decode().strip().splitlines()
    return done.returncode, lines, elapsed


def _assert_one_line(lines: list[str], *fragments: str) -> None:
    assert len(lines) == 1, lines
    assert lines[0].startswith("jobspine") and ": error: " in lines[0], lines
    for fragment in fragments:
        assert fragment in lines[0], lines


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}


@contextmanager
def _port_in_use() -> Iterator[int]:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield int(taken.getsockname()[1])


async def _stopped_with_a_paused_job(db: Path) -> str:
    """A database whose job a graceful shutdown paused: a start would resume it."""
    config = RuntimeConfig(stop_grace=1.0, sqlite_synchronous="NORMAL")
    async with open_runtime(db, handlers=DEMO_HANDLERS, config=config) as rt:
        job = await rt.create_job("research", "alice", {"query": "q", "depth": 50, "delay": 0.1})
        async with rt.events() as events:
            async for event in events:
                if event.job_id == job.id and event.type.value == "checkpoint":
                    break
    reader = RuntimeConfig(resume_on_start=False, sqlite_synchronous="NORMAL")
    async with open_runtime(db, handlers={}, config=reader) as rt:  # read back, not resumed
        paused = await rt.get_job(job.id)
    assert (paused.state, paused.pause_reason) == (JobState.PAUSED, "shutdown")
    return job.id


@pytest.mark.parametrize("role", ["websocket", "health"])
async def test_port_in_use_refuses_before_touching_the_database(tmp_path: Path, role: str) -> None:
    data = tmp_path / "data"
    data.mkdir()
    await _stopped_with_a_paused_job(data / "jobspine.db")
    before = _files(data)
    with _port_in_use() as port:
        ports = {"websocket": free_port(), "health": free_port(), role: port}
        status, lines, elapsed = await _serve(
            data, "--port", str(ports["websocket"]), "--health-port", str(ports["health"])
        )
    assert status == ExitCode.PORT_UNAVAILABLE
    _assert_one_line(lines, f"port {port} on 127.0.0.1 is in use ({role} port)")
    assert elapsed < BOUND, elapsed
    assert _files(data) == before  # no recovery, no resume, no migration, not even a lock file


async def test_port_in_use_on_a_new_database_creates_nothing(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    with _port_in_use() as port:
        status, lines, _ = await _serve(data, "--port", str(port), "--health-port", "0")
    assert status == ExitCode.PORT_UNAVAILABLE and "is in use" in lines[0]
    assert _files(data) == {}


def _newer_schema(db: Path) -> None:
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
        conn.execute("INSERT INTO meta VALUES ('schema_version', '99'), ('epoch', 'e')")
    conn.close()


def _garbage(db: Path) -> None:
    db.write_bytes(bytes(range(256)) * 64)


def _directory(db: Path) -> None:
    db.mkdir()


def _truncated_header(db: Path) -> None:
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE t (x)")
    conn.close()
    db.write_bytes(db.read_bytes()[:100])


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (_garbage, "file is not a database"),
        (_truncated_header, "cannot open"),
        (_directory, "not a file"),
        (_newer_schema, "schema v99 is newer"),
    ],
)
async def test_unusable_database_is_one_line_and_left_as_it_was(
    tmp_path: Path, make: Any, message: str
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    make(data / "jobspine.db")
    before = _files(data)
    status, lines, elapsed = await _serve(
        data, "--port", str(free_port()), "--health-port", str(free_port())
    )
    assert status == ExitCode.DATABASE_UNUSABLE
    _assert_one_line(lines, str(data / "jobspine.db"), message)
    assert elapsed < BOUND, elapsed
    after = _files(data)
    after.pop("jobspine.db.owner", None)  # the lock file is not the database
    assert after == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--port", "70000"], "port 70000 is outside 0-65535"),
        (["--health-port", "http"], "--health-port: invalid int value"),
        (["--heartbeat-timeout", "0"], "--heartbeat-timeout"),
        (["--stop-grace", "-1"], "--stop-grace"),
        (["--request-rate", "nan"], "--request-rate"),
        (["--handlers", "no_such_module_xyz:HANDLERS"], "cannot import no_such_module_xyz"),
        (["--handlers", "json:NO_SUCH"], "module json has no NO_SUCH"),
        (["--handlers", "json:loads"], "expected a dict of kind -> handler"),
        (["--handlers", "json:__builtins__"], "expected a kind name mapped to a handler"),
        (["--handlers", "broken_handlers"], "cannot import broken_handlers: ZeroDivisionError"),
        (["--handlers", "exiting_handlers:H"], "cannot import exiting_handlers: SystemExit: 0"),
    ],
)
async def test_bad_option_is_one_line_and_creates_nothing(
    tmp_path: Path, args: list[str], message: str
) -> None:
    data = tmp_path / "data"
    (tmp_path / "broken_handlers.py").write_text("HANDLERS = {'x': 1 / 0}\n")
    (tmp_path / "exiting_handlers.py").write_text("import sys\nsys.exit(0)\n")  # a script
    env = {"PYTHONPATH": str(tmp_path)}
    status, lines, elapsed = await _serve(data, *args, env=env)
    assert status == ExitCode.USAGE
    _assert_one_line(lines, message)
    assert elapsed < BOUND, elapsed
    assert not data.exists()


async def test_bad_log_level_is_one_line(tmp_path: Path) -> None:
    with trio.fail_after(20):
        done = await trio.run_process(
            [*COMMAND, "--log-level", "LOUD", "serve"],
            capture_stderr=True,
            check=False,
            env={**os.environ, "JOBSPINE_DATA": str(tmp_path / "data")},
        )
    assert done.returncode == ExitCode.USAGE
    _assert_one_line(done.stderr.decode().strip().splitlines(), "unknown log level 'LOUD'")


# -- every way out of open_runtime ----------------------------------------------------------------


def _sqlite_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if "_connection_worker_thread" in t.name]


async def _busy(ctx: JobContext, input: Any) -> Any:
    i = 0
    while True:
        i += 1
        await ctx.checkpoint({"i": i})
        await trio.sleep(0.01)


@pytest.mark.parametrize("way", ["return", "exception", "cancellation", "keyboard_interrupt"])
async def test_every_way_out_of_open_runtime_closes_the_database(tmp_path: Path, way: str) -> None:
    db = tmp_path / "jobs.db"
    config = RuntimeConfig(stop_grace=0.2, sqlite_synchronous="NORMAL")
    baseline = threading.active_count()
    raised: type[BaseException] | None = {
        "exception": ValueError,
        "keyboard_interrupt": KeyboardInterrupt,
    }.get(way)
    with trio.CancelScope() as scope:
        try:
            async with open_runtime(db, handlers={"busy": _busy}, config=config) as rt:
                job = await rt.create_job("busy", "alice", {})
                await wait_for_state(rt, job.id, {JobState.RUNNING})
                await trio.sleep(0.05)  # checkpoints in flight
                assert len(_sqlite_threads()) == 1
                leaving = trio.current_time()
                if way == "cancellation":
                    scope.cancel()
                    await trio.sleep_forever()
                if raised is not None:
                    raise raised("left the block")
        except (ValueError, KeyboardInterrupt) as exc:
            assert type(exc) is raised
    assert scope.cancelled_caught == (way == "cancellation")
    assert trio.current_time() - leaving < BOUND  # graceful, not the 30 s shutdown bound
    assert _sqlite_threads() == []
    assert threading.active_count() <= baseline
    # The database was closed cleanly and its owner lock released: the next runtime opens it.
    reader = RuntimeConfig(resume_on_start=False, sqlite_synchronous="NORMAL")
    async with open_runtime(db, handlers={}, config=reader) as rt:  # read back, not resumed
        job_after = await rt.get_job(job.id)
        assert (job_after.state, job_after.pause_reason) == (JobState.PAUSED, "shutdown")
        assert job_after.checkpoint_version > 0


async def test_open_runtime_cancelled_while_it_opens_leaves_no_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cancellation that lands inside the connect (the connection's thread started, no
    connection handed back yet) must not leave that thread behind, unclosed: it used to
    outlive the block and die on the closed event loop."""
    crashed: list[threading.ExceptHookArgs] = []
    monkeypatch.setattr(threading, "excepthook", crashed.append)
    db = tmp_path / "jobs.db"
    config = RuntimeConfig(stop_grace=0.2, sqlite_synchronous="NORMAL")
    for _ in range(3):
        with trio.move_on_after(0):  # cancelled at its first checkpoint
            async with open_runtime(db, handlers={}, config=config):
                await trio.sleep_forever()
        with trio.fail_after(BOUND):
            while _sqlite_threads():  # noqa: ASYNC110 - a closed connection's thread ends just after close
                await trio.sleep(0.01)
    async with open_runtime(db, handlers={}, config=config) as rt:
        assert await rt.get_stats() == {
            **{s.value: 0 for s in JobState},
            "total": 0,
            "waiting_by_kind": {},
        }
    assert crashed == []


async def test_open_runtime_on_an_unusable_database_leaves_no_thread(tmp_path: Path) -> None:
    _garbage(tmp_path / "jobs.db")
    with pytest.raises(StoreError, match="file is not a database"):
        async with open_runtime(tmp_path / "jobs.db"):
            pass
    assert _sqlite_threads() == []


EMBEDDED = """
import sys, trio
from actors import open_runtime

async def main():
    async with open_runtime(sys.argv[1]):
        print("open", flush=True)
        if sys.argv[2] == "raise":
            raise KeyboardInterrupt
        await trio.sleep_forever()

trio.run(main)
"""


@pytest.mark.parametrize("how", ["raise", "sigint"])
async def test_an_interrupted_application_exits(tmp_path: Path, how: str) -> None:
    errors = await trio.Path(tmp_path / "stderr").open("wb")
    process = await trio.lowlevel.open_process(
        [sys.executable, "-c", EMBEDDED, str(tmp_path / "jobs.db"), how],
        stdout=subprocess.PIPE,
        stderr=errors.wrapped,
    )
    try:
        assert process.stdout is not None
        output = b""
        with trio.fail_after(20):
            while b"open" not in output:
                output += await process.stdout.receive_some()
        start = trio.current_time()
        if how == "sigint":
            process.send_signal(signal.SIGINT)
        with trio.fail_after(20):  # the original fault: it never exits
            status = await process.wait()
        assert trio.current_time() - start < BOUND
        assert status != 0
        assert b"KeyboardInterrupt" in await trio.Path(tmp_path / "stderr").read_bytes()
    finally:
        process.kill()
        await process.wait()
        await errors.aclose()


async def test_a_refused_start_writes_no_development_secret(tmp_path: Path) -> None:
    """Without JOBSPINE_SECRET a server generates one, but keeps it only once it started."""
    data = tmp_path / "data"
    data.mkdir()
    _garbage(data / "jobspine.db")
    status, lines, _ = await _serve(
        data,
        "--port",
        str(free_port()),
        "--health-port",
        str(free_port()),
        env={"JOBSPINE_SECRET": ""},
    )
    assert status == ExitCode.DATABASE_UNUSABLE
    _assert_one_line(lines, "file is not a database")
    assert not (data / "secret").exists()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_a_signal_while_the_database_migrates_stops_before_anything_runs(
    tmp_path: Path, signum: signal.Signals
) -> None:
    """SIGTERM or SIGINT while the database opens (here a migration of 300,000 events to v5)
    stops the server before it serves: nothing is recovered, claimed or run, and the file
    keeps its version (the migration is one transaction). The signal used to wait for the
    whole startup, after which the server recovered and ran jobs, and only then stopped."""
    data = tmp_path / "data"
    data.mkdir()
    db = data / "jobspine.db"
    shutil.copy(Path(__file__).parent / "data" / "v2.db", db)
    ids = orjson.loads((Path(__file__).parent / "data" / "v2.ids.json").read_bytes())
    with sqlite3.connect(db) as conn:
        conn.executemany(
            "INSERT INTO events VALUES (?, ?, 'bulk', ?, 'progress', ?)",
            [(ids["completed"], 1000 + n, n, "x" * 100) for n in range(300_000)],
        )
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        process = await trio.lowlevel.open_process(
            [
                *COMMAND,
                "serve",
                "--db",
                str(db),
                "--port",
                str(free_port()),
                "--health-port",
                str(free_port()),
                "--handlers",
                "tests.test_migration:HANDLERS",  # the file's kinds: they would run
            ],
            env={
                **os.environ,
                "JOBSPINE_DATA": str(data),
                "JOBSPINE_SECRET": SECRET,
                "PYTHONPATH": str(Path(__file__).parent.parent),
            },
            stderr=log,
        )
        try:
            with trio.fail_after(60):
                while b"migrating the database" not in log_path.read_bytes():  # noqa: ASYNC110 - a file another process writes
                    await trio.sleep(0.01)
                process.send_signal(signum)
                status = await process.wait()
        finally:
            process.kill()
            await process.wait()
    output = log_path.read_text()
    assert status == 0, output
    assert "stopping before serving" in output and "jobspine listening" not in output, output
    with sqlite3.connect(db) as conn:
        states = dict(conn.execute("SELECT id, state FROM jobs").fetchall())
        version = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    assert version == ("2",)
    assert (states[ids["created"]], states[ids["running"]]) == ("created", "running")


async def test_nodes_started_at_once_without_a_secret_share_the_one_they_keep(
    tmp_path: Path, pg_url: str
) -> None:
    """Two nodes of one PostgreSQL database started at once on one machine (one data
    directory) without JOBSPINE_SECRET each made a development secret; the second to save
    its own once serving failed (``jobspine: error: [Errno 17] File exists: .../secret``,
    exit status 9). They now take turns to make it: the second reads the first's, so both
    serve, and a token minted from the data directory is taken by both. Three rounds, each
    on a data directory of its own: the two starts race, and lost most rounds before."""
    for round_ in range(3):
        await _two_nodes_at_once(tmp_path / f"round{round_}", pg_url, round_)


async def _two_nodes_at_once(directory: Path, pg_url: str, round_: int) -> None:
    data = directory / "data"
    await trio.Path(directory).mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBSPINE_")}
    env = {**env, "JOBSPINE_DATA": str(data), "JOBSPINE_STORE": pg_url}
    ports = [(free_port(), free_port()) for _ in range(2)]
    logs = [directory / f"node{i}.log" for i in range(2)]
    processes = []
    try:
        for i, (port, health) in enumerate(ports):
            with logs[i].open("wb") as output:
                processes.append(
                    await trio.lowlevel.open_process(
                        [*COMMAND, "serve", "--node-id", f"r{round_}n{i}", "--port", str(port),
                         "--health-port", str(health), "--stop-grace", "0.5"],
                        env=env, stdout=output, stderr=output,
                    )
                )  # fmt: skip
        with trio.fail_after(30):
            while not all("listening on" in log.read_text() for log in logs):
                for process, log in zip(processes, logs, strict=True):
                    assert process.poll() is None, log.read_text()
                await trio.sleep(0.05)
        minted = await trio.run_process(
            [*COMMAND, "token", "--user", "alice"], env=env, capture_stdout=True
        )
        user_token = minted.stdout.decode().strip()
        for port, _ in ports:
            async with open_client(f"ws://127.0.0.1:{port}", user_token, reconnect=False) as c:
                assert await c.list() is not None
        assert sum("generated a development secret" in log.read_text() for log in logs) == 1
    finally:
        for process in processes:
            process.kill()
            await process.wait()
