"""When the client reconnects, and when it must not (sans-I/O: every call takes ``now``).

Close codes fall in three kinds (the table is in PROTOCOL.md, "Reconnecting"):

- *fatal*: reconnecting cannot help; the application gets a typed error (4002 bad hello,
  4003 authentication failed; 4004 token expired when the token is a fixed string);
- *recurring*: the same thing will happen again at once (1007 invalid data, 1009 a message
  over a size limit, 1011 server error, 1013 try again later: a worker's kinds have no room
  now, 4008 slow consumer, 4009 too many connections, 4029 request flood): retried, but only
  after the full backoff;
- anything else (1000, 1001 shutdown, 1006 abnormal, 4001, refused or reset connections):
  retried with a jittered exponential backoff.

The backoff resets only once a connection has stayed up for ``healthy_after`` seconds, so a
server that accepts the hello and then drops the connection each time is not hammered.
"""

from __future__ import annotations

import math
import random

import attrs

__all__ = ["FATAL_CLOSE", "RECURRING_CLOSE", "ReconnectPolicy"]

#: Close code -> error code of the :class:`ClientError` the application gets.
FATAL_CLOSE = {
    4002: "protocol_error",
    4003: "auth_failed",
    4004: "token_expired",
    4010: "wrong_role",
}

#: Close codes that would recur on an immediate reconnect, with what they mean.
RECURRING_CLOSE = {
    1007: "invalid data",
    1009: "a message over a size limit",
    1011: "server error",
    1013: "try again later",  # a worker's hello: no room for its kinds now
    4008: "slow consumer",
    4009: "too many connections",
    4029: "request flood",
}


@attrs.define
class ReconnectPolicy:
    """Delays between connection attempts.

    ``min_backoff``, ``max_backoff`` and ``healthy_after`` are seconds. The n-th consecutive
    failure waits ``min(max_backoff, min_backoff * 2**n)`` times a jitter in [0.5, 1].
    """

    min_backoff: float = 0.05
    max_backoff: float = 10.0
    healthy_after: float = 10.0
    rng: random.Random = attrs.field(factory=random.Random, repr=False)
    #: Consecutive failures so far (what the next delay grows from).
    failures: int = 0
    _up_since: float | None = None

    @property
    def _at_cap(self) -> int:
        """The failure count from which the delay is ``max_backoff``."""
        if self.min_backoff <= 0 or self.max_backoff <= self.min_backoff:
            return 0
        return math.ceil(math.log2(self.max_backoff / self.min_backoff))

    def connected(self, now: float) -> None:
        """A connection was established (the hello was answered) at ``now``."""
        self._up_since = now

    def next_delay(self, now: float, close_code: int | None = None) -> float:
        """Seconds to wait before the next attempt, for a connection (or attempt) that ended
        at ``now`` with ``close_code`` (None: no close frame, e.g. refused or reset)."""
        if self._up_since is not None and now - self._up_since >= self.healthy_after:
            self.failures = 0
        self._up_since = None
        if close_code in RECURRING_CLOSE:
            self.failures = max(self.failures, self._at_cap)
        base = min(self.max_backoff, self.min_backoff * (1 << min(self.failures, self._at_cap)))
        self.failures += 1
        return base * self.rng.uniform(0.5, 1.0)

    def succeeded(self) -> None:
        """What was retried worked (for retries that have no connection to stay up)."""
        self.failures = 0
