"""The client's cursor logic, fed events directly: duplicates dropped, gaps detected,
coalesced sequence numbers skipped."""

from __future__ import annotations

from typing import Any

import trio
from trio_websocket import CloseReason, ConnectionClosed

from transport import Client, ConnectionLostError, RoomCursor
from transport.client import _Room


def event(seq: int, user_seq: int) -> dict[str, Any]:
    return {
        "job_id": "j", "user_id": "u", "seq": seq, "user_seq": user_seq, "type": "progress",
        "state": "running", "at": 1.0, "data": {}, "actor": None,
    }  # fmt: skip


def client_following(room: str) -> Client:
    client = Client("ws://unused", "token")
    client.rooms[room] = _Room(RoomCursor("e", 0), RoomCursor("e", 0), resyncing=False)
    return client


async def delivered(client: Client) -> list[int]:
    seqs = []
    while True:
        try:
            seqs.append(client._receive_events.receive_nowait().seq)  # type: ignore[union-attr]
        except trio.WouldBlock:
            return seqs


async def test_duplicates_are_dropped() -> None:
    client = client_following("job:j")
    for seq in (1, 2, 2, 1, 3):
        client._on_event(event(seq, seq))
    assert await delivered(client) == [1, 2, 3]
    assert client.counters.duplicates == 2 and client.counters.gaps == 0
    assert client.rooms["job:j"].cursor == RoomCursor("e", 3)


async def test_a_gap_is_detected_and_the_room_resynchronized() -> None:
    client = client_following("user:u")
    client._on_event(event(1, 1))
    client._on_event(event(2, 3))  # user_seq 2 never came
    assert await delivered(client) == [1]
    assert client.counters.gaps == 1
    assert client.rooms["user:u"].resyncing  # events are ignored until the replay arrives


def skipped(seq: int, user_seq: int, count: int = 1) -> dict[str, Any]:
    return {
        "type": "skipped", "job_id": "j", "user_id": "u", "seq": seq, "user_seq": user_seq,
        "count": count,
    }  # fmt: skip


async def test_coalesced_sequence_numbers_are_not_gaps() -> None:
    client = client_following("job:j")
    client._on_event(event(1, 1))
    client._dispatch(skipped(2, 2))
    client._dispatch(skipped(3, 3))
    client._on_event(event(4, 4))
    client._dispatch(skipped(5, 5, count=3))
    client._on_event(event(8, 8))
    assert await delivered(client) == [1, 4, 8]
    assert client.counters.gaps == 0


def closed(code: int) -> ConnectionClosed:
    return ConnectionClosed(CloseReason(code, "why"))


def test_close_codes_are_fatal_or_retried() -> None:
    fixed = Client("ws://unused", "token")
    minting = Client("ws://unused", lambda: "token")
    for code, name in ((4002, "protocol_error"), (4003, "auth_failed"), (4004, "token_expired")):
        error = fixed._close_error(closed(code))
        assert not isinstance(error, ConnectionLostError) and error.code == name
    # With a way to mint a new token, an expired one is a reconnect.
    assert isinstance(minting._close_error(closed(4004)), ConnectionLostError)
    for code in (1001, 1006, 1009, 4008, 4029):
        error = fixed._close_error(closed(code))
        assert isinstance(error, ConnectionLostError) and error.close_code == code


async def test_a_skipped_marker_beyond_the_cursor_is_a_gap() -> None:
    client = client_following("user:u")
    client._on_event(event(1, 1))
    client._dispatch(skipped(3, 3))  # user_seq 2 never came
    assert client.counters.gaps == 1 and client.rooms["user:u"].resyncing


def test_why_a_connection_failed_is_said_in_a_users_words() -> None:
    """The reconnect log line names the cause: trio-websocket's own exceptions print as
    ``HandshakeError()`` or a raw tuple of the HTTP answer, and a drop as ``1006:``."""
    from trio_websocket import ConnectionRejected, HandshakeError

    from transport.client import _problem

    rejected = ConnectionRejected(404, ((b"content-type", b"application/json"),), b"{}")
    assert _problem(rejected) == "it answered HTTP 404, not a websocket"
    assert _problem(HandshakeError()) == "refused, unreachable or no such host"
    dropped = ConnectionClosed(CloseReason(1006, None))
    assert _problem(dropped) == (
        "closed with 1006: the connection dropped without a close frame (the server stopped"
        " or the network failed)"
    )
    said = ConnectionClosed(CloseReason(4008, "slow consumer"))
    assert _problem(said) == "closed with 4008: slow consumer"
