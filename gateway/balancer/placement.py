"""Which servers may run a job, and which should: pure functions, no I/O.

A job's requirements come from its workflow (node types, model files named in inputs) and its
request (a pinned server, required labels). Choosing among servers that may run it is list
scheduling: jobs in queue order go, one by one, to the server expected to finish them first,
counting what that server already holds; a job is bound only when that server has room. A job
whose best server is busy waits for it rather than going to a slow server that happens to be idle,
which is what keeps the makespan close to ideal on a fleet of uneven GPUs. A load that would push
out a model that jobs waiting behind it still need is charged that model's reload too: without
it, each job's own earliest finish has servers trade models back and forth.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol

import msgspec

from gateway.balancer.costs import Estimate
from gateway.bus.contract import Capabilities, JobRequest, PlacementReason
from gateway.comfyui.shape import MODEL_INPUTS, JobShape


class Requirements(msgspec.Struct, frozen=True, kw_only=True):
    """What a server needs to run one job."""

    node_types: frozenset[str]
    models: frozenset[tuple[str, str]]  # (input name, file name)
    server: str | None = None
    labels: tuple[tuple[str, str], ...] = ()


def requirements(request: JobRequest) -> Requirements:
    """The node types and model files a request's workflow names, with its pin and labels."""
    node_types: set[str] = set()
    models: set[tuple[str, str]] = set()
    for node in request.workflow.values():
        if not isinstance(node, dict):
            continue
        class_type = node.get("class_type")
        if isinstance(class_type, str):
            node_types.add(class_type)
        inputs = node.get("inputs")
        if isinstance(inputs, dict):
            for name, value in inputs.items():
                if name in MODEL_INPUTS and isinstance(value, str):
                    models.add((name, value))
    return Requirements(
        node_types=frozenset(node_types),
        models=frozenset(models),
        server=request.server,
        labels=tuple(sorted(request.labels.items())),
    )


class Missing(msgspec.Struct, frozen=True, kw_only=True):
    """What one server lacks for one job; empty when it has everything."""

    node_types: tuple[str, ...] = ()
    models: tuple[str, ...] = ()
    labels: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.node_types or self.models or self.labels)

    def describe(self) -> str:
        parts = []
        if self.node_types:
            parts.append("node types " + ", ".join(self.node_types))
        if self.models:
            parts.append("model files " + ", ".join(self.models))
        if self.labels:
            parts.append("labels " + ", ".join(self.labels))
        return "; ".join(parts)


def missing(req: Requirements, capabilities: Capabilities, labels: Mapping[str, str]) -> Missing:
    """What a server with these capabilities and labels lacks to run a job."""
    have_nodes = set(capabilities.node_types)
    lacking_nodes = sorted(req.node_types - have_nodes)
    lacking_models = []
    for input_name, filename in sorted(req.models):
        folders = MODEL_INPUTS[input_name]
        if not any(filename in capabilities.models.get(folder, ()) for folder in folders):
            lacking_models.append(f"{filename} ({'/'.join(folders)})")
    lacking_labels = [f"{k}={v}" for k, v in req.labels if labels.get(k) != v]
    return Missing(
        node_types=tuple(lacking_nodes),
        models=tuple(lacking_models),
        labels=tuple(lacking_labels),
    )


class Candidate(msgspec.Struct, kw_only=True):
    """A server as the scheduler sees it in one round."""

    server_id: str
    capacity: int
    bound: int
    seconds_per_job: float

    busy_s: float | None = None
    """The work bound to it, estimated job by job; None: bound x seconds_per_job."""
    resident: tuple[str, ...] = ()
    """The models it will hold once its bound jobs ran, most recently used first."""
    model_slots: int | None = None
    """How many models it keeps at once; None: unknown, nothing is taken to leave."""

    @property
    def has_room(self) -> bool:
        return self.bound < self.capacity


class Pending(msgspec.Struct, frozen=True, kw_only=True):
    job_id: str
    eligible: frozenset[str]  # servers that may run it now
    shape: JobShape | None = None  # None: every job costs its server's seconds_per_job


class Estimator(Protocol):
    """What a job of a shape costs on a server (see costs.py)."""

    def run_seconds(self, server_id: str, shape: JobShape) -> Estimate: ...

    def load_seconds(self, server_id: str, model: str) -> float: ...


class Binding(msgspec.Struct, frozen=True):
    job_id: str
    server_id: str
    reason: PlacementReason


def hold(resident: list[str], models: Iterable[str], slots: int | None) -> None:
    """The server ran a job of these models: they are its most recent, the oldest may leave."""
    used = [m for m in models if m]
    resident[:] = [*used, *(m for m in resident if m not in used)]
    if slots is not None:
        del resident[max(slots, len(used)) :]


def schedule(
    pending: Sequence[Pending],
    candidates: Iterable[Candidate],
    costs: Estimator | None = None,
    *,
    lookahead: int = 0,
) -> list[Binding]:
    """Bindings to make now, in queue order, each with why.

    Each job goes, in turn, to the eligible server with the earliest expected finish: the work
    already bound there and planned for it this round, plus the job's run time there, plus the
    loading of the models it needs that the server will not hold by then; a load that would
    push out a model later jobs of the plan need counts that model's reload as well. So jobs
    of one model go where it is held as long as waiting for that server beats loading it
    elsewhere, and a server's held models follow the jobs planned for it. Only jobs whose
    chosen server has room are bound; the rest wait. `lookahead` limits how many queued jobs
    the plan considers (0: twice the fleet's total capacity, enough to fill every slot).
    """
    servers = {c.server_id: msgspec.structs.replace(c) for c in candidates}
    if not servers:
        return []
    busy_until = {
        s.server_id: s.busy_s if s.busy_s is not None else s.bound * s.seconds_per_job
        for s in servers.values()
    }
    held = {s.server_id: list(s.resident) for s in servers.values()}
    limit = lookahead or 2 * sum(s.capacity for s in servers.values()) + 1
    window = pending[:limit] if len(pending) > limit else pending
    # Models the jobs not planned yet need, counted per job.
    wanted = Counter(m for job in window if job.shape is not None for m in job.shape.models)
    bindings: list[Binding] = []
    for job in window:
        if job.shape is not None:
            wanted.subtract(job.shape.models)
        # Only the best two options matter, and a reason is written only for a binding:
        # most jobs of the window are planned, not bound, and a round runs many times a second.
        best: _Option | None = None
        second: _Option | None = None
        for server_id in job.eligible:
            server = servers.get(server_id)
            if server is None:
                continue
            option = _option(job, server, busy_until[server_id], held[server_id], costs, wanted)
            if best is None or option.key < best.key:
                best, second = option, best
            elif second is None or option.key < second.key:
                second = option
        if best is None:
            continue
        chosen = servers[best.server_id]
        busy_until[chosen.server_id] = best.finish
        reason = best.reason(chosen.bound, job, held[chosen.server_id])
        if job.shape is not None:
            hold(held[chosen.server_id], job.shape.models, chosen.model_slots)
        if chosen.has_room:
            chosen.bound += 1
            if second is not None:
                reason.next_best, reason.next_best_finish_s = second.server_id, second.finish
                reason.next_best_evicts_s = second.evicts_s
            bindings.append(Binding(job.job_id, chosen.server_id, reason))
    return bindings


class _Option(msgspec.Struct, frozen=True):
    """A job on one server: when it would finish there, and why."""

    finish: float
    load_s: float
    server_id: str
    queued_s: float
    estimate: Estimate
    loads: tuple[str, ...]
    evicts_s: float = 0.0

    @property
    def key(self) -> tuple[float, float, str]:
        """The least is best: soonest finish with the reloads it causes, then the least
        loading, then the id."""
        return (self.finish + self.evicts_s, self.load_s, self.server_id)

    def reason(self, bound: int, job: Pending, held: list[str]) -> PlacementReason:
        return PlacementReason(
            estimate_s=self.estimate.seconds,
            estimate_from=self.estimate.source,
            load_s=self.load_s,
            loads=list(self.loads),
            queued_s=self.queued_s,
            finish_s=self.finish,
            evicts_s=self.evicts_s,
            bound=bound,
            held=[m for m in job.shape.models if m in held] if job.shape is not None else [],
        )


def _option(
    job: Pending,
    server: Candidate,
    busy: float,
    held: list[str],
    costs: Estimator | None,
    wanted: Mapping[str, int],
) -> _Option:
    if costs is None or job.shape is None:
        estimate = Estimate(server.seconds_per_job, "fallback")
        return _Option(busy + estimate.seconds, 0.0, server.server_id, busy, estimate, ())
    estimate = costs.run_seconds(server.server_id, job.shape)
    loads = tuple(m for m in job.shape.models if m not in held)
    load_s = sum(costs.load_seconds(server.server_id, m) for m in loads)
    evicts_s = 0.0
    if loads:
        after = list(held)
        hold(after, job.shape.models, server.model_slots)
        evicts_s = sum(
            costs.load_seconds(server.server_id, m)
            for m in held
            if m not in after and wanted.get(m, 0) > 0
        )
    finish = busy + load_s + estimate.seconds
    return _Option(finish, load_s, server.server_id, busy, estimate, loads, evicts_s)


def plan(
    pending: Sequence[Pending], candidates: Iterable[Candidate], *, lookahead: int = 0
) -> list[tuple[str, str]]:
    """Bindings (job id, server id) to make now, in queue order: `schedule` without costs."""
    return [(b.job_id, b.server_id) for b in schedule(pending, candidates, lookahead=lookahead)]


def left_idle(
    pending: Sequence[Pending], candidates: Iterable[Candidate], bindings: Sequence[tuple[str, str]]
) -> set[str]:
    """Servers holding nothing that a plan leaves idle although a waiting job may run there.

    That is right while their estimate is right (the job finishes sooner elsewhere); the
    dispatcher measures afresh a server left so for long, since a wrong estimate that keeps a
    server idle is never corrected by a run.
    """
    bound_now = {job_id for job_id, _ in bindings}
    taken = {server_id for _, server_id in bindings}
    could_run: set[str] = set()
    for eligible in {p.eligible for p in pending if p.job_id not in bound_now}:
        could_run |= eligible
    return {
        c.server_id
        for c in candidates
        if not c.bound and c.server_id not in taken and c.server_id in could_run
    }
