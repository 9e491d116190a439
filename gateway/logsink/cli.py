"""Command-line entry points: `comfyautomate logsink` and `comfyautomate logs show|sql|rebuild`.

gateway/app/cli.py calls `add_parsers(subcommands)`; every command sets `handler` to a function
taking the parsed arguments and returning an exit code.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import sys
from typing import Any

import msgspec
from nats.aio.client import Client
from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table

from gateway.bus.connection import connect, shown_url
from gateway.bus.contract import Subjects
from gateway.lifecycle import stop_on_signals
from gateway.logsink import paths
from gateway.logsink.client import LogQueryError, job_log, query_logs
from gateway.logsink.config import SinkConfig
from gateway.logsink.index import IndexLockedError
from gateway.logsink.rebuild import rebuild_index
from gateway.logsink.sink import run_logsink
from gateway.settings import Settings, load_settings


def _out() -> Console:
    # Made per call, so the terminal's width (or $COLUMNS) is read when printing.
    return Console()


def _err() -> Console:
    return Console(stderr=True)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="TOML settings file")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING (default INFO)")
    parser.add_argument("--nats-url", help="NATS server URL (default nats://127.0.0.1:4222)")
    parser.add_argument(
        "--nats-replicas",
        help="copies of each stream and bucket: 1, 3 on a cluster, or auto (default 1)",
    )
    parser.add_argument("--data-dir", help="folder holding logs/ (default ./data)")
    parser.add_argument("--prefix", dest="subject_prefix", help="subject prefix (default comfy)")


def add_sink_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `comfyautomate logsink` (also `python -m gateway.logsink`)."""
    _common(parser)
    defaults = SinkConfig()
    parser.add_argument(
        "--batch-size",
        type=int,
        default=defaults.batch_size,
        help=f"most events stored per batch (default {defaults.batch_size})",
    )
    parser.add_argument(
        "--ack-wait",
        type=float,
        default=defaults.ack_wait_s,
        help="seconds before JetStream delivers an unacknowledged event again "
        f"(default {defaults.ack_wait_s:g})",
    )
    parser.set_defaults(handler=run_sink_command)


def add_parsers(subparsers: Any) -> None:
    """Add `logsink` and `logs` to the `comfyautomate` subcommands."""
    sink = subparsers.add_parser(
        "logsink",
        help="run the log sink (JSONL files, DuckDB index, SQL queries)",
        description="Consume every event into one JSONL file per job and the DuckDB index, "
        "and answer log queries, until Ctrl-C.",
    )
    add_sink_arguments(sink)

    logs = subparsers.add_parser("logs", help="show a job's log, run SQL, rebuild the index")
    commands = logs.add_subparsers(dest="logs_command", metavar="COMMAND", required=True)
    show = commands.add_parser("show", help="a job's timeline")
    _common(show)
    show.add_argument("job_id", metavar="JOB_ID")
    show.add_argument("--all", action="store_true", help="every progress event, not the last")
    show.set_defaults(handler=show_command)

    sql = commands.add_parser(
        "sql",
        help="run a SELECT on the log index",
        description="Tables: events, jobs. Views: node_runs, slowest_nodes, failure_rates, "
        "daily_timing.",
    )
    _common(sql)
    sql.add_argument("sql", metavar="SQL", help='e.g. "SELECT * FROM jobs LIMIT 10"')
    sql.add_argument("--max-rows", type=int, default=1000, help="row cap (default 1000)")
    sql.add_argument("--timeout", type=float, default=30.0, help="seconds (default 30)")
    sql.add_argument("--json", action="store_true", help="print the result as JSON")
    sql.set_defaults(handler=sql_command)

    rebuild = commands.add_parser(
        "rebuild",
        help="rebuild the index from the JSONL files (stop the log sink first)",
    )
    _common(rebuild)
    rebuild.set_defaults(handler=rebuild_command)


def _settings(args: argparse.Namespace) -> Settings:
    fields = set(Settings.__struct_fields__)
    flags = {key: value for key, value in vars(args).items() if key in fields}
    return load_settings(flags, config_file=args.config)


async def _client(settings: Settings) -> Client:
    options: dict[str, Any] = {"allow_reconnect": False, "connect_timeout": 3}
    if settings.nats_user:
        options.update(user=settings.nats_user, password=settings.nats_password or "")
    return await connect(settings.nats_url, "comfyautomate-logs", **options)


# --------------------------------------------------------------------------------------------
# logsink


def run_sink_command(args: argparse.Namespace) -> int:
    """`comfyautomate logsink`: run until SIGINT or SIGTERM."""
    settings = _settings(args)
    config = SinkConfig(batch_size=args.batch_size, ack_wait_s=args.ack_wait)

    async def main() -> None:
        stop = asyncio.Event()
        with stop_on_signals(stop):
            await run_logsink(settings, stop, config=config)

    try:
        asyncio.run(main())
    except IndexLockedError as exc:
        _err().print(f"comfyautomate logsink: {escape(str(exc))}")
        return 1
    return 0


# --------------------------------------------------------------------------------------------
# logs rebuild


def rebuild_command(args: argparse.Namespace) -> int:
    """`comfyautomate logs rebuild`."""
    settings = _settings(args)
    try:
        stats = rebuild_index(settings.data_path)
    except IndexLockedError as exc:
        _err().print(f"comfyautomate logs rebuild: {escape(str(exc))}; stop the log sink first")
        return 1
    _out().print(
        f"Rebuilt {paths.index_path(settings.data_path)}: {stats.events_indexed} events "
        f"from {stats.files_read} files ({stats.lines_rejected} unreadable lines)"
    )
    return 0


# --------------------------------------------------------------------------------------------
# logs sql


def sql_command(args: argparse.Namespace) -> int:
    """`comfyautomate logs sql "SELECT ..."`."""
    settings = _settings(args)

    async def main() -> Any:
        nc = await _client(settings)
        try:
            return await query_logs(
                nc,
                Subjects(settings.subject_prefix),
                args.sql,
                max_rows=args.max_rows,
                timeout_s=args.timeout,
            )
        finally:
            await nc.close()

    try:
        result = asyncio.run(main())
    except LogQueryError as exc:
        _err().print(f"[red]{escape(exc.code)}[/red]: {escape(exc.message)}")
        return 1
    if args.json:
        sys.stdout.write(msgspec.json.encode(result).decode() + "\n")
        return 0
    table = Table(show_lines=False)
    for column in result.columns:
        table.add_column(f"{escape(column.name)}\n[dim]{escape(column.type)}[/dim]")
    for row in result.rows:
        table.add_row(*(escape(_cell(value)) for value in row))
    _out().print(table)
    note = f"{len(result.rows)} rows in {result.elapsed_ms:.1f} ms"
    if result.truncated:
        note += " (truncated: raise --max-rows or add LIMIT)"
    _out().print(f"[dim]{note}[/dim]")
    return 0


def _cell(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, dict | list):
        return json.dumps(value)
    return str(value)


# --------------------------------------------------------------------------------------------
# logs show


def show_command(args: argparse.Namespace) -> int:
    """`comfyautomate logs show JOB_ID`: ask the sink, else read the JSONL file directly."""
    settings = _settings(args)

    async def main() -> tuple[str, list[dict[str, Any]]]:
        nc = await _client(settings)
        try:
            found = await job_log(nc, Subjects(settings.subject_prefix), args.job_id)
        finally:
            await nc.close()
        return found.log_file_path, found.entries

    try:
        path, entries = asyncio.run(main())
    except LogQueryError as exc:
        if exc.code != "no_log_sink":
            _err().print(f"[red]{escape(exc.code)}[/red]: {escape(exc.message)}")
            return 1
        local = paths.find_log_file(settings.data_path, args.job_id)
        if local is None:
            _err().print(
                f"{escape(exc.message)}; and no log file of that job in {settings.data_path}"
            )
            return 1
        _err().print(f"[dim]no log sink answers; reading {local}[/dim]")
        path = str(local)
        entries = [json.loads(line) for line in local.read_bytes().splitlines() if line.strip()]
        entries.sort(key=lambda entry: int(entry.get("seq", 0)))
    except OSError as exc:
        _err().print(f"cannot reach NATS at {shown_url(settings.nats_url)}: {escape(str(exc))}")
        return 1
    render_timeline(args.job_id, path, entries, show_all=args.all, console=_out())
    return 0


def render_timeline(
    job_id: str,
    log_file_path: str,
    entries: list[dict[str, Any]],
    *,
    show_all: bool = False,
    console: Console | None = None,
) -> None:
    """Print a job's events as a table, then its errors' tracebacks and its outputs."""
    console = console or _out()
    start = float(entries[0].get("ts", 0.0)) if entries else 0.0
    table = Table(title=f"job {escape(job_id)}", caption=escape(log_file_path))
    for name in ("seq", "time (UTC)", "+s", "event", "server", "node", "detail"):
        table.add_column(name, justify="right" if name in ("seq", "+s") else "left")
    shown = entries if show_all else _collapse_progress(entries)
    for entry in shown:
        ts = float(entry.get("ts", 0.0))
        data = entry.get("data") or {}
        table.add_row(
            str(entry.get("seq", "")),
            dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3],
            f"{ts - start:.3f}",
            _styled(str(entry.get("type", "?"))),
            escape(str(entry.get("server_id") or "")),
            escape(str(data.get("node_id") or "") if isinstance(data, dict) else ""),
            escape(_detail(entry)),
        )
    console.print(table)
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


_STYLES = {
    "succeeded": "green",
    "failed": "bold red",
    "cancelled": "yellow",
    "retried": "yellow",
    "queued": "cyan",
    "dispatched": "cyan",
    "running": "blue",
}


def _styled(kind: str) -> str:
    style = _STYLES.get(kind)
    return f"[{style}]{escape(kind)}[/{style}]" if style else escape(kind)


def _detail(entry: dict[str, Any]) -> str:
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
