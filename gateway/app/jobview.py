"""What `submit --wait` knows of a job while it runs, built from the job's events alone.

ComfyUI runs a prompt's nodes one at a time and says when each starts, but not always when it
ends: a node without outputs ends silently when the next one starts, and the last one when the
prompt does. So a node counts as done at its output, at the next node's start, or at the job's
end; its time stops then.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec

ENDINGS = frozenset({"succeeded", "failed", "cancelled"})


class NodeView(msgspec.Struct, kw_only=True):
    """One node of the running prompt, as the events have told of it."""

    node_id: str
    class_type: str = ""
    state: str = "running"  # running, done, cached, failed
    value: int = 0
    max: int | None = None
    """Steps of the node's progress, when it reports any (a sampler does)."""
    started: float | None = None
    ended: float | None = None

    @property
    def seconds(self) -> float | None:
        """How long the node ran; None for a node served from ComfyUI's cache."""
        if self.started is None or self.ended is None:
            return None
        return max(0.0, self.ended - self.started)


class JobView(msgspec.Struct, kw_only=True):
    """The job's state, server, attempt and nodes, folded from its events in order."""

    job_id: str
    status: str = "queued"
    server_id: str | None = None
    attempt: int = 0
    reason: str | None = None
    """Why the job is where it is: a retry's or a cancel's reason, a failure's message."""
    nodes: dict[str, NodeView] = msgspec.field(default_factory=dict)
    class_types: dict[str, str] = msgspec.field(default_factory=dict)
    """The workflow's node types by id, for nodes whose events do not name theirs (cached)."""
    outputs: list[str] = msgspec.field(default_factory=list)

    def apply(self, event: Mapping[str, Any]) -> None:
        """Fold one event in (events of a superseded try never arrive: the log is in order)."""
        kind = str(event.get("type", ""))
        data = event.get("data") or {}
        ts = float(event.get("ts") or 0.0)
        if kind == "dispatched":
            self.status, self.server_id = kind, data.get("server_id") or event.get("server_id")
            self.attempt = int(data.get("attempt") or self.attempt)
            self.nodes.clear()  # a new try runs every node again
        elif kind == "running":
            self.status = kind
        elif kind == "retried":
            self._end_running(ts, "failed")
            self.status, self.reason, self.server_id = "queued", data.get("reason"), None
        elif kind == "node_started":
            self._end_running(ts, "done")
            node_id = str(data.get("node_id"))
            self.nodes[node_id] = NodeView(
                node_id=node_id, class_type=str(data.get("class_type") or ""), started=ts
            )
        elif kind == "node_progress":
            node = self.nodes.get(str(data.get("node_id")))
            if node is not None:
                node.value, node.max = int(data.get("value") or 0), int(data.get("max") or 0)
        elif kind == "node_cached":
            for cached in data.get("node_ids") or []:
                node_id = str(cached)
                kind_of = self.class_types.get(node_id, "")
                self.nodes.setdefault(
                    node_id, NodeView(node_id=node_id, class_type=kind_of, state="cached")
                )
        elif kind == "node_output":
            node = self.nodes.get(str(data.get("node_id")))
            if node is not None and node.state == "running":
                self._end(node, ts, "done")
        elif kind in ENDINGS:
            self.status = kind
            self._end_running(ts, "done" if kind == "succeeded" else "failed")
            if kind == "failed":
                self.reason = data.get("message")
                failing = data.get("node_id")
                if failing is not None and str(failing) in self.nodes:
                    self.nodes[str(failing)].state = "failed"
            elif kind == "cancelled":
                self.reason = data.get("reason")
            self.outputs = [
                str(output.get("url") or output.get("key"))
                for output in data.get("outputs") or []
                if isinstance(output, dict)
            ]

    def _end_running(self, ts: float, state: str) -> None:
        for node in self.nodes.values():
            if node.state == "running":
                self._end(node, ts, state)

    @staticmethod
    def _end(node: NodeView, ts: float, state: str) -> None:
        node.state, node.ended = state, ts
        if state == "done" and node.max:
            node.value = node.max


def class_types(workflow: Mapping[str, Any]) -> dict[str, str]:
    """Each node's class_type in an API-format workflow (what is not a node is left out)."""
    return {
        str(node_id): str(node.get("class_type") or "")
        for node_id, node in workflow.items()
        if isinstance(node, Mapping)
    }


def waiting_reason(
    servers: list[Any], *, server: str | None = None, share: Any | None = None
) -> str:
    """Why a queued job waits, as far as the fleet's health tells (`servers`: ServerHealth)
    and its caller's share of the queue (`share`: CallerShare, GET /workflow/queue).

    The balancer binds a job only when its caller is below its cap, and only to a healthy
    server below its capacity that is not draining, so the answer is the first of: the caller
    at its cap, no server at all, the pinned one draining, the pinned one unwell, none healthy,
    every healthy one draining, every healthy one full.
    """
    if share is not None and share.at_cap:
        return f"caller at its cap ({share.running} of {share.max_running} jobs running)"
    if server is not None:
        servers = [s for s in servers if s.server_id == server]
        if not servers:
            return f"server {server} is not registered"
        if servers[0].draining:
            return f"server {server} is draining"
    if not servers:
        return "no server is registered"
    healthy = [s for s in servers if s.status == "healthy"]
    if not healthy:
        why = "; ".join(
            f"{s.server_id} {s.status}" + (f": {s.reason}" if s.reason else "") for s in servers[:3]
        )
        return f"no healthy server ({why})"
    if all(s.draining for s in healthy):
        names = ", ".join(s.server_id for s in healthy[:3])
        return f"every healthy server is draining ({names})"
    healthy = [s for s in healthy if not s.draining]
    used = sum(min(s.in_flight, s.capacity) for s in healthy)
    room = sum(s.capacity for s in healthy)
    if used >= room:
        return f"every healthy server is full ({used} of {room} slots busy)"
    return f"waiting for the balancer ({used} of {room} slots busy)"
