"""`/health` and `/metrics` (Prometheus text format, version 0.0.4)."""

from __future__ import annotations

from litestar import Response, get
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from gateway.api.schemas import HealthReport
from gateway.api.services import ServicesDep
from gateway.bus.replication import Replication, replication_status


@get("/health", tags=["system"])
async def health(services: ServicesDep) -> Response[HealthReport]:
    """200 once the system can take, run and log a job; 503 naming what it lacks.

    It needs NATS, a leading balancer (here or in another process) and a log sink that
    answers. Servers are counted but not required: a job waits for one.
    """
    table = services.fleet.table
    connected = services.nc.is_connected
    missing = []
    balancer = sink = False
    replication: list[Replication] = []
    if not connected:
        missing.append("NATS: this gateway is not connected")
    else:
        # Reported, not required: a copy catching up, or an election, does not stop a job.
        replication = await replication_status(services.js, services.subjects)
        balancer = await services.someone_leads()
        if not balancer:
            missing.append("a leading balancer: none holds the lease yet")
        sink = await services.log_sink_answers()
        if not sink:
            missing.append("a log sink: none answers (`comfyautomate logsink`)")
    report = HealthReport(
        status="ok" if not missing else "degraded",
        nats=connected,
        servers=len(table),
        healthy_servers=len(table.live()),
        leader=services.leads,
        balancer=balancer,
        log_sink=sink,
        missing=missing,
        replication=replication,
    )
    return Response(report, status_code=200 if not missing else 503)


@get("/metrics", tags=["system"], media_type=CONTENT_TYPE_PLAIN_0_0_4)
async def metrics(services: ServicesDep) -> bytes:
    """Jobs counted from the EVENTS stream, this gateway's own times, the fleet's gauges: for
    Prometheus (docs/METRICS.md). Counts include every event stored before the scrape began."""
    await services.job_counter.caught_up()
    return await services.metrics.scrape()
