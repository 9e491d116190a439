"""Command-line entry points: `comfyautomate logsink` and `comfyautomate logs rebuild`.

`logs show` and `logs sql` ask the gateway like every client command (gateway/app/clientcli.py).

gateway/app/cli.py calls `add_parsers(subcommands)`; every command sets `handler` to a function
taking the parsed arguments and returning an exit code.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from rich.console import Console
from rich.markup import escape

from gateway.lifecycle import stop_on_signals
from gateway.logsink import paths
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


def add_parsers(subparsers: Any) -> Any:
    """Add `logsink` and `logs rebuild` to the `comfyautomate` subcommands; return the `logs`
    subcommands, where the client commands add `show` and `sql`."""
    sink = subparsers.add_parser(
        "logsink",
        help="run the log sink (JSONL files, DuckDB index, SQL queries)",
        description="Consume every event into one JSONL file per job and the DuckDB index, "
        "and answer log queries, until Ctrl-C.",
    )
    add_sink_arguments(sink)

    logs = subparsers.add_parser("logs", help="show a job's log, run SQL, rebuild the index")
    commands = logs.add_subparsers(dest="logs_command", metavar="COMMAND", required=True)
    rebuild = commands.add_parser(
        "rebuild",
        help="rebuild the index from the JSONL files (stop the log sink first)",
    )
    _common(rebuild)
    rebuild.set_defaults(handler=rebuild_command)
    return commands


def _settings(args: argparse.Namespace) -> Settings:
    fields = set(Settings.__struct_fields__)
    flags = {key: value for key, value in vars(args).items() if key in fields}
    return load_settings(flags, config_file=args.config)


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
