"""`comfyautomate up`: the whole system on one machine, embedded NATS included."""

from __future__ import annotations

import asyncio
import logging
from contextlib import AsyncExitStack
from pathlib import Path

from gateway.bus import connect, ensure_resources
from gateway.contract import Subjects
from gateway.lifecycle import stop_on_signals
from gateway.natsserver import DEFAULT_CONF, embedded_nats
from gateway.settings import Settings

log = logging.getLogger(__name__)


async def run_up(settings: Settings, *, ready_file: Path | None = None) -> int:
    """Start every role in this process and run until SIGINT or SIGTERM; return an exit code.

    Shutdown unwinds in reverse order of start, so the broker is the last thing to stop and
    every role can hand back its work before it goes.
    """
    stop = asyncio.Event()
    with stop_on_signals(stop):
        async with AsyncExitStack() as stack:
            url = settings.nats_url
            if settings.embedded_nats:
                conf = Path(settings.nats_conf) if settings.nats_conf else DEFAULT_CONF
                url = await stack.enter_async_context(
                    embedded_nats(url, settings.data_path, config=conf)
                )
            nc = await connect(url, "comfyautomate-up")
            stack.push_async_callback(nc.close)
            await ensure_resources(nc.jetstream(), Subjects(settings.subject_prefix))
            summary = f"ComfyAutomate is up: NATS at {url}, data in {settings.data_path.resolve()}"
            log.info(summary)
            print(summary, flush=True)  # noqa: T201 - the one line a person waits for
            if ready_file is not None:
                ready_file.write_text(url)
            await stop.wait()
    return 0


def up(settings: Settings, *, ready_file: Path | None = None) -> int:
    """Synchronous entry point for the CLI."""
    return asyncio.run(run_up(settings, ready_file=ready_file))
