"""Small helpers for tests that watch processes. Waits are on events with a deadline."""

from __future__ import annotations

import asyncio
import os
import select
from collections.abc import Awaitable, Callable


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_pid_gone(pid: int, timeout: float) -> bool:
    """Wait until process `pid` has exited (any process, not only our child). True if it did.

    A pidfd becomes readable when the process exits, so this wakes on the event itself.
    """
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(timeout * 1000))
    finally:
        os.close(fd)


async def poll_until(
    check: Callable[[], Awaitable[bool]], what: str, *, within: float = 20.0, every: float = 0.05
) -> None:
    """Ask another component until `check` holds; fail after `within` seconds.

    For state that shows only through another process's API (what a gateway thinks of a server,
    how far a consumer has acknowledged); each try is a real request, not a sleep standing in for
    an event, and the pause between tries only keeps the loop from spinning.
    """
    try:
        async with asyncio.timeout(within):
            while not await check():  # noqa: ASYNC110 - paced retries of a real request
                await asyncio.sleep(every)
    except TimeoutError:
        raise AssertionError(f"not within {within} s: {what}") from None
