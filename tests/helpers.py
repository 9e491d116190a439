"""Small helpers for tests that watch processes. Waits are on events with a deadline."""

from __future__ import annotations

import os
import select


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
