"""The live view of `submit --wait`: the job's state (and why it waits), then each node."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from rich.console import Group, RenderableType
from rich.live import Live
from rich.markup import escape
from rich.progress_bar import ProgressBar
from rich.table import Table

from gateway.api.schemas import CallerShare
from gateway.app import render
from gateway.app.jobview import JobView, class_types, waiting_reason
from sdk import ComfyUISDK


def follow(
    sdk: ComfyUISDK,
    job_id: str,
    workflow: Mapping[str, Any],
    *,
    server: str | None,
    as_json: bool,
) -> JobView:
    """Follow the job's events to its end: JSON lines on stdout, or a live view on stderr."""
    view = JobView(job_id=job_id, class_types=class_types(workflow))
    if as_json:
        for event in sdk.stream_events(job_id):
            render.emit_json(event)
            view.apply(event)
        return view
    shown = _Shown(view)
    console = render.err()
    with Live(shown, console=console, refresh_per_second=4, transient=False) as live:
        for event in sdk.stream_events(job_id):
            before = view.status
            view.apply(event)
            if view.status == "queued" and (before != "queued" or shown.waiting is None):
                shown.waiting = waiting_reason(
                    sdk.list_servers(), server=server, share=_own_share(sdk)
                )
            live.refresh()
    if not console.is_terminal:
        console.line()  # a terminal's Live ends its last line itself; a pipe's does not
    return view


def _own_share(sdk: ComfyUISDK) -> CallerShare | None:
    """The asking key's share of the queue (its cap and jobs running)."""
    queue = sdk.get_queue()
    return next((c for c in queue.callers if c.caller == queue.you), None)


class _Shown:
    """Rendered afresh at each refresh, so running nodes' times tick between events."""

    def __init__(self, view: JobView) -> None:
        self.view = view
        self.waiting: str | None = None

    def __rich__(self) -> RenderableType:
        view = self.view
        head = f"job {escape(view.job_id)}: {render.styled(view.status)}"
        if view.server_id:
            head += f" on {escape(view.server_id)}"
        if view.attempt > 1:
            head += f" (attempt {view.attempt})"
        if view.status == "queued" and self.waiting:
            head += f" [dim]- {escape(self.waiting)}[/dim]"
        if view.reason and view.status in {"queued", "failed", "cancelled"}:
            head += f"\n  [dim]{escape(view.reason)}[/dim]"
        if not view.nodes:
            return head
        nodes = Table.grid(padding=(0, 2))
        now = time.time()
        for node in view.nodes.values():
            if node.state == "cached":
                label = f"node {escape(node.node_id)} {escape(node.class_type)}"
                nodes.add_row(label, "", "", "[dim]cached[/dim]", "")
                continue
            bar: RenderableType = ""
            steps = ""
            if node.max:
                bar = ProgressBar(total=node.max, completed=node.value, width=24)
                steps = f"{node.value}/{node.max}"
            seconds = node.seconds if node.ended is not None else now - (node.started or now)
            nodes.add_row(
                f"node {escape(node.node_id)} {escape(node.class_type)}",
                bar,
                steps,
                render.styled(node.state) if node.state != "done" else "[green]done[/green]",
                f"{max(0.0, seconds or 0.0):.1f} s",
            )
        return Group(head, nodes)
