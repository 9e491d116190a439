"""`/health` and `/metrics` (Prometheus text format)."""

from __future__ import annotations

from collections import Counter

from litestar import Response, get

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


def _line(name: str, value: float, **labels: str) -> str:
    if labels:
        inner = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items()))
        return f"{name}{{{inner}}} {value}"
    return f"{name} {value}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


@get("/metrics", tags=["system"], media_type="text/plain; version=0.0.4")
async def metrics(services: ServicesDep) -> str:
    """Fleet load and health, open jobs by status, events stored: for Prometheus."""
    table = services.fleet.table
    clock = table.now()
    lines = [
        "# HELP comfyautomate_server_up 1 when the server heartbeats and is healthy.",
        "# TYPE comfyautomate_server_up gauge",
    ]
    states = sorted(table, key=lambda s: s.server_id)
    lines += [
        _line("comfyautomate_server_up", int(s.is_live(clock)), server=s.server_id) for s in states
    ]
    lines += [
        "# HELP comfyautomate_server_queue Prompts in the server's ComfyUI queue.",
        "# TYPE comfyautomate_server_queue gauge",
    ]
    for s in states:
        beat = s.heartbeat
        lines.append(
            _line(
                "comfyautomate_server_queue",
                beat.queue_running if beat else 0,
                server=s.server_id,
                state="running",
            )
        )
        lines.append(
            _line(
                "comfyautomate_server_queue",
                beat.queue_pending if beat else 0,
                server=s.server_id,
                state="pending",
            )
        )
    lines += [
        "# HELP comfyautomate_server_capacity Jobs the balancer may bind to the server.",
        "# TYPE comfyautomate_server_capacity gauge",
    ]
    lines += [
        _line("comfyautomate_server_capacity", s.capacity, server=s.server_id) for s in states
    ]
    counts = services.open_jobs()
    if counts is not None:
        lines += [
            "# HELP comfyautomate_jobs_open Jobs not yet finished, by status (leader only).",
            "# TYPE comfyautomate_jobs_open gauge",
        ]
        by_status = Counter(counts)
        for status in ("queued", "dispatched", "running"):
            lines.append(_line("comfyautomate_jobs_open", by_status.get(status, 0), status=status))
    info = await services.js.stream_info(services.subjects.events_stream)
    lines += [
        "# HELP comfyautomate_events_stored Events held in the EVENTS stream.",
        "# TYPE comfyautomate_events_stored gauge",
        _line("comfyautomate_events_stored", info.state.messages),
    ]
    return "\n".join(lines) + "\n"
