"""`comfyautomate adapter` (and `python -m plugins.comfyui`): one server's adapter as a process."""

from __future__ import annotations

import argparse
import asyncio
import logging
from typing import Any

from gateway.bus.connection import session
from gateway.bus.contract import Subjects
from gateway.bus.process import run_role
from gateway.settings import Settings, SettingsError, load_settings
from plugins.comfyui.adapter import run_adapter
from plugins.comfyui.options import AdapterOptions

__all__ = ["add_arguments", "add_parser", "main", "parse_labels", "run_adapter"]

_DESCRIPTION = """\
Run the adapter of one ComfyUI server: take the jobs the balancer binds to it from NATS, run
them on ComfyUI, publish their progress and store their outputs, and heartbeat its health.
Stops on SIGINT/SIGTERM, letting running jobs finish within --grace seconds.
"""

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The adapter's options, for any parser."""
    parser.add_argument("--server-id", required=True, help="the server's id on the bus")
    parser.add_argument("--address", required=True, metavar="HOST:PORT", help="ComfyUI address")
    parser.add_argument("--capacity", type=int, help="jobs bound at once (default 2)")
    parser.add_argument("--weight", type=float, default=1.0, help="relative speed (default 1)")
    parser.add_argument(
        "--label",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a label jobs can require (repeatable)",
    )
    parser.add_argument("--config", help="TOML settings file")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING (default INFO)")
    parser.add_argument("--nats-url", help="NATS server URL (default nats://127.0.0.1:4222)")
    parser.add_argument(
        "--nats-replicas",
        help="copies of each stream and bucket: 1, 3 on a cluster, or auto (default 1)",
    )
    parser.add_argument("--data-dir", help="where the local storage keeps outputs (default ./data)")
    parser.add_argument("--prefix", dest="subject_prefix", help="subject prefix (default comfy)")
    parser.add_argument("--storage", help="storage backend for outputs: local, nats, ...")
    parser.add_argument("--grace", type=float, help="seconds running jobs get on shutdown (30)")
    parser.add_argument("--ack-wait", type=float, help="seconds before JetStream redelivers (30)")
    parser.add_argument(
        "--job-timeout", type=float, help="default job timeout in s of running (3600)"
    )
    parser.add_argument(
        "--start-wait",
        type=float,
        help="seconds a job may wait in ComfyUI's queue before it is handed back (3600)",
    )
    parser.add_argument(
        "--comfyui-input-dir",
        metavar="DIR",
        help="ComfyUI's input folder, if this machine sees it: jobs' input files are deleted "
        "after them (otherwise they are emptied through ComfyUI's API)",
    )


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the `adapter` command to a CLI's subparsers; its handler returns an exit code."""
    parser = subparsers.add_parser(
        "adapter",
        help="run the adapter of one ComfyUI server",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    parser.set_defaults(handler=main)


def parse_labels(items: list[str]) -> dict[str, str]:
    """`["gpu=a100", "zone=eu"]` as a dict; SettingsError for an item without `=`."""
    labels = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SettingsError(f"--label {item!r} must look like key=value")
        labels[key.strip()] = value.strip()
    return labels


_FLAGS = {
    "grace_s": "--grace",
    "ack_wait_s": "--ack-wait",
    "default_timeout_s": "--job-timeout",
    "start_wait_s": "--start-wait",
}


def _options(args: argparse.Namespace) -> AdapterOptions:
    changes: dict[str, Any] = {}
    if args.grace is not None:
        changes["grace_s"] = args.grace
    if args.ack_wait is not None:
        changes["ack_wait_s"] = args.ack_wait
    if args.job_timeout is not None:
        changes["default_timeout_s"] = args.job_timeout
    if args.start_wait is not None:
        changes["start_wait_s"] = args.start_wait
    if args.comfyui_input_dir is not None:
        changes["comfyui_input_dir"] = args.comfyui_input_dir
    try:
        return AdapterOptions(**changes)
    except SettingsError as exc:
        # Named as the flag that set it, which is what the user typed.
        name = str(exc).split(" ", 1)[0]
        raise SettingsError(str(exc).replace(name, _FLAGS.get(name, name), 1)) from None


def main(args: argparse.Namespace) -> int:
    """Run the adapter until SIGINT/SIGTERM; the exit code (1 when NATS does not answer)."""
    flags = {
        name: getattr(args, name, None)
        for name in ("nats_url", "nats_replicas", "data_dir", "subject_prefix", "storage")
    }
    settings = load_settings(flags, config_file=args.config)
    labels = parse_labels(args.label)
    options = _options(args)
    capacity = args.capacity if args.capacity is not None else settings.default_capacity
    if settings.storage == "local":
        # An adapter alone is usually on a GPU box: its outputs would land on that box, and a
        # gateway elsewhere would answer 404 for every image URL.
        log.warning(
            "storage is local: outputs are kept under %s on this machine, and only a gateway "
            "that reads the same folder can serve them; on a fleet use storage = nats "
            "(--storage nats) or a shared folder",
            settings.data_path / "outputs",
        )

    async def role(settings: Settings, url: str, stop: asyncio.Event) -> None:
        subjects = Subjects(settings.subject_prefix)
        async with session(
            url,
            f"adapter-{args.server_id}",
            subjects,
            user=settings.nats_user,
            password=settings.nats_password,
            replicas=settings.nats_replicas,
        ) as nc:
            await run_adapter(
                nc,
                settings,
                stop,
                server_id=args.server_id,
                address=args.address,
                capacity=capacity,
                weight=args.weight,
                labels=labels,
                options=options,
            )

    return run_role(settings, role)
