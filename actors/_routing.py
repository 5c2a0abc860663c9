"""Routing controls to the node that runs a job (issue 11), sans-I/O but for the calls given.

A pause, cancel or recovery asked of a job *running on another node* must act where its worker
is: there the handler checkpoints within the grace (pause) or is stopped (cancel). The asking
node sends the control to the owner (the job's ``owner``, the claim's node id, through
``send``: :class:`~._pg_notify.PgNotifier` on PostgreSQL); the owner applies it as a local call
of its own repository (:meth:`~._repository.Repository.apply_control`); the asker waits,
bounded by ``bound`` (stop grace + lease time-to-live + a margin), until the job has left that
running attempt (:func:`left_attempt`), and returns it as stored. If the owner is gone (no
change within the bound) the asker gets :class:`RemoteControlError`; the owner's lease expiry
hands the job to another node. A node is "another" when the job's ``owner`` is not this node's
id; whether it is alive is left to its lease. On memory and SQLite there is no routing.

A control is addressed to one attempt held by one incarnation (:class:`Control`'s ``attempt``
and ``owner``, the job as the asker read it), and the receiving node applies it only while
the job still runs that attempt under that incarnation and its own lease is valid
(:func:`refusal`); else it is dropped, and the asker sees the attempt end otherwise (a
takeover, another control) or its bound pass. Notifications reach every process listening on
the node id's channel, including one that was frozen past its lease (they queue up for it) or
one replaced by a newer process of the same node id: neither may act on the jobs it no longer
holds.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import attrs
import orjson
import trio

from ._errors import StoreError, shown
from ._job import Job
from ._states import JobState

__all__ = [
    "QUEUE_CHANNEL",
    "Control",
    "RemoteControlError",
    "RemoteControls",
    "left_attempt",
    "refusal",
]

#: Channel on which PostgreSQL commits announce waiting jobs.
QUEUE_CHANNEL = "jobspine_queue"
#: Seconds between reads of a job while a control is awaited on another node.
POLL_INTERVAL = 0.05
#: Seconds between two sends of one control while the job has not left its attempt (a
#: notification sent while the owner's listener reconnects is lost).
RESEND_INTERVAL = 1.0
#: Operations a node applies for another: the repository methods of the same name.
OPS = frozenset({"pause", "cancel", "recover"})


class RemoteControlError(StoreError):
    """The node running the job did not act on the control within the bound (it is gone or
    unreachable; its lease's expiry hands the job to another node). Code ``store_error``."""


@attrs.frozen
class Control:
    """A control of one running attempt: ``op`` (one of :data:`OPS`) of attempt ``attempt`` of
    ``job_id``, which the claim owner ``owner`` (``"<node id>#<incarnation>"``) held when the
    asker read it. Only that incarnation applies it, only to that attempt (:func:`refusal`)."""

    op: str
    job_id: str
    attempt: int
    owner: str
    by: str | None = None
    reason: str = "user"

    @classmethod
    def of(cls, op: str, job: Job, by: str | None = None, reason: str = "user") -> Control:
        """``op`` of ``job``'s running attempt, addressed to the owner that holds it."""
        assert job.owner is not None
        return cls(op, job.id, job.attempt, job.owner, by, reason)

    def encode(self) -> str:
        return orjson.dumps(attrs.asdict(self)).decode()

    @classmethod
    def decode(cls, payload: str) -> Control:
        """Raises :class:`ValueError` for a payload that is not a control (one without an
        attempt and owner, as nodes sent before controls were addressed, included: it cannot
        be told from a control meant for an attempt that has ended)."""
        try:
            data = orjson.loads(payload)
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"control is not JSON: {exc}") from None
        if not isinstance(data, dict) or data.get("op") not in OPS:
            raise ValueError(f"not a control: {payload[:200]!r}")
        job_id, by, reason = data.get("job_id"), data.get("by"), data.get("reason", "user")
        attempt, owner = data.get("attempt"), data.get("owner")
        if not isinstance(job_id, str) or not isinstance(reason, str):
            raise ValueError(f"not a control: {payload[:200]!r}")
        if by is not None and not isinstance(by, str):
            raise ValueError(f"not a control: {payload[:200]!r}")
        if isinstance(attempt, bool) or not isinstance(attempt, int) or not isinstance(owner, str):
            raise ValueError(f"control without its attempt and owner: {payload[:200]!r}")
        return cls(data["op"], job_id, attempt, owner, by, reason)


def refusal(control: Control, job: Job, holder: str | None) -> str | None:
    """Why a node must drop ``control`` rather than apply it, or None to apply it. ``job``:
    the job as stored; ``holder``: the node's claim owner while its lease is valid, None while
    it has none (fenced, lapsed locally, or not registered again yet).

    Invariant: a control acts on the attempt it was sent for, where that attempt runs, and
    nowhere else. A node whose lease is not valid writes nothing for what it held (another
    node owns it, or will); a node that registered again is another incarnation, which never
    held the attempt; and a job that left the attempt (a takeover re-queued or paused it, and
    another node may run its next attempt) is no longer the control's to change."""
    if holder is None:
        return "this node holds no valid lease"
    if control.owner != holder:
        return f"addressed to {control.owner}, this node is {holder}"
    if job.state is not JobState.RUNNING or job.attempt != control.attempt:
        now = f"{job.state.value} (attempt {job.attempt})"
        return f"attempt {control.attempt} ended: the job is {now}"
    if job.owner != control.owner:
        return f"attempt {control.attempt} is held by {job.owner}, not {control.owner}"
    return None


def left_attempt(before: Job, now: Job) -> bool:
    """Whether ``now`` (the job as stored) is past the running attempt ``before`` was: the
    control, or a takeover, has ended it."""
    return now.state is not JobState.RUNNING or now.attempt != before.attempt


class RemoteControls:
    """Which jobs run elsewhere, and the control sent there and awaited. ``owner()``: this
    node's current claim owner (it changes when the node registers again); ``send(owner,
    control)`` delivers it to the node of ``owner``; ``read(job_id)`` reads the job as stored;
    ``bound``: seconds the asker waits."""

    def __init__(
        self,
        owner: Callable[[], str],
        send: Callable[[str, Control], Awaitable[None]],
        read: Callable[[str], Awaitable[Job]],
        bound: float,
    ) -> None:
        self.owner = owner
        self._send = send
        self._read = read
        self.bound = bound

    def is_remote(self, job: Job) -> bool:
        """Whether ``job`` runs on another node (running, claimed by an owner not this one)."""
        return job.state is JobState.RUNNING and job.owner is not None and job.owner != self.owner()

    async def control(self, job: Job, control: Control) -> Job:
        """Send ``control`` to the node running ``job`` and wait until the job has left that
        attempt; returns it as stored. Raises :class:`RemoteControlError` past the bound."""
        assert job.owner is not None
        await self._send(job.owner, control)
        sent_at = trio.current_time()
        with trio.move_on_after(self.bound):
            while True:
                now = await self._read(job.id)
                if left_attempt(job, now):
                    return now
                if trio.current_time() - sent_at >= RESEND_INTERVAL:
                    # A notification sent while the owner's listener reconnected is lost:
                    # sent again (the owner applies one control once, see _pg_notify).
                    sent_at = trio.current_time()
                    await self._send(job.owner, control)
                await trio.sleep(POLL_INTERVAL)
        raise RemoteControlError(
            f"job {job.id}: node {shown(job.owner)} did not {control.op} it within"
            f" {self.bound:g} s; its lease's expiry hands it to another node"
        )
