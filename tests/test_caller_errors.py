"""A caller's mistakes are :class:`InvalidInputError` naming the argument, as the protocol's
are ``invalid_input`` naming the field: a retry policy's booleans and intervals past a year
(a create's delay bound), ``list_jobs``'s states and limit; and a write after the job's end
says that the attempt has ended (mock clock, in-memory store)."""

from __future__ import annotations

import math
from typing import Any

import pytest
import trio

from actors import (
    InvalidInputError,
    JobContext,
    JobState,
    KindOptions,
    RetryPolicy,
    StaleAttemptError,
)
from actors._options import options_from_wire

from .conftest import memory_runtime, wait_for_state

S = JobState
YEAR = 365 * 86_400


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("initial_interval", True),
        ("initial_interval", 0),
        ("initial_interval", math.nan),
        ("initial_interval", math.inf),
        ("initial_interval", "1"),
        ("initial_interval", YEAR + 1),
        ("initial_interval", 1e12),
        ("maximum_interval", True),
        ("maximum_interval", YEAR * 2),
        ("backoff_coefficient", True),
        ("backoff_coefficient", 0.5),
        ("jitter", False),
        ("jitter", 1.0),
    ],
)
def test_a_retry_policy_is_refused_naming_the_field(field: str, value: Any) -> None:
    with pytest.raises(InvalidInputError, match=f"^{field} must be"):
        RetryPolicy(**{field: value})


def test_a_retry_policy_may_wait_up_to_a_year_as_a_create_may() -> None:
    longest = RetryPolicy(initial_interval=YEAR, maximum_interval=YEAR)
    assert (longest.initial_interval, longest.maximum_interval) == (YEAR, YEAR)
    assert RetryPolicy(backoff_coefficient=1, jitter=0).backoff_coefficient == 1
    with pytest.raises(InvalidInputError, match="maximum_interval"):
        RetryPolicy(initial_interval=10, maximum_interval=5)
    wire = {"retry": {"initial_interval": 1e12}}  # a worker's hello: the same rule
    with pytest.raises(InvalidInputError, match="initial_interval must be seconds in"):
        options_from_wire(wire)


async def test_list_jobs_refuses_bad_filters_naming_them(autojump_clock: trio.abc.Clock) -> None:
    async with memory_runtime({"k": quick}) as rt:
        job = await rt.create_job("k", "alice", 1)
        await wait_for_state(rt, job.id)
        refused: list[tuple[dict[str, Any], str]] = [
            ({"states": ["nope"]}, "states must be distinct states, at least one, of: created,"),
            ({"states": ["nope"]}, "(unknown: 'nope')"),
            ({"states": "completed"}, "states must be a list of states, not a string"),
            ({"states": S.COMPLETED}, r"\['completed'\] for one"),
            ({"states": []}, "at least one"),
            ({"states": ["completed", S.COMPLETED]}, "distinct"),
            ({"states": [None]}, "unknown: None"),
            ({"states": 3}, "states must be a list of states, not int"),
            ({"limit": 0}, "limit must be an integer >= 1, or None"),
            ({"limit": -1}, "limit must be an integer >= 1"),
            ({"limit": True}, "limit must be an integer >= 1"),
            ({"limit": 2.5}, "limit must be an integer >= 1"),
            ({"tag": ""}, "tag must not be empty"),
            ({"parent_id": ""}, "parent_id must not be empty"),
            ({"kind": 3}, "kind must be a string"),
        ]
        for arguments, message in refused:
            with pytest.raises(InvalidInputError, match=message):
                await rt.list_jobs("alice", **arguments)
        # What is right is listed: states as JobStates or their values, in any iterable.
        for states in (["completed"], [S.COMPLETED], (S.COMPLETED, "failed"), {S.COMPLETED}):
            assert [j.id for j in await rt.list_jobs("alice", states=states)] == [job.id]
        assert [j.id for j in await rt.list_jobs("alice", limit=1)] == [job.id]
        assert len(await rt.list_jobs("alice", limit=None)) == 1
        with pytest.raises(InvalidInputError, match="limit"):
            await rt.get_user_completed_jobs("alice", limit=0)
        # wait_job's states alike: a bare string is refused, not waited for letter by letter.
        with pytest.raises(InvalidInputError, match="states must be a list of states"):
            await rt.wait_job(job.id, "completed")
        with pytest.raises(InvalidInputError, match="unknown: 'done'"):
            await rt.wait_job(job.id, ["done"])
        assert (await rt.wait_job(job.id, ["completed"])).id == job.id


async def test_a_write_after_the_jobs_end_says_the_attempt_has_ended(
    autojump_clock: trio.abc.Clock,
) -> None:
    kept: list[JobContext] = []

    async def keeps(ctx: JobContext, input: Any) -> Any:
        kept.append(ctx)
        if input == "fail":
            raise ValueError("no")
        return "done"

    kinds = {"k": KindOptions(max_attempts=1)}
    async with memory_runtime({"k": keeps}, kinds=kinds) as rt:
        job = await rt.create_job("k", "alice", "done")
        assert (await wait_for_state(rt, job.id)).state is S.COMPLETED
        ctx = kept[0]
        with pytest.raises(StaleAttemptError) as progress:
            await ctx.progress(50, "late")
        assert str(progress.value) == (
            f"job {job.id} is completed: its attempt 1 has ended; progress after the end is refused"
        )
        assert progress.value.code == "stale_attempt"
        with pytest.raises(
            StaleAttemptError, match="is completed: its attempt 1 has ended; a checkpoint after"
        ):
            await ctx.checkpoint({"late": 1})
        failed = await rt.create_job("k", "alice", "fail")
        assert (await wait_for_state(rt, failed.id)).state is S.FAILED
        with pytest.raises(StaleAttemptError, match="is failed: its attempt 1 has ended"):
            await kept[1].progress(1)
        after = await rt.get_job(job.id)
        assert (after.result, after.progress) == ("done", 100)


async def quick(ctx: JobContext, input: Any) -> Any:
    return input
