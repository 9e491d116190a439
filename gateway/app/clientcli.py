"""Client commands of the CLI: submit, servers, jobs, logs show|sql. They talk to a gateway
through the SDK, never to NATS, so a client needs no bus access.

Every command takes `--json` (one JSON document on stdout; JSON lines for a stream). Exit codes:
0 done; 1 the gateway refused, or the job did not succeed; 2 a bad command line or input file;
3 no gateway at that address. Errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
from rich.markup import escape

from gateway.app import render
from gateway.app.follow import follow
from gateway.logsink import paths
from sdk import ComfyAutomateError, ComfyUISDK, JobResult, ServerHealth
from sdk.errors import ApiError, FileUnusable, GatewayUnreachable

GATEWAY_ENV = "COMFYAUTOMATE_GATEWAY_URL"

EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3

# How often `servers drain --wait` looks whether the count of jobs it shows has changed.
_WAIT_STEP_S = 5.0


class UsageError(Exception):
    """A command line that cannot be carried out (exit code 2)."""


def _gateway_options() -> argparse.ArgumentParser:
    """Options every client command takes, wherever they stand on the line."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument(
        "--gateway",
        default=os.environ.get(GATEWAY_ENV, "http://127.0.0.1:8000"),
        help=f"gateway URL (default ${GATEWAY_ENV} or http://127.0.0.1:8000)",
    )
    parser.add_argument("--api-key", default=os.environ.get("COMFYAUTOMATE_API_KEY"))
    parser.add_argument("--json", action="store_true", help="print JSON (lines, for a stream)")
    return parser


def add_parsers(commands: Any) -> None:
    """Add `submit`, `servers` and `jobs` to the CLI's subcommands."""
    common = _gateway_options()
    submit = commands.add_parser(
        "submit",
        parents=[common],
        help="submit a workflow (API format JSON); --wait shows live progress",
        description="Submit a workflow. Without --wait, prints the job id and returns. "
        "With --wait --json: each event as a JSON line, then the result as the last line.",
    )
    submit.add_argument("workflow", type=Path, help="workflow file in ComfyUI's API format")
    submit.add_argument("--wait", action="store_true", help="follow progress until the end")
    submit.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NODE.INPUT=VALUE",
        help="override an input; NODE is an id or a title; VALUE is JSON or a plain string",
    )
    submit.add_argument(
        "--input", action="append", default=[], metavar="NAME=FILE", help="an image to upload"
    )
    submit.add_argument("--server", help="run on this server only")
    submit.add_argument("--priority", type=int, default=0)
    submit.add_argument("--out", type=Path, help="with --wait: download the outputs here")
    submit.set_defaults(handler=_guarded(_submit))

    servers = commands.add_parser(
        "servers", help="list, add, drain, undrain or remove ComfyUI servers"
    )
    verbs = servers.add_subparsers(dest="verb", required=True, metavar="VERB")
    verbs.add_parser("list", parents=[common], help="every server with its health and load")
    add = verbs.add_parser("add", parents=[common], help="register a server")
    add.add_argument("name")
    add.add_argument("address", help="HOST:PORT of its ComfyUI")
    add.add_argument("--capacity", type=int, default=2)
    add.add_argument("--weight", type=float, default=1.0)
    add.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
    remove = verbs.add_parser("remove", parents=[common], help="unregister a server")
    remove.add_argument("server_id")
    drain = verbs.add_parser(
        "drain",
        parents=[common],
        help="take a server out of service: no new jobs, those it holds finish",
        description="Stop sending new jobs to a server; what it holds runs to its end and jobs "
        "pinned to it wait. With --wait, return once it holds no job (safe to stop).",
    )
    drain.add_argument("server_id")
    drain.add_argument("--wait", action="store_true", help="wait until it holds no job")
    drain.add_argument(
        "--timeout", type=float, metavar="SECONDS", help="with --wait: give up after this long"
    )
    undrain = verbs.add_parser("undrain", parents=[common], help="put a server back in service")
    undrain.add_argument("server_id")
    servers.set_defaults(handler=_guarded(_servers))

    jobs = commands.add_parser("jobs", help="list, show or cancel jobs")
    verbs = jobs.add_subparsers(dest="verb", required=True, metavar="VERB")
    listing = verbs.add_parser("list", parents=[common], help="recent jobs, newest first")
    listing.add_argument("--status")
    listing.add_argument("--server")
    listing.add_argument("--limit", type=int, default=20)
    show = verbs.add_parser("show", parents=[common], help="a job's status and result")
    show.add_argument("job_id")
    cancel = verbs.add_parser("cancel", parents=[common], help="cancel a job")
    cancel.add_argument("job_id")
    jobs.set_defaults(handler=_guarded(_jobs))


def add_log_parsers(logs: Any) -> None:
    """Add `show` and `sql` to `comfyautomate logs`: both ask the gateway."""
    common = _gateway_options()
    show = logs.add_parser(
        "show",
        parents=[common],
        help="a job's timeline",
        description="A job's events from its log. With --data-dir, the job's JSONL file there "
        "is read when the gateway has no log sink to ask.",
    )
    show.add_argument("job_id", metavar="JOB_ID")
    show.add_argument("--all", action="store_true", help="every progress event, not the last")
    show.add_argument("--data-dir", type=Path, help="read the log file here if no sink answers")
    show.set_defaults(handler=_guarded(_logs_show))
    sql = logs.add_parser(
        "sql",
        parents=[common],
        help="run a SELECT on the log index",
        description="Tables: events, jobs. Views: node_runs, slowest_nodes, failure_rates, "
        "daily_timing.",
    )
    sql.add_argument("sql", metavar="SQL", help='e.g. "SELECT * FROM jobs LIMIT 10"')
    sql.add_argument("--max-rows", type=int, default=1000, help="row cap (default 1000)")
    sql.add_argument("--timeout", type=float, default=30.0, help="seconds, at most 60 (default 30)")
    sql.set_defaults(handler=_guarded(_logs_sql))


def _guarded(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Run a command; a user's error becomes one line on stderr and an exit code."""

    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except (UsageError, FileUnusable) as exc:
            return _fail(args, EXIT_USAGE, "usage", str(exc))
        except GatewayUnreachable as exc:
            return _fail(args, EXIT_UNREACHABLE, "gateway_unreachable", str(exc))
        except ApiError as exc:
            return _fail(args, EXIT_REFUSED, exc.code, exc.message)
        except ComfyAutomateError as exc:
            return _fail(args, EXIT_REFUSED, "error", str(exc))

    return run


def _fail(args: argparse.Namespace, code: int, kind: str, message: str) -> int:
    if getattr(args, "json", False):
        render.emit_json({"error": {"code": kind, "message": message}})
    render.err().print(
        f"[red]comfyautomate: {escape(kind)}:[/red] {escape(message)}", soft_wrap=True
    )
    return code


def _sdk(args: argparse.Namespace) -> ComfyUISDK:
    return ComfyUISDK(args.gateway, api_key=args.api_key)


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _pairs(items: list[str], what: str) -> dict[str, str]:
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"{what} {item!r} must look like KEY=VALUE")
        pairs[key] = value
    return pairs


def _workflow(path: Path) -> dict[str, Any]:
    try:
        graph = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UsageError(f"workflow file {path}: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"workflow file {path} is not JSON: {exc}") from None
    if not isinstance(graph, dict):
        raise UsageError(f"workflow file {path} holds a {type(graph).__name__}, not a workflow")
    return graph


def _submit(args: argparse.Namespace) -> int:
    overrides = {k: _value(v) for k, v in _pairs(args.set, "--set").items()}
    inputs = {name: Path(path) for name, path in _pairs(args.input, "--input").items()}
    options = {
        "overrides": overrides,
        "inputs": inputs,
        "server": args.server,
        "priority": args.priority,
    }
    graph = _workflow(args.workflow)
    with _sdk(args) as sdk:
        job_id = sdk.submit_workflow(graph, **options)
        if not args.wait:
            if args.json:
                render.emit_json({"job_id": job_id})
            else:
                print(job_id)
            return 0
        follow(sdk, job_id, graph, server=args.server, as_json=args.json)
        # The record follows the log's end by a moment: wait for it rather than read it.
        result = sdk.wait(job_id)
        saved = []
        if result.status == "succeeded" and args.out is not None:
            saved = [str(path) for path in sdk.download_outputs(result, args.out)]
    if args.json:
        render.emit_json({**msgspec.to_builtins(result), "downloaded": saved})
    else:
        _print_result(result)
        for path in saved:
            print(path)
    return 0 if result.status == "succeeded" else EXIT_REFUSED


def _print_result(result: JobResult) -> None:
    console = render.err()
    where = f" on {escape(result.server_id)}" if result.server_id else ""
    console.print(f"{render.styled(result.status)} job {escape(result.job_id)}{where}")
    if result.error is not None:
        node = f" (node {escape(result.error.node_id)})" if result.error.node_id else ""
        console.print(
            f"[red]{escape(result.error.code)}{node}: {escape(result.error.message)}",
            soft_wrap=True,
        )
    for url in result.images:
        print(url)
    console.print(f"log: {escape(result.log_file_path)}", soft_wrap=True)


def _servers(args: argparse.Namespace) -> int:
    with _sdk(args) as sdk:
        if args.verb == "add":
            record = sdk.register_server(
                args.name,
                args.address,
                capacity=args.capacity,
                weight=args.weight,
                labels=_pairs(args.label, "--label"),
            )
            if args.json:
                render.emit_json(record)
            else:
                print(record.server_id)
        elif args.verb == "remove":
            sdk.remove_server(args.server_id)
            if args.json:
                render.emit_json({"removed": args.server_id})
        elif args.verb in {"drain", "undrain"}:
            return _drain(sdk, args)
        else:
            servers = sdk.list_servers()
            if args.json:
                render.emit_json(servers)
                return 0
            render.table(
                ("server", "address", "status", "running", "pending", "capacity", "why"),
                (
                    (
                        s.server_id,
                        s.address or "(admins only)",
                        s.status + (f", {render.drain_state(s)}" if s.draining else ""),
                        s.queue_running,
                        s.queue_pending,
                        s.capacity,
                        s.reason if s.status != "healthy" else "",
                    )
                    for s in servers
                ),
                wrap=[6],
            )
    return 0


def _drain(sdk: ComfyUISDK, args: argparse.Namespace) -> int:
    """`servers drain|undrain ID`: set or clear the flag; with --wait, until the server is empty."""
    if args.verb == "undrain":
        server = sdk.undrain_server(args.server_id)
    else:
        server = sdk.drain_server(args.server_id)
        if args.wait:
            server = _wait_drained(sdk, args, server)
            if not server.draining:
                return _fail(
                    args, EXIT_REFUSED, "undrained", f"server {args.server_id} was undrained"
                )
            if server.jobs_held != 0:
                return _fail(
                    args,
                    EXIT_REFUSED,
                    "timeout",
                    f"server {args.server_id} still holds "
                    f"{'its' if server.jobs_held is None else server.jobs_held} jobs "
                    f"after {args.timeout:g} s",
                )
    if args.json:
        render.emit_json(server)
    else:
        print(render.drain_line(server))
    return 0


def _wait_drained(sdk: ComfyUISDK, args: argparse.Namespace, server: ServerHealth) -> ServerHealth:
    """Wait until the server holds no job (or is undrained, or --timeout passes), saying on
    stderr how many it still holds whenever that changes."""
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    said: int | None = -1
    while server.draining and server.jobs_held != 0:
        if not args.json and server.jobs_held != said:
            said = server.jobs_held
            render.err().print(f"[dim]{escape(render.drain_line(server))}[/dim]")
        step = _WAIT_STEP_S if deadline is None else min(_WAIT_STEP_S, deadline - time.monotonic())
        if step <= 0:
            break
        server = sdk.wait_drained(args.server_id, timeout=step)
    return server


def _jobs(args: argparse.Namespace) -> int:
    with _sdk(args) as sdk:
        if args.verb in {"show", "cancel"}:
            result = sdk.get_status(args.job_id) if args.verb == "show" else sdk.cancel(args.job_id)
            if args.json:
                render.emit_json(result)
            else:
                _print_result(result)
            return 0
        jobs = sdk.list_jobs(limit=args.limit, status=args.status, server=args.server)
    if args.json:
        render.emit_json(jobs)
        return 0
    render.table(
        ("job", "status", "server", "submitted", "run s", "error"),
        (
            (
                job["job_id"],
                job["status"],
                job.get("server_id"),
                job.get("submitted_at"),
                job.get("duration_s"),
                job.get("error_message"),
            )
            for job in jobs
        ),
        wrap=[5],
    )
    return 0


def _logs_show(args: argparse.Namespace) -> int:
    try:
        with _sdk(args) as sdk:
            log = sdk.get_logs(args.job_id)
        path, entries = str(log.get("log_file_path") or ""), list(log.get("entries") or [])
    except (ApiError, GatewayUnreachable) as exc:
        unanswered = isinstance(exc, GatewayUnreachable) or exc.code == "no_log_sink"
        local = paths.find_log_file(args.data_dir, args.job_id) if args.data_dir else None
        if not unanswered or local is None:
            raise
        render.err().print(f"[dim]{escape(str(exc))}; reading {escape(str(local))}[/dim]")
        path = str(local)
        entries = [json.loads(line) for line in local.read_bytes().splitlines() if line.strip()]
        entries.sort(key=lambda entry: int(entry.get("seq", 0)))
    if args.json:
        render.emit_json({"job_id": args.job_id, "log_file_path": path, "entries": entries})
    else:
        render.timeline(args.job_id, path, entries, show_all=args.all)
    return 0


def _logs_sql(args: argparse.Namespace) -> int:
    with _sdk(args) as sdk:
        result = sdk.query_logs(args.sql, max_rows=args.max_rows, timeout_s=args.timeout)
    if args.json:
        render.emit_json(result)
        return 0
    columns = result.get("columns") or []
    rows = result.get("rows") or []
    render.table(
        [str(column["name"]) for column in columns],
        rows,
        wrap=[i for i in range(len(columns)) if any(len(render.cell(row[i])) > 60 for row in rows)],
    )
    note = f"{len(result.get('rows') or [])} rows in {float(result.get('elapsed_ms') or 0):.1f} ms"
    if result.get("truncated"):
        note += " (truncated: raise --max-rows or add LIMIT)"
    render.err().print(f"[dim]{note}[/dim]")
    return 0
