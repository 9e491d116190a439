"""Client commands of the CLI: submit, servers, jobs. They talk to a gateway through the SDK."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from sdk import ComfyAutomateError, ComfyUISDK, JobResult

GATEWAY_ENV = "COMFYAUTOMATE_GATEWAY_URL"
_err = Console(stderr=True)


def _gateway_options() -> argparse.ArgumentParser:
    """Options every client command takes, wherever they stand on the line."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument(
        "--gateway",
        default=os.environ.get(GATEWAY_ENV, "http://127.0.0.1:8000"),
        help=f"gateway URL (default ${GATEWAY_ENV} or http://127.0.0.1:8000)",
    )
    parser.add_argument("--api-key", default=os.environ.get("COMFYAUTOMATE_API_KEY"))
    return parser


def add_parsers(commands: Any) -> None:
    """Add `submit`, `servers` and `jobs` to the CLI's subcommands."""
    common = _gateway_options()
    submit = commands.add_parser(
        "submit",
        parents=[common],
        help="submit a workflow (API format JSON); --wait shows live progress",
        description="Submit a workflow. Without --wait, prints the job id and returns.",
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
    submit.set_defaults(handler=_submit)

    servers = commands.add_parser("servers", help="list, add or remove ComfyUI servers")
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
    servers.set_defaults(handler=_servers)

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
    jobs.set_defaults(handler=_jobs)


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
            raise SystemExit(f"comfyautomate: {what} {item!r} must look like KEY=VALUE")
        pairs[key] = value
    return pairs


def _submit(args: argparse.Namespace) -> int:
    overrides = {k: _value(v) for k, v in _pairs(args.set, "--set").items()}
    inputs = {name: Path(path) for name, path in _pairs(args.input, "--input").items()}
    options = {
        "overrides": overrides,
        "inputs": inputs,
        "server": args.server,
        "priority": args.priority,
    }
    with ComfyUISDK(args.gateway, api_key=args.api_key) as sdk:
        try:
            job_id = sdk.submit_workflow(args.workflow, **options)
            if not args.wait:
                print(job_id)
                return 0
            _follow(sdk, job_id)
            result = sdk.get_result(job_id)
            _print_result(result)
            if result.status == "succeeded" and args.out is not None:
                for path in sdk.download_outputs(result, args.out):
                    print(path)
        except ComfyAutomateError as exc:
            _err.print(f"[red]error:[/red] {exc}")
            return 1
    return 0 if result.status == "succeeded" else 1


def _follow(sdk: ComfyUISDK, job_id: str) -> None:
    """A live bar per node, from the job's events."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=_err, transient=False) as progress:
        status = progress.add_task(f"job {job_id[:8]}: queued", total=None)
        nodes: dict[str, TaskID] = {}
        for event in sdk.stream_events(job_id):
            kind, data = event["type"], event.get("data", {})
            if kind in {"dispatched", "running", "succeeded", "failed", "cancelled", "retried"}:
                where = f" on {event.get('server_id')}" if event.get("server_id") else ""
                progress.update(status, description=f"job {job_id[:8]}: {kind}{where}")
            if kind == "node_started":
                label = f"  node {data['node_id']} {data.get('class_type') or ''}"
                nodes[data["node_id"]] = progress.add_task(label, total=1)
            elif kind == "node_progress" and data["node_id"] in nodes:
                progress.update(nodes[data["node_id"]], completed=data["value"], total=data["max"])
            elif kind in {"node_output", "node_cached"}:
                for node_id in data.get("node_ids", [data.get("node_id")]):
                    if node_id in nodes:
                        task = progress.tasks[nodes[node_id]]
                        progress.update(nodes[node_id], completed=task.total or 1)
        progress.update(status, total=1, completed=1)


def _print_result(result: JobResult) -> None:
    colour = "green" if result.status == "succeeded" else "red"
    _err.print(f"[{colour}]{result.status}[/{colour}] job {result.job_id} on {result.server_id}")
    if result.error is not None:
        where = f" (node {result.error.node_id})" if result.error.node_id else ""
        _err.print(f"[red]{result.error.code}{where}: {result.error.message}[/red]")
    for url in result.images:
        print(url)
    _err.print(f"log: {result.log_file_path}")


def _servers(args: argparse.Namespace) -> int:
    with ComfyUISDK(args.gateway, api_key=args.api_key) as sdk:
        try:
            if args.verb == "add":
                record = sdk.register_server(
                    args.name,
                    args.address,
                    capacity=args.capacity,
                    weight=args.weight,
                    labels=_pairs(args.label, "--label"),
                )
                print(record.server_id)
            elif args.verb == "remove":
                sdk.remove_server(args.server_id)
            else:
                table = Table("server", "address", "status", "running", "pending", "capacity")
                for s in sdk.list_servers():
                    table.add_row(
                        s.server_id,
                        s.address or "(admins only)",
                        s.status,
                        str(s.queue_running),
                        str(s.queue_pending),
                        str(s.capacity),
                    )
                Console().print(table)
        except ComfyAutomateError as exc:
            _err.print(f"[red]error:[/red] {exc}")
            return 1
    return 0


def _jobs(args: argparse.Namespace) -> int:
    with ComfyUISDK(args.gateway, api_key=args.api_key) as sdk:
        try:
            if args.verb == "show":
                _print_result(sdk.get_status(args.job_id))
            elif args.verb == "cancel":
                _print_result(sdk.cancel(args.job_id))
            else:
                params = {"limit": args.limit, "status": args.status, "server": args.server}
                jobs = sdk.list_jobs(**params)
                table = Table("job", "status", "server", "submitted", "run s", "error")
                for job in jobs:
                    run = job.get("duration_s")
                    table.add_row(
                        job["job_id"],
                        job["status"],
                        job.get("server_id") or "",
                        str(job.get("submitted_at") or ""),
                        f"{run:.2f}" if isinstance(run, float) else "",
                        job.get("error_message") or "",
                    )
                Console().print(table)
        except ComfyAutomateError as exc:
            _err.print(f"[red]error:[/red] {exc}")
            return 1
    return 0
