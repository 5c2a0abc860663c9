"""The README's embedding example runs as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).parent.parent / "README.md"


def test_embedding_example_runs(tmp_path: Path) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.DOTALL)
    embedding = next(b for b in blocks if "open_runtime(" in b)
    result = subprocess.run(
        [sys.executable, "-c", embedding], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "completed {'result': {'counted': 20}}" in result.stdout
    assert (tmp_path / "jobs.db").exists()


def test_readme_documents_every_command_variable_and_exit_status() -> None:
    from transport._cli import parser
    from transport._config import SETTINGS
    from transport._exit import ExitCode

    text = README.read_text()
    sub = next(a for a in parser()._actions if a.dest == "command")
    for command in sub.choices:  # type: ignore[union-attr]
        assert f"| `{command}" in text or f"`{command} ID`" in text, command
    for variable in {s.env for s in SETTINGS if s.env} | {"JOBSPINE_CONFIG", "JOBSPINE_DATA"}:
        assert f"| `{variable}` |" in text, variable
    for code in ExitCode:
        assert f"\n| {code.value} | " in text, code


def test_readme_commands_hurt_no_other_users_processes() -> None:
    text = README.read_text()
    assert not re.search(r"\b(pkill|killall)\b", text)
    walk = text[text.index("## Walk-through") : text.index("## Command line")]
    assert "kill -9 12345" in walk and "pid 12345" in walk
    # the demo job runs about a minute: long enough to kill the server by hand
    depth = int(re.search(r'"depth": (\d+)', walk).group(1))  # type: ignore[union-attr]
    assert depth * 0.2 >= 50


async def test_client_example_runs_against_a_server(tmp_path: Path) -> None:
    """The README's Python client example, as written, against a served server: it follows
    its job from its first event to its last."""
    import os

    import trio

    from .serving import serving, token

    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.DOTALL)
    (example,) = [b for b in blocks if "open_client(" in b]
    async with serving(tmp_path / "client.db") as running:
        env = {**os.environ, "JOBSPINE_URL": running.url, "JOBSPINE_TOKEN": token("alice")}
        env["PYTHONPATH"] = str(README.parent)
        with trio.fail_after(30):
            result = await trio.run_process(
                [sys.executable, "-c", example], env=env, capture_stdout=True, capture_stderr=True
            )
    lines = result.stdout.decode().splitlines()
    assert lines[0].startswith("1 created ") and " completed " in lines[-1], lines
    assert [int(line.split()[0]) for line in lines] == list(range(1, len(lines) + 1))
