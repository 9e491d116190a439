"""Which servers may run a job, and which should: pure functions, no I/O.

A job's requirements come from its workflow (node types, model files named in inputs) and its
request (a pinned server, required labels). Choosing among servers that may run it is list
scheduling: jobs in queue order go, one by one, to the server expected to finish them first,
counting what that server already holds; a job is bound only when that server has room. A job
whose best server is busy waits for it rather than going to a slow server that happens to be idle,
which is what keeps the makespan close to ideal on a fleet of uneven GPUs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import msgspec

from gateway.bus.contract import Capabilities, JobRequest
from gateway.comfyui.shape import MODEL_INPUTS


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

    @property
    def has_room(self) -> bool:
        return self.bound < self.capacity


class Pending(msgspec.Struct, frozen=True, kw_only=True):
    job_id: str
    eligible: frozenset[str]  # servers that may run it now


def plan(
    pending: Sequence[Pending], candidates: Iterable[Candidate], *, lookahead: int = 0
) -> list[tuple[str, str]]:
    """Bindings (job id, server id) to make now, in queue order.

    Each job goes, in turn, to the eligible server with the earliest expected finish, counting
    the work already bound there and the work this round has planned for it. Only jobs whose
    chosen server has room are bound; the rest wait. `lookahead` limits how many queued jobs the
    plan considers (0: twice the fleet's total capacity, enough to fill every slot).
    """
    servers = {c.server_id: msgspec.structs.replace(c) for c in candidates}
    if not servers:
        return []
    busy_until = {s.server_id: s.bound * s.seconds_per_job for s in servers.values()}
    limit = lookahead or 2 * sum(s.capacity for s in servers.values()) + 1
    bindings: list[tuple[str, str]] = []
    for job in pending[:limit] if len(pending) > limit else pending:
        choices = [servers[s] for s in job.eligible if s in servers]
        if not choices:
            continue
        best = min(
            choices,
            key=lambda s: (busy_until[s.server_id] + s.seconds_per_job, s.server_id),
        )
        busy_until[best.server_id] += best.seconds_per_job
        if best.has_room:
            best.bound += 1
            bindings.append((job.job_id, best.server_id))
    return bindings


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
