"""The fleet workload (`bench/fleetload.py`) run live: the whole system in this event loop.

The gateway takes the jobs in their bursts over NATS; afterwards the log index tells each job's
server, wait, run time and `dispatched` reason, and which jobs loaded their checkpoint (the
loader node ran instead of being served from the cache).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import time
from collections.abc import Iterator
from typing import Any

from bench.common import running_system
from bench.fleetload import SPEEDS, FleetJob, load_time, server_config
from gateway.balancer import binding
from gateway.bus.connection import connect
from gateway.bus.contract import JobRecord, Subjects, decode
from sdk import AsyncComfyUISDK
from sdk.nats import NatsClient


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
