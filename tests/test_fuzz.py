"""Protocol fuzzing against a live server: random and mutated frames get only documented errors
or close codes; the server keeps serving others and leaks no task."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, cast

import orjson
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from trio_websocket import ConnectionClosed

from actors import InvalidInputError, Job, JobState, NotSerializableError
from actors._ops import checkpoint, create, start
from transport import CLOSE, OPS, open_client

from .serving import raw, serving, token

DOC = (Path(__file__).parent.parent / "transport" / "PROTOCOL.md").read_text()
ERROR_TABLE = DOC[DOC.index("Error replies (`code`)") : DOC.index("Close codes:")]
DOCUMENTED_ERRORS = set(re.findall(r"`(\w+)`", ERROR_TABLE)) - {"code"}
DOCUMENTED_CLOSES = set(CLOSE.values())

# Strings include lone surrogates (sent as "\ud83d" escapes) and integers go beyond the signed
# 64-bit range: the server must refuse those, never change them.
texts = st.text(max_size=20) | st.sampled_from(["\ud83d", "x\udc00", "\U0001f600"])
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.integers()
    | st.floats()
    | texts,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
valid_requests = st.sampled_from(
    [
        {"op": "get", "job_id": "01AAAAAAAAAAAAAAAAAAAAAAAA"},
        {"op": "create", "kind": "research", "input": {"query": "q", "depth": 1, "delay": 0}},
        {"op": "subscribe", "room": "user:alice", "cursor": {"epoch": "x", "seq": 3}},
        {"op": "list", "state": "running", "limit": 5},
        {"op": "restart", "job_id": "01AAAAAAAAAAAAAAAAAAAAAAAA", "modifications": {"a": 1}},
        {"op": "resume", "job_id": "01AAAAAAAAAAAAAAAAAAAAAAAA"},
        {"op": "pause", "job_id": "01AAAAAAAAAAAAAAAAAAAAAAAA"},
        {"op": "ping"},
        {"op": "unsubscribe", "room": "job:nope"},
    ]
)


@st.composite
def mutated(draw: st.DrawFn) -> str | bytes:
    base: dict[str, Any] = dict(cast(dict[str, Any], draw(valid_requests)))
    choice = draw(st.integers(0, 5))
    if choice == 0 and len(base) > 1:
        del base[draw(st.sampled_from(sorted(k for k in base if k != "op")))]
    elif choice == 1:
        base[draw(st.sampled_from(sorted(base)))] = draw(json_values)
    elif choice == 2:
        base[draw(st.text(max_size=6))] = draw(json_values)
    elif choice == 3:
        base["op"] = draw(st.sampled_from([*OPS, "", "HELLO", "get ", "drop_table"]))
    base["id"] = draw(st.integers(1, 10**6))
    frame = json.dumps(base)
    if choice == 5:  # a key given twice
        key = draw(st.sampled_from(sorted(base)))
        frame = f"{frame[:-1]}, {json.dumps(key)}: {json.dumps(draw(json_values))}}}"
    return frame


frames = st.one_of(
    mutated(),
    json_values.map(json.dumps),
    st.text(max_size=200),
    st.binary(max_size=200),  # binary frames, invalid UTF-8 included
    st.integers(1, 3000).map(lambda n: "[" * n + "]" * n),  # deep nesting
    st.integers(19, 400).map(lambda n: '{"op":"get","id":1,"job_id":' + "9" * n + "}"),
    st.integers(1, 3000).map(lambda n: '{"op":"ping","id":' + "1" * n + "}"),
)


def collect(strategy: st.SearchStrategy[Any], count: int) -> list[Any]:
    found: list[Any] = []

    @settings(
        max_examples=count,
        database=None,
        derandomize=True,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def draw(value: Any) -> None:
        found.append(value)

    draw()
    return found


def count_tasks() -> int:
    def walk(task: trio.lowlevel.Task) -> int:
        return 1 + sum(walk(t) for n in task.child_nurseries for t in n.child_tasks)

    root = trio.lowlevel.current_root_task()
    assert root is not None
    return walk(root)


async def test_fuzzed_frames_get_documented_answers(tmp_path: Path) -> None:
    samples = collect(frames, 400)
    samples.append("x" * 70_000)  # over the frame limit: close 1009
    async with (
        serving(tmp_path / "fuzz.db", request_rate=100_000, request_burst=100_000) as running,
        open_client(running.url, token("bob")) as bystander,
    ):
        await trio.sleep(0.1)
        baseline = count_tasks()
        outcomes: dict[str, int] = {}
        pending = list(samples)
        while pending:
            async with raw(running) as ws:
                while pending:
                    frame = pending.pop(0)
                    try:
                        await ws.send_message(frame)
                        reply = await _answer(ws)
                    except ConnectionClosed as exc:
                        assert exc.reason is not None
                        assert exc.reason.code in DOCUMENTED_CLOSES, (exc.reason, frame[:80])
                        outcomes[f"close {exc.reason.code}"] = (
                            outcomes.get(f"close {exc.reason.code}", 0) + 1
                        )
                        break
                    if reply["type"] == "error":
                        assert reply["code"] in DOCUMENTED_ERRORS, (reply, frame[:80])
                    assert reply["id"] == _readable_id(frame), (reply, frame[:80])
                    key = reply.get("code", "reply")
                    outcomes[key] = outcomes.get(key, 0) + 1
            assert (await bystander.ping())["pong"] > 0
        assert outcomes.get("close 1009") == 1
        assert len(outcomes) > 5, outcomes  # the fuzzer reached many distinct answers
        with trio.fail_after(5):
            while count_tasks() > baseline:  # noqa: ASYNC110 - task count has no event
                await trio.sleep(0.05)
        assert (await bystander.my_stats())["total"] == 0


def _readable_id(frame: str | bytes) -> Any:
    """The id PROTOCOL.md says an answer carries: the one top-level ``id`` of a JSON object,
    if it is a string of 1-128 characters or an integer in the signed 64-bit range."""
    try:
        data = json.loads(frame, object_pairs_hook=tuple)  # arrays stay lists
    except (ValueError, RecursionError):
        return None
    ids = [v for k, v in data if k == "id"] if isinstance(data, tuple) else []
    if len(ids) != 1:
        return None
    value = ids[0]
    if type(value) is int:
        return value if -(2**63) <= value < 2**63 else None
    if type(value) is str and 1 <= len(value) <= 128:
        try:
            value.encode()
        except UnicodeEncodeError:
            return None
        return value
    return None


async def _answer(ws: Any) -> Any:
    with trio.fail_after(5):
        while True:
            message = orjson.loads(await ws.get_message())
            for inner in message.get("messages", [message]):
                if inner["type"] in ("reply", "error"):
                    return inner


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_fuzzed_checkpoints_are_stored_or_refused_cleanly(value: Any) -> None:
    job, _ = create("j", "u", "k", None, 1.0)
    job, _ = start(job, 2.0)
    try:
        saved, event = checkpoint(job, 1, value, 3.0, limit=2000)
    except (InvalidInputError, NotSerializableError):
        return  # refused with a typed error; the job object is unchanged by construction
    assert saved.checkpoint == value and saved.checkpoint_version == 1
    assert Job.from_record(orjson.loads(orjson.dumps(saved.to_record()))) == saved
    assert saved.state is JobState.RUNNING and event.data["size"] <= 2000


def test_documented_error_set_is_parsed() -> None:
    assert {"bad_json", "bad_request", "unknown_op", "forbidden"} <= DOCUMENTED_ERRORS
