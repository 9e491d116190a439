"""A circuit breaker: a server that fails several jobs in a row through no fault of theirs is
taken out of the fleet for a while, then tried again with one job.

    closed ──(TRIP_AFTER server faults in a row)──▶ open ──(cooldown over)──▶ probing
      ▲                                               ▲                         │
      └────────────────(a job succeeds)───────────────┼─────────────────────────┤
                                                      └───(a server fault)──────┘

A server fault is a failure that says nothing about the job, of a server that answers: ComfyUI
answering POST /prompt with a server error, or storing its outputs failing (a full disk). A
server that does not answer at all is the health check's business (it is reported unhealthy
while it does not answer, and healthy again once it does: a restarted ComfyUI works at once).
A job's own failure (a node error, a bad input) changes nothing. While open, the adapter's
heartbeat says unhealthy with the reason, so no balancer sends it work; the server's answering
health checks alone do not close it. Each trip from probing doubles the cooldown, up to a cap.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Final

log = logging.getLogger(__name__)

TRIP_AFTER: Final = 3
FIRST_COOLDOWN_S: Final = 30.0
MAX_COOLDOWN_S: Final = 600.0


class Breaker:
    """Counts a server's faults in a row and says when it must get no work."""

    def __init__(
        self,
        *,
        trip_after: int = TRIP_AFTER,
        cooldown_s: float = FIRST_COOLDOWN_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._trip_after = trip_after
        self._first_cooldown = cooldown_s
        self._cooldown = cooldown_s
        self._clock = clock
        self._faults = 0
        self._last_fault = ""
        self._open_until: float | None = None  # set while open or probing

    def succeeded(self) -> None:
        """A job succeeded here: the server works."""
        if self._open_until is not None:
            log.info("the server works again: its circuit is closed")
        self._faults = 0
        self._open_until = None
        self._cooldown = self._first_cooldown

    def server_fault(self, reason: str) -> None:
        """A job failed here through the server's fault."""
        self._faults += 1
        self._last_fault = reason
        now = self._clock()
        probing = self._open_until is not None and now >= self._open_until
        if probing:
            self._cooldown = min(MAX_COOLDOWN_S, self._cooldown * 2)
        if probing or (self._open_until is None and self._faults >= self._trip_after):
            self._open_until = now + self._cooldown
            log.warning("taking the server out for %.0f s: %s", self._cooldown, self.reason())

    def reason(self) -> str | None:
        """Why the server must get no work now; None when it may (closed, or probing)."""
        if self._open_until is None:
            return None
        left = self._open_until - self._clock()
        if left <= 0:
            return None  # probing: the next job tells
        return (
            f"{self._faults} jobs in a row failed through the server "
            f"(last: {self._last_fault}); tried again in {left:.0f} s"
        )
