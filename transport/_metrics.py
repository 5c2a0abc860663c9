"""``GET /metrics``: the server's state in the Prometheus text format, via prometheus-client.

Each server has its own :class:`~prometheus_client.CollectorRegistry` (several servers may
live in one process, as in tests). Nothing is counted here: one custom collector reads the
live counters of the store, supervisor, broadcaster and connections when scraped, so the hot
path only ever increments ints.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.registry import Collector

from actors import EventType, JobState

if TYPE_CHECKING:
    from actors import Fanout

    from ._app import RunningServer

__all__ = ["CONTENT_TYPE", "metrics_registry", "render"]

#: The classic text exposition format (what every Prometheus version scrapes).
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4


class ServerCollector(Collector):
    """Reads one running server's counters at each scrape."""

    def __init__(self, running: RunningServer) -> None:
        self.running = running

    def collect(self) -> Iterator[Metric]:
        running = self.running
        runtime = running.runtime
        store = runtime.store_actor.metrics
        status = runtime.status()
        server = running.server
        broadcaster = server.broadcaster
        live = [conn.outbox for conn in server.connections]
        closed = server.closed_outboxes

        info = InfoMetricFamily("jobspine", "The serving process: its database epoch.")
        info.add_metric([], {"epoch": runtime.epoch})
        yield info
        node = runtime.node
        node_info = InfoMetricFamily(
            "jobspine_node", "This node: its id and current incarnation (the claim owner)."
        )
        node_info.add_metric([], {"node": node.node_id, "owner": node.owner or ""})
        yield node_info
        age = node.lease_age()
        yield GaugeMetricFamily(
            "jobspine_node_lease_age_seconds",
            "Seconds since this node's lease was last renewed (NaN before registration, and"
            " on a SQLite file, whose lock stands for the lease).",
            value=math.nan if age is None else age,
        )
        yield CounterMetricFamily(
            "jobspine_node_takeovers", "Dead nodes this node took over.", value=node.takeovers
        )
        yield CounterMetricFamily(
            "jobspine_node_fenced",
            "Times this node lost its lease and abandoned its running jobs.",
            value=node.fenced,
        )
        yield GaugeMetricFamily(
            "jobspine_start_time_seconds",
            "When the server started, seconds since the Unix epoch.",
            value=running.started_at,
        )
        yield GaugeMetricFamily(
            "jobspine_uptime_seconds",
            "Seconds since the server started.",
            value=running.uptime,
        )

        jobs = GaugeMetricFamily("jobspine_jobs", "Stored jobs by state.", labels=["state"])
        for state in JobState:
            jobs.add_metric([state.value], store.jobs.get(state, 0))
        yield jobs
        events = CounterMetricFamily(
            "jobspine_job_events", "Job events committed, by type.", labels=["type"]
        )
        for type_ in EventType:
            events.add_metric([type_.value], store.events.get(type_.value, 0))
        yield events

        histogram = store.commit_seconds
        yield HistogramMetricFamily(
            "jobspine_store_commit_seconds",
            "Duration of one group commit (one transaction) in the database.",
            buckets=[(_le(bound), n) for bound, n in histogram.cumulative()],
            sum_value=histogram.sum,
        )
        yield CounterMetricFamily(
            "jobspine_store_commits", "Group commits (transactions).", value=store.commits
        )
        yield CounterMetricFamily(
            "jobspine_store_requests",
            "Write requests committed (progress, checkpoints, transitions...).",
            value=store.requests,
        )
        yield CounterMetricFamily(
            "jobspine_store_commit_failures",
            "Group commits the database refused (each fails every write of the group).",
            value=store.failed_commits,
        )

        yield GaugeMetricFamily(
            "jobspine_workers", "Jobs running in a worker of this process.", value=status.running
        )
        yield GaugeMetricFamily(
            "jobspine_orphans",
            "Jobs whose outcome the store refused, waiting for a stored recovery.",
            value=status.orphans,
        )
        yield CounterMetricFamily(
            "jobspine_stalls",
            "Running jobs found stalled: no heartbeat in time, their process gone at start,"
            " or their node taken over.",
            value=status.stalls_detected,
        )
        yield CounterMetricFamily(
            "jobspine_recoveries",
            "Stalled jobs recovered: paused at their checkpoint, or back in the queue"
            " (re-queued or retried).",
            value=status.recoveries,
        )
        yield CounterMetricFamily(
            "jobspine_stall_failures",
            "Stalled jobs failed (no checkpoint and no attempts left, or recovery attempts"
            " used up).",
            value=status.failures,
        )

        yield GaugeMetricFamily(
            "jobspine_connections", "Open client websocket connections.", value=len(live)
        )
        yield GaugeMetricFamily(
            "jobspine_subscriptions",
            "Room subscriptions across all connections.",
            value=broadcaster.subscriber_count,
        )
        yield CounterMetricFamily(
            "jobspine_events_published",
            "Committed events fanned out to rooms.",
            value=broadcaster.published,
        )
        yield CounterMetricFamily(
            "jobspine_events_delivered",
            "Messages sent to connections (events, replies, heartbeats).",
            value=closed.delivered + sum(outbox.delivered for outbox in live),
        )
        yield CounterMetricFamily(
            "jobspine_events_coalesced",
            "Progress events superseded by a newer one before a slow connection took them.",
            value=closed.coalesced + sum(outbox.coalesced for outbox in live),
        )
        yield CounterMetricFamily(
            "jobspine_lagged",
            "Times a connection fell too far behind and was told to resubscribe.",
            value=closed.lagged + sum(outbox.lagged for outbox in live),
        )
        if runtime.fanout is not None:
            yield from _fanout_metrics(runtime.fanout)


def _fanout_metrics(fanout: Fanout) -> Iterator[Metric]:
    """The fan-out (with ``--redis``, or on a shared database: the log polled)."""
    stats, order = fanout.stats, fanout.sequencer.stats
    if fanout.config.redis is not None:
        yield GaugeMetricFamily(
            "jobspine_redis_up",
            "1 while events are pushed through Redis; 0 while the log is polled instead.",
            value=int(fanout.health.ok),
        )
        yield CounterMetricFamily(
            "jobspine_redis_outages", "Times Redis became unavailable.", value=fanout.health.outages
        )
    for name, help, value in (
        ("fanout_published_events", "This node's events published to Redis.",
         stats.published_events),
        ("fanout_publish_dropped", "Commit groups not published (outbox full, Redis down);"
         " other nodes fill them from the log.", stats.publish_dropped),
        ("fanout_publish_oversized", "Commit groups over max_message_bytes: only their heads"
         " published; other nodes fill them from the log.", stats.publish_oversized),
        ("fanout_received_events", "Other nodes' events received from Redis.",
         stats.received),
        ("fanout_filled_events", "Events delivered from the log (gap fills, polling).",
         order.filled),
        ("fanout_duplicates", "Events dropped as already delivered.", order.duplicates),
        ("fanout_gaps", "Times an event arrived ahead of its predecessor.", order.gaps),
        ("fanout_fill_reads", "Reads of the log to fill gaps or poll.", stats.fill_reads),
        ("fanout_forged", "Messages on the channel whose signature did not verify: dropped.",
         stats.forged),
        ("fanout_late_events", "Events delivered from the log over a second after their commit"
         " while Redis was up: their node died before publishing them, or nodes disagree on"
         " Redis or secret.", stats.late),
    ):  # fmt: skip
        yield CounterMetricFamily(f"jobspine_{name}", help, value=value)


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


def metrics_registry(running: RunningServer) -> CollectorRegistry:
    """A registry of this server's metrics, plus the process, platform and GC collectors."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServerCollector(running))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The text exposition (format 0.0.4) of ``registry``."""
    return generate_latest(registry)
