"""Faults a new user's trial of the command line found: a watch ended by the server's refusal,
a watched job the server no longer has, ``ui`` signing in unchecked, ``token``'s limits, the
exit status of a missing browser."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import jwt
import trio

from transport import verify_token
from transport._exit import EXIT_HELP, ExitCode

from .serving import SECRET, free_port, serving, token
from .test_cli import COMMAND
from .test_cli_surface import read_until

HOLD = '{"phases": [], "hold": true}'


def _env(url: str, user_token: str, **extra: str) -> dict[str, str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("JOBSPINE_")}
    return {**environment, "JOBSPINE_URL": url, "JOBSPINE_TOKEN": user_token, **extra}


async def cli(
    url: str, user_token: str, *args: str, **extra: str
) -> subprocess.CompletedProcess[str]:
    result = await trio.run_process(
        [*COMMAND, *args],
        env=_env(url, user_token, **extra),
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    return subprocess.CompletedProcess(
        result.args, result.returncode, result.stdout.decode(), result.stderr.decode()
    )


def _one_line(stderr: str) -> str:
    """The one error line (a follower logs its reconnections before it)."""
    lines = [line for line in stderr.splitlines() if " jobspine.client: " not in line]
    assert len(lines) == 1 and lines[0].startswith("jobspine: error: "), stderr
    assert "Traceback" not in stderr, stderr
    return lines[0]


async def test_a_token_expiring_during_a_watch_is_one_line_and_exit_5(tmp_path: Path) -> None:
    """``watch`` and ``submit --watch`` whose token expires while the job runs: the server
    closes with 4004. That was an exception group's traceback (the client's ``token_expired``
    and the watch's 'the event stream ended') and exit status 1, which says the job failed;
    it is one line saying the token expired and how to get one, exit status 5."""
    async with serving(tmp_path / "db.sqlite") as running:
        job = await cli(running.url, token("alice"), "submit", "emitter", HOLD)
        assert job.returncode == 0, job.stderr
        job_id = job.stdout.strip()
        short = token("alice", ttl=5)  # past two process starts, however slow
        async with trio.open_nursery() as nursery:
            results: dict[str, subprocess.CompletedProcess[str]] = {}

            async def run(name: str, *args: str) -> None:
                with trio.fail_after(30):
                    results[name] = await cli(running.url, short, *args)

            nursery.start_soon(run, "watch", "watch", job_id)
            nursery.start_soon(run, "submit", "submit", "emitter", HOLD, "--watch")
        # Refused at the hello, before any watch: the usual words.
        expired = await cli(running.url, token("alice", ttl=-5), "watch", job_id)
        assert expired.returncode == ExitCode.AUTH, expired.stderr
        assert "token_expired" in expired.stderr and "while watching" not in expired.stderr
    assert set(results) == {"watch", "submit"}
    for name, result in results.items():
        assert result.returncode == ExitCode.AUTH, (name, result.stderr)
        line = _one_line(result.stderr)
        assert "token_expired" in line and "jobspine token --user NAME" in line, line
        assert "Traceback" not in result.stderr and "event stream" not in line, line


async def test_a_watched_job_the_server_no_longer_has_ends_the_watch(tmp_path: Path) -> None:
    """The server comes back on another database (a new epoch, the same secret): the watched
    job is not in it. ``watch`` retried its resubscription forever ('refused (unknown_job
    …); retrying in 9 s'); it stops as the dashboard does, one line saying the server's
    database changed, and the exit status of an unknown job (6)."""
    port = free_port()
    async with serving(tmp_path / "one.sqlite", port=port) as running:
        job = await cli(running.url, token("alice"), "submit", "emitter", HOLD)
        job_id = job.stdout.strip()
        watcher = await trio.lowlevel.open_process(
            [*COMMAND, "watch", job_id],
            env=_env(running.url, token("alice")),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            await read_until(watcher.stdout, b"started")
        except BaseException:
            watcher.kill()
            raise
    try:
        async with serving(tmp_path / "two.sqlite", port=port):
            with trio.fail_after(30):
                code = await watcher.wait()
        assert watcher.stderr is not None
        stderr = (await watcher.stderr.receive_some()).decode()
    finally:
        if watcher.poll() is None:
            watcher.kill()
        await watcher.wait()
    assert code == ExitCode.REFUSED, stderr
    line = _one_line(stderr)
    assert f"job {job_id} is not on the server" in line and "another database" in line, line


async def test_ui_checks_the_server_and_the_token_with_a_health_port_given(
    tmp_path: Path,
) -> None:
    """``ui --print-url --health-port P`` (or ``JOBSPINE_HEALTH_PORT``) printed a signed-in
    URL, exit 0, for no server at ``--url`` and any token. It connects first, always: no
    server is exit 4, a refused token exit 5, neither printing the token; the port given
    only replaces the one announced."""
    nobody = f"ws://127.0.0.1:{free_port()}"
    health = str(free_port())
    quick = ("--connect-timeout", "1")
    async with serving(tmp_path / "db.sqlite") as running:
        cases = [
            (nobody, ("--health-port", health), {}, ExitCode.CANNOT_CONNECT),
            (nobody, (), {"JOBSPINE_HEALTH_PORT": health}, ExitCode.CANNOT_CONNECT),
            (running.url, ("--health-port", health), {}, ExitCode.AUTH),
            (running.url, (), {"JOBSPINE_HEALTH_PORT": health}, ExitCode.AUTH),
        ]
        for url, flags, extra, status in cases:
            done = await cli(url, "garbage", "ui", "--print-url", *quick, *flags, **extra)
            assert (done.returncode, done.stdout) == (status, ""), (url, flags, extra, done)
            assert "garbage" not in done.stderr and "Traceback" not in done.stderr, done.stderr
        signed = await cli(
            running.url, token("alice"), "ui", "--print-url", "--health-port", health
        )
        assert signed.returncode == 0, signed.stderr
        assert signed.stdout.startswith(f"http://127.0.0.1:{health}/#token="), signed.stdout


async def test_no_browser_to_start_is_a_documented_exit_status(tmp_path: Path) -> None:
    """``BROWSER=/bin/false jobspine ui``: exit 2, which the README's table and ``--help``
    gave to usage errors alone. The status is documented for it (the remedy is another
    command line: ``--print-url``)."""
    async with serving(tmp_path / "db.sqlite") as running:
        port = str(free_port())  # this server has no HTTP port: give one
        done = await cli(
            running.url, token("alice"), "ui", "--health-port", port, BROWSER="/bin/false"
        )
    assert done.returncode == ExitCode.USAGE, done.stderr
    assert "--print-url" in _one_line(done.stderr)
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    row = next(line for line in readme.splitlines() if line.startswith("| 2 |"))
    assert "`ui`" in row and "browser" in row, row
    assert "no browser" in EXIT_HELP.split("\n  3 ")[0], EXIT_HELP


def _token(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("JOBSPINE_")}
    return subprocess.run(
        [*COMMAND, "token", *args],
        env={**environment, "JOBSPINE_SECRET": SECRET, **env},
        capture_output=True,
        text=True,
        check=False,
    )


async def test_token_admits_what_the_runtime_admits_and_reads_ttl_as_a_duration(
    tmp_path: Path,
) -> None:
    """``token --user`` refused user ids over 256 characters, which the runtime takes up to
    1,024 characters (and 1,024 bytes of UTF-8); ``--ttl 3153600001`` was shown as
    ``3.1536e+09``; ``--ttl 1d`` was refused though other durations take units; the help
    said '1 to 100 years'; a short secret printed PyJWT's raw warning."""
    for user in ("x" * 300, "x" * 1024, "é" * 512):
        minted = _token("--user", user)
        assert minted.returncode == 0, minted.stderr
        assert verify_token(SECRET, minted.stdout.strip()).user_id == user
    async with serving(tmp_path / "db.sqlite") as running:  # the server takes it, and stores it
        for user in ("x" * 1024, "é" * 512):
            longest = _token("--user", user).stdout.strip()
            job = await cli(running.url, longest, "submit", "research", '{"query": "q"}', "--json")
            assert job.returncode == 0 and json.loads(job.stdout)["user_id"] == user, job
    for user, said in (("x" * 1025, "1025 characters"), ("é" * 513, "1,026 bytes")):
        refused = _token("--user", user)
        assert refused.returncode == ExitCode.USAGE and refused.stdout == "", refused
        assert said in _one_line(refused.stderr), refused.stderr
        assert len(refused.stderr) < 300, refused.stderr  # the value is shown cut
    over = _token("--user", "bob", "--ttl", "3153600001")
    assert over.returncode == ExitCode.USAGE and "--ttl 3153600001:" in over.stderr, over.stderr
    for ttl, seconds in (("1d", 86400), ("90", 90), ("2w", 14 * 86400)):
        minted = _token("--user", "bob", "--ttl", ttl)
        assert minted.returncode == 0, (ttl, minted.stderr)
        claims = jwt.decode(minted.stdout.strip(), options={"verify_signature": False})
        assert claims["exp"] - claims["iat"] == seconds, ttl
    for ttl in ("0.5", "6M", "soon"):
        refused = _token("--user", "bob", "--ttl", ttl)
        assert refused.returncode == ExitCode.USAGE, (ttl, refused)
        assert _one_line(refused.stderr).startswith(f"jobspine: error: --ttl {ttl}"), ttl
    helped = " ".join(_token("--help").stdout.split())
    assert "1 second to 100 years" in helped and "7d" in helped, helped
    short = _token("--user", "bob", JOBSPINE_SECRET="short")
    assert short.returncode == 0 and short.stdout.count(".") == 2, short
    (line,) = short.stderr.splitlines()
    assert line.startswith("jobspine: warning: ") and "32 bytes" in line, short.stderr
