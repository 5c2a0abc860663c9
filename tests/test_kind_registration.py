"""A handler can only be registered under a kind a job can be created with: every way of
registering (``open_runtime(handlers=)``, ``rt.register``, ``--handlers``, a worker process
and a worker's hello) uses the one check ``create_job`` does."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from actors import (
    InvalidInputError,
    JobContext,
    KindOptions,
    MemoryBackend,
    RuntimeConfig,
    UnknownKindError,
    open_runtime,
)
from tests.conftest import memory_runtime
from transport._cli import load_handlers
from transport._exit import CLIError, ExitCode
from transport._worker_process import WorkerProcess
from transport._workers import WorkerHello, hello_problem


async def _handler(ctx: JobContext, input: Any) -> int:
    return 1


#: Kinds ``create_job`` never takes (or a log line could not show as they are).
BAD_KINDS = ["", "a\x00b", "a\x01b", "tab\there", "a\nb", "a\u202e", "k" * 1025, "a\ud800"]


@pytest.mark.parametrize("kind", BAD_KINDS)
async def test_a_kind_no_job_can_be_created_with_cannot_be_registered(kind: str) -> None:
    """Registered, ``""`` or ``"a\\x00b"`` was listed in ``rt.kinds`` and every create of it
    failed with invalid_input; ``"a\\nb"`` forged log lines and could not be declared by a
    worker. Now every registration refuses it, naming it, and registers nothing."""
    async with memory_runtime({}) as rt:
        with pytest.raises(InvalidInputError, match=r"^kind"):
            rt.register(kind, _handler)
        assert kind not in rt.kinds
        # Not registered, so no job of it is stored either.
        with pytest.raises(UnknownKindError):
            await rt.create_job(kind, "alice", {})
        assert await rt.list_jobs("alice") == []
    with pytest.raises(InvalidInputError, match=r"^kind"):
        async with open_runtime(backend=MemoryBackend(), handlers={kind: _handler}):
            pytest.fail("opened with a kind no job can be created with")
    with pytest.raises(InvalidInputError, match=r"^kind"):
        WorkerProcess("ws://127.0.0.1:1", "token", {kind: _handler})
    problem = hello_problem(WorkerHello("token", [kind], 1))
    assert problem is not None and problem.startswith("kinds: kind")


@pytest.mark.parametrize("kind", ["research-2", "résumé ✓", "a b", "k" * 1024])
async def test_a_kind_a_job_can_be_created_with_is_registered(kind: str) -> None:
    async with memory_runtime({}) as rt:
        rt.register(kind, _handler)
        job = await rt.create_job(kind, "alice", {})
        assert (await rt.wait_job(job.id)).result == 1
    assert hello_problem(WorkerHello("token", [kind], 1)) is None


def test_handlers_option_refuses_a_kind_no_job_can_be_created_with(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``serve --handlers`` and ``worker --handlers``: a usage error naming the kind, before
    any port or database is opened."""
    (tmp_path / "bad_kinds.py").write_text(
        "async def h(ctx, input):\n    return 1\n\nHANDLERS = {'ok': h, 'a\\x00b': h}\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
    with pytest.raises(CLIError) as refused:
        load_handlers("bad_kinds:HANDLERS")
    assert refused.value.code == ExitCode.USAGE
    assert str(refused.value) == (
        "--handlers bad_kinds:HANDLERS: kind must not contain a NUL character"
    )


@pytest.mark.parametrize("handler", [None, "myapp:count", 5])
async def test_a_handler_that_cannot_be_called_is_not_registered(handler: Any) -> None:
    """``open_runtime(handlers={"k": None})`` opened, and a job of ``k`` never ran: its
    ``wait_job`` waited for ever. Every registration now refuses it, naming the kind."""
    async with memory_runtime({}) as rt:
        with pytest.raises(InvalidInputError, match="handler of kind 'k'"):
            rt.register("k", handler)
        assert "k" not in rt.kinds
    with pytest.raises(InvalidInputError, match="handler of kind 'k'"):
        async with open_runtime(backend=MemoryBackend(), handlers={"k": handler}):
            pytest.fail("opened with a handler that cannot be called")
    with pytest.raises(InvalidInputError, match="handler of kind 'k'"):
        WorkerProcess("ws://127.0.0.1:1", "token", {"k": handler})


def test_a_worker_whose_hello_the_server_cannot_read_is_refused_at_once() -> None:
    """Kinds each fine, but together a hello over the 512 KiB a server reads before accepting
    one (256 names of 1 KB, the most a name holds, with their options): the server closed it
    with 1009, which a worker retries, so ``jobspine worker`` retried for ever. Now refused as
    the worker is built, saying so."""
    kinds = {f"{i:03d}" + "\U0001f600" * 255: _handler for i in range(256)}
    with pytest.raises(InvalidInputError, match="over the 524,288 a server reads"):
        WorkerProcess("ws://127.0.0.1:1", "token", kinds)
    WorkerProcess("ws://127.0.0.1:1", "token", dict(list(kinds.items())[:32]))


@pytest.mark.parametrize("kind", ["", "a\tb", 5])
def test_a_runtime_config_refuses_a_kind_no_job_can_be_created_with(kind: Any) -> None:
    """``RuntimeConfig(max_running_per_kind=…)`` and ``kinds=…`` took kinds that every
    registration refuses (the config file's table refused them): now refused alike."""
    with pytest.raises(InvalidInputError, match=r"^kind"):
        RuntimeConfig(max_running_per_kind={kind: 1})
    with pytest.raises(InvalidInputError, match=r"^kind"):
        RuntimeConfig(kinds={kind: KindOptions()})
