"""`GET /events`: every job's state changes, fleet-wide, as Server-Sent Events (see fleetstream)."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

from litestar import Request, get
from litestar.params import FromQuery
from litestar.response import ServerSentEvent
from litestar.response.sse import ServerSentEventMessage

from gateway.api.auth import caller_of
from gateway.api.errors import ApiError, error_responses
from gateway.api.fleetstream import (
    STATE_CHANGES,
    FleetEvent,
    FleetFilter,
    Missed,
    Start,
    fleet_events,
)
from gateway.api.limits import hold, take_stream
from gateway.api.services import Services, ServicesDep
from gateway.api.signing import signer_of
from gateway.api.workflows import base_url, seq_after
from gateway.bus.contract import encode


@get(
    "/events",
    tags=["events"],
    media_type="text/event-stream",
    responses=error_responses(400, 503),
)
async def fleet_event_stream(
    services: ServicesDep,
    request: Request[Any, Any, Any],
    status: FromQuery[list[str] | None] = None,
    server: FromQuery[list[str] | None] = None,
    label: FromQuery[list[str] | None] = None,
    caller: FromQuery[str | None] = None,
    progress: FromQuery[bool] = False,
    since: FromQuery[str | None] = None,
    last_event_id: FromQuery[str | None] = None,
) -> ServerSentEvent:
    """Every job's state changes (queued, dispatched, running, retried, succeeded, failed,
    cancelled; with `progress=true` also node_progress), live, as Server-Sent Events.

    Filters (repeat a parameter, or separate values by commas, for any of several): `status`,
    `server`; `label=KEY=VALUE`, repeated, all of which must match; `caller` (admin keys; a
    user key sees only its own jobs whatever it asks). Each event's `id` is its sequence in
    the EVENTS stream: a client that reconnects with `Last-Event-ID` (or `?last_event_id=`)
    gets the events after it. Without one, the stream starts at `since` (epoch seconds or
    ISO 8601), else now.
    """
    who = caller_of(request)
    wanted = FleetFilter(
        types=_choices(status, "status", STATE_CHANGES),
        servers=frozenset(_values(server)),
        labels=_labels(label),
        caller=(caller or None) if who.admin else who.id,
        progress=progress,
    )
    start = await _start(services, request.headers.get("last-event-id") or last_event_id, since)
    slot = take_stream(request)  # 503 when too many are open
    base = base_url(services, request)
    signer = signer_of(request)
    events = fleet_events(
        services.js,
        services.subjects,
        services.directory,
        start,
        wanted,
        keepalive_s=services.settings.event_keepalive_s,
        output_urls=lambda: signer.answer(base),  # signed as results are, per event
    )
    return ServerSentEvent(hold(slot, _messages(events)))


async def _start(services: Services, resume: str | None, since: str | None) -> Start:
    """Where the client's stream starts; fixed now, so events stored from here on are in it."""
    info = await services.js.stream_info(services.subjects.events_stream)
    if resume is not None and resume.strip():
        after = seq_after(resume)
        if after > info.state.last_seq:
            raise ApiError(
                400,
                "invalid_request",
                f"event id {after} is past the newest event ({info.state.last_seq}): "
                "it is not an id of this system's events",
            )
        return Start(seq=after + 1)
    if since is not None and since.strip():
        return Start(time=_time(since))
    return Start(seq=info.state.last_seq + 1)


async def _messages(
    events: AsyncIterator[FleetEvent | Missed | None],
) -> AsyncIterator[ServerSentEventMessage]:
    async for event in events:
        if event is None:
            yield ServerSentEventMessage(comment="keep-alive", data=None)
        else:
            yield ServerSentEventMessage(data=encode(event).decode(), event=event.type, id=event.id)


def _values(given: list[str] | None) -> list[str]:
    """Repeated parameters and comma-separated values alike."""
    return [v.strip() for item in given or [] for v in item.split(",") if v.strip()]


def _choices(given: list[str] | None, name: str, allowed: frozenset[str]) -> frozenset[str]:
    values = frozenset(_values(given))
    unknown = sorted(values - allowed)
    if unknown:
        raise ApiError(
            400,
            "invalid_request",
            f"{name} {', '.join(unknown)} is not one of {', '.join(sorted(allowed))}",
        )
    return values


def _labels(given: list[str] | None) -> dict[str, str]:
    """`label=KEY=VALUE`, repeated (not split at commas: a value may hold one)."""
    labels = {}
    for item in given or []:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ApiError(400, "invalid_request", f"a label is KEY=VALUE, not {item!r}")
        labels[key] = value
    return labels


def _time(text: str) -> datetime:
    """`since`: seconds since the epoch, or an ISO 8601 time (UTC unless it says otherwise)."""
    try:
        seconds = float(text)
    except ValueError:
        try:
            moment = datetime.fromisoformat(text.strip())
        except ValueError:
            raise ApiError(
                400,
                "invalid_request",
                f"since is seconds since the epoch or an ISO 8601 time, not {text!r}",
            ) from None
        return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
    if not math.isfinite(seconds) or seconds < 0:
        raise ApiError(400, "invalid_request", f"since must be a time, not {text!r}")
    try:
        return datetime.fromtimestamp(seconds, UTC)
    except (OverflowError, OSError, ValueError):
        raise ApiError(400, "invalid_request", f"since is out of range: {text!r}") from None
