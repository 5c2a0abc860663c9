"""A pytest plugin giving a runtime to tests: ``jobspine_runtime`` (on a temporary SQLite file)
and ``jobspine_memory_runtime`` (on the in-memory store: no threads, so its time is the test's
clock, pytest-trio's ``autojump_clock`` included).

Enable it with ``pytest_plugins = ["actors.testing"]`` in a ``conftest.py``; override the
``jobspine_handlers`` or ``jobspine_config`` fixtures to register your own handlers or timings.
It needs pytest-trio (``pip install 'jobspine[testing]'``). An ``async def`` test that uses
either runtime runs under Trio even without ``trio_mode = true`` or ``@pytest.mark.trio``.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable
from inspect import iscoroutinefunction
from pathlib import Path
from typing import TypeVar

import trio
import trio.testing

try:
    import pytest
except ImportError as exc:  # exercised in a subprocess without pytest (tests/test_trial_faults)
    # Imported outside a test run (an application's module importing its test helpers): the
    # bare "No module named 'pytest'" did not say what to install.
    raise ModuleNotFoundError(
        "actors.testing is a pytest plugin and needs pytest and pytest-trio: pip install"
        " 'jobspine[testing]' (or add both to your test dependencies)",
        name="pytest",
    ) from exc

try:
    from pytest_trio import trio_fixture as _untyped_trio_fixture
except ImportError as exc:  # pragma: no cover - exercised in a subprocess without pytest-trio
    raise ImportError(
        "actors.testing needs pytest-trio: pip install 'jobspine[testing]'"
        " (or add pytest-trio to your test dependencies)"
    ) from exc

from ._backend import MemoryBackend
from ._demo import DEMO_HANDLERS
from ._runtime import Runtime, RuntimeConfig, open_runtime
from ._worker import Handler

__all__ = ["jobspine_config", "jobspine_handlers", "jobspine_memory_runtime", "jobspine_runtime"]

#: The fixtures whose async tests the plugin runs under Trio.
_RUNTIMES = frozenset({"jobspine_runtime", "jobspine_memory_runtime"})

F = TypeVar("F", bound=Callable[..., object])
#: A fixture pytest-trio runs in the test's Trio loop, with or without ``trio_mode``.
trio_fixture: Callable[[F], F] = _untyped_trio_fixture


def pytest_configure(config: pytest.Config) -> None:
    if not config.pluginmanager.hasplugin("trio"):
        raise pytest.UsageError(
            "actors.testing needs the pytest-trio plugin, which is installed but disabled"
            " (-p no:trio?)"
        )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run ``async def`` tests that use a runtime fixture under Trio (what ``trio_mode`` does
    for every async test)."""
    if config.getini("trio_mode"):
        return
    for item in items:
        if (
            isinstance(item, pytest.Function)
            and not _RUNTIMES.isdisjoint(item.fixturenames)
            and iscoroutinefunction(item.obj)
            and item.get_closest_marker("trio") is None
        ):
            item.add_marker(pytest.mark.trio)


@pytest.fixture
def jobspine_handlers() -> dict[str, Handler]:
    return dict(DEMO_HANDLERS)


@pytest.fixture
def jobspine_config() -> RuntimeConfig:
    return RuntimeConfig(stop_grace=1.0, sqlite_synchronous="NORMAL")


@trio_fixture
async def jobspine_runtime(
    tmp_path: Path, jobspine_handlers: dict[str, Handler], jobspine_config: RuntimeConfig
) -> AsyncIterator[Runtime]:
    """A running runtime on ``tmp_path / "jobspine.db"``, closed after the test. A test that
    also requests ``autojump_clock`` (any ``MockClock`` that jumps by itself) fails at once,
    saying to use :func:`jobspine_memory_runtime`."""
    clock = trio.lowlevel.current_clock()
    if isinstance(clock, trio.testing.MockClock) and clock.autojump_threshold != math.inf:
        # The clock jumps whenever every task waits, and here they wait on the database's
        # thread: virtual time ran on while SQLite worked (a 2.5 s job took 41 virtual
        # seconds), so stalls, timeouts and delays fired at no time the test could predict.
        pytest.fail(
            "jobspine_runtime keeps its SQLite database in a thread, which autojump_clock"
            " does not wait for: the virtual clock would jump while the database works."
            " Use jobspine_memory_runtime (the same runtime in memory) with autojump_clock",
            pytrace=False,
        )
    async with open_runtime(
        tmp_path / "jobspine.db", handlers=jobspine_handlers, config=jobspine_config
    ) as runtime:
        yield runtime


@trio_fixture
async def jobspine_memory_runtime(
    jobspine_handlers: dict[str, Handler], jobspine_config: RuntimeConfig
) -> AsyncIterator[Runtime]:
    """A running runtime on the in-memory store, closed after the test. Nothing in it runs
    in a thread, so delays, backoffs, timeouts and stalls follow the test's clock: with
    ``autojump_clock`` requested by the test, an hour of them passes in about a second (the
    runtime's loops wake once per virtual second, each wake a jump; the SQLite runtime's
    database thread does not follow a virtual clock)."""
    async with open_runtime(
        backend=MemoryBackend(), handlers=jobspine_handlers, config=jobspine_config
    ) as runtime:
        yield runtime
