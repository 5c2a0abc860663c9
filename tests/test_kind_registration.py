"""A handler can only be registered under a kind a job can be created with: every way of
registering (``open_runtime(handlers=)``, ``rt.register``, ``--handlers``, a worker process
and a worker's hello) uses the one check ``create_job`` does."""

from __future__ import annotations

import functools
import inspect
import os
import sys
from pathlib import Path
from typing import Any, cast

import pytest
import trio

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


async def _only_ctx(ctx: JobContext) -> int:
    return 1


async def _three(ctx: JobContext, input: Any, extra: Any) -> int:
    return 1


async def _keyword_needed(ctx: JobContext, input: Any, *, mode: str) -> int:
    return 1


async def _keyword_defaulted(ctx: JobContext, input: Any, *, mode: str = "fast") -> int:
    return 2


async def _any(*args: Any) -> int:
    return 3


class _Callable:
    async def __call__(self, ctx: JobContext, input: Any) -> int:
        return 4


#: Callables ``handler(ctx, input)`` cannot call, with what the refusal says of each.
UNCALLABLE: dict[str, tuple[Any, str]] = {
    "only ctx": (_only_ctx, "too many positional arguments"),
    "three": (_three, "missing a required argument: 'extra'"),
    "keyword needed": (_keyword_needed, "missing a required argument: 'mode'"),
    "bound both": (functools.partial(_three, cast(Any, 1), 2), "too many positional arguments"),
    "lambda of nothing": (lambda: None, "too many positional arguments"),
}


@pytest.mark.parametrize("name", list(UNCALLABLE))
async def test_a_handler_that_cannot_take_ctx_and_input_is_not_registered(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``async def handler(ctx)`` was registered, and each of its jobs failed at its start
    with Python's ``TypeError: handler() takes 1 positional argument but 2 were given``
    (naming neither the kind nor the fix), retried as often as its kind allowed; under
    ``jobspine worker`` too, whose start then printed a traceback. Every registration now
    refuses it, naming the kind and what does not fit, and registers nothing."""
    handler, why = UNCALLABLE[name]
    expected = f"the handler of kind 'k' cannot be called with (ctx, input): {why}"
    async with memory_runtime({}) as rt:
        with pytest.raises(InvalidInputError) as refused:
            rt.register("k", handler)
        assert str(refused.value).startswith(expected)
        assert "async def handler(ctx, input)" in str(refused.value)
        assert "k" not in rt.kinds
    with pytest.raises(InvalidInputError, match="cannot be called with"):
        async with open_runtime(backend=MemoryBackend(), handlers={"k": handler}):
            pytest.fail("opened with a handler that cannot take (ctx, input)")
    with pytest.raises(InvalidInputError, match="cannot be called with"):
        WorkerProcess("ws://127.0.0.1:1", "token", {"k": handler})
    (tmp_path / "narrow.py").write_text("async def h(ctx):\n    return 1\n\nHANDLERS = {'k': h}\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
    with pytest.raises(CLIError) as usage:
        load_handlers("narrow:HANDLERS")
    assert usage.value.code == ExitCode.USAGE
    assert str(usage.value).startswith(
        "--handlers narrow:HANDLERS: the handler of kind 'k' cannot be called with (ctx, input)"
    )


@pytest.mark.parametrize(
    ("handler", "result"),
    [
        (_keyword_defaulted, 2),
        (_any, 3),
        (_Callable(), 4),
        (functools.partial(_three, extra=None), 1),
        (print, None),  # no signature Python can read: judged when called, as before
    ],
)
async def test_a_handler_that_can_take_ctx_and_input_is_registered(
    handler: Any, result: int | None
) -> None:
    async with memory_runtime({}) as rt:
        rt.register("k", handler)
        assert "k" in rt.kinds
        if result is not None:
            job = await rt.create_job("k", "alice", {})
            assert (await rt.wait_job(job.id)).result == result
    WorkerProcess("ws://127.0.0.1:1", "token", {"k": handler})


async def _needs_db(ctx: JobContext, input: Any, db: dict[str, int]) -> int:
    return db["answer"]


def _with_db(handler: Any) -> Any:
    """A decorator giving a handler its database, as a dependency-injecting library does:
    ``functools.wraps`` names the wrapper ``__wrapped__``, whose signature is not its own."""

    @functools.wraps(handler)
    async def wrapper(ctx: JobContext, input: Any) -> int:
        return cast(int, await handler(ctx, input, {"answer": 5}))

    return wrapper


async def _ctx_only(ctx: JobContext) -> int:
    return 6


def _ignoring_input(handler: Any) -> Any:
    @functools.wraps(handler)
    async def wrapper(ctx: JobContext, input: Any) -> int:
        return cast(int, await handler(ctx))

    return wrapper


@pytest.mark.parametrize(
    ("handler", "result"), [(_with_db(_needs_db), 5), (_ignoring_input(_ctx_only), 6)]
)
async def test_a_decorated_handler_is_judged_by_its_own_signature(
    handler: Any, result: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A wrapper made with ``functools.wraps`` is called as it is, ``wrapper(ctx, input)``;
    ``inspect.signature`` followed its ``__wrapped__`` to the function it decorates, which
    takes other arguments (a database it is given, or no input), so every registration
    refused a handler that runs: "missing a required argument: 'db'"."""
    async with memory_runtime({}) as rt:
        rt.register("k", handler)
        job = await rt.create_job("k", "alice", {})
        assert (await rt.wait_job(job.id)).result == result
    async with open_runtime(backend=MemoryBackend(), handlers={"k": handler}) as rt:
        assert rt.kinds == ["k"]
    WorkerProcess("ws://127.0.0.1:1", "token", {"k": handler})
    (tmp_path / "injected.py").write_text(
        "import functools\n\n"
        "async def h(ctx, input, db):\n    return db\n\n"
        "@functools.wraps(h)\n"
        "async def wrapper(ctx, input):\n    return await h(ctx, input, 7)\n\n"
        "HANDLERS = {'k': wrapper}\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
    assert list(load_handlers("injected:HANDLERS")) == ["k"]


class _SignatureRaises:
    """A callable handler whose ``__signature__`` raises as it is read (as a lazy proxy's
    attributes may)."""

    @property
    def __signature__(self) -> inspect.Signature:
        raise RuntimeError("not loaded yet")

    async def __call__(self, ctx: JobContext, input: Any) -> int:
        return 8


async def test_a_handler_whose_signature_cannot_be_read_is_judged_when_called() -> None:
    """``inspect.signature`` raising what check_handler did not expect (here the
    RuntimeError of a ``__signature__`` property) crashed every registration with it; such a
    handler is judged when called, as one Python cannot describe is, and its jobs run."""
    handler = _SignatureRaises()
    async with memory_runtime({}) as rt:
        rt.register("k", handler)
        job = await rt.create_job("k", "alice", {})
        assert (await rt.wait_job(job.id)).result == 8
    async with open_runtime(backend=MemoryBackend(), handlers={"k": handler}) as rt:
        assert rt.kinds == ["k"]
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


WORKER = [sys.executable, "-m", "transport._cli", "worker"]


@pytest.mark.parametrize(
    ("handlers", "said"),
    [
        (
            "async def h(ctx):\n    return 1\n\nHANDLERS = {'k': h}\n",
            "--handlers mine:HANDLERS: the handler of kind 'k' cannot be called with (ctx,"
            " input): too many positional arguments",
        ),
        (
            "async def h(ctx, input):\n    return 1\n\n"
            "HANDLERS = {f'{i:03d}' + '\\U0001f600' * 255: h for i in range(256)}\n",
            "the hello of these 259 kinds (their names and options) takes 570,530 bytes, over"
            " the 524,288 a server reads",
        ),
    ],
)
async def test_jobspine_worker_refuses_handlers_it_cannot_serve_in_one_line(
    tmp_path: Path, handlers: str, said: str
) -> None:
    """``jobspine worker`` whose handlers it could not serve (a hello no server reads) ended
    in a traceback and exit status 1; now one line and a usage error, before connecting."""
    (tmp_path / "mine.py").write_text(handlers)
    # Named: the name is in the hello, whose size the message says (HOSTNAME-PID varies).
    args = ["--token", "x", "--handlers", "mine:HANDLERS", "--name", "w"]
    result = await trio.run_process(
        [*WORKER, "--url", "ws://127.0.0.1:1", *args],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    stderr = result.stderr.decode()
    assert result.returncode == ExitCode.USAGE, stderr
    assert "Traceback" not in stderr
    assert stderr.startswith(f"jobspine: error: {said}"), stderr
    assert len(stderr.splitlines()) == 1, stderr
