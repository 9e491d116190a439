"""`python -m plugins.comfyui --server-id S --address HOST:PORT`: one adapter on its own."""

import argparse
import sys

from gateway.lifecycle import setup_logging
from gateway.settings import SettingsError
from plugins.comfyui.cli import add_arguments, main


def _main() -> int:
    parser = argparse.ArgumentParser(prog="python -m plugins.comfyui", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args()
    setup_logging(args.log_level)
    try:
        return main(args)
    except SettingsError as exc:
        parser.error(str(exc))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(_main())
