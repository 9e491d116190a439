"""A workload that looks like a fleet's: model loads, jobs of sizes 20x apart, bursts.

Part of `bench/balance.py` (section 4). Four fake servers (1x, 2x, 4x, 4x) hold two of three
checkpoints at a time (`resident_models=2`), loading them in 2, 5 and 15 s scaled down
(`load_seconds`); a job is checkpoint -> prompt -> empty latent -> KSampler -> VAE decode ->
save, its sampling `sample_seconds` per step of a 512 x 512 latent, with steps and sizes giving
jobs 20x apart in work. Jobs come in bursts, checkpoints in skewed shares (50/30/20 %).

The gateway runs it live, and its own placement code replays it on a simulated clock
(`bench/fleetsim.py`: no overhead, so what is left is the rule's); the strategies it is
compared with are simulated offline on the same jobs and arrival times, each server running
one job at a time in order and holding its two most recently used models: round-robin, fewest
queued (speed- and model-blind), earliest finish (speed-aware, model-blind: the gateway before
it knew models), SwarmUI-like (a server that holds the model, the least queued of them, else
the least queued), and earliest finish with model loads counted, each job for itself (the
gateway's rule before it counted the reloads a load causes), all with exact costs. The lower
bound is the issue's: all the work plus one load of each model, over the total speed, and
never less than a burst's arrival plus the work from it on. The bound with one load per model
per server the live run loaded it on is shown too: it grows with the run's own loads, so it
flatters a run that loads often.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import statistics
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from bench.common import running_system, say, table
from gateway.balancer import binding
from gateway.bus.connection import connect
from gateway.bus.contract import JobRecord, Subjects, decode
from plugins.simulator import SimulatorConfig
from sdk import AsyncComfyUISDK
from sdk.nats import NatsClient

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


# -- the live run ---------------------------------------------------------------------------


@contextlib.contextmanager
def model_blind() -> Iterator[None]:
    """The gateway's balancer as it was before it knew models: every job its server's
    seconds per job. (The benchmark runs the gateway in its own process, so it can.)"""
    original = binding.schedule

    def blind(pending: Any, candidates: Any, costs: Any = None, **kw: Any) -> Any:
        return original(pending, candidates, None, **kw)

    binding.schedule = blind  # type: ignore[assignment]
    try:
        yield
    finally:
        binding.schedule = original  # type: ignore[assignment]


async def live(jobs: list[FleetJob], *, blind: bool = False) -> dict[str, Any]:
    """Run the jobs on the gateway in their bursts; makespan, waits, placement, loads."""
    with model_blind() if blind else contextlib.nullcontext():
        return await _live(jobs)


async def _live(jobs: list[FleetJob]) -> dict[str, Any]:
    async with running_system() as system:
        for server_id, speed in SPEEDS.items():
            await system.add_server(server_id, server_config(speed))
        nc = await connect(system.settings.nats_url, "bench-fleet")
        done: dict[str, float] = {}
        all_done = asyncio.Event()
        want: set[str] = set()

        async def watch() -> None:
            kv = await nc.jetstream().key_value(Subjects().jobs_bucket)
            watcher = await kv.watchall()
            try:
                async for entry in watcher:
                    if entry is None or entry.value is None:
                        continue
                    record = decode(entry.value, JobRecord)
                    if record.status.terminal and record.job_id not in done:
                        done[record.job_id] = time.perf_counter()
                        if len(want) == len(jobs) and want <= done.keys():
                            all_done.set()
            finally:
                await watcher.stop()

        watching = asyncio.create_task(watch())
        try:
            async with await NatsClient.connect(system.settings.nats_url) as bus:
                t0 = time.perf_counter()
                t0_wall = time.time()
                ids: list[str] = []
                for arrival in sorted({j.arrival for j in jobs}):
                    await asyncio.sleep(max(0.0, arrival - (time.perf_counter() - t0)))
                    burst = [(i, j) for i, j in enumerate(jobs) if j.arrival == arrival]
                    accepted = await asyncio.gather(
                        *(bus.submit(j.workflow(1000 + i)) for i, j in burst)
                    )
                    ids += [a.job_id for a in accepted]
                    want.update(a.job_id for a in accepted)
                if want <= done.keys():
                    all_done.set()
                await asyncio.wait_for(all_done.wait(), 600)
                makespan = max(done[i] for i in ids) - t0
            model_of = {job_id: job.model for job_id, job in zip(ids, jobs, strict=True)}
            async with AsyncComfyUISDK(system.url) as sdk:
                quoted = ",".join(f"'{i}'" for i in ids)
                rows: list[Any] = []
                for _ in range(100):
                    rows = (
                        await sdk.query_logs(
                            "SELECT job_id, server_id, queue_wait_s, status, duration_s FROM jobs "
                            f"WHERE job_id IN ({quoted})",
                            max_rows=100_000,
                        )
                    )["rows"]
                    if len(rows) == len(ids) and all(r[2] is not None for r in rows):
                        break
                    await asyncio.sleep(0.1)
                reasons = (
                    await sdk.query_logs(
                        "SELECT job_id, data->'reason'->>'estimate_s', data->'reason'->>'load_s', "
                        "data->'reason'->>'estimate_from', epoch(ts), server_id, "
                        "CAST(data->'reason' AS VARCHAR) FROM events "
                        f"WHERE type = 'dispatched' AND job_id IN ({quoted}) ORDER BY ts",
                        max_rows=100_000,
                    )
                )["rows"]
                load_rows = (
                    await sdk.query_logs(
                        "SELECT job_id, server_id FROM node_runs "
                        f"WHERE node_id = '4' AND job_id IN ({quoted})",
                        max_rows=100_000,
                    )
                )["rows"]
        finally:
            watching.cancel()
            await asyncio.gather(watching, return_exceptions=True)
            await nc.close()
    loads: dict[str, dict[str, int]] = {}
    for job_id, server_id in load_rows:
        per = loads.setdefault(server_id, {})
        per[model_of[job_id]] = per.get(model_of[job_id], 0) + 1
    per_server: dict[str, int] = {}
    for r in rows:
        per_server[r[1]] = per_server.get(r[1], 0) + 1
    statuses: dict[str, int] = {}
    for r in rows:
        statuses[r[3]] = statuses.get(r[3], 0) + 1
    waits = [r[2] for r in rows if r[2] is not None]
    # How long jobs ran against their nominal time (sampling, and the load if they loaded),
    # and against the balancer's estimate: what the fake and the system add, what it misjudged.
    loaded = {job_id for job_id, _ in load_rows}
    job_of = dict(zip(ids, jobs, strict=True))
    stretch: dict[str, list[float]] = {}
    runs: list[list[Any]] = []  # job, server, seconds from running to its end, nominal seconds
    misjudged: list[float] = []
    estimate = {r[0]: float(r[1] or 0) + float(r[2] or 0) for r in reasons}
    sources: dict[str, int] = {}
    for r in reasons:
        sources[r[3]] = sources.get(r[3], 0) + 1
    for r in rows:
        job, server_id, ran = job_of[r[0]], r[1], r[4]
        if ran is None or server_id not in SPEEDS:
            continue
        nominal = (job.work + (load_time(job.model) if r[0] in loaded else 0)) / SPEEDS[server_id]
        stretch.setdefault(server_id, []).append(ran / nominal)
        runs.append([ids.index(r[0]), server_id, round(ran, 3), round(nominal, 3)])
        if estimate.get(r[0]):
            misjudged.append(ran / estimate[r[0]])
    # Each placement as it was made, and whether the job then loaded its model: a load the
    # plan did not expect (`loads` empty) is a wrong belief about what the server held.
    dispatches = [
        {
            "t": round(r[4] - t0_wall, 3),
            "job": ids.index(r[0]),
            "model": model_of[r[0]],
            "server": r[5],
            "loaded": r[0] in loaded,
            "reason": json.loads(r[6]) if r[6] else None,
        }
        for r in reasons
    ]
    return {
        "run_over_nominal_all": statistics.median(v for vs in stretch.values() for v in vs),
        "runs": sorted(runs),
        "dispatches": dispatches,
        "unexpected_loads": sum(
            1 for d in dispatches if d["loaded"] and d["reason"] and not d["reason"]["loads"]
        ),
        "planned_loads": sum(1 for d in dispatches if d["reason"] and d["reason"]["loads"]),
        "run_over_nominal": {s: statistics.median(v) for s, v in sorted(stretch.items())},
        "run_over_estimate_median": statistics.median(misjudged) if misjudged else None,
        "estimate_sources": sources,
        "makespan_s": makespan,
        "mean_wait_s": sum(waits) / len(waits) if waits else float("nan"),
        "loads": len(load_rows),
        "loads_per_server": loads,
        "jobs_per_server": dict(sorted(per_server.items())),
        "statuses": statuses,
    }


async def run(quick: bool) -> dict[str, Any]:
    """Section 4 of balance.py: the fleet workload, live and offline; figures and goals."""
    from bench.fleetsim import replay  # it reads this module's workload

    n_jobs, bursts = (60, 3) if quick else (120, 4)
    jobs = workload(n_jobs, bursts, gap_s=3.0)
    work = sum(j.work for j in jobs)
    say(
        f"\nfleet: {n_jobs} jobs in {bursts} bursts 3 s apart, {work:.1f} s of 1x sampling, "
        f"loads {', '.join(f'{load_time(m):.1f}' for m in CHECKPOINTS)} s at 1x, {SLOTS} held"
    )
    gateway = await live(jobs)
    blind_live = await live(jobs, blind=True)
    del blind_live["dispatches"], blind_live["runs"]  # the main run's are the ones to read
    offline = {name: simulate(jobs, choose) for name, (_, choose, _) in STRATEGIES.items()}
    replayed = replay(jobs)
    stretch = gateway["run_over_nominal_all"]
    replayed_stretched = replay(jobs, stretch=stretch)
    used: dict[str, int] = {}
    for per in gateway["loads_per_server"].values():
        for model in per:
            used[model] = used.get(model, 0) + 1
    bound = lower_bound(jobs, dict.fromkeys(CHECKPOINTS, 1))
    bound_live_loads = lower_bound(jobs, used)
    named = [
        ("gateway (live)", gateway),
        ("gateway, model-blind (live)", blind_live),
        ("gateway's placement replayed, no overhead", replayed),
        (f"the same, runs x{stretch:.2f} as live", replayed_stretched),
        *((STRATEGIES[name][0] + " (offline)", result) for name, result in offline.items()),
    ]
    rows: list[list[Any]] = [
        [
            label,
            r["makespan_s"],
            r["makespan_s"] / bound,
            r["makespan_s"] / bound_live_loads,
            r["mean_wait_s"],
            r["loads"],
        ]
        for label, r in named
    ]
    rows.append(["lower bound (one load per model)", bound, 1.0, bound / bound_live_loads, "", ""])
    rows.append(
        [
            "bound with the live run's loads (one per model per server)",
            bound_live_loads,
            bound_live_loads / bound,
            1.0,
            "",
            "",
        ]
    )
    header = ["strategy", "makespan s", "x bound", "x bound (live loads)", "mean wait s", "loads"]
    say(table(rows, header))
    say(f"live: {gateway['statuses']}, jobs per server {gateway['jobs_per_server']}")
    say(
        f"live loads per server: {gateway['loads_per_server']}; planned {gateway['planned_loads']},"
        f" not expected by the plan {gateway['unexpected_loads']}"
    )
    say(
        f"run time / nominal per server (median): {gateway['run_over_nominal']}, all {stretch:.3f};"
        f" run time / estimate at dispatch (median): {gateway['run_over_estimate_median']}; "
        f"estimates from: {gateway['estimate_sources']}"
    )
    blind = min(
        offline[k]["makespan_s"] for k in ("round_robin", "fewest_queued", "earliest_finish")
    )
    say(
        f"best model-blind (offline, exact, no overhead) {blind:.2f} s: / replayed placement "
        f"{blind / replayed['makespan_s']:.2f}, / offline each-job-alone "
        f"{blind / offline['earliest_finish_models']['makespan_s']:.2f}, / live "
        f"{blind / gateway['makespan_s']:.2f}"
    )
    baseline_loads = min(
        offline[k]["loads"]
        for k in ("round_robin", "fewest_queued", "earliest_finish", "swarm_like")
    )
    return {
        "jobs": n_jobs,
        "bursts": bursts,
        "work_1x_s": work,
        "bound_s": bound,
        "bound_live_loads_s": bound_live_loads,
        "live": gateway,
        "live_blind": blind_live,
        "replayed": replayed,
        "replayed_stretched": {**replayed_stretched, "stretch": stretch},
        "offline": offline,
        "best_blind_s": blind,
        "fewest_baseline_loads": baseline_loads,
    }
