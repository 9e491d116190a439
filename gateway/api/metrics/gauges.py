"""The gauges read at each scrape: the fleet as this gateway sees it, the open jobs, the queue by
caller, the EVENTS stream and how far the log sink is behind it, and the replication of every
NATS resource.

Each function makes a gauge source for `Metrics.add_gauges`, added where the gateway's services
start; a new gauge is one more such function.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from gateway.api.metrics.instruments import GaugeSource
from gateway.balancer.backlogview import BacklogView
from gateway.balancer.fleet import FleetView
from gateway.bus.contract import Subjects
from gateway.bus.replication import replication_status
from gateway.logsink.messages import SINK_DURABLE

OPEN_STATUSES = ("queued", "dispatched", "running")


def fleet_gauges(
    fleet: FleetView,
    open_jobs: Callable[[], list[str] | None],
    bound_jobs: Callable[[], dict[str, int] | None],
) -> GaugeSource:
    """Each server's liveness, ComfyUI queue, capacity and draining; the open jobs and each
    server's bound ones, where this leads."""

    async def read() -> Iterable[Metric]:
        table = fleet.table
        clock = table.now()
        states = sorted(table, key=lambda s: s.server_id)
        up = GaugeMetricFamily(
            "comfyautomate_server_up",
            "1 when the server heartbeats and is healthy.",
            labels=["server"],
        )
        queue = GaugeMetricFamily(
            "comfyautomate_server_queue",
            "Prompts in the server's ComfyUI queue.",
            labels=["server", "state"],
        )
        capacity = GaugeMetricFamily(
            "comfyautomate_server_capacity",
            "Jobs the balancer may bind to the server.",
            labels=["server"],
        )
        draining = GaugeMetricFamily(
            "comfyautomate_server_draining",
            "1 while an admin has the server draining: it takes no new jobs.",
            labels=["server"],
        )
        for s in states:
            beat = s.heartbeat
            up.add_metric([s.server_id], int(s.is_live(clock)))
            queue.add_metric([s.server_id, "running"], beat.queue_running if beat else 0)
            queue.add_metric([s.server_id, "pending"], beat.queue_pending if beat else 0)
            capacity.add_metric([s.server_id], s.capacity)
            draining.add_metric([s.server_id], int(s.draining))
        families: list[Metric] = [up, queue, capacity, draining]
        statuses = open_jobs()
        if statuses is not None:
            by_status = Counter(statuses)
            jobs = GaugeMetricFamily(
                "comfyautomate_jobs_open",
                "Jobs not yet finished, by status (shown by the leading balancer's gateway only).",
                labels=["status"],
            )
            for status in OPEN_STATUSES:
                jobs.add_metric([status], by_status.get(status, 0))
            families.append(jobs)
        counts = bound_jobs()
        if counts is not None:
            bound = GaugeMetricFamily(
                "comfyautomate_server_bound",
                "Jobs bound to the server, dispatched or running: the slots of its capacity in "
                "use (shown by the leading balancer's gateway only).",
                labels=["server"],
            )
            # Also a server removed from the table whose last jobs are still bound to it.
            for server_id in sorted(counts.keys() | {s.server_id for s in states}):
                bound.add_metric([server_id], counts.get(server_id, 0))
            families.append(bound)
        return families

    return read


def queue_gauges(backlog: BacklogView, named: frozenset[str]) -> GaugeSource:
    """Jobs waiting and bound per caller, from the leader's backlog: each of the `named`
    callers (those the settings name: a bounded set), every other caller together as `other`,
    so that unnamed keys do not make a series each."""

    async def read() -> Iterable[Metric]:
        latest = backlog.latest
        if latest is None:
            return []  # no leader has counted the queue yet
        jobs = GaugeMetricFamily(
            "comfyautomate_caller_jobs",
            "Jobs of each caller named in the settings waiting to be bound (pending) and bound "
            "(running), as the leading balancer last counted them; every other caller as other.",
            labels=["caller", "state"],
        )
        pending, running = latest.pending, latest.bound
        for entry in sorted(latest.callers, key=lambda c: c.caller):
            if entry.caller in named:
                jobs.add_metric([entry.caller, "pending"], entry.pending)
                jobs.add_metric([entry.caller, "running"], entry.bound)
                pending -= entry.pending
                running -= entry.bound
        jobs.add_metric(["other", "pending"], pending)
        jobs.add_metric(["other", "running"], running)
        return [jobs]

    return read


def stream_gauges(js: JetStreamContext, subjects: Subjects) -> GaugeSource:
    """Events held in the EVENTS stream, and those the log sink has not acknowledged yet."""

    async def read() -> Iterable[Metric]:
        info = await js.stream_info(subjects.events_stream)
        families: list[Metric] = [
            GaugeMetricFamily(
                "comfyautomate_events_stored",
                "Events held in the EVENTS stream.",
                value=info.state.messages,
            )
        ]
        try:
            sink = await js.consumer_info(subjects.events_stream, SINK_DURABLE)
        except NotFoundError:
            return families  # no log sink has ever run: there is no lag to tell
        families.append(
            GaugeMetricFamily(
                "comfyautomate_logsink_lag_events",
                "Events in the EVENTS stream the log sink has not acknowledged yet (not yet "
                "delivered to it, or delivered and not yet written).",
                value=(sink.num_pending or 0) + (sink.num_ack_pending or 0),
            )
        )
        return families

    return read


def replication_gauges(js: JetStreamContext, subjects: Subjects) -> GaugeSource:
    """Each stream's, bucket's and the object store's copies, and whether all are caught up."""

    async def read() -> Iterable[Metric]:
        replicas = GaugeMetricFamily(
            "comfyautomate_nats_replicas",
            "Copies configured of each stream, bucket (KV_...) and object store (OBJ_...).",
            labels=["resource"],
        )
        current = GaugeMetricFamily(
            "comfyautomate_nats_replicas_current",
            "1 when the resource has a leader and every copy is online and caught up.",
            labels=["resource"],
        )
        behind = GaugeMetricFamily(
            "comfyautomate_nats_replicas_behind",
            "Copies of the resource lagging or offline.",
            labels=["resource", "state"],
        )
        for status in await replication_status(js, subjects):
            replicas.add_metric([status.resource], status.replicas)
            current.add_metric([status.resource], int(status.current))
            behind.add_metric([status.resource, "lagging"], len(status.lagging))
            behind.add_metric([status.resource, "offline"], len(status.offline))
        return [replicas, current, behind]

    return read
