"""`GET /workflow/queue`: the pending queue by caller, from the leader's backlog (why a job
waits when its caller is at its cap, and how much of the queue each caller holds)."""

from __future__ import annotations

from typing import Any

from litestar import Request, get

from gateway.api.auth import caller_of
from gateway.api.schemas import CallerShare, QueueShare
from gateway.api.services import Services, ServicesDep
from gateway.balancer.shares import NO_CALLER
from gateway.bus.contract import CallerBacklog


@get("/workflow/queue", tags=["workflows"])
async def queue_share(services: ServicesDep, request: Request[Any, Any, Any]) -> QueueShare:
    """The pending queue by caller: jobs waiting and bound, weight and cap of each.

    A user key sees its own entry only (and the queue's totals); an admin key every caller.
    """
    caller = caller_of(request)
    backlog = services.backlog.latest
    listed = {c.caller: c for c in backlog.callers} if backlog is not None else {}
    own = listed.get(caller.id, CallerBacklog(caller=caller.id, pending=0, bound=0, ended_per_s=0))
    shown = [own]
    if caller.admin:
        shown += [c for c in listed.values() if c.caller != caller.id]
    shares = services.shares
    return QueueShare(
        you=caller.id,
        pending=backlog.pending if backlog is not None else 0,
        running=backlog.bound if backlog is not None else 0,
        max_pending=shares.max_pending or None,
        max_pending_per_caller=shares.max_pending_per_caller or None,
        callers=[_share(services, entry) for entry in shown],
        as_of=backlog.at if backlog is not None else None,
    )


def _share(services: Services, entry: CallerBacklog) -> CallerShare:
    cap = services.shares.cap(entry.caller)
    return CallerShare(
        caller=entry.caller if entry.caller != NO_CALLER else None,
        pending=entry.pending,
        running=entry.bound,
        max_running=cap,
        weight=services.shares.weight(entry.caller),
        at_cap=cap is not None and entry.bound >= cap,
    )
