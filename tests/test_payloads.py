"""Large values over the wire: no message the server sends exceeds what its client accepts.

Payloads over the inline limit are left out of events, lists and snapshots as ``$omitted``
markers and fetched with ``get_payload``; a value too large for any message is refused with
``payload_too_large``; and the client never loops reconnecting over a frame it refuses.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from actors import EventType, JobEvent
from actors._payloads import fit_job, inline_payloads
from transport import Client, ClientError, RoomCursor, RunningServer, is_omitted, open_client
from transport._commands import watch_job
from transport._display import PlainView

from .serving import GATES, eventually, serving, token

MIB = 1024 * 1024


@pytest.fixture(autouse=True)
def fresh_gates() -> None:
    GATES.clear()


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[RunningServer]:
    async with serving(tmp_path / "payloads.db") as running:
        yield running


async def terminal_event(client: Client, job_id: str, seconds: float = 30) -> JobEvent:
    with trio.fail_after(seconds):
        async for item in client.events():
            if (
                isinstance(item, JobEvent)
                and item.job_id == job_id
                and item.type in (EventType.COMPLETED, EventType.FAILED)
            ):
                return item
    raise AssertionError("the event stream ended")


def test_fit_job_omits_the_largest_payloads_until_it_fits() -> None:
    job = {"id": "j", "input": "i" * 100, "result": "r" * 1000, "checkpoint": "c" * 500}
    assert fit_job(job, 10_000) == job
    fitted = fit_job(job, 800)
    assert fitted["result"] == {"$omitted": "result", "size": 1002}
    assert fitted["checkpoint"] == "c" * 500 and fitted["input"] == "i" * 100
    smallest = fit_job(job, 10)  # cannot fit: every payload omitted, nothing else touched
    assert all(is_omitted(smallest[f]) for f in ("input", "result", "checkpoint"))
    assert smallest["id"] == "j"


def test_inline_payloads_keeps_small_values_and_the_same_object() -> None:
    data = {"progress": 5.0, "step": "s" * 20}
    assert inline_payloads(data, 100) is data
    assert inline_payloads(data, 10) == {"progress": 5.0, "step": {"$omitted": "step", "size": 22}}
    looks_like_one = {"result": {"$omitted": "x"}}
    assert inline_payloads(looks_like_one, 10**9)["result"] == {"$omitted": "result", "size": 16}


async def test_a_20_mb_result_never_breaks_the_connection(served: RunningServer) -> None:
    """The reported case: a handler returns 20 MB. The subscriber gets the outcome on its
    first connection; `get` and `list` answer; the value itself is refused, not sent."""
    async with open_client(served.url, token("alice")) as client:
        await client.subscribe("user:alice")
        job = await client.create("sized", {"result": 20 * MIB})
        final = await terminal_event(client, job["id"])
        got = await client.get(job["id"])
        (listed,) = await client.list()
        if final.type is EventType.COMPLETED:
            marker = final.data["result"]
            assert is_omitted(marker) and marker == {"$omitted": "result", "size": marker["size"]}
            assert marker["size"] > 20 * MIB
            assert got["state"] == "completed" and got["result"] == marker
            assert listed["result"] == marker
            for seq in (None, final.seq):
                with pytest.raises(ClientError) as refused:
                    await client.get_payload(job["id"], "result", seq)
                assert refused.value.code == "payload_too_large"
                assert str(marker["size"]) in refused.value.message
        else:  # a store that limits results refuses it at completion, with the reason
            assert got["state"] == "failed" and got["error"]["message"]
        assert await client.ping()  # the same connection still serves
        assert client.counters.connects == 1 and client.counters.reconnects == 0


async def test_large_checkpoints_and_results_are_listed_then_fetched(
    served: RunningServer,
) -> None:
    """Another input of the kind: nine jobs each with a 1 MB checkpoint and a 1 MB result
    (18 MB in one list today, over the client's limit). Lists, replays and snapshots carry
    markers; `get` of one job fits in a message, so it is inline; `get_payload` returns each
    value exactly."""
    size = 1_000_000
    async with open_client(served.url, token("alice")) as client:
        await client.subscribe("user:alice")
        ids = []
        for _ in range(9):
            job = await client.create("sized", {"checkpoint": size, "result": size})
            ids.append(job["id"])
            await terminal_event(client, job["id"])
        jobs = await client.list()
        assert {j["id"] for j in jobs} == set(ids)
        for j in jobs:
            assert j["state"] == "completed", j
            assert is_omitted(j["result"]) and is_omitted(j["checkpoint"])
            assert j["input"] == {"checkpoint": size, "result": size}  # small: inline
        got = await client.get(ids[0])
        assert got["result"] == {"blob": "r" * size} and got["checkpoint"]["blob"] == "c" * size
        assert await client.get_payload(ids[1], "checkpoint") == {"blob": "c" * size}

        # A replay from the durable log (cursor 0) and a reset snapshot carry markers too.
        async with open_client(served.url, token("alice")) as late:
            await late.subscribe(f"job:{ids[2]}", RoomCursor(late.welcome["epoch"], 0))
            completed = await terminal_event(late, ids[2])
            assert is_omitted(completed.data["result"])
            assert await late.get_payload(ids[2], "result", completed.seq) == {"blob": "r" * size}
            reply = await late.subscribe("user:alice", RoomCursor(late.welcome["epoch"], 10**9))
            assert reply["reset_reason"].startswith("cursor_ahead")
            snapshot = reply["snapshot"]["jobs"]
            assert len(snapshot) == 9 and all(is_omitted(j["result"]) for j in snapshot)
        assert client.counters.reconnects == 0


async def test_a_small_message_limit_omits_even_from_get(tmp_path: Path) -> None:
    async with (
        serving(tmp_path / "small.db", max_message_size=256 * 1024) as running,
        open_client(running.url, token("alice")) as client,
    ):
        assert client.welcome["max_message_size"] == 256 * 1024
        await client.subscribe("user:alice")
        job = await client.create("sized", {"checkpoint": 600_000, "result": 100_000})
        await terminal_event(client, job["id"])
        got = await client.get(job["id"])
        # The largest payload goes first; the 100 KB result then fits and stays inline.
        assert got["checkpoint"] == {"$omitted": "checkpoint", "size": 600_011}
        assert got["result"] == {"blob": "r" * 100_000}
        with pytest.raises(ClientError) as refused:
            await client.get_payload(job["id"], "checkpoint")
        assert refused.value.code == "payload_too_large"
        assert (await client.get_payload(job["id"], "result"))["blob"] == "r" * 100_000


async def test_a_value_shaped_like_a_marker_is_always_omitted(served: RunningServer) -> None:
    tricky = {"$omitted": "result", "size": 3}
    async with open_client(served.url, token("alice")) as client:
        await client.subscribe("user:alice")
        job = await client.create("sized", {"value": tricky})
        final = await terminal_event(client, job["id"])
        assert final.data["result"] == {"$omitted": "result", "size": 30}
        assert (await client.get(job["id"]))["result"] == {"$omitted": "result", "size": 30}
        assert await client.get_payload(job["id"], "result") == tricky


async def test_get_payload_refuses_what_is_not_a_payload(served: RunningServer) -> None:
    async with (
        open_client(served.url, token("alice")) as alice,
        open_client(served.url, token("bob")) as bob,
    ):
        await alice.subscribe("user:alice")
        job = await alice.create("sized", {"result": 10})
        final = await terminal_event(alice, job["id"])
        bad: list[tuple[Client, dict[str, Any], str]] = [
            (alice, {"field": "state"}, "invalid_input"),
            (alice, {"field": "result", "seq": final.seq + 1}, "invalid_input"),
            (alice, {"field": "result", "seq": 0}, "invalid_input"),
            (alice, {"field": "nope", "seq": final.seq}, "invalid_input"),
            (bob, {"field": "result"}, "forbidden"),
        ]
        for client, fields, code in bad:
            with pytest.raises(ClientError) as refused:
                await client.request("get_payload", job_id=job["id"], **fields)
            assert refused.value.code == code, fields
        assert await alice.get_payload(job["id"], "input", 1) == {"result": 10}


async def test_a_request_over_the_frame_limit_is_refused_before_it_is_sent(
    served: RunningServer,
) -> None:
    async with open_client(served.url, token("alice")) as client:
        with pytest.raises(ClientError) as refused:
            await client.create("sized", {"value": "x" * 100_000})
        assert refused.value.code == "request_too_large"
        assert await client.ping() and client.counters.connects == 1


async def test_a_frame_the_client_refuses_is_not_retried_in_a_tight_loop(
    served: RunningServer,
) -> None:
    """A client configured to accept less than the server sends (8 KiB; events here are
    12 KB): each replay of the room closes the connection with 1009 again. It must wait
    the full backoff between attempts, not reconnect at once."""
    async with open_client(served.url, token("alice")) as producer:
        job = await producer.create(
            "emitter", {"phases": [{"gate": "big", "count": 3}], "pad": 12_000, "hold": True}
        )
        async with open_client(
            served.url, token("alice"), max_message_size=8 * 1024, min_backoff=0.01, max_backoff=1.0
        ) as small:
            await small.subscribe(f"job:{job['id']}")
            GATES.setdefault("big", trio.Event()).set()
            await eventually(lambda: small.counters.reconnects >= 1)
            start, before = trio.current_time(), small.counters.reconnects
            await trio.sleep(3.0)
            window = small.counters.reconnects - before
            assert window <= 3.0 / 0.5 + 1, window  # each wait is at least max_backoff / 2
            assert "1009" in (small.counters.last_problem or "")
            assert small.counters.last_delay >= 0.5
            assert trio.current_time() - start >= 3.0
        await producer.cancel(job["id"])


@pytest.mark.parametrize("size", [200_000, 20 * MIB])
async def test_the_watcher_prints_a_large_outcome(
    served: RunningServer, capsys: pytest.CaptureFixture[str], size: int
) -> None:
    """`jobspine submit --watch` ends with the outcome: fetched when it fits in a message,
    else a note of its size (or the failure the store recorded for it)."""
    async with open_client(served.url, token("alice")) as client:
        job = await client.create("sized", {"result": size})
        with trio.fail_after(30):
            status = await watch_job(client, job["id"], PlainView(job["id"]), exit_on_pause=False)
        last = capsys.readouterr().out.strip().splitlines()[-1]
        if status == 0:
            expected = '{"blob":"' + "r" * size + '"}' if size < MIB else "not shown"
            assert last.startswith("completed: ") and expected in last, last[:200]
        else:
            assert last.startswith("failed: ")
        assert client.counters.reconnects == 0


async def test_a_list_that_cannot_fit_omits_every_payload_then_is_refused(
    tmp_path: Path,
) -> None:
    """A server whose replies may take 8 KiB: a list of small jobs first loses its payloads,
    and a list too long even without them is refused, never sent over the limit."""
    async with (
        serving(tmp_path / "tiny.db", max_message_size=72 * 1024) as running,
        open_client(running.url, token("alice")) as client,
    ):
        for _ in range(4):
            await client.create("sized", {"value": 1, "pad": "p" * 2000})
        jobs = await client.list()
        assert len(jobs) == 4 and all(is_omitted(j["input"]) for j in jobs)
        for _ in range(16):
            await client.create("sized", {"value": 1})
        with pytest.raises(ClientError) as refused:
            await client.list(limit=20)
        assert refused.value.code == "payload_too_large"
        assert len(await client.list(limit=4)) == 4
        assert client.counters.reconnects == 0
