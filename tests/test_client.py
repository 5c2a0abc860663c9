"""The client's cursor logic, fed events directly: duplicates dropped, gaps detected,
coalesced sequence numbers skipped."""

from __future__ import annotations

from typing import Any

import trio
from trio_websocket import CloseReason, ConnectionClosed

from transport import Client, ConnectionLostError, Reset, RoomCursor
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
            seqs.append(client._receive_events.receive_nowait()[0].seq)  # type: ignore[union-attr]
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
    assert client.counters.skipped == 5  # 2, 3 and 5 to 7: counted for whoever measures
    client._dispatch({"type": "lagged", "rooms": ["job:j"]})
    assert client.counters.lagged == 1


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


def job_event(job: str, seq: int, user_seq: int) -> dict[str, Any]:
    return {**event(seq, user_seq), "job_id": job}


async def test_a_rooms_cursor_moves_only_with_its_own_events_taken() -> None:
    """``cursor(room)`` is just past the last event of that room the application took, in the
    room's order: an event handed out through its job's room while its user's room waits for
    a resubscription does not move the user room's cursor past the user's events still to
    come (a program saving that cursor and resuming from it lost them)."""
    client = Client("ws://unused", "token")
    client.welcome = {"epoch": "e"}
    for room in ("job:j", "user:u"):
        client.rooms[room] = _Room(RoomCursor("e", 0), RoomCursor("e", 0), resyncing=False)
    client._on_event(job_event("j", 1, 1))
    client._on_event(job_event("k", 1, 3))  # user_seq 2 (job k's first) never came: resync
    client._on_event(job_event("j", 2, 4))  # through its job's room only
    taken = []
    with trio.move_on_after(0.1):
        async for item in client.events():
            taken.append(item)
    assert [(e.job_id, e.seq) for e in taken] == [("j", 1), ("j", 2)]  # type: ignore[union-attr]
    assert client.cursor("job:j") == RoomCursor("e", 2)
    assert client.cursor("user:u") == RoomCursor("e", 1)


async def test_a_resets_head_counts_once_the_reset_is_taken() -> None:
    """A room reset while events before it wait in the buffer: ``cursor(room)`` stays with
    the events taken until the reset itself is taken (it moved to the reset's head at once,
    so a program saving it then skipped the events still buffered)."""
    from transport.client import _Pending

    client = Client("ws://unused", "token")
    client.welcome = {"epoch": "e"}
    room = "job:j"
    client.rooms[room] = _Room(RoomCursor("e", 0), RoomCursor("e", 0), resyncing=False)
    client._on_event(event(1, 1))
    client._on_event(event(2, 2))
    client._pending[1] = _Pending(on_reply=lambda result: client._joined(room, result))
    result = {"epoch": "f", "head": 9, "reset_reason": "epoch_changed: test"}
    client._dispatch({"type": "reply", "id": 1, "result": result})
    assert client.cursor(room) == RoomCursor("e", 0)
    seen = []
    async for item in client.events():
        seen.append(client.cursor(room))
        if isinstance(item, Reset):
            break
    assert seen == [RoomCursor("e", 1), RoomCursor("e", 2), RoomCursor("f", 9)]
