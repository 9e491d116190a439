"""Process life: logging set-up and turning SIGINT/SIGTERM into an event to wait on."""

from __future__ import annotations

import asyncio
import io
import logging
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


def setup_logging(level: str = "INFO") -> None:
    """One log format for every role, on stderr."""
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )
    # One line per HTTP request to ComfyUI drowns what matters; their failures still show.
    logging.getLogger("httpx").setLevel(logging.WARNING)


@contextmanager
def stop_on_signals(stop: asyncio.Event) -> Iterator[None]:
    """Set `stop` on SIGINT or SIGTERM for the duration of the block, then restore defaults.

    A second signal while stopping is left to the event loop's handler, so a stuck shutdown can
    still be interrupted by pressing Ctrl-C again.
    """
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM)

    def on_signal(signum: signal.Signals) -> None:
        logging.getLogger(__name__).info("%s received; stopping", signum.name)
        stop.set()
        for sig in signals:
            loop.remove_signal_handler(sig)

    for sig in signals:
        loop.add_signal_handler(sig, on_signal, sig)
    # `kill -USR1 PID` shows what every task is waiting on: the tool for a stuck shutdown.
    loop.add_signal_handler(signal.SIGUSR1, _dump_tasks)
    try:
        yield
    finally:
        for sig in (*signals, signal.SIGUSR1):
            loop.remove_signal_handler(sig)


def _dump_tasks() -> None:
    out = io.StringIO()
    tasks = asyncio.all_tasks()
    out.write(f"--- {len(tasks)} asyncio tasks ---\n")
    for task in tasks:
        task.print_stack(limit=6, file=out)
    logging.getLogger(__name__).warning("%s", out.getvalue())


async def wait_event(event: asyncio.Event, within: float) -> bool:
    """Wait up to `within` seconds for `event`; True if it is set.

    Built on asyncio.timeout rather than wait_for: on Python 3.11, wait_for can turn a
    cancellation that races its time-out into a TimeoutError, and a loop that ignores time-outs
    then never stops.
    """
    try:
        async with asyncio.timeout(within):
            await event.wait()
    except TimeoutError:
        return False
    return True


async def stop_tasks(*tasks: asyncio.Task[Any]) -> None:
    """Cancel `tasks` and return once every one has ended.

    A cancellation can be lost inside a library call (nats-py turns some into other errors, and
    3.11's wait_for can swallow one), so the request is repeated until each task is done. If the
    caller is cancelled meanwhile, it still waits for them, then re-raises.
    """
    interrupted = False
    while running := [task for task in tasks if not task.done()]:
        for task in running:
            task.cancel()
        try:
            await asyncio.wait(running, timeout=1.0)
        except asyncio.CancelledError:
            interrupted = True
    if interrupted:
        raise asyncio.CancelledError
