"""The README's embedding example runs as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).parent.parent / "README.md"


def test_embedding_example_runs(tmp_path: Path) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.DOTALL)
    assert blocks, "README has no python example"
    result = subprocess.run(
        [sys.executable, "-c", blocks[0]], cwd=tmp_path, capture_output=True, text=True, timeout=60
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
