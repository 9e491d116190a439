"""How client commands print: JSON for scripts, tables and timelines for people.

Tables never cut an identifier: its column is as wide as its longest value, and the table is
printed wider than the terminal (or the 80 columns of a pipe) rather than shortening one.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any

import msgspec
from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from gateway.api.schemas import ServerHealth


def out() -> Console:
    # Made per call, so the terminal's width (or $COLUMNS) is read when printing.
    return Console()


def err() -> Console:
    return Console(stderr=True)


def emit_json(value: Any) -> None:
    """One JSON document (or one line of a JSON-lines stream) on stdout."""
    sys.stdout.write(msgspec.json.encode(value).decode() + "\n")
    sys.stdout.flush()


def table(
    headers: Sequence[str],
    rows: Iterable[Sequence[Any]],
    *,
    wrap: Collection[int] = (),
    right: Collection[int] = (),
    title: str | None = None,
    caption: str | None = None,
) -> None:
    """Print rows under `headers` on stdout. Only the columns numbered in `wrap` (free text: an
    error, a detail) may wrap; every other column is as wide as its longest value, and the table
    is printed wider than the terminal (or a pipe's 80 columns) if that is what it takes."""
    cells = [
        [value if isinstance(value, Text) else Text(cell(value)) for value in row] for row in rows
    ]
    widths = [
        max([row[i].cell_len for row in cells] + [len(header)]) for i, header in enumerate(headers)
    ]
    grid = Table(title=title, caption=caption)
    for i, header in enumerate(headers):
        grid.add_column(
            header,
            justify="right" if i in right else "left",
            no_wrap=i not in wrap,
            overflow="fold" if i in wrap else "ellipsis",
            min_width=None if i in wrap else widths[i],
        )
    for row in cells:
        grid.add_row(*row)
    # Each column has a space of padding either side and a rule after it.
    needed = 1 + sum(3 + (min(w, _WRAPPED_WIDTH) if i in wrap else w) for i, w in enumerate(widths))
    console = out()
    if needed > console.width:
        console = Console(width=needed)
    console.print(grid)


_WRAPPED_WIDTH = 40
"""The width a wrapping column is given, at least, before the table grows past the terminal."""


def _text(value: Any) -> Text:
    return value if isinstance(value, Text) else Text(cell(value))


def cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.2f}"
    if isinstance(value, dict | list):
        return json.dumps(value)
    return str(value)


def timeline(
    job_id: str,
    log_file_path: str,
    entries: list[dict[str, Any]],
    *,
    show_all: bool = False,
) -> None:
    """Print a job's events as a table, then its errors' tracebacks and its outputs."""
    start = float(entries[0].get("ts", 0.0)) if entries else 0.0
    shown = entries if show_all else _collapse_progress(entries)
    rows = []
    for entry in shown:
        ts = float(entry.get("ts", 0.0))
        data = entry.get("data") or {}
        rows.append(
            (
                entry.get("seq", ""),
                dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3],
                f"{ts - start:.3f}",
                Text.from_markup(styled(str(entry.get("type", "?")))),
                entry.get("server_id"),
                data.get("node_id") if isinstance(data, dict) else None,
                _detail(entry),
            )
        )
    headers = ("seq", "time (UTC)", "+s", "event", "server", "node", "detail")
    table(headers, rows, wrap={6}, right={0, 2}, title=f"job {job_id}", caption=log_file_path)
    console = out()
    for entry in entries:
        data = entry.get("data") or {}
        if entry.get("type") == "failed" and data.get("traceback"):
            console.print(
                Panel(
                    escape("".join(data["traceback"])),
                    title=f"{escape(str(data.get('exception_type') or data.get('code')))}",
                    border_style="red",
                )
            )
        if entry.get("type") == "succeeded":
            for output in data.get("outputs") or []:
                console.print(f"output {escape(str(output.get('url') or output.get('key')))}")
    console.print(f"[dim]{len(entries)} events[/dim]")


def _collapse_progress(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Keep the last of each run of progress events of one node."""
    kept: list[dict[str, Any]] = []
    for entry in entries:
        if (
            entry.get("type") == "node_progress"
            and kept
            and kept[-1].get("type") == "node_progress"
            and (kept[-1].get("data") or {}).get("node_id")
            == (entry.get("data") or {}).get("node_id")
        ):
            kept[-1] = entry
        else:
            kept.append(entry)
    return kept


def drain_state(server: ServerHealth) -> str:
    """A draining server in a word or two: `draining (N jobs left)`, `drained`."""
    if server.jobs_held == 0:
        return "drained"
    if server.jobs_held is None:
        return "draining"
    return f"draining ({server.jobs_held} job{'' if server.jobs_held == 1 else 's'} left)"


def drain_line(server: ServerHealth) -> str:
    """What `servers drain|undrain` says of the server it answered."""
    if not server.draining:
        return f"{server.server_id}: in service, takes jobs"
    if server.jobs_held == 0:
        return f"{server.server_id}: drained, holds no job: safe to stop"
    return f"{server.server_id}: {drain_state(server)}; it takes no new jobs"


_STYLES = {
    "succeeded": "green",
    "failed": "bold red",
    "cancelled": "yellow",
    "retried": "yellow",
    "queued": "cyan",
    "dispatched": "cyan",
    "running": "blue",
}


def styled(kind: str) -> str:
    """A job status or event type in its colour (markup)."""
    style = _STYLES.get(kind)
    return f"[{style}]{escape(kind)}[/{style}]" if style else escape(kind)


def _detail(entry: Mapping[str, Any]) -> str:
    data = entry.get("data")
    if not isinstance(data, dict):
        return ""
    kind = entry.get("type")
    if kind == "queued":
        request = data.get("request") or {}
        workflow = request.get("workflow") or {}
        return f"{len(workflow)} nodes, priority {request.get('priority', 0)}"
    if kind == "dispatched":
        return f"to {data.get('server_id')} (attempt {data.get('attempt')})"
    if kind == "running":
        return f"attempt {data.get('attempt')}, prompt {data.get('prompt_id')}"
    if kind == "node_started":
        return str(data.get("class_type") or "")
    if kind == "node_progress":
        return f"{data.get('value')}/{data.get('max')}"
    if kind == "node_cached":
        return f"cached: {', '.join(map(str, data.get('node_ids') or []))}"
    if kind == "node_output":
        return ", ".join(sorted((data.get("output") or {}).keys()))
    if kind == "node_image":
        return f"image {data.get('index')}: {(data.get('output') or {}).get('key')}"
    if kind == "succeeded":
        took = data.get("duration_s")
        return f"{len(data.get('outputs') or [])} outputs" + (f" in {took:.2f} s" if took else "")
    if kind == "failed":
        return f"{data.get('code')}: {data.get('message')}"
    if kind in ("cancelled", "retried"):
        return str(data.get("reason") or "")
    if kind == "history":
        return f"ComfyUI history of prompt {data.get('prompt_id')}"
    return ""
