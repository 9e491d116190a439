"""Running one role as a process: settings in, signals handled, exit code out."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from gateway.bus.connection import shown_url
from gateway.bus.natsserver import answers
from gateway.lifecycle import stop_on_signals
from gateway.settings import Settings

log = logging.getLogger(__name__)

Role = Callable[[Settings, str, asyncio.Event], Coroutine[Any, Any, None]]


async def _main(settings: Settings, role: Role) -> int:
    if not await answers(settings.nats_url, within=2.0):
        log.error(
            "no NATS server answers at %s; start one (comfyautomate up starts its own) or "
            "give --nats-url",
            shown_url(settings.nats_url),
        )
        return 1
    stop = asyncio.Event()
    with stop_on_signals(stop):
        await role(settings, settings.nats_url, stop)
    return 0


def run_role(settings: Settings, role: Role) -> int:
    """Run `role` until SIGINT or SIGTERM; 1 when the broker cannot be reached."""
    return asyncio.run(_main(settings, role))
