"""How callers share the fleet: each one's weight and cap, and the bounds of the pending queue.

A caller is the opaque id a job records (`JobRecord.caller`: an API key's name, `key-<hmac>`,
`anonymous`); jobs published on the bus without one share the caller `NO_CALLER`. Every
balancer of a system reads the same settings, so any of them may lead or admit.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

import msgspec

from gateway.settings import Settings

# The caller of jobs that name none (published on the bus directly).
NO_CALLER: Final = ""


def caller_key(caller: str | None) -> str:
    """The caller a job is counted under."""
    return caller or NO_CALLER


class Shares(msgspec.Struct, frozen=True, kw_only=True):
    """Each caller's weight and cap, and the bounds on waiting jobs (0: none)."""

    weights: Mapping[str, float] = msgspec.field(default_factory=dict)
    max_running: int = 0
    caller_max_running: Mapping[str, int] = msgspec.field(default_factory=dict)
    max_pending_per_caller: int = 0
    max_pending: int = 0

    def weight(self, caller: str) -> float:
        """The caller's weight: its share of the bindings while several callers wait."""
        return self.weights.get(caller, 1.0)

    def cap(self, caller: str) -> int | None:
        """Jobs of the caller that may be bound at once; None: no cap."""
        cap = self.caller_max_running.get(caller, self.max_running)
        return cap or None

    @property
    def bounded(self) -> bool:
        """Whether submissions are checked against a bound on waiting jobs."""
        return bool(self.max_pending_per_caller or self.max_pending)


def shares_of(settings: Settings) -> Shares:
    """The shares the settings describe (the settings checked their ranges already)."""
    return Shares(
        weights=dict(settings.caller_weights),
        max_running=settings.max_running_per_caller,
        caller_max_running=dict(settings.caller_max_running),
        max_pending_per_caller=settings.max_pending_per_caller,
        max_pending=settings.max_pending,
    )
