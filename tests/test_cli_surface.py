"""The ``jobspine`` command as scripts and people use it, through the real console script:
exit codes, ``--json``, connect timeout, tokens, broken pipes, Ctrl-C, the live display on a
pseudo-terminal, and configuration precedence."""

from __future__ import annotations

import fcntl
import io
import os
import pty
import re
import signal
import struct
import subprocess
import termios
import time
from pathlib import Path

import orjson
import pytest
import trio
from rich.console import Console

from actors import EventType, JobEvent, JobState
from actors._errors import shown
from transport._auth import MAX_TOKEN_TTL, verify_token
from transport._config import resolve
from transport._display import PlainView, jobs_table
from transport._exit import CLIError, ExitCode
from transport._live import LiveView

from .serving import free_port
from .test_cli import COMMAND, Served, serve_process

HANDLERS = ("--handlers", "tests.cli_handlers:HANDLERS")
SLOW = '{"query": "q", "depth": 300, "delay": 0.2}'


def run(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("JOBSPINE_")}
    return subprocess.run(
        [*COMMAND, *args],
        env={**environment, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


async def arun(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return await trio.to_thread.run_sync(lambda: run(*args, env=env))


def _client_env(served: Served, user: str = "alice") -> dict[str, str]:
    return {
        "JOBSPINE_DATA": str(served.data),
        "JOBSPINE_URL": served.url,
        "JOBSPINE_TOKEN": served.token(user),
    }


async def read_until(
    stream: trio.abc.ReceiveStream | None, marker: bytes, seen: bytes = b"", seconds: float = 20
) -> bytes:
    """``seen`` and what ``stream`` gives after it, until ``marker`` is among it."""
    assert stream is not None
    with trio.fail_after(seconds):
        while marker not in seen:
            seen += await stream.receive_some()
    return seen


async def test_exit_codes_json_and_errors(tmp_path: Path) -> None:
    async with serve_process(tmp_path / "data", extra=HANDLERS) as served:
        env = _client_env(served)

        # success, --json anywhere (before or after the command), --version
        version = await arun("--version")
        assert version.returncode == 0 and version.stdout.startswith("jobspine ")
        small = '{"query": "q", "depth": 2, "delay": 0.01}'
        done = await arun("--json", "submit", "research", small, "--watch", env=env)
        assert done.returncode == ExitCode.OK, done.stderr
        lines = [orjson.loads(line) for line in done.stdout.splitlines()]
        assert lines[0]["type"] == "created" and lines[-1]["type"] == "completed"
        assert [e["seq"] for e in lines] == list(range(1, len(lines) + 1))
        job_id = lines[0]["job_id"]
        listed = await arun("jobs", "--log-level", "WARNING", "--json", env=env)
        assert [j["id"] for j in orjson.loads(listed.stdout)] == [job_id]
        got = await arun("get", job_id, "--json", env=env)
        assert orjson.loads(got.stdout)["state"] == "completed"
        table = await arun("jobs", env=env)
        header, row = table.stdout.splitlines()
        assert header.split() == ["ID", "KIND", "STATE", "PROGRESS", "CREATED", "RAN", "STEP"]
        assert row.split()[:4] == [job_id, "research", "completed", "100.0%"]

        # job failed: 1; job cancelled: 3; job paused with --exit-on-pause: 3
        failed = await arun("submit", "failing", "{}", "--watch", env=env)
        assert failed.returncode == ExitCode.JOB_FAILED
        assert "failed: RuntimeError: failed on purpose" in failed.stdout
        slow = (await arun("submit", "endless", "{}", env=env)).stdout.strip()
        assert (await arun("cancel", slow, env=env)).returncode == 0
        cancelled = await arun("watch", slow, env=env)
        assert cancelled.returncode == ExitCode.JOB_STOPPED and "cancelled" in cancelled.stdout
        slow = (await arun("submit", "endless", "{}", env=env)).stdout.strip()
        paused = await arun("pause", slow, "--json", env=env)
        assert orjson.loads(paused.stdout)["state"] == "paused"
        stopped = await arun("watch", slow, "--exit-on-pause", env=env)
        assert stopped.returncode == ExitCode.JOB_STOPPED and "paused" in stopped.stdout

        # usage errors: 2, one line, no traceback
        for args in (
            ("restart", slow, "{bad"),
            ("restart", slow, "[1, 2]"),
            ("submit", "research", "{bad"),
            ("submit", "no-such-kind", "{}"),
            ("jobs", "--limit", "many"),
            ("nonsense",),
            # refused as the user's input: a request over max_frame_size, an unknown parent
            ("submit", "research", '{"query": "' + "q" * 70_000 + '"}'),
            ("submit", "research", '{"query": "q"}', "--parent", "01NOSUCHJOB"),
        ):
            bad = await arun(*args, env=env)
            assert bad.returncode == ExitCode.USAGE, (args, bad)
            assert "Traceback" not in bad.stderr
        # the server refused the input (invalid_input): 2, like any other usage error
        listed_input = (await arun("submit", "failing", "[1, 2]", env=env)).stdout.strip()
        await arun("watch", listed_input, env=env)
        modified = await arun("restart", listed_input, '{"depth": 1}', env=env)
        assert modified.returncode == ExitCode.USAGE and "invalid_input" in modified.stderr
        # the server refused the request: 6
        unknown = await arun("pause", "01NOSUCHJOB", env=env)
        assert unknown.returncode == ExitCode.REFUSED and "unknown_job" in unknown.stderr
        illegal = await arun("resume", job_id, env=env)
        assert illegal.returncode == ExitCode.REFUSED and "illegal_transition" in illegal.stderr

        # auth: no token, a token from another secret
        missing = await arun("jobs", env={**env, "JOBSPINE_TOKEN": ""})
        assert missing.returncode == ExitCode.AUTH
        assert "export JOBSPINE_TOKEN=$(jobspine token --user NAME)" in missing.stderr
        foreign = run("token", "--user", "alice",
                      env={"JOBSPINE_SECRET": "another-secret-of-32-bytes-or-more!!"})  # fmt: skip
        refused = await arun("jobs", env={**env, "JOBSPINE_TOKEN": foreign.stdout.strip()})
        assert refused.returncode == ExitCode.AUTH and "another secret" in refused.stderr
        workers = run("token", "--worker", env={"JOBSPINE_DATA": str(served.data)})
        wrong = await arun("jobs", env={**env, "JOBSPINE_TOKEN": workers.stdout.strip()})
        assert wrong.returncode == ExitCode.AUTH and "wrong_role" in wrong.stderr
        assert "mint a user's token with jobspine token --user NAME" in wrong.stderr

        # cannot connect: wrong scheme, the health port (HTTP 404), nothing listening
        urls = ("http://127.0.0.1:1", "ws://127.0.0.1:99999", "ws://[::1", "ws://")
        for url in (*urls, f"ws://127.0.0.1:{served.health}"):
            start = time.monotonic()
            wrong = await arun("jobs", "--url", url, env=env)
            assert wrong.returncode == ExitCode.CANNOT_CONNECT, wrong
            assert time.monotonic() - start < 5 and "Traceback" not in wrong.stderr
        assert "HTTP 404" in wrong.stderr
        # Followers too: they reconnect once they have connected, but a server never
        # reached is an error (submit --watch has created nothing).
        for command in (["jobs"], ["watch", job_id], ["submit", "endless", "{}", "--watch"]):
            start = time.monotonic()
            nobody = await arun("--connect-timeout", "1", *command, "--url",
                                f"ws://127.0.0.1:{free_port()}", env=env)  # fmt: skip
            assert nobody.returncode == ExitCode.CANNOT_CONNECT, (command, nobody)
            assert "within 1 s (refused, unreachable or no such host)" in nobody.stderr
            assert time.monotonic() - start < 8
        health = await arun("watch", job_id, "--url", f"ws://127.0.0.1:{served.health}", env=env)
        assert health.returncode == ExitCode.CANNOT_CONNECT and "HTTP 404" in health.stderr


async def test_closed_stdout_and_ctrl_c_are_quiet(tmp_path: Path) -> None:
    async with serve_process(tmp_path / "data", extra=HANDLERS) as served:
        env = {**os.environ, **_client_env(served)}
        for _ in range(3):
            await served.cli("submit", "research", '{"query": "q", "depth": 1, "delay": 0}')
        # the reader is gone before the first line: like `jobspine jobs | head -0`
        read, write = os.pipe()
        os.close(read)
        closed = await trio.run_process(
            [*COMMAND, "jobs"], env=env, stdout=write, capture_stderr=True, check=False
        )
        os.close(write)
        assert closed.returncode == ExitCode.BROKEN_PIPE and closed.stderr == b""
        # `jobs | head -1`
        piped = await trio.run_process(
            f"{' '.join(COMMAND)} jobs | head -1", shell=True, env=env,
            capture_stdout=True, capture_stderr=True, check=False,
        )  # fmt: skip
        assert piped.stdout.decode().startswith("ID ") and piped.stderr == b""

        job_id = (await served.cli("submit", "endless", "{}")).stdout.strip()
        process = await trio.lowlevel.open_process(
            [*COMMAND, "watch", job_id], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        try:
            assert process.stdout is not None and process.stderr is not None
            await read_until(process.stdout, b"tick")
            process.send_signal(signal.SIGINT)
            with trio.fail_after(10):
                code = await process.wait()
            stderr = b""
            while chunk := await process.stderr.receive_some():
                stderr += chunk
        finally:
            if process.poll() is None:
                process.kill()
            await process.wait()
        assert code == ExitCode.INTERRUPTED, stderr.decode()
        assert b"Traceback" not in stderr and len(stderr.decode().splitlines()) <= 2


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _on_pty(argv: list[str], env: dict[str, str], columns: int) -> tuple[int, str]:
    """Run ``argv`` on a pseudo-terminal ``columns`` wide; its exit status and output."""
    pid, fd = pty.fork()
    if pid == 0:  # pragma: no cover - the child
        os.execve(argv[0], argv, env)
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    out = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    return os.waitstatus_to_exitcode(status), out.decode(errors="replace")


async def test_live_display_on_a_narrow_terminal(tmp_path: Path) -> None:
    async with serve_process(tmp_path / "data") as served:
        env = {**os.environ, **_client_env(served), "TERM": "xterm-256color"}
        env.pop("COLUMNS", None)
        argv = [*COMMAND, "submit", "research", '{"query": "q", "depth": 15, "delay": 0.1}',
                "--watch"]  # fmt: skip
        code, out = await trio.to_thread.run_sync(lambda: _on_pty(argv, env, 50))
    assert code == 0, out
    text = ANSI.sub("", out)
    frames = [f for f in re.split(r"[\r\n]+", text) if "%" in f]
    assert frames and all(len(frame) <= 50 for frame in frames), frames
    assert "reading" in text and "started (attempt 1)" in text
    final = frames[-1]
    assert final.startswith("completed") and "100%" in final, final
    assert re.search(r"\d:\d\d:\d\d", final)
    assert "completed: {" in text


def test_every_help_has_descriptions_defaults_and_variables() -> None:
    top = run("--help")
    commands = re.findall(r"^    (\w+) ", top.stdout, re.MULTILINE)
    assert {"serve", "token", "config", "submit", "watch", "jobs", "get"} <= set(commands)
    for command in [c for c in commands if c != "bench"]:
        text = " ".join(run(command, "--help").stdout.split())
        assert "exit status:" in text and "130 interrupted" in text, command
        assert "(default: INFO; env JOBSPINE_LOG; config: log_level)" in text, command
        if command not in ("serve", "token", "nodes"):  # they talk to no server
            assert "env JOBSPINE_URL" in text and "env JOBSPINE_CONNECT_TIMEOUT" in text, command
    serve = " ".join(run("serve", "--help").stdout.split())
    assert "(default: 8765; env JOBSPINE_PORT; config: server.port)" in serve


def test_token_refuses_a_user_or_lifetime_no_server_would_accept(tmp_path: Path) -> None:
    """``token`` mints only what a server accepts: a bad user id or lifetime is a usage error
    (exit 2, naming the flag), not a token refused later as if from another secret."""
    env = {"JOBSPINE_DATA": str(tmp_path), "JOBSPINE_SECRET": "s" * 32}
    for flags in (("--user", ""), ("--user", "a\x07b"), ("--user", "x" * 1025),
                  ("--user", "bob", "--ttl", "-5"), ("--user", "bob", "--ttl", "0"),
                  ("--user", "bob", "--ttl", "nan"),
                  # An exp past a 64-bit integer: minted, then refused at every use.
                  ("--user", "bob", "--ttl", "1e300"),
                  ("--user", "bob", "--ttl", "1e19")):  # fmt: skip
        minted = run("token", *flags, env=env)
        assert (minted.returncode, minted.stdout) == (2, ""), (flags, minted)
        assert minted.stderr.startswith(f"jobspine: error: {flags[-2]} "), minted.stderr
    assert run("token", "--user", "x" * 256, "--ttl", "60", env=env).returncode == 0
    longest = run("token", "--user", "bob", "--ttl", str(MAX_TOKEN_TTL), env=env)
    assert verify_token("s" * 32, longest.stdout.strip()).user_id == "bob"


@pytest.mark.parametrize("given", ["flag --db", "env JOBSPINE_DB", "file"])
def test_serve_refuses_a_database_in_a_directory_that_does_not_exist(
    tmp_path: Path, given: str
) -> None:
    """``serve --db`` with a mistyped directory created it and started on a new, empty
    database beside a new development secret: every job seemingly gone, every token minted
    before refused. A path the user gave must be in a directory that exists: a usage error
    naming the path, its directory and where it came from, and nothing created."""
    db = tmp_path / "jbos" / "nested" / "jobs.db"  # "jobs" mistyped
    env = {"JOBSPINE_DATA": str(tmp_path / "data")}
    args: tuple[str, ...] = ()
    if given == "flag --db":
        args = ("--db", str(db))
    elif given == "env JOBSPINE_DB":
        env["JOBSPINE_DB"] = str(db)
    else:
        config = tmp_path / "config.toml"
        config.write_text(f"[server]\ndb = {str(db)!r}\n")
        env["JOBSPINE_CONFIG"] = str(config)
        given = f"file {config}"
    ports = ("--port", str(free_port()), "--health-port", str(free_port()))
    refused = run("serve", *args, *ports, env=env)
    assert (refused.returncode, refused.stdout) == (ExitCode.USAGE, ""), refused
    assert refused.stderr == (
        f"jobspine: error: database '{db}' ({given}): its directory '{db.parent}' does not"
        " exist; create it, or correct the path\n"
    )
    assert not (tmp_path / "jbos").exists() and not (tmp_path / "data").exists()


def refused_serve(tmp_path: Path, db: str) -> str:
    """``serve --db DB``, refused as a usage error before anything starts: its stderr."""
    ports = ("--port", str(free_port()), "--health-port", str(free_port()))
    refused = run("serve", "--db", db, *ports, env={"JOBSPINE_DATA": str(tmp_path / "d")})
    assert (refused.returncode, refused.stdout) == (ExitCode.USAGE, ""), refused
    return refused.stderr


@pytest.mark.parametrize("suffix", ["/", "/.", "/.."])
def test_serve_refuses_a_database_path_naming_a_directory(tmp_path: Path, suffix: str) -> None:
    """``--db /srv/jbos/`` (the data directory meant, mistyped) passed the directory check:
    ``Path`` drops the trailing ``/``, so its directory was the one above, which exists; the
    server started on a new, empty database in a file named ``jbos`` beside a new
    development secret. A path ending in ``/``, ``/.`` or ``/..`` names a directory: a usage
    error, nothing created."""
    given = f"{tmp_path / 'jbos'}{suffix}"
    assert refused_serve(tmp_path, given) == (
        f"jobspine: error: database '{given}' (flag --db): names a directory, not the database"
        f" file; give the file, say '{Path(given, 'jobspine.db')}'\n"
    )
    assert sorted(tmp_path.iterdir()) == []


def test_serve_refuses_an_existing_directory_as_its_database(tmp_path: Path) -> None:
    """``--db ~/.local/share/jobspine`` (the data directory, not the file in it) failed with
    exit status 9 after leaving a lock file in the directory above; a usage error now, as a
    path ending in ``/``, and nothing created."""
    data = tmp_path / "data"
    data.mkdir()
    assert refused_serve(tmp_path, str(data)) == (
        f"jobspine: error: database '{data}' (flag --db): names a directory, not the database"
        f" file; give the file, say '{data / 'jobspine.db'}'\n"
    )
    assert sorted(tmp_path.iterdir()) == [data] and sorted(data.iterdir()) == []


def test_serve_refuses_a_database_whose_directory_cannot_be_checked(tmp_path: Path) -> None:
    """A directory whose name is too long for the system (a garbled path; or one on the way
    this user may not search): the directory check's is_dir() raised OSError, a traceback
    and exit status 1. A usage error naming the path and why, nothing created."""
    db = tmp_path / ("d" * 300) / "jobs.db"
    assert refused_serve(tmp_path, str(db)) == (
        f"jobspine: error: database {shown(str(db))} (flag --db): its directory"
        f" {shown(str(db.parent))} cannot be used (File name too long); create it, or correct"
        " the path\n"
    )
    assert sorted(tmp_path.iterdir()) == []


def test_serve_refuses_a_database_under_a_file(tmp_path: Path) -> None:
    """``--db notes.txt/jobs.db``: the refusal said the directory ``notes.txt`` "does not
    exist; create it", while a file of that name is there and no directory can be made."""
    (tmp_path / "notes.txt").write_text("mine\n")
    db = tmp_path / "notes.txt" / "jobs.db"
    assert refused_serve(tmp_path, str(db)) == (
        f"jobspine: error: database '{db}' (flag --db): its directory '{db.parent}' is not a"
        " directory: correct the path\n"
    )
    assert sorted(tmp_path.iterdir()) == [tmp_path / "notes.txt"]


def test_precedence_flags_env_file_defaults() -> None:
    file = {"log_level": "WARNING", "client": {"url": "ws://file:1", "connect_timeout": 3},
            "server": {"port": 7000, "max_inflight": 4}, "runtime": {"stop_grace": 1}}  # fmt: skip
    env = {"JOBSPINE_URL": "ws://env:2", "JOBSPINE_PORT": "7001", "JOBSPINE_DATA": "/d"}
    got = resolve({"port": 7002}, env, file, "c.toml")
    assert (got["port"].value, got["port"].source) == (7002, "flag --port")
    assert (got["url"].value, got["url"].source) == ("ws://env:2", "env JOBSPINE_URL")
    assert (got["connect_timeout"].value, got["connect_timeout"].source) == (3.0, "file c.toml")
    assert got["max_inflight"].value == 4 and got["stop_grace"].value == 1.0
    assert (got["host"].value, got["host"].source) == ("127.0.0.1", "default")
    assert got["db"].value == "/d/jobspine.db" and got["log_level"].value == "WARNING"
    assert got["db"].source == "default, in env JOBSPINE_DATA"
    assert resolve({}, {}, {})["db"].source == "default"
    for bad in ({"server": {"port": "x"}}, {"server": {"prot": 1}}, {"client": {"url": 5}}):
        with pytest.raises(CLIError) as info:
            resolve({}, {}, bad)
        assert info.value.code == ExitCode.USAGE
    with pytest.raises(CLIError):
        resolve({}, {"JOBSPINE_PORT": "eighty"}, {})
    # A wrong file value is wrong even where a variable or flag overrides it today.
    overridden = {"JOBSPINE_PORT": "7001", "JOBSPINE_URL": "ws://env:2"}
    for bad in ({"server": {"port": "x"}}, {"server": {"port": 99999}}):
        with pytest.raises(CLIError, match=r"server\.port"):
            resolve({"port": 7002}, overridden, bad)
    # The burst's default follows the rate, wherever the rate came from, and says so.
    burst = resolve({}, {"JOBSPINE_REQUEST_RATE": "7"}, {})["request_burst"]
    assert (burst.value, burst.source) == (14, "default (2 x request_rate, at least 1)")


async def test_config_file_reaches_the_server_and_the_client(tmp_path: Path) -> None:
    port, health = free_port(), free_port()
    config = tmp_path / "jobspine.toml"
    config.write_text(
        f'log_level = "INFO"\n[client]\nurl = "ws://127.0.0.1:{port}"\n'
        f"[server]\nport = {port}\nhealth_port = {health}\nmax_inflight = 4\n"
        "[runtime]\nheartbeat_timeout = 12.5\n"
    )
    env = {"JOBSPINE_DATA": str(tmp_path / "data"), "JOBSPINE_CONFIG": str(config)}
    shown = orjson.loads((await arun("config", "--json", "--port", "1", env=env)).stdout)
    assert shown["server.port"] == {"value": 1, "source": "flag --port", "env": "JOBSPINE_PORT"}
    assert shown["runtime.heartbeat_timeout"]["value"] == 12.5
    assert shown["server.health_port"]["source"] == f"file {config}"
    bad = tmp_path / "bad.toml"
    bad.write_text("[server]\nport = 'eighty'\n")
    assert (await arun("config", "--config", str(bad), env=env)).returncode == ExitCode.USAGE
    missing = await arun("config", "--config", str(tmp_path / "none.toml"), env=env)
    assert missing.returncode == ExitCode.USAGE

    environment = {**os.environ, **env}
    process = await trio.lowlevel.open_process(
        [*COMMAND, "serve"], env=environment, stderr=subprocess.PIPE
    )
    try:
        assert process.stderr is not None
        seen = await read_until(process.stderr, b"listening on")
        assert f"ws://127.0.0.1:{port}".encode() in seen and f"pid {process.pid}".encode() in seen
        # A new user learns from this line where the dashboard is.
        assert re.search(rb"dashboard http://127\.0\.0\.1:\d+/ ", seen), seen
        token = orjson.loads(run("token", "--user", "alice", "--json", env=env).stdout)["token"]
        listed = await arun("jobs", "--json", env={**env, "JOBSPINE_TOKEN": token})
        assert listed.returncode == 0 and orjson.loads(listed.stdout) == []
        process.terminate()
        with trio.fail_after(20):
            assert await process.wait() == 0
    finally:
        if process.poll() is None:
            process.kill()
        await process.wait()


async def test_watcher_survives_its_server_as_the_walk_through_says(tmp_path: Path) -> None:
    data, port = tmp_path / "data", free_port()
    async with serve_process(data, port) as served:
        env = {**os.environ, **_client_env(served)}
        job_id = (await served.cli("submit", "research", SLOW)).stdout.strip()
        watcher = await trio.lowlevel.open_process(
            [*COMMAND, "watch", job_id], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        assert watcher.stdout is not None
        seen = await read_until(watcher.stdout, b"reading source 3/")
        served.process.kill()  # `kill -9 <pid>`: this server only
    try:
        async with serve_process(data, port) as served:
            seen = await read_until(watcher.stdout, b"paused (", seen, seconds=30)
            assert b"reconnected" in seen
            assert (await served.cli("resume", job_id)).returncode == 0
            seen = await read_until(watcher.stdout, b"resumed (attempt 2)", seen, seconds=30)
            assert (await served.cli("cancel", job_id)).returncode == 0
            with trio.fail_after(30):
                assert await watcher.wait() == ExitCode.JOB_STOPPED
    finally:
        if watcher.poll() is None:
            watcher.kill()
        await watcher.wait()


@pytest.mark.parametrize("command", ["watch", "submit"])
async def test_exit_on_pause_holds_when_the_server_stops(tmp_path: Path, command: str) -> None:
    """A server stopped with SIGTERM pauses its jobs, then closes every connection: the
    watcher exits 3 on the pause, not 4 on the lost connection, and says the server's next
    start resumes the job."""
    async with serve_process(tmp_path / "data", extra=HANDLERS) as served:
        env = {**os.environ, **_client_env(served)}
        if command == "watch":
            job_id = (await served.cli("submit", "endless", "{}")).stdout.strip()
            argv = [*COMMAND, "watch", job_id, "--exit-on-pause"]
        else:
            argv = [*COMMAND, "submit", "endless", "{}", "--watch", "--exit-on-pause"]
        watcher = await trio.lowlevel.open_process(
            argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        try:
            assert watcher.stdout is not None and watcher.stderr is not None
            seen = await read_until(watcher.stdout, b"tick")
            served.process.send_signal(signal.SIGTERM)
            with trio.fail_after(20):
                code = await watcher.wait()
            while chunk := await watcher.stdout.receive_some():
                seen += chunk
            stderr = await watcher.stderr.receive_some()
        finally:
            if watcher.poll() is None:
                watcher.kill()
            await watcher.wait()
    assert code == ExitCode.JOB_STOPPED, (seen.decode(), stderr.decode())
    assert b"paused (shutdown)\n  resumed when a server starts again" in seen


def test_plain_watch_output_says_each_state_once(capsys: pytest.CaptureFixture[str]) -> None:
    view = PlainView("j1")
    cancelled = JobEvent("j1", "u", 3, EventType.CANCELLED, JobState.CANCELLED, 1.0, {}, "u", 3)
    view.event(cancelled)
    view.finish({"id": "j1", "state": "cancelled", "progress": 10.0})
    failed = JobEvent("j1", "u", 4, EventType.FAILED, JobState.FAILED, 2.0, {"error": {}}, None, 4)
    view.event(failed)
    view.finish({"id": "j1", "state": "failed", "error": {"type": "E", "message": "m"}})
    assert capsys.readouterr().out.splitlines() == ["cancelled", "failed: E: m"]


def test_a_jobs_text_cannot_drive_the_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    """A step label, error or reason is the handler's (or a worker's) text: its control
    characters are shown escaped, in plain output and on the live display, never obeyed; the
    live display does not read it as markup either."""
    hostile = "\x1b]0;pwned\x07 [bold]x[/bold] \x1b[31mRED\rover\nFORGED ROW\tx"
    shown = "\\x1b]0;pwned\\x07 [bold]x[/bold] \\x1b[31mRED\\rover\\nFORGED ROW\\tx"
    view = PlainView("j1")
    data = {"progress": 10.0, "step": hostile}
    view.event(JobEvent("j1", "u", 2, EventType.PROGRESS, JobState.RUNNING, 1.0, data, "u", 2))
    view.finish({"id": "j1", "state": "failed", "error": {"type": "E", "message": hostile}})
    assert capsys.readouterr().out.splitlines() == [f" 10.0%  {shown}", f"failed: E: {shown}"]
    console = Console(file=io.StringIO(), force_terminal=True, width=200)
    live = LiveView("j1", console=console)
    live.start({"progress": 10.0, "state": "running", "step": hostile})
    console.print(live.progress.get_renderable())
    drawn = console.file.getvalue()  # type: ignore[attr-defined]
    assert shown in drawn and "\x1b]0;" not in drawn and "\x07" not in drawn
    job = {"id": "j1", "kind": "k\nk", "state": "running", "progress": 1.0, "step": hostile}
    jobs_table([{**job, "created_at": 0.0}], terminal=False)
    (_, row) = capsys.readouterr().out.splitlines()  # one row, whatever the step holds
    assert row.split()[:2] == ["j1", "k\\nk"] and row.endswith(shown)


def test_the_resume_command_has_a_line_of_its_own(capsys: pytest.CaptureFixture[str]) -> None:
    """A terminal wraps a long line wherever it ends: the command to copy stands alone."""
    view = PlainView("01M8KHPQ")
    reason = {"reason": "the process running it stopped (recovered at start)" * 3}
    paused = JobEvent("01M8KHPQ", "u", 5, EventType.RECOVERY, JobState.PAUSED, 1.0, reason, None, 5)
    view.event(paused)
    view.finish({"id": "01M8KHPQ", "state": "paused", "progress": 40.0})
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("paused (the process running it stopped")
    assert lines[1:] == ["  resume with: jobspine resume 01M8KHPQ"]


def test_the_jobs_table_tells_a_scheduled_job_from_a_ready_one(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A waiting job (``created``) whose ``run_at`` is ahead shows ``scheduled`` and the time
    left; one whose ``run_at`` has passed, or that has none, shows ``created``."""
    now = time.time()
    job = {"kind": "k", "state": "created", "progress": 0.0, "created_at": 0.0}
    jobs_table(
        [
            {**job, "id": "later", "run_at": now + 3 * 3600 + 600},
            {**job, "id": "due", "run_at": now - 5},
            {**job, "id": "ready", "run_at": None},
            {**job, "id": "ran", "state": "running", "run_at": now + 60},
        ],
        terminal=False,
    )
    rows = {row.split()[0]: row for row in capsys.readouterr().out.splitlines()}
    assert re.search(r"  scheduled 3h(09|10)m  ", rows["later"]), rows["later"]
    assert "  created  " in rows["due"] and "  created  " in rows["ready"]
    assert "  running  " in rows["ran"] and "scheduled" not in rows["ran"]
