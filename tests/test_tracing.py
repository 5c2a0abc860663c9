"""OpenTelemetry spans (the ``otel`` extra), recorded by the SDK's in-memory exporter; and the
no-op path when opentelemetry is not importable."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

import pytest
import trio
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from actors import JobContext, JobState, JobStopped

from .conftest import memory_runtime, wait_for_state

_exporter: InMemorySpanExporter | None = None


@pytest.fixture(scope="module")
def spans() -> Iterator[InMemorySpanExporter]:
    """The process's tracer provider (set once: OpenTelemetry allows no second one), exporting
    to memory; the exporter is shut down after this module so later tests keep nothing."""
    global _exporter
    if _exporter is None:
        _exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(_exporter))
        trace.set_tracer_provider(provider)
    yield _exporter
    _exporter.shutdown()


@pytest.fixture
def exporter(spans: InMemorySpanExporter) -> InMemorySpanExporter:
    spans.clear()
    return spans


def named(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [span for span in exporter.get_finished_spans() if span.name == name]


def attributes(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


async def steps(ctx: JobContext, input: Any) -> Any:
    """Checkpoints ``n`` times; with ``hold``, waits to be stopped after the first attempt's
    checkpoints (and checkpoints once more on the way out)."""
    for i in range(input["n"]):
        await ctx.checkpoint({"i": i})
    if input.get("fail"):
        raise ValueError("bad input")
    if input.get("hold") and ctx.resumed_from is None:
        await ctx.wait_stopping()
        await ctx.checkpoint({"i": "stopped"})
        raise JobStopped
    return {"n": input["n"]}


async def test_spans_around_attempts_checkpoints_and_commits(
    exporter: InMemorySpanExporter,
) -> None:
    async with memory_runtime({"steps": steps}, stop_grace=1.0) as rt:
        done = await rt.create_job("steps", "alice", {"n": 2})
        failed = await rt.create_job("steps", "bob", {"n": 1, "fail": True})
        await wait_for_state(rt, done.id)
        await wait_for_state(rt, failed.id)

    attempts = {
        attributes(span)["job.id"]: span for span in named(exporter, "jobspine.job.attempt")
    }
    ok = attempts[done.id]
    assert attributes(ok) == {
        "job.id": done.id,
        "job.kind": "steps",
        "user.id": "alice",
        "job.attempt": 1,
        "outcome": "completed",
    }
    assert ok.status.status_code is not StatusCode.ERROR
    bad = attempts[failed.id]
    assert attributes(bad)["outcome"] == "failed" and attributes(bad)["user.id"] == "bob"
    assert bad.status.status_code is StatusCode.ERROR

    checkpoints = named(exporter, "jobspine.checkpoint")
    assert len(checkpoints) == 3
    ours = [span for span in checkpoints if attributes(span)["job.id"] == done.id]
    assert len(ours) == 2
    for span in ours:  # nested in the attempt: the handler runs in the attempt's task
        assert span.parent is not None and span.parent.span_id == ok.context.span_id
        assert span.context.trace_id == ok.context.trace_id

    commits = named(exporter, "jobspine.store.commit")
    assert commits
    # created, started, checkpoints and the outcome of both jobs, in some grouping
    assert sum(attributes(span)["events"] for span in commits) == 5 + 4
    assert all(attributes(span)["requests"] >= 1 for span in commits)


async def test_one_span_per_attempt(exporter: InMemorySpanExporter) -> None:
    async with memory_runtime({"steps": steps}, stop_grace=1.0) as rt:
        job = await rt.create_job("steps", "alice", {"n": 1, "hold": True})
        async with rt.events() as events:
            async for event in events:
                if event.job_id == job.id and event.type == "checkpoint":
                    break
        await rt.pause(job.id)
        await rt.resume(job.id)
        assert (await wait_for_state(rt, job.id)).state is JobState.COMPLETED

    attempts = sorted(
        (attributes(span) for span in named(exporter, "jobspine.job.attempt")),
        key=lambda found: int(found["job.attempt"]),
    )
    assert [(a["job.attempt"], a["outcome"]) for a in attempts] == [
        (1, "stopped"),
        (2, "completed"),
    ]


NO_OTEL = """
import sys
sys.modules["opentelemetry"] = None  # importing it now raises ImportError
import trio
from actors import MemoryBackend, open_runtime

async def count(ctx, input):
    await ctx.checkpoint({"at": 1})
    return {"ok": True}

async def main():
    async with open_runtime(backend=MemoryBackend(), handlers={"count": count}) as rt:
        async with rt.events() as events:
            job = await rt.create_job("count", "alice", {})
            async for event in events:
                if event.job_id == job.id and event.type == "completed":
                    break
        print((await rt.get_job(job.id)).result, "opentelemetry.trace" in sys.modules)

trio.run(main)
"""


def test_without_opentelemetry_spans_are_a_no_op() -> None:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(NO_OTEL)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "{'ok': True} False"  # and jobspine never imported it


async def test_no_provider_means_no_span_work() -> None:
    """With opentelemetry loaded but no provider set, no span is made at all."""
    script = (
        "import opentelemetry.trace\n"
        "from actors._tracing import span\n"
        "with span('x', {}) as s: print(s._span)\n"
    )
    result = await trio.run_process(
        [sys.executable, "-c", script], capture_stdout=True, capture_stderr=True
    )
    assert result.stdout.decode().strip() == "None"
