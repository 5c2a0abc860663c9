"""The worker endpoint's stall check measures progress (:class:`transport._wire.Inbound`):
bytes arriving count as life, so a worker on a slow link uploading one large frame for
longer than ``heartbeat_timeout`` is not taken for a stalled one; a worker sending nothing,
or trickling a frame slower than the sending side's deadline allows, still is."""

from __future__ import annotations

import random

from transport._wire import Inbound

KIB = 1024


def test_nothing_arriving_is_a_stall_within_the_timeout() -> None:
    inbound = Inbound(100.0, 10.0, 64 * KIB)
    assert inbound.deadline() == 110.0
    assert inbound.stalled(109.99) is None
    assert inbound.stalled(110.0) == "nothing received for 10 s"
    inbound.frame_arrived(105.0)  # a complete frame (a heartbeat) moves it on
    assert inbound.stalled(110.0) is None and inbound.deadline() == 115.0


def test_a_large_frame_arriving_steadily_is_progress() -> None:
    """2 MiB at 64 KiB per 5 s takes 160 s, 16 timeouts: never stalled while it arrives,
    and the next frame's deadline starts from its end."""
    inbound = Inbound(0.0, 10.0, 64 * KIB)
    now = 0.0
    while inbound.received < 2 * 1024 * KIB:
        now += 1.0
        inbound.bytes_arrived(now, 64 * KIB // 5)
        assert inbound.stalled(now) is None, now
    assert now > 150 and inbound.partial == inbound.received
    inbound.frame_arrived(now)
    assert inbound.partial == 0 and inbound.deadline() == now + 10.0


def test_a_frame_that_stops_or_trickles_is_a_stall() -> None:
    # Half a frame, then nothing: stalled a timeout after its last byte.
    inbound = Inbound(0.0, 10.0, 64 * KIB)
    inbound.bytes_arrived(1.0, 200 * KIB)
    assert inbound.stalled(10.99) is None
    assert inbound.stalled(11.0) == "nothing received for 10 s"
    # A byte every 4 s keeps no frame alive past its deadline (64 KiB per timeout).
    inbound = Inbound(0.0, 10.0, 64 * KIB)
    for now in (4.0, 8.0):
        assert inbound.stalled(now) is None
        inbound.bytes_arrived(now, 1)
    assert inbound.stalled(10.0) == "a frame arriving slower than 64 KiB per 10 s"


def test_the_deadline_never_moves_earlier() -> None:
    """The watchdog sleeps until the deadline it read: what arrives meanwhile only moves it
    later, so a wake is never late."""
    rng = random.Random(7)
    inbound = Inbound(0.0, 1.0, 64 * KIB)
    now, last = 0.0, inbound.deadline()
    for _ in range(10_000):
        now += rng.uniform(0, 0.5)
        if rng.random() < 0.3:
            inbound.frame_arrived(now)
        else:
            inbound.bytes_arrived(now, rng.choice([0, 1, 4096, 65536]))
        assert inbound.deadline() >= last
        last = inbound.deadline()
