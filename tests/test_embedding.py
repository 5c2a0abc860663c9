"""Operating and embedding through the real ``jobspine`` console script: JSON logs, handlers
from the current directory, ``--no-demo``; and the ``actors.testing`` plugin in a project of
its own."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import trio

from transport import mint_token

from .serving import SECRET, free_port
from .test_cli import COMMAND

APP = """
from actors import JobContext


async def boom(ctx: JobContext, input: dict) -> dict:
    await ctx.checkpoint({"at": 1})
    raise ValueError("boom: " + input["why"])


async def echo(ctx: JobContext, input: dict) -> dict:
    return input


HANDLERS = {"boom": boom, "echo": echo}
"""


async def run_cli(cwd: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[bytes]:
    result = await trio.run_process(
        [*COMMAND, *args], cwd=cwd, env=env, capture_stdout=True, capture_stderr=True, check=False
    )
    return subprocess.CompletedProcess(result.args, result.returncode, result.stdout, result.stderr)


async def serve_and(
    tmp_path: Path, serve_args: list[str], env_extra: dict[str, str], *commands: list[str]
) -> tuple[list[subprocess.CompletedProcess[bytes]], str]:
    """Run ``jobspine serve`` with its cwd holding ``myapp.py``, run each client command,
    stop the server with SIGTERM; return the commands' results and the server's stderr."""
    app = tmp_path / "app"
    app.mkdir()
    (app / "myapp.py").write_text(APP)
    port = free_port()
    env = {
        **os.environ,
        "JOBSPINE_DATA": str(tmp_path / "data"),
        "JOBSPINE_URL": f"ws://127.0.0.1:{port}",
        "JOBSPINE_SECRET": SECRET,
        "JOBSPINE_TOKEN": mint_token(SECRET, "alice"),
        **env_extra,
    }
    env.pop("PYTHONPATH", None)
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        process = await trio.lowlevel.open_process(
            [*COMMAND, "serve", "--port", str(port), "--health-port", "0", *serve_args],
            cwd=app,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=out,
        )
        try:
            with trio.fail_after(20):
                while "listening on" not in log.read_text():
                    assert process.poll() is None, log.read_text()
                    await trio.sleep(0.05)
            results = [await run_cli(app, env, *command) for command in commands]
            process.send_signal(signal.SIGTERM)
            with trio.fail_after(15):
                assert await process.wait() == 0
        finally:
            if process.poll() is None:
                process.kill()
                await process.wait()
    return results, log.read_text()


async def test_json_logs_carry_job_fields_and_handlers_load_from_cwd(tmp_path: Path) -> None:
    (boom,), stderr = await serve_and(
        tmp_path,
        ["--handlers", "myapp:HANDLERS", "--log-format", "json"],
        {},
        ["submit", "boom", '{"why": "testing"}', "--watch"],
    )
    assert boom.returncode == 1 and b"failed: ValueError: boom: testing" in boom.stdout
    job_id = boom.stdout.decode().splitlines()[0]
    lines = [json.loads(line) for line in stderr.splitlines()]  # every line is JSON
    assert lines and all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    assert any("listening on" in line["message"] for line in lines)
    about_job = [line for line in lines if job_id in line["message"]]
    assert about_job
    for line in about_job:
        assert line["job_id"] == job_id
        assert line["user_id"] == "alice"
        assert line["attempt"] == 1
        assert line["event"] == "failed"
    assert "raised ValueError: boom: testing" in about_job[0]["message"]
    # The traceback is logged: the stored error keeps only the type and the message.
    assert 'raise ValueError("boom: " + input["why"])' in about_job[0]["exception"]


async def test_no_demo_leaves_out_the_demo_kinds(tmp_path: Path) -> None:
    (research, echo, trade), stderr = await serve_and(
        tmp_path,
        ["--no-demo", "--handlers", "myapp:HANDLERS"],
        {"JOBSPINE_LOG_FORMAT": "json"},
        ["submit", "research", '{"query": "q"}'],
        ["submit", "echo", '{"x": 1}', "--watch"],
        ["submit", "trade", '{"symbol": "X"}'],
    )
    for refused in (research, trade):
        assert refused.returncode != 0 and b"unknown_kind" in refused.stderr, refused
    assert echo.returncode == 0 and b'completed: {"x":1}' in echo.stdout
    assert all(json.loads(line) for line in stderr.splitlines())  # the variable chose JSON


async def test_bad_log_format_is_a_usage_error(tmp_path: Path) -> None:
    env = {**os.environ, "JOBSPINE_LOG_FORMAT": "yaml", "JOBSPINE_DATA": str(tmp_path)}
    result = await run_cli(tmp_path, env, "token", "--user", "alice")
    assert result.returncode == 2 and b"log format must be one of text, json" in result.stderr
    flag = await run_cli(tmp_path, env, "serve", "--log-format", "xml")
    assert flag.returncode == 2 and b"invalid choice: 'xml'" in flag.stderr


# -- the actors.testing plugin in an application's own project ---------------------------------

APP_TEST = """
from actors import JobContext, Runtime, RuntimeConfig
import pytest
import trio


async def double(ctx: JobContext, input: dict) -> dict:
    await ctx.checkpoint({"half": input["n"]})
    return {"n": 2 * input["n"]}


@pytest.fixture
def jobspine_handlers():
    return {"double": double}


async def test_double(jobspine_runtime: Runtime) -> None:
    async with jobspine_runtime.events() as events:
        job = await jobspine_runtime.create_job("double", "alice", {"n": 21})
        async for event in events:
            if event.job_id == job.id and event.type == "completed":
                break
    assert (await jobspine_runtime.get_job(job.id)).result == {"n": 42}


async def slowly(ctx: JobContext, input: dict) -> dict:
    await trio.sleep(3600)
    return {"slept": 3600}


@pytest.fixture
def jobspine_config() -> RuntimeConfig:
    return RuntimeConfig(heartbeat_timeout=7200)


async def test_an_hour_on_the_memory_runtime(jobspine_memory_runtime: Runtime, autojump_clock):
    jobspine_memory_runtime.register("slowly", slowly)
    job = await jobspine_memory_runtime.create_job("slowly", "alice", {}, delay=3600)
    start = trio.current_time()
    done = await jobspine_memory_runtime.wait_job(job.id)
    assert done.result == {"slept": 3600} and trio.current_time() - start >= 7200
"""


def run_app_tests(
    tmp_path: Path, pyproject: str, *args: str, app_test: str = APP_TEST
) -> subprocess.CompletedProcess[str]:
    project = tmp_path / "project"
    project.mkdir()
    (project / "pyproject.toml").write_text(textwrap.dedent(pyproject))
    (project / "conftest.py").write_text('pytest_plugins = ["actors.testing"]\n')
    (project / "test_app.py").write_text(app_test)
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTEST")}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize(
    "pyproject",
    [
        # the README's lines
        """
        [tool.pytest.ini_options]
        trio_mode = true
        """,
        # nothing but the plugin: tests using the fixture still run under Trio
        """
        [tool.pytest.ini_options]
        addopts = "-ra"
        """,
    ],
    ids=["trio_mode", "plugin_only"],
)
def test_the_fixture_works_in_an_application_project(tmp_path: Path, pyproject: str) -> None:
    result = run_app_tests(tmp_path, pyproject)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 passed" in result.stdout


def test_the_fixture_says_what_is_missing_without_pytest_trio(tmp_path: Path) -> None:
    result = run_app_tests(tmp_path, "[tool.pytest.ini_options]\n", "-p", "no:trio")
    assert result.returncode != 0
    assert "actors.testing needs the pytest-trio plugin" in result.stdout + result.stderr


AUTOJUMP_ON_SQLITE = """
import trio


async def slow(ctx, input):
    for i in range(20):
        await ctx.checkpoint({"i": i})
    return "done"


async def test_sqlite_under_autojump(jobspine_runtime, autojump_clock):
    jobspine_runtime.register("slow", slow)
    job = await jobspine_runtime.create_job("slow", "alice", {})
    start = trio.current_time()
    await jobspine_runtime.wait_job(job.id)
    assert trio.current_time() - start < 0.5  # no wait of its own: no virtual time should pass
"""


def test_the_sqlite_fixture_under_autojump_clock_fails_saying_what_to_use(tmp_path: Path) -> None:
    """The README says a virtual clock does not stop for the SQLite runtime's thread; a test
    that asked for both ran anyway, its clock jumping while the database worked (its job's
    20 checkpoints took 146 virtual seconds: stalls and timeouts fire early). It fails at once,
    naming the fixture to use."""
    result = run_app_tests(
        tmp_path, "[tool.pytest.ini_options]\ntrio_mode = true\n", app_test=AUTOJUMP_ON_SQLITE
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Use jobspine_memory_runtime (the same runtime in memory) with autojump_clock" in (
        result.stdout
    )
    assert "1 failed" in result.stdout and "AssertionError" not in result.stdout
