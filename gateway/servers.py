"""The live table of servers: registrations from KV, liveness and load from heartbeats.

Every gateway replica keeps one, fed by the heartbeat subject and a watch on KV
`comfy_servers`; the submit path uses it to refuse jobs no server could ever run, the dispatcher
to place jobs, the REST API to report health. A server whose last heartbeat is older than three
of its intervals is stale and gets no new work.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Final

import msgspec

from gateway.contract import Capabilities, Heartbeat, ServerRecord

STALE_AFTER_INTERVALS: Final = 3
_SPEED_SMOOTHING: Final = 0.3  # weight of the newest job duration in the running estimate


class ServerState(msgspec.Struct, kw_only=True):
    """What one replica knows of one server."""

    server_id: str
    record: ServerRecord | None = None
    heartbeat: Heartbeat | None = None
    seen_at: float = 0.0  # monotonic time of the last heartbeat
    capabilities: Capabilities | None = None
    capabilities_hash: str = ""
    seconds_per_job: float | None = None  # smoothed run time of its recent jobs

    @property
    def address(self) -> str:
        if self.heartbeat is not None:
            return self.heartbeat.address
        return self.record.address if self.record is not None else ""

    @property
    def name(self) -> str:
        return self.record.name if self.record is not None else self.server_id

    @property
    def labels(self) -> dict[str, str]:
        if self.record is not None and self.record.labels:
            return self.record.labels
        return self.heartbeat.labels if self.heartbeat is not None else {}

    @property
    def capacity(self) -> int:
        if self.record is not None:
            return self.record.capacity
        return self.heartbeat.capacity if self.heartbeat is not None else 0

    @property
    def weight(self) -> float:
        if self.record is not None:
            return self.record.weight
        return self.heartbeat.weight if self.heartbeat is not None else 1.0

    def age(self, now: float) -> float | None:
        """Seconds since the last heartbeat, or None if none was ever seen."""
        return None if self.heartbeat is None else now - self.seen_at

    def is_live(self, now: float) -> bool:
        """Heartbeating recently and reporting itself healthy."""
        if self.heartbeat is None or not self.heartbeat.healthy:
            return False
        return now - self.seen_at <= STALE_AFTER_INTERVALS * self.heartbeat.interval_s

    def is_stale(self, now: float) -> bool:
        """It heartbeated once, but not for three of its intervals."""
        if self.heartbeat is None:
            return False
        return now - self.seen_at > STALE_AFTER_INTERVALS * self.heartbeat.interval_s

    def status(self, now: float) -> str:
        if self.heartbeat is None:
            return "unknown"
        if self.is_stale(now):
            return "offline"
        return "healthy" if self.heartbeat.healthy else "unhealthy"


class ServerTable:
    """All servers one replica knows of, by id."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._servers: dict[str, ServerState] = {}
        self._clock = clock

    def now(self) -> float:
        return self._clock()

    def __iter__(self) -> Iterator[ServerState]:
        return iter(list(self._servers.values()))

    def __len__(self) -> int:
        return len(self._servers)

    def get(self, server_id: str) -> ServerState | None:
        return self._servers.get(server_id)

    def _state(self, server_id: str) -> ServerState:
        state = self._servers.get(server_id)
        if state is None:
            state = self._servers[server_id] = ServerState(server_id=server_id)
        return state

    def on_heartbeat(self, beat: Heartbeat) -> bool:
        """Record a heartbeat; True when it carries capabilities we do not have yet."""
        state = self._state(beat.server_id)
        state.heartbeat = beat
        state.seen_at = self.now()
        if beat.capabilities is not None:
            state.capabilities = beat.capabilities
            state.capabilities_hash = beat.capabilities_hash
            return False
        return beat.capabilities_hash != state.capabilities_hash

    def on_capabilities(self, server_id: str, capabilities: Capabilities, digest: str) -> None:
        state = self._state(server_id)
        state.capabilities = capabilities
        state.capabilities_hash = digest

    def on_registered(self, record: ServerRecord) -> None:
        self._state(record.server_id).record = record

    def on_removed(self, server_id: str) -> None:
        self._servers.pop(server_id, None)

    def observe_run(self, server_id: str, seconds: float) -> None:
        """Fold one job's run time into the server's speed estimate."""
        state = self._servers.get(server_id)
        if state is None or seconds < 0:
            return
        if state.seconds_per_job is None:
            state.seconds_per_job = seconds
        else:
            state.seconds_per_job += _SPEED_SMOOTHING * (seconds - state.seconds_per_job)

    def live(self) -> list[ServerState]:
        now = self.now()
        return [s for s in self._servers.values() if s.is_live(now)]
