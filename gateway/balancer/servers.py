"""The live table of servers: registrations from KV, liveness and load from heartbeats.

Every gateway replica keeps one, fed by the heartbeat subject and a watch on KV
`comfy_servers`; the submit path uses it to refuse jobs no server could ever run, the dispatcher
to place jobs, the REST API to report health. A server whose last heartbeat is older than three
of its intervals is stale and gets no new work; neither does a draining one (an admin's
choice, kept in its record), which still heartbeats and finishes what it holds.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from typing import Final

import msgspec

from gateway.balancer.costs import CostModel
from gateway.balancer.placement import hold
from gateway.bus.contract import Capabilities, Heartbeat, ServerRecord

STALE_AFTER_INTERVALS: Final = 3
# A server's speed is the median of its last few successful runs: one run stretched by a crash
# and a restart (or a hung ComfyUI) must not make it look slow for good.
_RUNS_REMEMBERED: Final = 5


class ServerState(msgspec.Struct, kw_only=True):
    """What one replica knows of one server."""

    server_id: str
    record: ServerRecord | None = None
    heartbeat: Heartbeat | None = None
    seen_at: float = 0.0  # monotonic time of the last heartbeat
    capabilities: Capabilities | None = None
    capabilities_hash: str = ""
    recent_runs: list[float] = msgspec.field(default_factory=list)  # seconds, newest last
    resident: list[str] = msgspec.field(default_factory=list)
    """Models it holds, most recently used first: its heartbeat's, and the jobs since."""
    model_slots: int | None = None

    @property
    def seconds_per_job(self) -> float | None:
        """Median run time of its recent successful jobs; None before the first."""
        return statistics.median(self.recent_runs) if self.recent_runs else None

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
    def draining(self) -> bool:
        """Taken out of service by an admin (its registry record says so): no new jobs."""
        return self.record is not None and self.record.draining

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
        self._listening_since = float("-inf")  # heartbeats are not stored: missed while away
        # Ids removed from the registry: their heartbeats (an adapter still stopping, or one
        # on a box nobody told) are ignored until the id is registered again.
        self._removed: set[str] = set()
        self.costs = CostModel()  # learnt by the leading balancer from the jobs it sees end
        # Removed id -> (monotonic time, interval) of its last heartbeat: its adapter is still
        # finishing the jobs it runs (it stops gracefully), and they are not handed back.
        self._finishing: dict[str, tuple[float, float]] = {}
        # Id -> KV revision of the registry change last applied for it (see _newer).
        self._revisions: dict[str, int] = {}

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
        if beat.server_id in self._removed:
            self._finishing[beat.server_id] = (self.now(), beat.interval_s)
            return False
        state = self._state(beat.server_id)
        state.heartbeat = beat
        state.seen_at = self.now()
        state.resident = list(beat.resident_models)
        state.model_slots = beat.model_slots
        if beat.capabilities is not None:
            state.capabilities = beat.capabilities
            state.capabilities_hash = beat.capabilities_hash
            return False
        return beat.capabilities_hash != state.capabilities_hash

    def on_capabilities(self, server_id: str, capabilities: Capabilities, digest: str) -> None:
        state = self._state(server_id)
        state.capabilities = capabilities
        state.capabilities_hash = digest

    def _newer(self, server_id: str, revision: int) -> bool:
        """Whether a registry change at `revision` is later than the last applied for the id.

        A change reaches the table twice, from the gateway that made it and from the registry's
        watch, in either order: only the newest of an id's changes may stand, or a server
        removed and registered again could look removed (and its pinned jobs fail) or the
        reverse."""
        if revision <= self._revisions.get(server_id, 0):
            return False
        self._revisions[server_id] = revision
        return True

    def on_registered(self, record: ServerRecord, *, revision: int) -> bool:
        """Apply a registration stored at KV `revision`; False if a later change was applied."""
        if not self._newer(record.server_id, revision):
            return False
        self._removed.discard(record.server_id)
        self._finishing.pop(record.server_id, None)
        self._state(record.server_id).record = record
        return True

    def on_removed(self, server_id: str, *, revision: int) -> bool:
        """Apply a removal stored at KV `revision`; False if a later change was applied."""
        if not self._newer(server_id, revision):
            return False
        state = self._servers.pop(server_id, None)
        if state is not None and state.heartbeat is not None:
            self._finishing[server_id] = (state.seen_at, state.heartbeat.interval_s)
        self._removed.add(server_id)
        return True

    def is_removed(self, server_id: str) -> bool:
        """Whether the server was removed from the registry (and not registered again)."""
        return server_id in self._removed

    def finishing(self, server_id: str) -> bool:
        """A removed server whose adapter still heartbeats: it finishes what it runs.

        Not to be confused with a draining server (ServerState.draining), which stays
        registered."""
        last = self._finishing.get(server_id)
        if server_id not in self._removed or last is None:
            return False
        seen_at, interval = last
        return self.now() - seen_at <= STALE_AFTER_INTERVALS * interval

    def observe_run(self, server_id: str, seconds: float) -> None:
        """Add one successful job's run time to the server's speed estimate."""
        state = self._servers.get(server_id)
        if state is None or seconds < 0:
            return
        state.recent_runs = [*state.recent_runs[-(_RUNS_REMEMBERED - 1) :], seconds]

    def forget_speed(self, server_id: str) -> None:
        """Drop a server's speed estimate: it is measured again from its next jobs."""
        state = self._servers.get(server_id)
        if state is not None:
            state.recent_runs = []
        self.costs.forget(server_id)

    def note_resident(self, server_id: str, models: tuple[str, ...]) -> None:
        """A job of these models ended well there: the server holds them (until its next beat)."""
        state = self._servers.get(server_id)
        if state is not None and models:
            hold(state.resident, models, state.model_slots)

    def typical_model_slots(self) -> int:
        """How many models a server is taken to keep until its adapter has seen it: as many
        as the live servers that told (fleets are set up alike), else one, as ComfyUI's
        default cache keeps only its last prompt's outputs. Taking more than it keeps sends
        jobs to a server for a model it no longer holds."""
        told = [s.model_slots for s in self.live() if s.model_slots is not None]
        return max(1, statistics.median_low(told)) if told else 1

    def typical_seconds_per_job(self) -> float | None:
        """Median estimate over the live measured servers, per unit of weight; None if none."""
        estimates = [
            s.seconds_per_job * max(s.weight, 0.01)
            for s in self.live()
            if s.seconds_per_job is not None
        ]
        return statistics.median(estimates) if estimates else None

    def on_reconnected(self) -> None:
        """This replica was cut off from NATS until now: heartbeats sent meanwhile were missed."""
        self._listening_since = self.now()

    def is_stale(self, state: ServerState) -> bool:
        """Silent for three of its intervals, counted from when this replica could hear it."""
        now = self.now()
        if not state.is_stale(now):
            return False
        interval = state.heartbeat.interval_s if state.heartbeat is not None else 1.0
        return now - self._listening_since > STALE_AFTER_INTERVALS * interval

    def live(self) -> list[ServerState]:
        """Servers heartbeating healthy, draining ones included (they still run their jobs)."""
        now = self.now()
        return [s for s in self._servers.values() if s.is_live(now)]

    def open_for_work(self) -> list[ServerState]:
        """Live servers that may take new jobs: those not draining."""
        return [s for s in self.live() if not s.draining]
