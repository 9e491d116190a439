"""`python -m gateway.logsink [flags]`: the log sink alone, as `comfyautomate logsink` runs it."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from gateway.lifecycle import setup_logging
from gateway.logsink.cli import add_sink_arguments
from gateway.settings import SettingsError


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway.logsink", description=__doc__)
    add_sink_arguments(parser)
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    try:
        code: int = args.handler(args)
    except SettingsError as exc:
        sys.stderr.write(f"gateway.logsink: {exc}\n")
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
