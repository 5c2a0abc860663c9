"""The fan-out actor: every node delivers every event of the rooms its clients joined, whoever
committed it, through Redis pub/sub with the durable log as the truth.

Several nodes share one database; each one's :class:`~._events.EventHub` only sees its own
commits. With a :class:`FanoutConfig`, the node's :class:`Fanout`

- **publishes** each commit group of its own events (one ``PUBLISH`` per group, never one per
  event) on the channel ``<prefix>:<epoch>:events``, from a bounded outbox drained by a
  publisher task: the store and the broadcaster never wait for Redis. A group that does not
  fit, or that Redis refuses, is dropped, and its users' highest ``user_seq`` is announced
  with the next message (or the next ``PING`` round): the other nodes fill it from the log,
  even when no later event of the user would reveal the gap.
- **orders** what reaches it (its own commits, the channel, fills) with a
  :class:`~._sequencer.Sequencer` per tracked user and hands the broadcaster each event once,
  in ``user_seq`` order (:attr:`Fanout.deliver`). A gap that persists ``gap_wait`` seconds
  (20-50 ms: pub/sub reorders nothing, so a gap that long is a drop) is filled from the log,
  one store request for every user due.
- **falls back** to polling the log for every tracked user each ``poll_interval`` while Redis
  is down (a subscription or command failed, or the periodic ``PING`` did): slower, nothing
  lost. When the subscription is back, every tracked user is filled once, then push resumes.
  :attr:`Fanout.health` says which, and why (``/readyz``).
- **checks** the log for every tracked user each ``check_interval`` while Redis is up (one
  store read for all of them): events no message will ever carry (their node died between
  its commit and its ``PUBLISH``, and no later event of the user reveals the gap; or nodes
  that do not share one Redis and secret) reach this node's clients that late at most,
  instead of never. Events a check finds more than ``LATE_SECONDS`` after their commit are
  counted (:attr:`FanoutStats.late`) and logged once a minute.
- **signs** every message and drops every one whose signature does not verify
  (:attr:`FanoutStats.forged`), with a key from the nodes' secret or, given none, from their
  database (:attr:`FanoutConfig.secret`): another program that can publish on the channel
  cannot deliver events (a forged progress, a forged completion) to this node's clients.

Redis errors never reach a store write, a client or a job: they only change the health.
coredis runs natively on Trio (its I/O goes through anyio), so no thread or asyncio loop is
involved.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import attrs
import orjson
import trio

from ._clock import wall_time
from ._codec import converter
from ._errors import InvalidInputError, JobspineError, leaves
from ._events import EventHub, EventStreamLagged, JobEvent, event_bytes
from ._ranges import check_fields
from ._sequencer import Sequencer
from ._store import StoreClient

if TYPE_CHECKING:
    import coredis

__all__ = ["Fanout", "FanoutConfig", "FanoutStats", "RedisHealth"]

log = logging.getLogger("jobspine.fanout")


@attrs.frozen
class FanoutConfig:
    """Cluster fan-out settings. ``redis``: ``redis://[:password@]host:port/db`` (or
    ``rediss://``); refused with :class:`InvalidInputError` if it is no such URL. None: no
    Redis, the other nodes' events are read from the log every ``poll_interval`` (what
    :func:`~._runtime.open_runtime` runs on a shared database given no fan-out). Every
    message on Redis is signed, with or without a ``secret`` (see there)."""

    redis: str | None
    #: Seconds an out-of-order event is held before its gap is filled from the log.
    gap_wait: float = 0.03
    #: Seconds between two reads of the log for every tracked user while Redis is down.
    poll_interval: float = 0.2
    #: Seconds between two reads of the log for every tracked user while Redis is up (what
    #: a dead node never published arrives this late at most).
    check_interval: float = 5.0
    #: Seconds between two ``PING``s, and how long one (or a ``PUBLISH``) may take.
    ping_interval: float = 1.0
    redis_timeout: float = 2.0
    #: Seconds between two attempts to subscribe while Redis is down.
    reconnect_delay: float = 0.5
    #: Commit groups waiting for their ``PUBLISH`` at most, and what their events may cost
    #: in all (:func:`~._events.event_bytes`); more are dropped: filled from the log.
    outbox: int = 1000
    outbox_bytes: int = 64 * 2**20
    #: Largest message published, in bytes: a commit group whose message would be larger (a
    #: few jobs finishing at once with results of megabytes) is not published, only its
    #: users' heads, and the other nodes read its events from the log at once. Redis
    #: disconnects a subscriber that has more than 32 MiB of messages waiting for it (its
    #: ``client-output-buffer-limit pubsub``), so a burst of large groups cut every node's
    #: subscription at once (each then polled the log until it subscribed again).
    max_message_bytes: int = 256 * 1024
    #: Events held per user while a gap is open (and what all users' held events may cost,
    #: see :class:`~._sequencer.Sequencer`), and read per user by one fill.
    max_held: int = 1000
    max_held_bytes: int = 64 * 2**20
    fill_limit: int = 500
    #: Channel name prefix: ``<prefix>:<epoch>:events``.
    prefix: str = "jobspine"
    #: The secret the nodes share (``jobspine serve`` passes its token secret), or None.
    #: Every message is signed (HMAC-SHA256: 64 hex digits before its JSON body) with a key
    #: derived from the secret or, given None, with the key of the database the nodes share
    #: (:attr:`~._backend.Backend.fanout_key`, read at start: 32 random bytes made once per
    #: PostgreSQL database; on SQLite or in memory, which no other node opens at once, one of
    #: the process's own). A message whose signature does not verify is dropped and counted
    #: (:attr:`FanoutStats.forged`): whoever else can publish on the Redis channel cannot
    #: deliver events to clients. The nodes of a database are given one secret, or all none:
    #: nodes with different keys get each other's events only from the log, within
    #: ``check_interval`` (counted late). Signing cannot be turned off: it costs one HMAC per
    #: commit group, nodes need no setting to share a key, and unsigned messages would let
    #: any program that reaches the Redis forge events of any user.
    secret: str | None = attrs.field(default=None, repr=False)

    def __attrs_post_init__(self) -> None:
        if self.redis is not None:
            problem = (
                redis_url_problem(self.redis) if isinstance(self.redis, str) else "not a string"
            )
            if problem is not None:
                raise InvalidInputError(f"redis must be a redis://host:port/db URL: {problem}")
        if self.secret is not None and (not isinstance(self.secret, str) or not self.secret):
            # An empty secret would derive a key anyone can compute: no signature at all.
            raise InvalidInputError(
                "secret must be a non-empty string (or None: the database's key signs)"
            )
        # Every number: seconds above 0, counts and sizes from 1 (named with the value).
        check_fields(self)


def redis_url_problem(url: str) -> str | None:
    """Why ``url`` is no Redis URL the client can open, else None: its scheme is none of
    ``redis://``, ``rediss://``, ``unix://``; its port is no number from 0 to 65535; or its
    database (the path, or a ``db`` query argument) is no number. The client raised on such
    a port only when the fan-out opened (the node's start failed with a traceback), and took
    such a database for database 0, silently."""
    shown = redact_redis_url(url)
    if not url.startswith(("redis://", "rediss://", "unix://")):
        return f"expected a redis://HOST:PORT/DB URL, not {shown!r}"
    parts = urlsplit(url)
    try:
        parts.port  # noqa: B018 - parsing the port is the check
    except ValueError:
        return f"the port of {shown!r} is no number from 0 to 65535"
    databases = parse_qs(parts.query).get("db", [])
    if parts.scheme != "unix" and parts.path not in ("", "/"):
        databases.append(parts.path[1:])
    if any(not db.isascii() or not db.isdigit() for db in databases):
        return f"the database of {shown!r} is no number (redis://HOST:PORT/DB)"
    return None


def redact_redis_url(url: str) -> str:
    """``url`` with its password (``redis://user:PASSWORD@host``) replaced by ``***``."""
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if not sep or not at or ":" not in credentials:
        return url
    user = credentials.partition(":")[0]
    return f"{scheme}://{user}:***@{host}"


#: Seconds ``redis_refusal`` waits for Redis's answer before taking it for an outage.
REDIS_CHECK_TIMEOUT = 5.0


async def redis_refusal(url: str) -> str | None:
    """Why the Redis server at ``url`` refuses it for good (a database index it does not
    have, a wrong user or password: an answer, which no retry changes), else None: it
    answered, or it could not be reached within ``REDIS_CHECK_TIMEOUT`` (Redis being down is an
    outage, lived through by polling the log). ``jobspine serve`` asks before it starts: a
    node given such a URL served on, polling the log for ever, its ``/readyz`` 200."""
    import coredis

    client: coredis.Redis[bytes] = coredis.Redis.from_url(url, decode_responses=False)
    try:
        with trio.move_on_after(REDIS_CHECK_TIMEOUT):
            async with client:
                await client.ping()
    except Exception as exc:
        for leaf in leaves(exc):
            if is_permanent_refusal(leaf):
                return f"{type(leaf).__name__}: {leaf}"
    return None


def is_permanent_refusal(exc: BaseException) -> bool:
    """Whether Redis's answer ``exc`` refuses the URL itself: a wrong user or password, a
    user without the right, a database index it does not have (``SELECT``'s "DB index is out
    of range"). Not an answer that passes (``LOADING`` a dataset after a restart, ``BUSY``
    with a script, ``MASTERDOWN``): a node started meanwhile polls the log until Redis is
    back, as for an outage."""
    import coredis

    errors = coredis.exceptions
    if isinstance(exc, errors.AuthenticationError | errors.AuthorizationError):
        return True
    return isinstance(exc, errors.ResponseError) and "DB index" in str(exc)


@attrs.frozen
class RedisHealth:
    """Whether events arrive pushed from Redis (``ok``); if not why (``reason``), since when
    (Unix seconds), and how many outages so far."""

    ok: bool = False
    reason: str | None = "not connected yet"
    since: float | None = None
    outages: int = 0


#: Length of a message's signature (hex SHA-256) before its body.
_MAC_LENGTH = 64
#: Seconds between two warnings about forged messages (a flood logs one line a minute), about
#: events found late in the log, and about fills that failed (a database outage fails one
#: every poll, tens a second).
FORGED_LOG_INTERVAL = 60.0
#: An event a fill delivers this many seconds after its commit (by the committing node's
#: clock) while Redis is up reached no message in time: counted and logged.
LATE_SECONDS = 1.0


@attrs.define
class FanoutStats:
    #: Commit groups and events published to Redis.
    published_groups: int = 0
    published_events: int = 0
    #: Commit groups not published (outbox full or Redis failed): their events are filled.
    publish_dropped: int = 0
    #: Commit groups over ``max_message_bytes``: only their heads published, events filled.
    publish_oversized: int = 0
    #: Other nodes' events received from Redis (this node's own are skipped unread).
    received: int = 0
    #: Messages on the channel that were not jobspine event groups.
    malformed: int = 0
    #: Messages whose signature did not verify (see :attr:`FanoutConfig.secret`): dropped.
    forged: int = 0
    #: Store reads made to fill gaps or to poll (one per round, for many users).
    fill_reads: int = 0
    #: Events delivered from the log over ``LATE_SECONDS`` after their commit while Redis
    #: was up (their node died before publishing them, or nodes disagree on Redis or secret).
    late: int = 0


class Fanout:
    """See the module docstring. ``deliver`` is called with events in order, once each (the
    broadcaster's :meth:`~._broadcaster.Broadcaster.publish_all`); set it before :meth:`run`."""

    def __init__(
        self, store: StoreClient, hub: EventHub, config: FanoutConfig, node_id: str
    ) -> None:
        self.store = store
        self.hub = hub
        self.config = config
        self.node_id = node_id
        # The signing key: set by run() (the database's is read once the store is open),
        # before any message is sent or received.
        self._key: bytes | None = None
        self._forged_logged_at = -math.inf
        self._late_logged_at = -math.inf
        self._fill_logged_at = -math.inf
        self._fills_failed = 0  # since the last warning
        self.sequencer = Sequencer(
            gap_wait=config.gap_wait,
            max_held=config.max_held,
            max_held_bytes=config.max_held_bytes,
            fill_limit=config.fill_limit,
        )
        self.stats = FanoutStats()
        self.health = RedisHealth()
        self.deliver: Callable[[list[JobEvent]], None] = lambda events: None
        self._subscribed = False
        self._wake = trio.Event()
        self._idle = trio.Event()
        self._local_pending: Callable[[], int] = lambda: 0
        #: Tests only: this node's commit groups are not published (as if pub/sub dropped them).
        self.skip_publish = False
        #: user id -> the highest ``user_seq`` of this node's events not published.
        self._unannounced: dict[str, int] = {}
        #: Tracked users another node announced heads of (events it did not publish) since
        #: their last fill: what that fill finds is no late event, a message told of it.
        self._announced: set[str] = set()
        #: Set once :meth:`run` has ended.
        self.closed = trio.Event()
        send, receive = trio.open_memory_channel[tuple[list[JobEvent], int]](config.outbox)
        self._outbox_send, self._outbox_receive = send, receive
        #: What the outbox's groups cost now (within ``config.outbox_bytes``).
        self.outbox_bytes = 0

    @property
    def channel(self) -> str:
        return f"{self.config.prefix}:{self.store.epoch}:events"

    # -- tracking (the broadcaster's joins and leaves) ------------------------------------------

    def watch(self, user_id: str) -> None:
        self.sequencer.watch(user_id)

    def started(self, user_id: str) -> bool:
        return self.sequencer.head(user_id) is not None

    def start(self, user_id: str, head: int) -> None:
        """Deliver ``user_id``'s events after ``head``; the log is read once right away, in
        case ``head`` (this node's count) is behind other nodes' commits."""
        if not self.started(user_id):
            self.deliver(self.sequencer.start(user_id, head, trio.current_time()))
            self.sequencer.mark_behind([user_id])
            self._wake.set()

    def unwatch(self, user_id: str) -> None:
        self.sequencer.unwatch(user_id)
        if self.sequencer.head(user_id) is None:  # no longer tracked
            self._announced.discard(user_id)

    # -- health ---------------------------------------------------------------------------------

    def _down(self, reason: str) -> None:
        if self.health.ok or self.health.since is None:  # up, or never connected yet
            log.warning("redis unavailable, polling the event log instead: %s", reason)
            self.health = RedisHealth(False, reason, time.time(), self.health.outages + 1)
        elif self.health.reason != reason:
            self.health = attrs.evolve(self.health, reason=reason)
        self._wake.set()

    def _up(self) -> None:
        if not self.health.ok and self._subscribed:
            if self.health.since is not None:
                log.warning("redis is back: events are pushed again")
            self.health = RedisHealth(True, None, None, self.health.outages)
            # Whatever was published while this node was not subscribed: filled once.
            self.sequencer.mark_behind()
            self._wake.set()

    # -- the actor ------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[Fanout] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until the hub closes (the runtime's shutdown); then publish what is queued
        (for ``redis_timeout`` seconds at most) and stop."""
        if self.config.redis is None:
            await self._run_on_the_log(task_status)
            return
        self._key = signing_key(self.config.secret, self.store.fanout_key)
        import coredis  # here: it takes most of a second to import, and only a cluster needs it

        client: coredis.Redis[bytes] = coredis.Redis.from_url(
            self.config.redis, decode_responses=False
        )
        try:
            async with self.store, client, self._outbox_receive, trio.open_nursery() as nursery:
                publishing = trio.CancelScope()
                await nursery.start(self._local, publishing)
                nursery.start_soon(self._publisher, client, publishing, nursery.cancel_scope)
                nursery.start_soon(self._subscriber, client)
                nursery.start_soon(self._pinger, client)
                nursery.start_soon(self._filler)
                task_status.started(self)
        finally:
            self.closed.set()

    async def _run_on_the_log(self, task_status: trio.TaskStatus[Fanout]) -> None:
        """No Redis: this node's commits are delivered at once, and the other nodes' events
        are read from the log every ``poll_interval`` (nothing is published: the other
        nodes read this one's from the log too)."""
        self.health = RedisHealth(False, "no redis: the log is polled")
        try:
            async with self.store, self._outbox_receive, trio.open_nursery() as nursery:
                await nursery.start(self._local_then_stop, nursery.cancel_scope)
                nursery.start_soon(self._filler)
                task_status.started(self)
        finally:
            self.closed.set()

    async def _local_then_stop(
        self,
        stop: trio.CancelScope,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """:meth:`_local`, then ``stop`` (the hub closed: nothing more to deliver)."""
        try:
            await self._local(trio.CancelScope(), task_status=task_status)
        finally:
            stop.cancel()

    async def drained(self) -> None:
        """Return once this node's committed events so far have been delivered."""
        while self._local_pending():
            self._idle = trio.Event()
            await self._idle.wait()

    async def _local(
        self,
        publishing: trio.CancelScope,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """This node's commits: delivered at once (no round trip) and queued for publishing.
        Once the hub closes, the publisher gets ``redis_timeout`` to send what is queued."""
        started = False
        try:
            while True:
                async with self.hub.subscribe(buffer=1_000_000) as stream:
                    self._local_pending = stream.pending
                    if not started:
                        task_status.started()
                        started = True
                    try:
                        async for event in stream:
                            # A commit's events arrive together: one group, one PUBLISH.
                            group = [event]
                            while stream.pending():
                                group.append(stream.receive_nowait())
                            self._commit_group(group)
                    except EventStreamLagged:
                        log.error("fan-out fell behind the store; filling from the log")
                        self.sequencer.mark_behind()
                        self._wake.set()
                        continue
                    return
        finally:
            self._outbox_send.close()
            publishing.deadline = trio.current_time() + self.config.redis_timeout

    def _commit_group(self, group: list[JobEvent]) -> None:
        self.deliver(self.sequencer.offer(group, trio.current_time()))
        if self.config.redis is None:
            return  # nobody to publish to: the other nodes read the log
        if self.skip_publish:
            self._unpublished(group)
        else:
            cost = sum(map(event_bytes, group))
            try:
                # An empty outbox takes a group whatever it weighs (its events are in
                # memory anyway): a publisher that keeps up never drops one.
                if self.outbox_bytes and self.outbox_bytes + cost > self.config.outbox_bytes:
                    raise trio.WouldBlock
                self._outbox_send.send_nowait((group, cost))
                self.outbox_bytes += cost
            except trio.WouldBlock:
                self._unpublished(group)
        self._idle.set()
        self._wake.set()

    def _unpublished(self, group: list[JobEvent]) -> None:
        self.stats.publish_dropped += 1
        for event in group:
            if event.user_seq > self._unannounced.get(event.user_id, 0):
                self._unannounced[event.user_id] = event.user_seq

    async def _send(self, client: coredis.Redis[bytes], group: list[JobEvent]) -> int | None:
        """Publish ``group`` (may be empty) with the heads not announced yet; returns the
        events published (none of a group over ``max_message_bytes``: its heads instead),
        None if Redis failed (the group then joins what is announced next)."""
        heads, self._unannounced = self._unannounced, {}
        body, heads, published = group_message(
            self.node_id, group, heads, self.config.max_message_bytes - len(self._sign(b""))
        )
        if len(published) < len(group):
            self.stats.publish_oversized += 1
        group = published
        message = self._sign(body)
        try:
            with trio.fail_after(self.config.redis_timeout):
                await client.publish(self.channel, message)
        except Exception as exc:
            for user_id, seq in heads.items():
                self._unannounced[user_id] = max(seq, self._unannounced.get(user_id, 0))
            if group:
                self._unpublished(group)
            self._down(f"publish failed: {_describe(exc)}")
            return None
        return len(group)

    async def _publisher(
        self, client: coredis.Redis[bytes], scope: trio.CancelScope, done: trio.CancelScope
    ) -> None:
        with scope:
            await self._publish(client)
        done.cancel()  # the hub closed and the queue is sent (or out of time): stop

    async def _publish(self, client: coredis.Redis[bytes]) -> None:
        async for group, cost in self._outbox_receive:
            self.outbox_bytes -= cost
            published = await self._send(client, group)
            if published is not None:
                self.stats.published_groups += 1
                self.stats.published_events += published

    async def _subscriber(self, client: coredis.Redis[bytes]) -> None:
        while True:
            try:
                async with client.pubsub(
                    channels=[self.channel], ignore_subscribe_messages=True, retry_policy=None
                ) as pubsub:
                    self._subscribed = True
                    with trio.fail_after(self.config.redis_timeout):
                        await client.ping()
                    self._up()
                    async for message in pubsub:
                        self._receive(message["data"])
                raise ConnectionError("the subscription ended")
            except Exception as exc:
                self._subscribed = False
                self._down(f"subscription lost: {_describe(exc)}")
            await trio.sleep(self.config.reconnect_delay)

    def _sign(self, body: bytes) -> bytes:
        """``body`` preceded by its signature (64 hex digits)."""
        assert self._key is not None, "run() sets the key before anything is published"
        return hmac.new(self._key, body, hashlib.sha256).hexdigest().encode() + body

    def _verified(self, data: bytes) -> bytes | None:
        """The body of a message whose signature verifies, else None. No message is taken
        unsigned, whatever the configuration: a foreign publisher must not reach clients."""
        if self._key is None:
            return None
        mac, body = data[:_MAC_LENGTH], data[_MAC_LENGTH:]
        expected = hmac.new(self._key, body, hashlib.sha256).hexdigest().encode()
        return body if hmac.compare_digest(mac, expected) else None

    def _receive(self, data: Any) -> None:
        body_bytes = self._verified(data) if isinstance(data, bytes) else None
        if body_bytes is None:
            self.stats.forged += 1
            if trio.current_time() >= self._forged_logged_at + FORGED_LOG_INTERVAL:
                self._forged_logged_at = trio.current_time()
                log.warning(
                    "dropped a message on %s whose signature does not verify (%d so far):"
                    " another publisher, or a node with another key (another secret, or a"
                    " secret where this node has none)",
                    self.channel,
                    self.stats.forged,
                )
            return
        try:
            body = orjson.loads(body_bytes)
            if body["node"] == self.node_id:
                return  # already delivered from the hub
            events = converter.structure(body["events"], list[JobEvent])
            heads = converter.structure(body["heads"], dict[str, int])
        except Exception:
            self.stats.malformed += 1
            log.warning("ignored a message on %s that is not an event group", self.channel)
            return
        self.stats.received += len(events)
        self.deliver(self.sequencer.offer(events, trio.current_time()))
        for user_id, seq in heads.items():
            self.sequencer.announce(user_id, seq)
            if self.sequencer.head(user_id) is not None:
                self._announced.add(user_id)
        self._wake.set()

    async def _pinger(self, client: coredis.Redis[bytes]) -> None:
        """Checks Redis every ``ping_interval``; announces heads no message carried since."""
        while True:
            await trio.sleep(self.config.ping_interval)
            try:
                with trio.fail_after(self.config.redis_timeout):
                    await client.ping()
            except Exception as exc:
                self._down(f"ping failed: {_describe(exc)}")
                continue
            self._up()
            if self._unannounced:
                await self._send(client, [])

    async def _filler(self) -> None:
        """Fills gaps from the log, and polls it for every tracked user while Redis is down."""
        next_poll = trio.current_time()
        next_check = next_poll + self.config.check_interval
        while True:
            now = trio.current_time()
            if not self.health.ok and now >= next_poll:
                self.sequencer.mark_behind()
                next_poll = now + self.config.poll_interval
            elif self.health.ok and now >= next_check:
                self.sequencer.mark_behind()
                next_check = now + self.config.check_interval
            due = self.sequencer.fills_due(now)
            if due:
                await self._fill(due)
                continue
            deadline = self.sequencer.next_deadline()
            wake = next_check if self.health.ok else next_poll
            deadline = wake if deadline is None else min(deadline, wake)
            self._wake = trio.Event()
            with trio.move_on_at(deadline if deadline is not None else float("inf")):
                await self._wake.wait()

    async def _fill(self, due: dict[str, int]) -> None:
        self.stats.fill_reads += 1
        announced = self._announced.intersection(due)
        self._announced.difference_update(announced)
        try:
            found = await self.store.read_users_events(due, self.config.fill_limit)
        except JobspineError as exc:
            now = trio.current_time()
            self._fills_failed += 1
            if now >= self._fill_logged_at + FORGED_LOG_INTERVAL:
                self._fill_logged_at = now
                log.warning(
                    "could not fill %d users' events from the log (%d fills failed since the"
                    " last such warning; retried until the database answers): %s",
                    len(due),
                    self._fills_failed,
                    exc,
                )
                self._fills_failed = 0
            for user_id in due:
                self.sequencer.fill_failed(user_id, now)
            return
        now = trio.current_time()
        late_before = wall_time() - LATE_SECONDS
        late = 0
        for user_id in due:
            delivered = self.sequencer.filled(user_id, found.get(user_id, []), now)
            if self.health.ok and user_id not in announced:
                late += sum(1 for event in delivered if event.at < late_before)
            self.deliver(delivered)
        if late:
            self.stats.late += late
            if now >= self._late_logged_at + FORGED_LOG_INTERVAL:
                self._late_logged_at = now
                log.warning(
                    "%d events of other nodes reached this node only from the log, over %g s"
                    " after their commit (%d so far): a node died before publishing them, or"
                    " the nodes do not share one Redis and secret",
                    late,
                    LATE_SECONDS,
                    self.stats.late,
                )


def signing_key(secret: str | None, database_key: bytes) -> bytes:
    """The key (32 bytes) fan-out messages are signed with, HMAC-SHA256: derived from
    ``secret`` when one is given (nodes given one secret agree whatever their database, as
    before there was a database key; never the secret itself, which also signs tokens), else
    ``database_key`` as it is (:attr:`~._backend.Backend.fanout_key`: random, and used for
    nothing else)."""
    if secret is None:
        return database_key
    return hashlib.sha256(b"jobspine fan-out\0" + secret.encode()).digest()


def group_message(
    node_id: str, group: list[JobEvent], heads: dict[str, int], max_bytes: int
) -> tuple[bytes, dict[str, int], list[JobEvent]]:
    """The message body publishing ``group`` with ``heads`` (user id -> highest ``user_seq``
    not announced yet), the heads it carries and the events it carries. A body over
    ``max_bytes`` carries no event: each user's highest ``user_seq`` of the group joins the
    heads instead, which make every node holding that user read the events from the log at
    once (sans-I/O)."""
    events = converter.unstructure(group, list[JobEvent])
    body = orjson.dumps({"node": node_id, "events": events, "heads": heads})
    if not group or len(body) <= max_bytes:
        return body, heads, group
    heads = dict(heads)
    for event in group:
        if event.user_seq > heads.get(event.user_id, 0):
            heads[event.user_id] = event.user_seq
    return orjson.dumps({"node": node_id, "events": [], "heads": heads}), heads, []


def _describe(exc: BaseException) -> str:
    """One line for a Redis failure (the first real error inside an exception group)."""
    if isinstance(exc, trio.TooSlowError):
        return "timed out"
    found = [e for e in leaves(exc) if not isinstance(e, trio.Cancelled)] or [exc]
    return " ".join(str(found[0]).split()) or type(found[0]).__name__
