"""The whole transition matrix, and the errors of an illegal transition."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import trio

from actors import (
    TERMINAL_STATES,
    TRANSITIONS,
    IllegalTransitionError,
    JobContext,
    JobState,
    check_transition,
)

from .conftest import memory_runtime, wait_for_state

S = JobState

ALLOWED = {
    (S.CREATED, S.RUNNING),
    (S.CREATED, S.CANCELLED),
    (S.CREATED, S.FAILED),
    (S.CREATED, S.PAUSED),
    (S.CREATED, S.CREATED),
    (S.RUNNING, S.COMPLETED),
    (S.RUNNING, S.FAILED),
    (S.RUNNING, S.CANCELLED),
    (S.RUNNING, S.PAUSED),
    (S.RUNNING, S.CREATED),
    (S.PAUSED, S.CREATED),
    (S.PAUSED, S.CANCELLED),
    (S.FAILED, S.CREATED),
    (S.CANCELLED, S.CREATED),
}


@pytest.mark.parametrize(("src", "dst"), list(itertools.product(JobState, JobState)))
def test_transition_matrix(src: JobState, dst: JobState) -> None:
    if (src, dst) in ALLOWED:
        check_transition("j1", src, dst)
    else:
        with pytest.raises(IllegalTransitionError) as info:
            check_transition("j1", src, dst)
        assert info.value.from_state == src.value
        assert info.value.to_state == dst.value
        assert f"{src.value} -> {dst.value}" in str(info.value)


def test_table_is_the_matrix() -> None:
    assert {(a, b) for a, targets in TRANSITIONS.items() for b in targets} == ALLOWED


def test_completed_is_final_and_terminal_states_only_restart() -> None:
    assert TRANSITIONS[S.COMPLETED] == frozenset()
    for state in TERMINAL_STATES - {S.COMPLETED}:
        assert TRANSITIONS[state] == {S.CREATED}


def test_a_job_evolved_by_the_ops_is_what_attrs_evolve_makes() -> None:
    """The ops' positional rebuild of a job (their hot path) sets exactly the changed fields,
    whatever they are, and keeps every other one."""
    import attrs

    from actors._job import Job
    from actors._ops import _FIELDS, _evolve

    job = Job("j1", "alice", "research", JobState.RUNNING, {"q": 1}, 1.0, 2.0, tags=("a",))
    other = Job(
        "j2", "bob", "other", JobState.PAUSED, [2], 3.0, 4.0, 50.0, "s", {"r": 1}, None,
        {"c": 1}, 3, 5.0, 2, 1, "user", 6.0, 7.0, 8.0, 9.0, 10, 11.0, 12.0, 5, 13.0, 3, 1,
        60.0, ("b",), "p", "k", "n1", 14.0,
    )  # fmt: skip
    for name in _FIELDS:
        changes = {name: getattr(other, name)}
        assert _evolve(job, changes) == attrs.evolve(job, **changes), name
    everything = {name: getattr(other, name) for name in _FIELDS}
    assert _evolve(job, everything) == other
    assert _evolve(job, {}) == job


@pytest.mark.parametrize(
    ("src", "dst", "hint"),
    [
        ("completed", "created", "a completed job is final: its result is kept"),
        ("completed", "cancelled", "a completed job is final: its result is kept"),
        ("paused", "paused", "it is paused already"),
        ("created", "created", "it is waiting in the queue already"),  # resume of a waiting job
        ("failed", "paused", "only a waiting or running job can be paused"),
        ("cancelled", "cancelled", "it is cancelled already"),
        ("failed", "cancelled", "it has ended already"),
        ("running", "created", "it is running: pause or cancel it first"),
        ("running", "deleted", "it is running: pause or cancel it first"),
    ],
)
def test_an_illegal_transition_says_why(src: str, dst: str, hint: str) -> None:
    """The message a user reads (``jobspine restart`` of a completed job, say) names the
    reason after the transition, which stays for programs that match it."""
    assert str(IllegalTransitionError("j1", src, dst)) == (
        f"job j1: illegal transition {src} -> {dst} ({hint})"
    )


async def _forever(ctx: JobContext, input: Any) -> Any:
    await ctx.checkpoint({"started": True})
    await trio.sleep_forever()


async def _fails(ctx: JobContext, input: Any) -> Any:
    raise RuntimeError("no")


async def test_a_resume_refused_says_what_would_run_the_job() -> None:
    """``jobspine resume`` of a running job said "it is running: pause or cancel it first"
    (the hint of a restart, which pausing first does help), and of a failed or cancelled job
    nothing at all: it says the job is running already, or that restart runs it again."""
    async with memory_runtime({"forever": _forever, "fails": _fails}, stop_grace=0.1) as rt:
        running = await rt.create_job("forever", "alice", None)
        await wait_for_state(rt, running.id, {JobState.RUNNING})
        with pytest.raises(IllegalTransitionError) as refused:
            await rt.resume(running.id, by="alice")
        assert "pause or cancel it first" not in str(refused.value)
        assert str(refused.value).endswith("(it is running already: only a paused job is resumed)")
        await rt.cancel(running.id, by="alice")
        failed = await rt.create_job("fails", "alice", None)
        await wait_for_state(rt, failed.id, {JobState.FAILED})
        for job_id, state in ((running.id, "cancelled"), (failed.id, "failed")):
            with pytest.raises(IllegalTransitionError) as refused:
                await rt.resume(job_id, by="alice")
            assert str(refused.value) == (
                f"job {job_id}: illegal transition {state} -> created"
                f" (only a paused job is resumed: restart runs a {state} job again)"
            )
            assert (refused.value.from_state, refused.value.to_state) == (state, "created")
