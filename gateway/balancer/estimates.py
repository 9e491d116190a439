"""The estimates one dispatch round plans with: job costs per server, and what servers hold.

A round asks the cost of many queued jobs on every server, and jobs of one shape share it:
each (server, shape) and (server, model) is estimated once per round. A server's work ahead is
its bound jobs, each at its estimate (a running one less what it has run: counted whole, a
12 s model load just begun and one nearly done look alike, and jobs go elsewhere to load
their model again), loading the models it will not hold by then; what it holds afterwards
follows them, the least recently used leaving beyond the models it keeps.
"""

from __future__ import annotations

from typing import Final

from gateway.balancer.book import JobBook
from gateway.balancer.costs import Estimate
from gateway.balancer.placement import hold
from gateway.balancer.servers import ServerState, ServerTable
from gateway.bus.contract import JobStatus
from gateway.comfyui.shape import JobShape

# A running job past its estimate still has some of it ahead: it is not done until it ends.
_LEFT_AT_LEAST: Final = 0.1


class RoundCosts:
    """The cost model's estimates for one round, each computed once."""

    def __init__(self, servers: ServerTable, default_per_unit: float) -> None:
        self._costs = servers.costs
        live = servers.live()
        weights = {s.server_id: s.weight for s in live}
        typical = self._costs.typical_per_unit([s.server_id for s in live], weights)
        base = typical if typical is not None else default_per_unit
        # A server not measured yet is taken to be as fast as the typical one, per weight.
        self._fallback = {s.server_id: base / max(s.weight, 0.01) for s in live}
        self._default = base
        self._runs: dict[tuple[str, str], Estimate] = {}
        self._loads: dict[tuple[str, str], float] = {}

    def run_seconds(self, server_id: str, shape: JobShape) -> Estimate:
        key = (server_id, shape.key)
        found = self._runs.get(key)
        if found is None:
            fallback = self._fallback.get(server_id, self._default)
            found = self._runs[key] = self._costs.run_seconds(server_id, shape, fallback)
        return found

    def load_seconds(self, server_id: str, model: str) -> float:
        key = (server_id, model)
        found = self._loads.get(key)
        if found is None:
            found = self._loads[key] = self._costs.load_seconds(server_id, model)
        return found


def bound_work(
    book: JobBook,
    state: ServerState,
    costs: RoundCosts,
    *,
    seconds_per_job: float,
    slots: int,
    at: float,
) -> tuple[float, list[str]]:
    """(seconds of work bound to the server from `at` on, the models it holds once that is
    done), `slots` of them at most."""
    server_id = state.server_id
    resident = state.resident[:slots]
    records = [book.records[j] for j in book.bound.of(server_id) if j in book.records]
    # The running job first, then the others in the order they were bound (ComfyUI's queue).
    records.sort(key=lambda r: (r.status is not JobStatus.RUNNING, r.updated_at))
    busy = 0.0
    for record in records:
        shape = book.shapes.get(record.job_id)
        if shape is None:
            busy += seconds_per_job
            continue
        work = costs.run_seconds(server_id, shape).seconds + sum(
            costs.load_seconds(server_id, m) for m in shape.models if m not in resident
        )
        started = book.started_at.get(record.job_id)
        if record.status is JobStatus.RUNNING and started is not None:
            work = max(work - (at - started), _LEFT_AT_LEAST * work)
        busy += work
        hold(resident, shape.models, slots)
    return busy, resident
