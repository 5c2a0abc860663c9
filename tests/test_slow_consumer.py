"""Slow consumers and coalescing (issue 8, faults 6 and 7).

Frames stay within ``batch_bytes`` whatever is queued; coalesced progress is represented by
skipped markers in place, so a client applying PROTOCOL.md's rules literally, frame by frame
(:mod:`tests.doc_client`), never drops an event; a slow reader that keeps reading goes through
coalescing, ``lagged`` and 4008, never an abnormal closure.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from actors import (
    BroadcasterConfig,
    Cursor,
    EventType,
    JobContext,
    JobEvent,
    JobState,
    MemoryBackend,
    Outbox,
    encode_batch,
    open_runtime,
)
from actors._codec import converter

from .backends import CommitHooks
from .doc_client import DocClient, DocRules
from .serving import GATES, serving, token

# -- sans-I/O: the outbox's frames, read by the literal client ---------------------------------


class Feed:
    """Events of one user's jobs, numbered like the store numbers them."""

    def __init__(self, user: str = "u") -> None:
        self.user = user
        self.user_seq = 0
        self.seqs: dict[str, int] = defaultdict(int)
        self.log: list[JobEvent] = []

    def next(self, job: str, type: EventType = EventType.PROGRESS, pad: int = 0) -> JobEvent:
        self.user_seq += 1
        self.seqs[job] += 1
        event = JobEvent(
            job, self.user, self.seqs[job], type, JobState.RUNNING, 1.0,
            {"progress": 1.0, "step": "x" * pad}, None, self.user_seq,
        )  # fmt: skip
        self.log.append(event)
        return event

    def push(
        self,
        outbox: Outbox,
        job: str,
        type: EventType = EventType.PROGRESS,
        pad: int = 0,
        burst: int | None = None,
    ) -> None:
        event = self.next(job, type, pad)
        data = orjson.dumps({"type": "event", "event": converter.unstructure(event)})
        outbox.push_event(event, data, live=True, burst=burst)


def rules_following(feed: Feed) -> DocRules:
    """A literal client live in the user's room and every job's room, from the start."""
    rules = DocRules()
    for room in [f"user:{feed.user}", *(f"job:{job}" for job in feed.seqs)]:
        rules.follow(room)
        rules.joined(room, {"recovered": True, "head": 0}, 0)
    return rules


def drain(outbox: Outbox, rules: DocRules, max_bytes: int) -> list[bytes]:
    """Take every frame; check its size; let the literal client read it, frame by frame."""
    frames = []
    while messages := outbox.take(max_bytes):
        frame = encode_batch(messages)
        assert len(frame) <= max_bytes or len(messages) == 1, (len(frame), len(messages))
        parsed = orjson.loads(frame)
        for message in parsed["messages"] if parsed["type"] == "batch" else [parsed]:
            assert rules.apply(message) == [], message  # never a gap
        frames.append(frame)
    return frames


def assert_accounted(rules: DocRules, feed: Feed) -> None:
    """Every number of every room was processed once: as an event, or skipped because a later
    progress event of the same job (processed) superseded it. No other event was skipped."""
    by_room: dict[str, list[tuple[int, JobEvent]]] = defaultdict(list)
    for event in feed.log:
        by_room[f"user:{event.user_id}"].append((event.user_seq, event))
        by_room[f"job:{event.job_id}"].append((event.seq, event))
    for room, numbered in by_room.items():
        if room not in rules.rooms:
            continue
        events, skipped = rules.events[room], rules.skipped[room]
        assert len(events) == len(set(events)), f"{room}: duplicates"
        assert sorted(events + skipped) == [n for n, _ in numbered], f"{room}: lost numbers"
        event_of = dict(numbered)
        last_progress: dict[str, int] = {}  # job -> number of its last processed progress
        for n in events:
            if event_of[n].type is EventType.PROGRESS:
                job = event_of[n].job_id
                last_progress[job] = max(n, last_progress.get(job, 0))
        for n in skipped:
            superseded = event_of[n]
            assert superseded.type is EventType.PROGRESS, (room, n, superseded.type)
            assert last_progress.get(superseded.job_id, 0) > n, (room, n)


def test_a_marker_never_runs_ahead_of_its_frame() -> None:
    """Issue 8's input in small: a frame whose events ended at 3 listed a skipped event numbered
    21, so a literal client jumped to 21 and dropped 4..20 as duplicates. The marker now
    comes where user_seq 21 stood, after 20."""
    outbox = Outbox(BroadcasterConfig(coalesce_after=2))
    feed = Feed()
    for _ in range(20):
        feed.push(outbox, "x", EventType.CHECKPOINT)
    feed.push(outbox, "a")
    feed.push(outbox, "a")  # supersedes user_seq 21
    rules = rules_following(feed)
    frames = drain(outbox, rules, 700)
    first = orjson.loads(frames[0])["messages"]
    assert 1 < len(first) < 20 and all(m["type"] == "event" for m in first)
    assert len(rules.events["user:u"]) == 21 and rules.skipped["user:u"] == [21]
    assert_accounted(rules, feed)


def test_many_interleaved_jobs_coalesce_within_small_frames() -> None:
    outbox = Outbox(BroadcasterConfig(coalesce_after=0, overflow_after=10**9, overflow_bytes=10**9))
    feed = Feed()
    for _ in range(20):
        for job in range(300):
            feed.push(outbox, f"j{job}")
        feed.push(outbox, "j7", EventType.CHECKPOINT)
    assert outbox.coalesced == 19 * 300
    rules = rules_following(feed)
    frames = drain(outbox, rules, 4096)
    assert len(frames) > 100  # ~5,700 markers, each frame bounded
    assert_accounted(rules, feed)
    assert len(rules.new) == 300 + 20  # each job's last progress, and every checkpoint


def test_a_long_run_of_one_job_becomes_one_marker() -> None:
    outbox = Outbox(BroadcasterConfig(coalesce_after=0))
    feed = Feed()
    for _ in range(20_000):
        feed.push(outbox, "j1", pad=100)
    assert len(outbox) == 2 and outbox.queued_bytes < 1000
    rules = rules_following(feed)
    (frame,) = drain(outbox, rules, 64 * 1024)
    marker, last = orjson.loads(frame)["messages"]
    assert marker == {
        "type": "skipped", "job_id": "j1", "user_id": "u", "seq": 1, "user_seq": 1,
        "count": 19_999,
    }  # fmt: skip
    assert last["event"]["seq"] == 20_000
    assert_accounted(rules, feed)


def test_an_oversize_message_goes_alone_between_bounded_frames() -> None:
    outbox = Outbox(BroadcasterConfig(coalesce_after=10**9))
    feed = Feed()
    for _ in range(50):
        feed.push(outbox, "j1", EventType.CHECKPOINT, pad=100)
    feed.push(outbox, "j2", EventType.COMPLETED, pad=200_000)
    for _ in range(50):
        feed.push(outbox, "j1", EventType.CHECKPOINT, pad=100)
    rules = rules_following(feed)
    frames = drain(outbox, rules, 2048)
    big = [f for f in frames if len(f) > 2048]
    assert len(big) == 1 and orjson.loads(big[0])["type"] == "event"
    assert_accounted(rules, feed)


def test_the_frame_cap_includes_the_envelope() -> None:
    outbox = Outbox()
    for _ in range(4):
        outbox.push_control(b"x" * 100)
    # Two messages need 100 + 1 + 100 bytes plus the envelope: they do not fit in 220.
    messages = outbox.take(220)
    assert len(messages) == 1
    assert len(encode_batch(outbox.take(235))) <= 235


async def _ready(outbox: Outbox) -> None:
    """Mark the sender ready as the server's does, without blocking: :meth:`Outbox.wait`,
    cancelled at its first checkpoint (there is none when something is queued)."""
    with trio.CancelScope() as scope:
        scope.cancel()
        await outbox.wait()


async def test_a_burst_reaching_a_waiting_sender_is_not_coalesced() -> None:
    """CI's smoke benchmark lost 58 progress events on a fast reader: one slow group commit
    (130 ms) published about 260 events to its connection at once, past ``coalesce_after``,
    before its sender, waiting for them, could take any. What a waiting sender takes next is
    not behind, however much arrives at once; what arrives while it sends is."""
    outbox = Outbox(BroadcasterConfig(overflow_after=10**9, overflow_bytes=10**12))
    feed = Feed()
    await _ready(outbox)
    for _ in range(5):
        for job in range(300):  # 1,500 live events, 6 times coalesce_after
            feed.push(outbox, f"j{job}")
    assert outbox.coalesced == 0
    rules = rules_following(feed)
    drain(outbox, rules, 64 * 1024)  # the first take ends the sender's readiness
    assert len(rules.new) == 1500 and outbox.coalesced == 0
    # Sending (not waiting): what arrives now is behind, and coalesced past the limit.
    for _ in range(5):
        for job in range(300):
            feed.push(outbox, f"j{job}")
    assert outbox.coalesced == 4 * 300  # every superseded one: 300 queued already
    drain(outbox, rules, 64 * 1024)
    assert_accounted(rules, feed)


async def test_a_burst_larger_than_a_frame_is_not_behind_while_it_is_taken() -> None:
    """A burst larger than one frame stays not behind until taken; what arrives while its
    frames are sent is behind, and is coalesced past the limit."""
    outbox = Outbox(BroadcasterConfig(coalesce_after=100, overflow_after=10**9))
    feed = Feed()
    await _ready(outbox)
    for job in range(400):
        feed.push(outbox, f"j{job}")
    rules = rules_following(feed)
    for message in outbox.take(8 * 1024):  # about 40 of the 400
        assert rules.apply(orjson.loads(message)) == []
    for job in range(300, 400):  # behind: 100, the limit; each supersedes one of the burst
        feed.push(outbox, f"j{job}")
    assert outbox.coalesced == 0
    feed.push(outbox, "j200")  # the 101st behind: past the limit, j200's is coalesced
    assert outbox.coalesced == 1
    drain(outbox, rules, 64 * 1024)
    assert_accounted(rules, feed)


def test_a_burst_is_not_behind_even_while_the_sender_sends() -> None:
    """A burst (events published together) reaching a sender that is sending (say, in the
    checkpoint after its socket write) does not count against itself; once the next burst
    comes, what is left of it is behind."""
    outbox = Outbox(BroadcasterConfig(overflow_after=10**9, overflow_bytes=10**12))
    feed = Feed()
    for _ in range(5):
        for job in range(300):
            feed.push(outbox, f"j{job}", burst=1)
    assert outbox.coalesced == 0
    for job in range(300):  # 1,500 of burst 1 behind now: each supersedes one of them
        feed.push(outbox, f"j{job}", burst=2)
    assert outbox.coalesced == 300
    rules = rules_following(feed)
    drain(outbox, rules, 64 * 1024)
    assert_accounted(rules, feed)
    assert len(rules.new) == 1500 + 300 - 300


class _SlowCommits(CommitHooks, MemoryBackend):
    """Every group commit takes 150 ms (a slow disk's fsync): each publishes what queued."""

    async def before_commit(self, commit: Any) -> None:
        await trio.sleep(0.15)


async def _steps(ctx: JobContext, input: Any) -> None:
    for step in range(input["steps"]):
        await ctx.progress(step / input["steps"], str(step))
        await trio.sleep(0.01)


async def test_a_fast_connection_gets_every_event_of_slow_commits(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The runtime end to end, with the server's sender loop: 300 jobs report progress while
    each commit takes 150 ms, so each commit publishes about 600 events at once (the
    ``progress_window`` of each job). A sender that takes each burst as it comes is not
    behind: every progress event reaches it, none coalesced (before: 900 of 3,000)."""
    handlers = {"steps": _steps}
    async with open_runtime(
        backend=_SlowCommits(), handlers=handlers, broadcast=BroadcasterConfig()
    ) as rt:
        assert rt.broadcaster is not None
        outbox = Outbox(rt.broadcaster.config)
        await rt.broadcaster.join(outbox, "user:u", None)
        rt.broadcaster.finish_join(outbox, "user:u")
        progress = completed = 0
        async with trio.open_nursery() as nursery:

            async def sender() -> None:
                nonlocal progress, completed
                while completed < 300:
                    await outbox.wait()
                    await trio.lowlevel.cancel_shielded_checkpoint()
                    for message in outbox.take(64 * 1024):
                        parsed = orjson.loads(message)
                        assert parsed["type"] == "event", parsed
                        progress += parsed["event"]["type"] == "progress"
                        completed += parsed["event"]["type"] == "completed"

            nursery.start_soon(sender)
            async with trio.open_nursery() as creating:  # one commit creates them all
                for _ in range(300):
                    creating.start_soon(rt.create_job, "steps", "u", {"steps": 10})
        assert (progress, outbox.coalesced) == (3000, 0)


async def test_lagged_goes_right_behind_queued_replies_not_behind_events() -> None:
    config = BroadcasterConfig(coalesce_after=10**9, overflow_after=10**9, overflow_bytes=50_000)
    outbox = Outbox(config)
    feed = Feed()
    outbox.push_control(b'{"type":"reply","id":1,"result":null}')
    for _ in range(40):
        feed.push(outbox, "j1", EventType.CHECKPOINT, pad=1000)
    outbox.push_control(b'{"type":"reply","id":2,"result":null}')
    while outbox.queued_bytes:
        feed.push(outbox, "j1", EventType.CHECKPOINT, pad=1000)
    # Past overflow_bytes the queued events were dropped; lagged follows the replies.
    frame = encode_batch(outbox.take(4096))
    types = [m["type"] for m in orjson.loads(frame)["messages"]]
    assert types == ["reply", "reply", "lagged"]
    assert outbox.queued_bytes == 0 and len(outbox) == 0


def assert_not_behind_within(outbox: Outbox) -> None:
    """The outbox's counts of what is not behind stay within what is queued (its private
    bookkeeping: an error there would coalesce too early, or never)."""
    events = outbox._waited_live + outbox._burst_live
    size = outbox._waited_bytes + outbox._burst_bytes
    assert min(outbox._waited_live, outbox._burst_live, outbox._waited_bytes) >= 0
    assert outbox._burst_bytes >= 0 and events <= outbox._live and size <= outbox.queued_bytes


OPS = st.lists(
    st.one_of(
        st.tuples(
            st.just("event"),
            st.integers(0, 4),
            st.sampled_from([EventType.PROGRESS] * 4 + [EventType.CHECKPOINT]),
            st.integers(0, 3000),
        ),
        st.tuples(st.just("control"), st.integers(1, 3000)),
        st.tuples(st.just("take"), st.integers(1, 8000)),
        st.tuples(st.just("wait")),
        st.tuples(st.just("burst")),
    ),
    max_size=300,
)


@settings(max_examples=200, deadline=None)
@given(OPS, st.integers(0, 20), st.integers(200, 8000))
def test_any_interleaving_keeps_frames_bounded_and_loses_nothing(
    ops: list[tuple[Any, ...]], coalesce_after: int, final_bytes: int
) -> None:
    """Adversarial interleavings of pushes (in bursts or not), takes and a sender's waits,
    with coalescing on (no overflow)."""
    outbox = Outbox(
        BroadcasterConfig(
            coalesce_after=coalesce_after, coalesce_bytes=4000, overflow_after=10**9,
            overflow_bytes=10**12,
        )
    )  # fmt: skip
    feed = Feed()
    taken: list[bytes] = []
    burst: int | None = None  # none until the first: then each "burst" starts the next
    for op in ops:
        if op[0] == "event":
            feed.push(outbox, f"j{op[1]}", op[2], op[3], burst)
        elif op[0] == "burst":
            burst = 0 if burst is None else burst + 1
        elif op[0] == "control":
            outbox.push_control(orjson.dumps({"type": "reply", "id": 1, "result": "x" * op[1]}))
        elif op[0] == "wait":
            trio.run(_ready, outbox)
        elif messages := outbox.take(op[1]):
            frame = encode_batch(messages)
            assert len(frame) <= op[1] or len(messages) == 1
            taken.append(frame)
        assert_not_behind_within(outbox)
    while messages := outbox.take(final_bytes):
        frame = encode_batch(messages)
        assert len(frame) <= final_bytes or len(messages) == 1
        taken.append(frame)
    assert outbox.queued_bytes == 0
    assert_not_behind_within(outbox)
    rules = rules_following(feed)
    for frame in taken:
        parsed = orjson.loads(frame)
        for message in parsed["messages"] if parsed["type"] == "batch" else [parsed]:
            assert rules.apply(message) == []
    assert_accounted(rules, feed)


async def test_a_lag_during_a_join_is_told_again_after_the_reply() -> None:
    """A ``lagged`` queued before a subscribe's reply does not count for that room (it was
    not live yet), so the room is named in another ``lagged`` right after the reply."""
    async with open_runtime(backend=MemoryBackend(), broadcast=BroadcasterConfig()) as rt:
        assert rt.broadcaster is not None
        outbox = Outbox(rt.broadcaster.config)
        await rt.broadcaster.join(outbox, "user:u", Cursor(rt.epoch, 0))
        outbox._overflow()  # the connection lags while the join reads the store
        outbox.push_control(b'{"type":"reply","id":3,"result":{}}')
        rt.broadcaster.finish_join(outbox, "user:u")
        types = [orjson.loads(m) for m in outbox.take()]
        assert [m["type"] for m in types] == ["lagged", "reply", "lagged"]
        assert types[2]["rooms"] == ["user:u"]


# -- a literal client reading slowly from a real server -------------------------------------


async def _slow_reader(
    tmp_path: Path,
    rooms: list[str],
    *,
    jobs: int,
    events_per_job: int,
    interval: float,
    rate: float,
    broadcast: BroadcasterConfig,
    seconds: float,
    **server: Any,
) -> DocClient:
    """``jobs`` jobs of user ``slow`` emit progress (plus a checkpoint each and the outcome)
    while a :class:`DocClient` reads ``rooms`` at ``rate`` bytes/s; returns it once its
    cursors reach the rooms' final heads, having checked every number is accounted for."""
    gate = f"slow-{tmp_path.name}"
    async with serving(tmp_path / "slow.db", broadcast=broadcast, **server) as running:
        runtime = running.runtime
        created = [
            await runtime.create_job(
                "emitter",
                "slow",
                {
                    "phases": [{"gate": gate, "count": events_per_job}],
                    "interval": interval,
                },
            )
            for _ in range(jobs)
        ]
        names = {"user": "user:slow", "job": f"job:{created[0].id}"}
        client = DocClient(running.url, token("slow"), {names[r]: 0 for r in rooms}, rate)
        finished = trio.Event()
        heads: dict[str, int] = {}

        def done(rules: DocRules) -> bool:
            return finished.is_set() and all(
                rules.rooms[room].cursor == head for room, head in heads.items()
            )

        async def produce() -> None:
            pending = {job.id for job in created}
            assert runtime.broadcaster is not None
            # The jobs start once the reader is in every room: their events reach it live
            # (a reader joining after them would replay them from the log, uncoalesced).
            while runtime.broadcaster.subscriber_count < len(rooms):  # noqa: ASYNC110
                await trio.sleep(0.01)
            async with runtime.events() as stream:
                GATES.setdefault(gate, trio.Event()).set()
                async for event in stream:
                    if event.type is EventType.COMPLETED:
                        pending.discard(event.job_id)
                        if not pending:
                            break
            assert runtime.broadcaster is not None
            store = runtime.broadcaster.store
            heads["user:slow"] = await store.user_head("slow")
            heads[f"job:{created[0].id}"] = (await store.get(created[0].id)).seq
            for room in list(heads):
                if room not in client.rules.rooms:
                    del heads[room]
            finished.set()

        with trio.fail_after(seconds):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(produce)
                await trio.sleep(0.05)
                await client.run(done)
                assert done(client.rules), client.timeline  # it was not cut off
                nursery.cancel_scope.cancel()
        assert runtime.broadcaster is not None
        feed = Feed("slow")
        feed.log = []
        after = 0
        while page := await runtime.broadcaster.store.read_user_events("slow", after, 10_000):
            feed.log.extend(page)
            after = page[-1].user_seq
        assert_accounted(client.rules, feed)
    return client


@pytest.mark.parametrize("rooms", [["user"], ["job"], ["user", "job"]])
async def test_a_slow_reader_keeps_reading_and_loses_nothing(
    tmp_path: Path, rooms: list[str]
) -> None:
    """Ten jobs emit progress as fast as the store takes it (~1,000 events/s here) to a reader
    taking 30 KB/s: frames stay within batch_bytes, progress is coalesced, the reader is never
    cut off and every number is accounted for."""
    client = await _slow_reader(
        tmp_path, rooms, jobs=10, events_per_job=60, interval=0, rate=30_000,
        broadcast=BroadcasterConfig(coalesce_after=32, coalesce_bytes=8 * 1024), seconds=60,
        batch_bytes=16 * 1024, send_timeout=6.0,
    )  # fmt: skip
    timeline = client.timeline
    assert timeline.closes == [] and timeline.refused == []
    assert timeline.largest_frame <= 16 * 1024
    if "user" in rooms:
        assert client.rules.skipped["user:slow"]  # it was behind


async def test_a_slow_reader_that_cannot_keep_up_is_told_it_lagged(tmp_path: Path) -> None:
    """Interleaved jobs leave a marker per superseded event, so a 30 KB/s reader falls
    further behind: it gets ``lagged`` (and maybe 4008, a close frame), resubscribes, and in
    the end has every number accounted for; it never sees an abnormal closure."""
    client = await _slow_reader(
        tmp_path, ["user", "job"], jobs=10, events_per_job=100, interval=0, rate=30_000,
        broadcast=BroadcasterConfig(overflow_bytes=32 * 1024), seconds=90,
        batch_bytes=16 * 1024, send_timeout=6.0,
    )  # fmt: skip
    timeline = client.timeline
    assert timeline.lagged_at, timeline
    assert all(code == 4008 for _, code in timeline.closes), timeline
    if timeline.closes:
        assert timeline.lagged_at[0] < timeline.closes[0][0]
    assert timeline.largest_frame <= 16 * 1024
