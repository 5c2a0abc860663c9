"""The runtime's wall clock: Unix seconds for every time it stores or compares with a stored
one (``created_at``, ``run_at``, a retry's time, checkpoints, heartbeats, claim leases, the
idempotency window, retention).

It is the system's clock, ``time.time()``, read anew each time: when that clock is set (NTP
correcting a clock that was wrong at boot, a VM resumed, an operator), every such time moves
with it, so a ``run_at`` a client computed from its clock, one another node wrote, and this
runtime's own stay comparable, as in every queue that stores wall times (BullMQ, Celery's
ETA, Oban). Keeping instead the clock as it read at the start plus a monotonic time (as the
runtime did) let the two drift apart by every step since: a day forward, a job due in ten
minutes waited a day more; hours back, a job for later started at once.

Durations within one process (stall deadlines, timeouts, lease renewal intervals) are not
wall time: they count on ``trio.current_time()``, monotonic, which no step moves.

Under a Trio clock that is not the system's (a test's ``MockClock``, ``autojump_clock``),
:func:`wall_time` moves with that clock instead of the real time: the system's clock as the
run first read it plus the Trio clock's time since, so a test's hour of jumps is exactly an
hour of stored time; a step of the system's clock (a test setting it) moves it too. Such a
clock may not move between two readings, so there each reading is also later than the one
before, by the least a float can tell: two jobs created one after the other keep their
order, and a job that has finished is older than the next prune.
"""

from __future__ import annotations

import math
import time

import attrs
import trio

__all__ = ["trio_time_of", "wall_time"]

#: Under a clock not the system's: a change of the system's clock against its monotonic one
#: by more than this many seconds is a step (less is two clocks read one after the other).
STEP = 0.001

#: Under a clock not the system's: a reading at most this many seconds before the last one
#: is taken as not moved (a test's wall clock set back by more is set back).
HOLD = 1.0


@attrs.define
class _Virtual:
    """A run under a Trio clock that is not the system's: the wall time is ``anchor`` plus
    the Trio clock's time; ``offset``, the system's clock minus its monotonic one, tells a
    step of the system's clock; ``last``, the last reading given."""

    anchor: float
    offset: float
    last: float = -math.inf

    def follow_steps(self) -> None:
        offset = time.time() - time.perf_counter()
        if abs(offset - self.offset) > STEP:
            self.anchor += offset - self.offset
            self.offset = offset


#: Per Trio run: None under Trio's own clock, else its :class:`_Virtual`.
_RUN: trio.lowlevel.RunVar[_Virtual | None] = trio.lowlevel.RunVar("jobspine_wall_clock")


def _is_system_clock(clock: trio.abc.Clock) -> bool:
    kind = type(clock)
    return kind.__name__ == "SystemClock" and kind.__module__.startswith("trio.")


def _run() -> _Virtual | None:
    """This run's state; raises :class:`RuntimeError` outside a Trio run's thread."""
    try:
        return _RUN.get()
    except LookupError:
        clock = trio.lowlevel.current_clock()
        run = None
        if not _is_system_clock(clock):
            offset = time.time() - time.perf_counter()
            run = _Virtual(time.time() - clock.current_time(), offset)
        _RUN.set(run)
        return run


def wall_time() -> float:
    """Unix seconds by the system's clock, moved with the Trio clock when that is not the
    system's (a mock clock in tests); outside Trio (a database thread), ``time.time()``."""
    try:
        run = _run()
    except RuntimeError:  # not in a Trio run's thread
        return time.time()
    if run is None:
        return time.time()
    run.follow_steps()
    now = run.anchor + trio.current_time()
    if run.last - HOLD < now <= run.last:
        now = math.nextafter(run.last, math.inf)
    run.last = now
    return now


def trio_time_of(wall: float) -> float:
    """The Trio time at which :func:`wall_time` will read ``wall``, unless the system's clock
    is set meanwhile (in a Trio run)."""
    run = _run()
    if run is None:
        return trio.current_time() + (wall - time.time())
    run.follow_steps()
    return wall - run.anchor
