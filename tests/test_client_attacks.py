"""The Python client misused as an application might: calls after it closed, a refused
refresh, a request naming its own ``id``, tokens that are not strings."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from actors import DEMO_HANDLERS, InvalidInputError, JobEvent, JobState, open_runtime
from actors._backend import MemoryBackend
from transport import (
    Client,
    ClientError,
    ConnectionLostError,
    RoomCursor,
    RunningServer,
    open_client,
)

from .serving import eventually, serving, token

research = DEMO_HANDLERS["research"]


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[RunningServer]:
    async with serving(tmp_path / "served.db") as running:
        yield running


async def test_a_request_after_the_client_closed_fails_at_once(served: RunningServer) -> None:
    """Before: a request on a client whose ``open_client`` block had ended waited for a
    connection that would never come, for the whole ``request_timeout`` (30 s), then raised
    trio.TooSlowError. Now it raises ConnectionLostError at once."""
    async with open_client(served.url, token("alice"), request_timeout=20) as client:
        await client.ping()
    with trio.fail_after(5), pytest.raises(ConnectionLostError, match="closed"):
        await client.ping()
    with trio.fail_after(5), pytest.raises(ConnectionLostError):
        await client.create("echo", {})


async def test_a_request_waiting_for_a_reconnection_fails_when_the_client_closes(
    served: RunningServer,
) -> None:
    """Before: a task (outside the client's block) waiting for a reconnection when the block
    ended kept waiting for the whole ``request_timeout``, then raised trio.TooSlowError. Now
    it raises ConnectionLostError when the client closes."""
    outcome: list[BaseException] = []

    async def call(client: Client) -> None:
        try:
            await client.request("ping")
        except ClientError as exc:
            outcome.append(exc)

    async with trio.open_nursery() as outer:
        async with open_client(
            served.url, token("alice"), request_timeout=20, min_backoff=10, max_backoff=10
        ) as client:
            await client.ping()
            ws = client._ws
            assert ws is not None
            await ws._stream.aclose()  # the connection drops; the next attempt is in 10 s
            await eventually(lambda: client._ws is None)
            outer.start_soon(call, client)
            await trio.sleep(0.1)
        with trio.fail_after(5):
            await eventually(lambda: bool(outcome))
    assert isinstance(outcome[0], ConnectionLostError)


async def test_a_refused_refresh_keeps_the_token_for_reconnecting(served: RunningServer) -> None:
    """Before: ``refresh`` stored the new token before the server judged it; a refused one
    (``auth_failed``) became the token of the next hello, so the next reconnect closed with
    4003 and the whole client failed with ``auth_failed``. Now a refused token changes
    nothing: the client reconnects with the one it had."""
    async with open_client(
        served.url, token("alice"), request_timeout=10, max_backoff=0.2
    ) as client:
        with pytest.raises(ClientError) as refused:
            await client.refresh("not-a-jwt")
        assert refused.value.code == "auth_failed"
        with pytest.raises(ClientError) as wrong_type:
            await client.refresh(b"bytes")  # type: ignore[arg-type]
        assert wrong_type.value.code == "invalid_input"
        ws = client._ws
        assert ws is not None
        await ws._stream.aclose()  # the network drops: the client reconnects
        with trio.fail_after(10):
            await eventually(lambda: client.counters.connects == 2)
            assert "pong" in await client.ping()
        fresh = token("alice")
        await client.refresh(fresh)
        assert client._current_token() == fresh


async def test_a_request_naming_an_id_is_refused_not_misrouted(served: RunningServer) -> None:
    """Before: ``request("ping", id=N)`` sent the caller's ``id`` in place of the client's:
    the reply went to the call that had id N (another task got this ping's reply) or to
    none, and this call waited out ``request_timeout``. Now it is ``invalid_input`` at once
    and the connection serves the other calls."""
    async with open_client(served.url, token("alice"), request_timeout=10) as client:
        with trio.fail_after(5), pytest.raises(ClientError) as refused:
            await client.request("ping", id=client._next_id + 1)
        assert refused.value.code == "invalid_input"
        assert "pong" in await client.ping()


async def test_states_as_a_string_is_refused_saying_so(served: RunningServer) -> None:
    """Before: ``list(states="created")`` was read letter by letter and refused naming 'c'
    (a new user's trial); now refused as the runtime's ``list_jobs`` refuses it."""
    async with open_client(served.url, token("alice")) as client:
        with trio.fail_after(5), pytest.raises(ClientError) as refused:
            await client.list(states="created")
        assert refused.value.code == "invalid_input"
        assert "not a string: ['created'] for one" in str(refused.value)
        assert await client.list(states=["created"]) is not None


async def _async_token() -> str:
    return token("alice")


def _failing_token() -> str:
    raise RuntimeError("the vault is down")


@pytest.mark.parametrize(
    ("bad", "says"),
    [
        (token("alice").encode(), "not bytes"),
        (None, "not NoneType"),
        (_async_token, "is async"),
        (_failing_token, "RuntimeError: the vault is down"),
    ],
    ids=["bytes", "none", "async-callable", "raising-callable"],
)
async def test_a_token_that_is_not_a_string_is_auth_failed(
    served: RunningServer, bad: object, says: str
) -> None:
    """Before: a bytes token (PyJWT 1's ``encode``), an ``async def`` token callable or one
    that raised escaped ``open_client`` as a bare TypeError or the callable's own exception
    (with a 'coroutine was never awaited' warning); None reached the server as a
    ``protocol_error``. Now each is a ClientError ``auth_failed`` saying what was wrong."""
    with trio.fail_after(5), pytest.raises(ClientError) as failed:
        async with open_client(served.url, bad, reconnect=False):  # type: ignore[arg-type]
            pass
    assert failed.value.code == "auth_failed"
    assert says in failed.value.message


async def test_a_token_callable_failing_on_a_reconnect_fails_the_client_and_its_calls(
    served: RunningServer,
) -> None:
    """Before: a token callable raising on a reconnect ended ``run`` with its own exception,
    and requests waiting for the reconnection were not failed. Now the client fails with
    ``auth_failed`` and so does every waiting request."""
    calls = 0

    def mint() -> str:
        nonlocal calls
        calls += 1
        if calls > 1:
            raise RuntimeError("the vault is down")
        return token("alice")

    outcome: list[BaseException] = []

    async def call(client: Client) -> None:
        try:
            await client.ping()
        except ClientError as exc:
            outcome.append(exc)

    async with trio.open_nursery() as outer:
        with pytest.raises(ClientError) as failed:
            async with open_client(served.url, mint, request_timeout=20, min_backoff=0.5) as client:
                ws = client._ws
                assert ws is not None
                await ws._stream.aclose()
                await eventually(lambda: client._ws is None)
                outer.start_soon(call, client)  # waits for the reconnection
                await trio.sleep_forever()
    assert failed.value.code == "auth_failed"
    with trio.fail_after(5):
        await eventually(lambda: bool(outcome))
    assert isinstance(outcome[0], ClientError) and outcome[0].code == "auth_failed"


async def sees_a_job_complete(client: Client) -> None:
    """Creates a job of alice's and reads the room's events until it completes (within 10 s):
    the room is still followed, its events delivered."""
    job = await client.create("sized", {"value": 1})
    with trio.fail_after(10):
        async for item in client.events():
            assert isinstance(item, JobEvent)
            if item.job_id == job["id"] and item.state is JobState.COMPLETED:
                return
    raise AssertionError("the events ended before the job completed")


async def test_a_refused_resubscription_keeps_the_room_followed(served: RunningServer) -> None:
    """Before: subscribing again to a room already followed, with a cursor the server
    refused (a negative seq) or one that is not a RoomCursor (a tuple: attrs'
    NotAnAttrsClassError), raised and dropped the room from the client: its events were
    then ignored, silently, though the server kept sending them. Now the bad cursor is a
    ClientError ``invalid_input`` and the room stays followed from where it was."""
    async with open_client(served.url, token("alice"), request_timeout=10) as client:
        await client.subscribe("user:alice")
        epoch = client.welcome["epoch"]
        with pytest.raises(ClientError) as refused:
            await client.subscribe("user:alice", RoomCursor(epoch, -5))
        assert refused.value.code == "invalid_input"
        with pytest.raises(ClientError) as wrong_type:
            await client.subscribe("user:alice", (epoch, 3))  # type: ignore[arg-type]
        assert wrong_type.value.code == "invalid_input"
        await sees_a_job_complete(client)
        assert client.cursor("user:alice") is not None


@pytest.mark.parametrize(
    ("options", "says"),
    [
        ({"config": {"stop_grace": 5}}, "config must be a RuntimeConfig or None, not dict"),
        ({"handlers": [research]}, "handlers must be a mapping of kind to handler, not list"),
        ({"broadcast": {"room_buffer": 10}}, "broadcast must be a BroadcasterConfig"),
    ],
    ids=["config-dict", "handlers-list", "broadcast-dict"],
)
async def test_a_testing_fixture_override_of_the_wrong_type_is_invalid_input(
    options: dict[str, object], says: str
) -> None:
    """What ``actors.testing``'s runtimes pass on from ``jobspine_config`` and
    ``jobspine_handlers`` overrides. Before: a ``jobspine_config`` returning a dict of the
    fields to change (the README says the fixture replaces the whole config), or handlers
    as a list, failed inside open_runtime with AttributeError ('dict' object has no
    attribute 'node_id'). Now each is InvalidInputError naming the argument and its type."""
    with pytest.raises(InvalidInputError, match=says):
        async with open_runtime(backend=MemoryBackend(), **options):  # type: ignore[arg-type]
            pass


async def test_a_cancelled_resubscription_keeps_the_room_followed(served: RunningServer) -> None:
    """Before: a subscribe to a room already followed, cancelled before its reply (a
    ``move_on_after`` around it), dropped the room from the client, whose later events were
    ignored, silently. Now the room stays followed from where it was."""
    async with open_client(served.url, token("alice"), request_timeout=10) as client:
        await client.subscribe("user:alice")
        with trio.move_on_after(0):
            await client.subscribe("user:alice")
        assert "user:alice" in client.rooms
        await sees_a_job_complete(client)
