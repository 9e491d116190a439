"""The `comfyautomate` command: one entry point, a subcommand per role or task."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gateway.lifecycle import setup_logging
from gateway.settings import Settings, SettingsError, load_settings

_DESCRIPTION = """\
Run ComfyUI workflows across a fleet of GPU servers.

  comfyautomate up                 everything on this machine, embedded NATS included

Settings come from a TOML file (--config, $COMFYAUTOMATE_CONFIG or ./comfyautomate.toml),
environment variables COMFYAUTOMATE_<SETTING>, and flags; a flag wins.
"""


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="TOML settings file")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING (default INFO)")
    parser.add_argument("--nats-url", help="NATS server URL (default nats://127.0.0.1:4222)")
    parser.add_argument("--data-dir", help="logs, outputs and JetStream go here (default ./data)")
    parser.add_argument("--prefix", dest="subject_prefix", help="subject prefix (default comfy)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="comfyautomate",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    up = commands.add_parser(
        "up",
        help="run the whole system on this machine",
        description="Start NATS (unless one answers at --nats-url) and every role, "
        "until Ctrl-C. Nothing is left running afterwards.",
    )
    _common(up)
    up.add_argument("--host", help="address the gateway listens on (default 127.0.0.1)")
    up.add_argument("--port", type=int, help="port the gateway listens on (default 8000)")
    up.add_argument(
        "--no-embedded-nats",
        dest="embedded_nats",
        action="store_const",
        const=False,
        help="never start nats-server; fail if --nats-url does not answer",
    )
    up.add_argument("--ready-file", type=Path, help=argparse.SUPPRESS)
    up.set_defaults(handler=_run_up)
    return parser


def _settings_from(args: argparse.Namespace) -> Settings:
    fields = {name for name in Settings.__struct_fields__}
    flags: dict[str, Any] = {k: v for k, v in vars(args).items() if k in fields}
    return load_settings(flags, config_file=args.config)


def _run_up(args: argparse.Namespace) -> int:
    from gateway.up import up

    return up(_settings_from(args), ready_file=args.ready_file)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line, run the chosen command, return its exit code."""
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    try:
        code: int = args.handler(args)
    except SettingsError as exc:
        print(f"comfyautomate: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
