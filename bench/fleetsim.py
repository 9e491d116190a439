"""The gateway's own placement, replayed on a simulated clock: where the live gap comes from.

Part of `bench/fleet.py`. The same jobs and arrivals as the live run go through the
balancer's own code, `placement.schedule` with `RoundCosts` and `bound_work` over a real
`JobBook` and `ServerTable` (whose `CostModel` learns from the runs), with capacity 2 per
server and late binding; each server is the fake's model of a GPU (two models held, least
recently used out, loads and sampling divided by its speed), and its adapter's `Residency`
reads each run as the adapter reads a history. Nothing else is simulated: no NATS, no
processes, no time between a job's end and the next round. So a gap between this and the
offline "earliest finish with loads" is the rule's (what it does not know yet, late binding,
estimates), and one between this and the live run is the machine's.

`stretch` and `fixed_s` lengthen every run (x stretch, + fixed_s) as the live run's
`run_over_nominal` shows the machine did, to see the placement under the same stretch.
"""

from __future__ import annotations

import heapq
import itertools
import statistics
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import msgspec

from bench.fleetload import CHECKPOINTS, SLOTS, SPEEDS, FleetJob, load_time
from gateway.balancer import binding
from gateway.balancer.book import JobBook
from gateway.balancer.estimates import RoundCosts, bound_work
from gateway.balancer.placement import Candidate, Pending, schedule
from gateway.balancer.servers import ServerTable
from gateway.bus.contract import Capabilities, Heartbeat, JobRecord, JobStatus, ServerRecord
from gateway.comfyui.shape import shape_of
from plugins.comfyui.residency import Residency

_NODES = ["CheckpointLoaderSimple", "EmptyLatentImage", "CLIPTextEncode", "KSampler"]
_CAPABILITIES = Capabilities(
    node_types=[*_NODES, "VAEDecode", "SaveImage"], models={"checkpoints": list(CHECKPOINTS)}
)


@dataclass
class _Gpu:
    """One fake server: its queue (the first runs), the models it holds, its adapter's view."""

    server_id: str
    speed: float
    held: OrderedDict[str, None] = field(default_factory=OrderedDict)
    queue: list[str] = field(default_factory=list)
    running: bool = False
    residency: Residency = field(default_factory=Residency)
    loads: int = 0


class _Replay:
    def __init__(self, jobs: list[FleetJob], stretch: float, fixed_s: float) -> None:
        self.jobs = jobs
        self.stretch, self.fixed_s = stretch, fixed_s
        self.now = 0.0
        self.table = ServerTable(clock=lambda: self.now)
        self.book = JobBook(None, None)  # type: ignore[arg-type]  # only its indexes are used
        self.gpus = {sid: _Gpu(sid, speed) for sid, speed in SPEEDS.items()}
        self.pending: list[str] = []
        self.events: list[tuple[float, int, str, str]] = []
        self.order = itertools.count()
        self.loaded: dict[str, float] = {}  # job -> its load's seconds
        self.started: dict[str, float] = {}
        self.ended: dict[str, float] = {}
        for sid in self.gpus:
            self.table.on_registered(
                ServerRecord(server_id=sid, name=sid, address="sim", registered_at=0.0)
            )
            self._beat(sid)

    def _at(self, t: float, kind: str, what: str) -> None:
        heapq.heappush(self.events, (t, next(self.order), kind, what))

    def _beat(self, server_id: str) -> None:
        gpu = self.gpus[server_id]
        self.table.on_heartbeat(
            Heartbeat(
                server_id=server_id,
                address="sim",
                ts=self.now,
                healthy=True,
                capabilities=_CAPABILITIES,
                capabilities_hash="sim",
                resident_models=gpu.residency.models,
                model_slots=gpu.residency.slots,
            )
        )

    def run(self) -> dict[str, Any]:
        for i, job in enumerate(self.jobs):
            self._at(job.arrival, "arrive", str(i))
        heartbeats = 0
        while len(self.ended) < len(self.jobs):
            t, _, kind, what = heapq.heappop(self.events)
            while heartbeats < t:  # the adapters heartbeat every second
                self.now = float(heartbeats)
                for sid in self.gpus:
                    self._beat(sid)
                heartbeats += 1
            self.now = t
            if kind == "arrive":
                self._arrive(what)
            elif kind == "loaded":
                server_id = self.book.records[what].server_id or ""
                self.table.costs.observe_load(server_id, self._job(what).model, self.loaded[what])
            else:
                self._end(what)
            self._round()
        waits = [self.started[j] - self._job(j).arrival for j in self.started]
        return {
            "makespan_s": max(self.ended.values()),
            "mean_wait_s": statistics.mean(waits),
            "loads": sum(g.loads for g in self.gpus.values()),
            "loads_per_server": {g.server_id: g.loads for g in self.gpus.values()},
        }

    def _job(self, job_id: str) -> FleetJob:
        return self.jobs[int(job_id)]

    def _arrive(self, job_id: str) -> None:
        record = JobRecord(
            job_id=job_id,
            status=JobStatus.QUEUED,
            submitted_at=self.now,
            updated_at=self.now,
            log_file_path="",
        )
        self.book.keep(record)
        self.book.shapes[job_id] = shape_of(self._job(job_id).workflow(int(job_id)))
        self.pending.append(job_id)

    def _round(self) -> None:
        """What binding.Binder.round does, without the bus."""
        costs = RoundCosts(self.table, binding._DEFAULT_SECONDS_PER_UNIT)
        typical = self.table.typical_seconds_per_job() or binding._DEFAULT_SECONDS_PER_JOB
        typical_slots = self.table.typical_model_slots()
        candidates = []
        for s in self.table.live():
            seconds_per_job = s.seconds_per_job or typical / max(s.weight, 0.01)
            slots = s.model_slots or typical_slots
            busy, resident = bound_work(
                self.book, s, costs, seconds_per_job=seconds_per_job, slots=slots, at=self.now
            )
            candidates.append(
                Candidate(
                    server_id=s.server_id,
                    capacity=s.capacity,
                    bound=self.book.bound.count(s.server_id),
                    seconds_per_job=seconds_per_job,
                    busy_s=busy,
                    resident=tuple(resident),
                    model_slots=slots,
                )
            )
        window = self.pending[: max(64, 4 * sum(c.capacity for c in candidates))]
        eligible = frozenset(self.gpus)
        pending = [Pending(job_id=j, eligible=eligible, shape=self.book.shapes[j]) for j in window]
        for bound in schedule(pending, candidates, costs):
            self.pending.remove(bound.job_id)
            record = self.book.records[bound.job_id]
            self.book.keep(
                msgspec.structs.replace(
                    record,
                    status=JobStatus.DISPATCHED,
                    server_id=bound.server_id,
                    updated_at=self.now,
                )
            )
            self.gpus[bound.server_id].queue.append(bound.job_id)
            self._start(bound.server_id)

    def _start(self, server_id: str) -> None:
        gpu = self.gpus[server_id]
        if gpu.running or not gpu.queue:
            return
        job_id = gpu.queue[0]
        job = self._job(job_id)
        gpu.running = True
        self.book.keep(msgspec.structs.replace(self.book.records[job_id], status=JobStatus.RUNNING))
        self.book.started_at[job_id] = self.started[job_id] = self.now
        load = 0.0
        if job.model not in gpu.held:
            gpu.loads += 1
            load = self.loaded[job_id] = load_time(job.model) / gpu.speed * self.stretch
            self._at(self.now + load, "loaded", job_id)
        gpu.held[job.model] = None
        gpu.held.move_to_end(job.model)
        while len(gpu.held) > SLOTS:
            gpu.held.popitem(last=False)
        run = load + job.work / gpu.speed * self.stretch + self.fixed_s
        self._at(self.now + run, "end", job_id)

    def _end(self, job_id: str) -> None:
        """What the recorder learns from a success, and the adapter from its history."""
        record = self.book.records[job_id]
        server_id = record.server_id or ""
        gpu = self.gpus[server_id]
        gpu.queue.pop(0)
        gpu.running = False
        shape = self.book.shapes[job_id]
        seconds = self.now - self.started[job_id]
        loads = {self._job(job_id).model: self.loaded[job_id]} if job_id in self.loaded else {}
        self.table.observe_run(server_id, seconds)
        self.table.costs.observe_run(server_id, shape, seconds, loads)
        self.table.note_resident(server_id, shape.models)
        cached = [] if loads else ["4"]  # the checkpoint loader's node id in the workflow
        gpu.residency.observe(self._job(job_id).workflow(int(job_id)), cached)
        self.book.keep(msgspec.structs.replace(record, status=JobStatus.SUCCEEDED))
        self.book.started_at.pop(job_id, None)
        self.ended[job_id] = self.now
        self._start(server_id)


def replay(jobs: list[FleetJob], *, stretch: float = 1.0, fixed_s: float = 0.0) -> dict[str, Any]:
    """Makespan, mean wait and loads of the gateway's placement on these jobs, simulated."""
    return _Replay(jobs, stretch, fixed_s).run()
