"""What a job costs on a server, learnt from the jobs the fleet ran: no I/O, no clock.

Two things are learnt per server. A job's run time without its model loads, per job shape
(`gateway/comfyui/shape.py`: node types, models, steps, pixels, frames), and the server's
seconds per unit of work (a 512 x 512 sampler step) over every shape it ran. A model's load
time, from the loader node's time when it ran (a held model's loader is served from the cache
and costs nothing), learnt as soon as the loader is done. Each is the median of the last few,
so one run stretched by a crash or a busy disk does not stick.

An estimate for a shape the server has not run yet comes from the same shape on another
server, scaled by the two servers' seconds per unit; failing that, from the job's units times
the server's seconds per unit; failing that, from the caller's fallback (the fleet's typical
server). A model the server never loaded costs what it took elsewhere, scaled by how the two
servers' loads of the models both loaded compare (disks and buses differ as GPUs do); one never
loaded anywhere, the longest load seen so far: guessing an unknown checkpoint cheap spreads it
over the fleet, a load on every server.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from typing import Final, Literal

import msgspec

from gateway.comfyui.shape import JobShape

_RUNS_REMEMBERED: Final = 5
_RATES_REMEMBERED: Final = 20
_SHAPES_REMEMBERED: Final = 10_000  # per server; beyond it the oldest shape is dropped
# A model never seen loading is assumed to take this long until one load is seen anywhere
# (a checkpoint read from a fast disk).
DEFAULT_LOAD_S: Final = 5.0

Source = Literal["learnt", "scaled", "by_size", "fallback"]


class Estimate(msgspec.Struct, frozen=True):
    seconds: float
    source: Source


class ServerCosts(msgspec.Struct, kw_only=True):
    """What /servers/health shows of what was learnt of one server."""

    seconds_per_unit: float | None
    """Median run time per 512 x 512 sampler step (or per job of the smallest size)."""
    shapes: int
    """Job shapes with measured runs here."""
    load_seconds: dict[str, float]
    """Median load time of each model it loaded."""


def _push(values: list[float], value: float, keep: int) -> None:
    values.append(value)
    del values[:-keep]


class CostModel:
    """Run and load times per server, learnt online from successful jobs."""

    def __init__(self) -> None:
        self._runs: dict[str, dict[str, list[float]]] = {}  # server -> shape key -> seconds
        self._rates: dict[str, list[float]] = {}  # server -> seconds per unit
        self._loads: dict[str, dict[str, list[float]]] = {}  # server -> model -> seconds

    def observe_load(self, server_id: str, model: str, seconds: float) -> None:
        """The server loaded `model` in `seconds`."""
        if seconds >= 0:
            _push(self._loads.setdefault(server_id, {}).setdefault(model, []), seconds, 5)

    def observe_run(
        self, server_id: str, shape: JobShape, seconds: float, loads: Mapping[str, float]
    ) -> None:
        """A successful run of `seconds`, of which `loads` (model -> seconds, each told to
        `observe_load` already) went to loading."""
        if seconds < 0:
            return
        compute = max(0.0, seconds - sum(loads.values()))
        runs = self._runs.setdefault(server_id, {})
        if shape.key not in runs and len(runs) >= _SHAPES_REMEMBERED:
            del runs[next(iter(runs))]
        _push(runs.setdefault(shape.key, []), compute, _RUNS_REMEMBERED)
        _push(self._rates.setdefault(server_id, []), compute / shape.units, _RATES_REMEMBERED)

    def forget(self, server_id: str) -> None:
        """Drop what was learnt of a server's speed: its next runs measure it afresh."""
        self._runs.pop(server_id, None)
        self._rates.pop(server_id, None)

    def seconds_per_unit(self, server_id: str) -> float | None:
        rates = self._rates.get(server_id)
        return statistics.median(rates) if rates else None

    def run_seconds(self, server_id: str, shape: JobShape, fallback_per_unit: float) -> Estimate:
        """Expected run time of a job of `shape` on the server, model loads not counted."""
        runs = self._runs.get(server_id, {}).get(shape.key)
        if runs:
            return Estimate(statistics.median(runs), "learnt")
        rate = self.seconds_per_unit(server_id)
        if rate is not None:
            scaled = [
                statistics.median(other[shape.key]) * rate / other_rate
                for other_id, other in self._runs.items()
                if other_id != server_id and other.get(shape.key)
                for other_rate in [self.seconds_per_unit(other_id)]
                if other_rate
            ]
            if scaled:
                return Estimate(statistics.median(scaled), "scaled")
            return Estimate(shape.units * rate, "by_size")
        return Estimate(shape.units * fallback_per_unit, "fallback")

    def load_seconds(self, server_id: str, model: str) -> float:
        """Expected time to load `model` on the server when it does not hold it."""
        mine = self._loads.get(server_id, {})
        if mine.get(model):
            return statistics.median(mine[model])
        elsewhere = [
            statistics.median(theirs[model]) * self._load_pace(mine, theirs)
            for other_id, theirs in self._loads.items()
            if other_id != server_id and theirs.get(model)
        ]
        if elsewhere:
            return statistics.median(elsewhere)
        known = [
            statistics.median(times) * self._load_pace(mine, theirs)
            for theirs in self._loads.values()
            for times in theirs.values()
            if times
        ]
        return max(known) if known else DEFAULT_LOAD_S

    @staticmethod
    def _load_pace(mine: Mapping[str, list[float]], theirs: Mapping[str, list[float]]) -> float:
        """How much longer a load takes on one server than on another: the median ratio of
        the models both loaded, 1 with none in common."""
        ratios = [
            statistics.median(mine[m]) / statistics.median(theirs[m])
            for m in mine.keys() & theirs.keys()
            if mine[m] and theirs[m] and statistics.median(theirs[m]) > 0
        ]
        return statistics.median(ratios) if ratios else 1.0

    def typical_per_unit(self, server_ids: list[str], weights: Mapping[str, float]) -> float | None:
        """The median seconds per unit of these servers, per unit of weight; None if none."""
        rates = [
            rate * max(weights.get(server_id, 1.0), 0.01)
            for server_id in server_ids
            for rate in [self.seconds_per_unit(server_id)]
            if rate is not None
        ]
        return statistics.median(rates) if rates else None

    def describe(self, server_id: str) -> ServerCosts:
        loads = self._loads.get(server_id, {})
        return ServerCosts(
            seconds_per_unit=self.seconds_per_unit(server_id),
            shapes=len(self._runs.get(server_id, {})),
            load_seconds={m: statistics.median(v) for m, v in sorted(loads.items()) if v},
        )
