"""A pytest-trio fixture giving a runtime on a temporary SQLite file.

Enable it with ``pytest_plugins = ["actors.testing"]`` in a ``conftest.py``; override the
``jobspine_handlers`` or ``jobspine_config`` fixtures to register your own handlers or timings.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ._demo import DEMO_HANDLERS
from ._runtime import Runtime, RuntimeConfig, open_runtime
from ._worker import Handler

__all__ = ["jobspine_config", "jobspine_handlers", "jobspine_runtime"]


@pytest.fixture
def jobspine_handlers() -> dict[str, Handler]:
    return dict(DEMO_HANDLERS)


@pytest.fixture
def jobspine_config() -> RuntimeConfig:
    return RuntimeConfig(stop_grace=1.0, sqlite_synchronous="NORMAL")


@pytest.fixture
async def jobspine_runtime(
    tmp_path: Path, jobspine_handlers: dict[str, Handler], jobspine_config: RuntimeConfig
) -> AsyncIterator[Runtime]:
    async with open_runtime(
        tmp_path / "jobspine.db", handlers=jobspine_handlers, config=jobspine_config
    ) as runtime:
        yield runtime
