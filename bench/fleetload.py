"""A workload that looks like a fleet's: model loads, jobs of sizes 20x apart, bursts.

Part of `bench/balance.py` (section 4, `bench/fleet.py`). Four fake servers (1x, 2x, 4x, 4x)
hold two of three checkpoints at a time (`resident_models=2`), loading them in 2, 5 and 15 s
scaled down (`load_seconds`); a job is checkpoint -> prompt -> empty latent -> KSampler -> VAE
decode -> save, its sampling `sample_seconds` per step of a 512 x 512 latent, with steps and
sizes giving jobs 20x apart in work. Jobs come in bursts, checkpoints in skewed shares
(50/30/20 %).

Here: the jobs, the strategies the gateway is compared with, simulated offline on the same
jobs and arrival times (each server running one job at a time in order and holding its two
most recently used models, all with exact costs): round-robin, fewest queued (speed- and
model-blind), earliest finish (speed-aware, model-blind: the gateway before it knew models),
SwarmUI-like (a server that holds the model, the least queued of them, else the least queued),
and earliest finish with model loads counted, each job for itself (the gateway's rule before it
counted the reloads a load causes); and the lower bound.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from plugins.simulator import SimulatorConfig

SPEEDS = {"s1": 1.0, "s2": 2.0, "s4a": 4.0, "s4b": 4.0}
LOAD_SCALE = 0.8
CHECKPOINTS = {"a.safetensors": 2.0, "b.safetensors": 5.0, "c.safetensors": 15.0}
SHARES = {"a.safetensors": 0.5, "b.safetensors": 0.3, "c.safetensors": 0.2}
SLOTS = 2
# Few steps of a long time each: a step is a progress event through the whole system, and the
# machine's time per event is not what is measured here.
SAMPLE_SECONDS = 0.2  # one step of a 512 x 512 latent at 1x
STEPS = (2, 4, 6, 8, 10)
SIZES = (512, 768, 1024)  # steps x size spans 2 x 1 to 10 x 4 units of work: 20x


@dataclass(frozen=True)
class FleetJob:
    model: str
    steps: int
    size: int
    arrival: float  # seconds after the first burst

    @property
    def work(self) -> float:
        """Sampling seconds at 1x."""
        return SAMPLE_SECONDS * self.steps * (self.size / 512) ** 2

    def workflow(self, seed: int) -> dict[str, Any]:
        return {
            "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": self.model}},
            "5": {
                "class_type": "EmptyLatentImage",
                "inputs": {"width": self.size, "height": self.size, "batch_size": 1},
            },
            "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["4", 1]}},
            "3": {
                "class_type": "KSampler",
                "inputs": {
                    "seed": seed,
                    "steps": self.steps,
                    "cfg": 7.0,
                    "sampler_name": "euler",
                    "scheduler": "normal",
                    "denoise": 1.0,
                    "model": ["4", 0],
                    "positive": ["6", 0],
                    "negative": ["6", 0],
                    "latent_image": ["5", 0],
                },
            },
            "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
            "9": {
                "class_type": "SaveImage",
                "inputs": {"filename_prefix": "fleet", "images": ["8", 0]},
            },
        }


def load_time(model: str) -> float:
    return CHECKPOINTS[model] * LOAD_SCALE


def workload(n_jobs: int, bursts: int, gap_s: float, seed: int = 11) -> list[FleetJob]:
    rng = random.Random(seed)
    models, weights = list(SHARES), list(SHARES.values())
    return [
        FleetJob(
            model=rng.choices(models, weights)[0],
            steps=rng.choice(STEPS),
            size=rng.choice(SIZES),
            arrival=(i * bursts // n_jobs) * gap_s,
        )
        for i in range(n_jobs)
    ]


def server_config(speed: float) -> SimulatorConfig:
    return SimulatorConfig(
        speed=speed,
        models={"checkpoints": list(CHECKPOINTS)},
        load_seconds={m: load_time(m) for m in CHECKPOINTS},
        resident_models=SLOTS,
        sample_seconds=SAMPLE_SECONDS,
    )


# -- offline strategies ---------------------------------------------------------------------


@dataclass
class _Server:
    speed: float
    free_at: float = 0.0
    held: OrderedDict[str, None] | None = None
    finishes: list[float] | None = None
    loads: int = 0

    def holds(self, model: str) -> bool:
        return self.held is not None and model in self.held

    def cost(self, job: FleetJob) -> float:
        load = 0.0 if self.holds(job.model) else load_time(job.model)
        return (job.work + load) / self.speed

    def run(self, job: FleetJob) -> float:
        assert self.held is not None and self.finishes is not None
        start = max(self.free_at, job.arrival)
        if not self.holds(job.model):
            self.loads += 1
        self.free_at = start + self.cost(job)
        self.held[job.model] = None
        self.held.move_to_end(job.model)
        while len(self.held) > SLOTS:
            self.held.popitem(last=False)
        self.finishes.append(self.free_at)
        return start

    def queued(self, t: float) -> int:
        assert self.finishes is not None
        return sum(1 for f in self.finishes if f > t)


Chooser = Callable[[list[_Server], FleetJob, int], int]


def _round_robin(servers: list[_Server], job: FleetJob, i: int) -> int:
    return i % len(servers)


def _fewest_queued(servers: list[_Server], job: FleetJob, i: int) -> int:
    return min(range(len(servers)), key=lambda k: (servers[k].queued(job.arrival), k))


def _earliest_finish_blind(servers: list[_Server], job: FleetJob, i: int) -> int:
    return min(
        range(len(servers)),
        key=lambda k: (max(servers[k].free_at, job.arrival) + job.work / servers[k].speed, k),
    )


def _swarm_like(servers: list[_Server], job: FleetJob, i: int) -> int:
    holding = [k for k, s in enumerate(servers) if s.holds(job.model)]
    pool = holding or list(range(len(servers)))
    return min(pool, key=lambda k: (servers[k].queued(job.arrival), k))


def _earliest_finish_models(servers: list[_Server], job: FleetJob, i: int) -> int:
    return min(
        range(len(servers)),
        key=lambda k: (max(servers[k].free_at, job.arrival) + servers[k].cost(job), k),
    )


STRATEGIES: dict[str, tuple[str, Chooser, bool]] = {
    "round_robin": ("round-robin", _round_robin, False),
    "fewest_queued": ("fewest queued", _fewest_queued, False),
    "earliest_finish": (
        "earliest finish, model-blind (the gateway before)",
        _earliest_finish_blind,
        False,
    ),
    "swarm_like": ("model-aware least queued (SwarmUI-like)", _swarm_like, True),
    "earliest_finish_models": (
        "earliest finish with loads, each job alone",
        _earliest_finish_models,
        True,
    ),
}


def simulate(jobs: list[FleetJob], choose: Chooser) -> dict[str, Any]:
    servers = [_Server(speed=v, held=OrderedDict(), finishes=[]) for v in SPEEDS.values()]
    waits = [
        servers[k].run(job) - job.arrival
        for i, job in enumerate(jobs)
        for k in [choose(servers, job, i)]
    ]
    return {
        "makespan_s": max(s.free_at for s in servers),
        "mean_wait_s": sum(waits) / len(waits),
        "loads": sum(s.loads for s in servers),
    }


def lower_bound(jobs: list[FleetJob], loads_per_model: dict[str, int]) -> float:
    """All the work plus `loads_per_model` loads of each model, over the total speed; never
    below a burst's arrival plus the work from it on."""
    speed = sum(SPEEDS.values())
    loads = sum(load_time(m) * n for m, n in loads_per_model.items())
    bound = (sum(j.work for j in jobs) + loads) / speed
    for arrival in sorted({j.arrival for j in jobs}):
        later = sum(j.work for j in jobs if j.arrival >= arrival)
        bound = max(bound, arrival + later / speed)
    return bound
