"""The `comfyautomate` command: one entry point, a subcommand per role or task."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Coroutine, Sequence
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
    parser.add_argument(
        "--nats-replicas",
        help="copies of each stream and bucket: 1, 3 on a cluster, or auto (default 1)",
    )
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
    up.add_argument(
        "--comfyui",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="a ComfyUI server to use (repeatable); more can be registered later by the API",
    )
    up.add_argument(
        "--simulate",
        type=int,
        default=0,
        metavar="N",
        help="also start N fake ComfyUI servers (no GPU needed) and use them",
    )
    up.add_argument(
        "--join",
        action="store_true",
        help="run beside a system already on this broker and prefix, as more of its roles",
    )
    up.set_defaults(handler=_run_up)

    gateway = commands.add_parser(
        "gateway",
        help="run the REST gateway (with a balancer inside, unless --no-balancer)",
        description="Serve the REST API; by default also answer comfy.submit and dispatch jobs.",
    )
    _common(gateway)
    gateway.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    gateway.add_argument("--port", type=int, help="port to listen on (default 8000)")
    gateway.add_argument(
        "--no-balancer", action="store_true", help="serve REST only; run balancers elsewhere"
    )
    gateway.set_defaults(handler=_run_gateway)

    balancer = commands.add_parser(
        "balancer",
        help="run a balancer alone (answers comfy.submit, dispatches jobs)",
        description="A balancer without the REST API; run as many as you like on one NATS.",
    )
    _common(balancer)
    balancer.set_defaults(handler=_run_balancer)

    cluster = commands.add_parser(
        "nats-cluster",
        help="run a local JetStream cluster of nats-server nodes, to try a fleet's broker",
        description="Start NODES nats-server processes on this machine, clustered, each with "
        "its own store under DATA_DIR/nats-cluster, until Ctrl-C.",
    )
    cluster.add_argument("--config", help="TOML settings file")
    cluster.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING")
    cluster.add_argument("--data-dir", help="the nodes' stores go under here (default ./data)")
    cluster.add_argument("--nodes", type=int, default=3, help="how many nodes (default 3)")
    cluster.add_argument("--host", default="127.0.0.1", help="address to listen on")
    cluster.add_argument(
        "--port", type=int, default=4222, help="first client port; node N gets PORT+N-1"
    )
    cluster.set_defaults(handler=_run_nats_cluster)

    from gateway.app import clientcli
    from gateway.logsink import cli as logsink_cli
    from plugins.comfyui import cli as adapter_cli
    from plugins.simulator import cli as simulator_cli

    adapter_cli.add_parser(commands)
    logs = logsink_cli.add_parsers(commands)
    clientcli.add_parsers(commands)
    clientcli.add_log_parsers(logs)

    simulator_cli.add_parser(commands)
    commands.choices["simulate"].set_defaults(handler=simulator_cli.run)
    return parser


def _settings_from(args: argparse.Namespace) -> Settings:
    fields = {name for name in Settings.__struct_fields__}
    flags: dict[str, Any] = {k: v for k, v in vars(args).items() if k in fields}
    return load_settings(flags, config_file=args.config)


def _run_up(args: argparse.Namespace) -> int:
    from gateway.app.up import up

    return up(
        _settings_from(args),
        comfyui=args.comfyui,
        simulate=args.simulate,
        join=args.join,
    )


def _run_nats_cluster(args: argparse.Namespace) -> int:
    from pathlib import Path

    from gateway.app.brokers import run_nats_cluster
    from gateway.bus.natsserver import DEFAULT_CONF

    settings = _settings_from(args)
    if args.nodes < 1:
        raise SettingsError("--nodes must be at least 1")
    conf = Path(settings.nats_conf) if settings.nats_conf else DEFAULT_CONF
    asyncio.run(
        run_nats_cluster(
            settings.data_path, nodes=args.nodes, host=args.host, first_port=args.port, config=conf
        )
    )
    return 0


def _run_role(args: argparse.Namespace, role: Callable[..., Coroutine[Any, Any, None]]) -> int:
    from gateway.bus.process import run_role

    return run_role(_settings_from(args), role)


def _run_gateway(args: argparse.Namespace) -> int:
    from gateway.app.serve import run_gateway

    async def role(settings: Settings, url: str, stop: asyncio.Event) -> None:
        await run_gateway(settings, url, stop, with_balancer=not args.no_balancer)

    return _run_role(args, role)


def _run_balancer(args: argparse.Namespace) -> int:
    from gateway.app.serve import run_balancer

    return _run_role(args, run_balancer)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line, run the chosen command, return its exit code."""
    args = build_parser().parse_args(argv)
    if args.command != "simulate":  # the simulator sets up its own logging
        setup_logging(getattr(args, "log_level", "WARNING"))
    try:
        code: int = args.handler(args)
    except (SettingsError, ExceptionGroup) as exc:
        # A role that cannot start raises inside the task group that runs it.
        why = _settings_error(exc)
        if why is None:
            raise
        print(f"comfyautomate: {why}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code


def _settings_error(exc: BaseException) -> SettingsError | None:
    """The SettingsError that `exc` is or holds (in exception groups), if any."""
    if isinstance(exc, SettingsError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _settings_error(inner)
            if found is not None:
                return found
    return None


if __name__ == "__main__":
    sys.exit(main())
