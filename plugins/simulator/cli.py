"""The `simulate` command: run a fake ComfyUI server in the foreground."""

from __future__ import annotations

import argparse
import asyncio
import logging

import msgspec

from .config import SimulatorConfig, load_config
from .server import Simulator, serve


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the `simulate` command to a CLI's subparsers."""
    parser = subparsers.add_parser(
        "simulate", help="run a fake ComfyUI server", description=__doc__
    )
    add_arguments(parser)
    parser.set_defaults(func=run)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8188, help="0 picks a free port")
    parser.add_argument("--config", metavar="FILE", help="a JSON or TOML SimulatorConfig")
    parser.add_argument("--node-seconds", type=float, help="time every node takes")
    parser.add_argument("--step-seconds", type=float, help="time per progress step")
    parser.add_argument("--speed", type=float, help="2.0 runs twice as fast")
    parser.add_argument("--base-dir", help="where comfy-output, comfy-input, comfy-temp go")
    parser.add_argument(
        "--fail-node",
        action="append",
        default=[],
        metavar="CLASS_OR_ID",
        help="nodes that end with an execution_error (repeatable)",
    )
    parser.add_argument("--fail-message", help="exception message of injected failures")
    parser.add_argument("--crash-on-node", metavar="CLASS_OR_ID", help="exit when it starts")
    parser.add_argument("--crash-after-prompts", type=int, metavar="N")
    parser.add_argument("--hang-queue", action="store_true", help="accept, never run")
    parser.add_argument("--hang-http", action="store_true", help="never answer")
    parser.add_argument("--drop-ws-every", type=float, metavar="SECONDS")
    parser.add_argument("--drop-ws-on", metavar="MESSAGE_TYPE")
    parser.add_argument("--log-level", default="WARNING")


def build_config(args: argparse.Namespace) -> SimulatorConfig:
    """The config file (if any) with the command-line flags applied on top."""
    config = load_config(args.config) if args.config else SimulatorConfig()
    changes: dict[str, object] = {"crash_exits_process": True}
    optional = {
        "node_seconds": args.node_seconds,
        "step_seconds": args.step_seconds,
        "speed": args.speed,
        "base_dir": args.base_dir,
        "fail_exception_message": args.fail_message,
        "crash_on_node": args.crash_on_node,
        "crash_after_prompts": args.crash_after_prompts,
        "drop_ws_every_seconds": args.drop_ws_every,
        "drop_ws_on_message": args.drop_ws_on,
    }
    changes.update({k: v for k, v in optional.items() if v is not None})
    if args.fail_node:
        changes["fail_nodes"] = [*config.fail_nodes, *args.fail_node]
    if args.hang_queue:
        changes["hang_queue"] = True
    if args.hang_http:
        changes["hang_http"] = True
    return msgspec.structs.replace(config, **changes)


def run(args: argparse.Namespace) -> int:
    """Run until SIGINT/SIGTERM; prints one line with the URL once listening."""
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s %(message)s")
    config = build_config(args)

    def ready(simulator: Simulator) -> None:
        print(f"ComfyUI simulator listening on {simulator.url}", flush=True)

    return asyncio.run(serve(config, args.host, args.port, ready=ready))
