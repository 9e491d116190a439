"""Balancing: makespan and wait on servers of different speeds vs the ideal and naive strategies.

    uv run python bench/balance.py [--quick]

1. Mixed: fake servers of speed 1x, 2x, 4x, 4x (capacity 2 each, the default); jobs of mixed
   sizes: EmptyImage -> k ImageInvert -> b ImageBlur -> SaveImage with per-class node times
   (SimulatorConfig.class_seconds), k in 1..4, b in 0..3, all submitted at once on NATS.
   Makespan = first submission to last job's record terminal. Compared with the ideal (total
   work / total speed) and with strategies simulated offline on the same job list and arrival
   times: round-robin, "fewest queued" (fewest unfinished jobs at arrival, speed-blind), and,
   as a strong reference, speed-aware earliest-finish list scheduling.
2. The same jobs with the fastest server crashed (sim.crash()) at half the ideal makespan.
3. The e2e test's case: speeds 1x, 2x, 4x, 70 equal 3-node jobs at node_seconds 0.05/0.1/0.2.
4. A fleet's workload (bench/fleet.py): model loads, two models held per server, jobs 20x
   apart in size, bursts; against round-robin, fewest queued, model-blind earliest finish,
   SwarmUI-like model-aware least queued, the gateway's placement replayed, and a lower bound.
   `--fleet-only` runs only this.
5. Fair share between API keys (bench/fairness.py): a light key's wait while a heavy key
   floods, against an idle fleet. `--fairness` runs only this.

Wait = started_at - submitted_at per job, from the log index (`jobs` table).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import fairness
from bench import fleet as fleet_section
from bench.common import (
    goal,
    print_goals,
    running_system,
    say,
    table,
    tiny,
    write_results,
)
from gateway.bus.connection import connect
from gateway.bus.contract import JobRecord, Subjects, decode
from plugins.simulator import SimulatorConfig
from sdk import AsyncComfyUISDK
from sdk.nats import NatsClient

CLASS_SECONDS = {"EmptyImage": 0.02, "SaveImage": 0.02, "ImageInvert": 0.05, "ImageBlur": 0.2}


def mixed_job(seed: int, inverts: int, blurs: int) -> dict[str, Any]:
    workflow: dict[str, Any] = {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": seed % 16_777_216},
        }
    }
    prev = "1"
    nid = 2
    for _ in range(inverts):
        workflow[str(nid)] = {"class_type": "ImageInvert", "inputs": {"image": [prev, 0]}}
        prev, nid = str(nid), nid + 1
    for _ in range(blurs):
        workflow[str(nid)] = {
            "class_type": "ImageBlur",
            "inputs": {"image": [prev, 0], "blur_radius": 1, "sigma": 1.0},
        }
        prev, nid = str(nid), nid + 1
    workflow[str(nid)] = {
        "class_type": "SaveImage",
        "inputs": {"images": [prev, 0], "filename_prefix": "bal"},
    }
    return workflow


def work_of(workflow: dict[str, Any], class_seconds: dict[str, float], default: float) -> float:
    return sum(class_seconds.get(n["class_type"], default) for n in workflow.values())


# -- offline strategies -----------------------------------------------------------------------


def simulate(
    strategy: str, works: list[float], arrivals: list[float], speeds: list[float]
) -> tuple[float, float]:
    """Makespan and mean wait of a strategy; each server runs one job at a time, FIFO."""
    n = len(speeds)
    free_at = [0.0] * n
    finishes: list[list[float]] = [[] for _ in range(n)]
    waits = []
    for i, (w, t) in enumerate(zip(works, arrivals, strict=True)):
        if strategy == "round_robin":
            s = i % n
        elif strategy == "fewest_queued":
            s = min(range(n), key=lambda k: (sum(1 for f in finishes[k] if f > t), k))
        else:  # earliest finish, speed-aware
            s = min(range(n), key=lambda k: (max(free_at[k], t) + w / speeds[k], k))
        start = max(free_at[s], t)
        free_at[s] = start + w / speeds[s]
        finishes[s].append(free_at[s])
        waits.append(start - t)
    return max(free_at), sum(waits) / len(waits)


# -- one live run -----------------------------------------------------------------------------


async def live_run(
    servers: list[tuple[str, SimulatorConfig]],
    workflows: list[dict[str, Any]],
    crash: tuple[str, float] | None = None,
) -> dict[str, Any]:
    """Submit all workflows at once; return makespan, waits, placement, arrival offsets."""
    async with running_system() as system:
        for server_id, config in servers:
            await system.add_server(server_id, config)
        nc = await connect(system.settings.nats_url, "bench-watch")
        done: dict[str, tuple[float, str]] = {}
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
                        done[record.job_id] = (time.perf_counter(), record.status.value)
                        if want and want <= done.keys():
                            all_done.set()
            finally:
                await watcher.stop()

        watcher = asyncio.create_task(watch())
        try:
            async with await NatsClient.connect(system.settings.nats_url) as bus:
                arrivals: list[float] = []
                t0 = time.perf_counter()

                async def submit(workflow: dict[str, Any]) -> str:
                    accepted = await bus.submit(workflow)
                    arrivals.append(time.perf_counter() - t0)
                    return accepted.job_id

                crasher = None
                if crash is not None:

                    async def do_crash() -> None:
                        await asyncio.sleep(crash[1])
                        system.sims[crash[0]].crash()

                    crasher = asyncio.create_task(do_crash())
                ids = list(await asyncio.gather(*(submit(w) for w in workflows)))
                want.update(ids)
                if want <= done.keys():
                    all_done.set()
                await asyncio.wait_for(all_done.wait(), 300)
                makespan = max(done[i][0] for i in ids) - t0
                if crasher is not None:
                    await crasher
            async with AsyncComfyUISDK(system.url) as sdk:
                quoted = ",".join(f"'{i}'" for i in ids)
                sql = (
                    "SELECT job_id, server_id, queue_wait_s, attempts, duration_s, "
                    "epoch(finished_at) FROM jobs "
                    f"WHERE job_id IN ({quoted})"
                )
                node_sql = (
                    "SELECT server_id, class_type, count(*), avg(duration_s) FROM node_runs "
                    f"WHERE job_id IN ({quoted}) GROUP BY ALL ORDER BY ALL"
                )
                rows: list[Any] = []
                for _ in range(100):
                    rows = (await sdk.query_logs(sql, max_rows=100_000))["rows"]
                    if len(rows) == len(ids) and all(r[2] is not None for r in rows):
                        break
                    await asyncio.sleep(0.1)
                node_rows = (await sdk.query_logs(node_sql, max_rows=10_000))["rows"]
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
            await nc.close()
    statuses: dict[str, int] = {}
    for i in ids:
        statuses[done[i][1]] = statuses.get(done[i][1], 0) + 1
    by_id = {r[0]: r[1] for r in rows}
    per_server: dict[str, int] = {}
    for r in rows:
        per_server[r[1]] = per_server.get(r[1], 0) + 1
    waits = [r[2] for r in rows if r[2] is not None]
    first_submit = time.time() - (time.perf_counter() - t0)  # wall clock of t0, near enough
    tail: dict[str, dict[str, float]] = {}
    for r in rows:
        if r[1] is None or r[5] is None:
            continue
        t = tail.setdefault(r[1], {"busy_s": 0.0, "last_finish_s": 0.0})
        t["busy_s"] += r[4] or 0.0
        t["last_finish_s"] = max(t["last_finish_s"], r[5] - first_submit)
    return {
        "makespan_s": makespan,
        "mean_wait_s": sum(waits) / len(waits) if waits else float("nan"),
        "statuses": statuses,
        "jobs_per_server": dict(sorted(per_server.items())),
        "retried_jobs": sum(1 for r in rows if (r[3] or 0) > 1),
        "per_server": dict(sorted(tail.items())),
        "placement": [by_id.get(i) for i in ids],
        "node_runs": [
            {"server_id": r[0], "class_type": r[1], "runs": r[2], "avg_s": r[3]} for r in node_rows
        ],
        "arrivals": sorted(arrivals),
    }


async def main(quick: bool, fleet_only: bool = False) -> dict[str, Any]:
    if fleet_only:
        fleet = await fleet_section.run(quick)
        goals = fleet_goals(fleet)
        say("")
        print_goals(goals)
        return {"mode": "quick" if quick else "full", "fleet": fleet, "goals": goals}
    rng = random.Random(7)
    n_jobs = 60 if quick else 200
    scale = 0.5 if quick else 1.0
    class_seconds = {k: v * scale for k, v in CLASS_SECONDS.items()}
    speeds = {"s1": 1.0, "s2": 2.0, "s4a": 4.0, "s4b": 4.0}
    workflows = [mixed_job(i, rng.randint(1, 4), rng.randint(0, 3)) for i in range(n_jobs)]
    works = [work_of(w, class_seconds, 0.0) for w in workflows]
    total_speed = sum(speeds.values())
    ideal = sum(works) / total_speed
    servers = [
        (sid, SimulatorConfig(class_seconds=class_seconds, speed=sp)) for sid, sp in speeds.items()
    ]
    say(f"mixed: {n_jobs} jobs, {sum(works):.1f} s of 1x work, ideal makespan {ideal:.2f} s")
    live = await live_run(servers, workflows)
    arrivals = live.pop("arrivals")
    order = list(range(n_jobs))  # submission order is the list order (gather starts them so)
    sim_rows = []
    offline = {}
    for strategy in ("round_robin", "fewest_queued", "earliest_finish"):
        mk, wait = simulate(
            strategy, [works[i] for i in order], [0.0] * n_jobs, list(speeds.values())
        )
        offline[strategy] = {"makespan_s": mk, "mean_wait_s": wait}
    rows = [["gateway (live)", live["makespan_s"], live["makespan_s"] / ideal, live["mean_wait_s"]]]
    for name, o in offline.items():
        label = {
            "round_robin": "round-robin (offline)",
            "fewest_queued": "fewest queued (offline)",
            "earliest_finish": "earliest finish, speed-aware (offline ref.)",
        }[name]
        rows.append([label, o["makespan_s"], o["makespan_s"] / ideal, o["mean_wait_s"]])
        sim_rows.append(name)
    rows.append(["ideal (work / total speed)", ideal, 1.0, ""])
    say("\nmixed jobs on speeds 1x, 2x, 4x, 4x (offline: all jobs arrive at t=0, no overhead)")
    say(table(rows, ["strategy", "makespan s", "× ideal", "mean wait s"]))
    say(f"live: statuses {live['statuses']}, jobs per server {live['jobs_per_server']}")
    per_rows = []
    for sid, sp in speeds.items():
        t = live["per_server"].get(sid, {})
        fair = sum(works) * sp / total_speed
        done_work = sum(
            w for w, srv in zip(works, live.get("placement", []), strict=False) if srv == sid
        )
        per_rows.append(
            [
                sid,
                sp,
                live["jobs_per_server"].get(sid, 0),
                fair / sp,
                t.get("busy_s", 0.0),
                t.get("last_finish_s", 0.0),
                done_work / sp if done_work else "",
            ]
        )
    say(
        table(
            per_rows,
            [
                "server",
                "speed",
                "jobs",
                "ideal busy s",
                "busy s (running→end)",
                "last finish s",
                "assigned work / speed s",
            ],
        )
    )
    say(f"live submission took {arrivals[-1]:.2f} s")
    node_rows = []
    for r in live["node_runs"]:
        nominal = class_seconds.get(r["class_type"], 0.0) / speeds.get(r["server_id"], 1.0)
        node_rows.append([r["server_id"], r["class_type"], r["runs"], nominal, r["avg_s"]])
    say("node run times as logged (node_started to next event) vs nominal class_seconds/speed")
    say(table(node_rows, ["server", "class", "runs", "nominal s", "logged avg s"]))

    crash_at = ideal / 2
    say(f"\ncrash run: s4b dies at {crash_at:.2f} s ...")
    crashed = await live_run(servers, workflows, crash=("s4b", crash_at))
    crashed.pop("arrivals")
    left_speed = total_speed - speeds["s4b"]
    ideal_crash = crash_at + (sum(works) - total_speed * crash_at) / left_speed
    say(
        table(
            [
                [
                    "gateway, s4b crashed",
                    crashed["makespan_s"],
                    ideal_crash,
                    crashed["makespan_s"] / ideal_crash,
                    crashed["mean_wait_s"],
                    crashed["retried_jobs"],
                    " ".join(f"{k}={v}" for k, v in crashed["statuses"].items()),
                ]
            ],
            ["run", "makespan s", "ideal s", "× ideal", "mean wait s", "retried", "statuses"],
        )
    )

    e2e_rows = []
    e2e = {}
    e2e_cases = (0.1,) if quick else (0.05, 0.1, 0.2)
    for node_seconds in e2e_cases:
        sp = {"x1": 1.0, "x2": 2.0, "x4": 4.0}
        cfgs = [(s, SimulatorConfig(node_seconds=node_seconds, speed=v)) for s, v in sp.items()]
        jobs = [tiny(1000 + i) for i in range(70)]
        e_ideal = 70 * 3 * node_seconds / sum(sp.values())
        say(f"\ne2e case node_seconds={node_seconds}: ideal {e_ideal:.2f} s ...")
        run = await live_run(cfgs, jobs)
        run.pop("arrivals")
        rr, _ = simulate("round_robin", [3 * node_seconds] * 70, [0.0] * 70, list(sp.values()))
        ratio = run["makespan_s"] / e_ideal
        e2e[str(node_seconds)] = {
            **run,
            "ideal_s": e_ideal,
            "ratio": ratio,
            "rr_ratio": rr / e_ideal,
        }
        e2e_rows.append(
            [node_seconds, run["makespan_s"], e_ideal, ratio, rr / e_ideal, run["jobs_per_server"]]
        )
    say("\ne2e case: speeds 1x, 2x, 4x, 70 equal 3-node jobs (we measured 1.50, 1.26, 1.08)")
    say(table(e2e_rows, ["node s", "makespan s", "ideal s", "× ideal", "RR × ideal", "per server"]))

    ratio = live["makespan_s"] / ideal
    naive_best = min(offline["round_robin"]["makespan_s"], offline["fewest_queued"]["makespan_s"])
    goals = [
        goal("mixed: makespan / ideal", ratio, "x", 1.05, False),
        goal(
            "mixed: makespan / best naive (offline)",
            live["makespan_s"] / naive_best,
            "x",
            1.0,
            False,
        ),
        goal(
            "crash: makespan / ideal-with-crash",
            crashed["makespan_s"] / ideal_crash,
            "x",
            1.05,
            False,
        ),
    ]
    goals += [
        goal(f"e2e case node_seconds={k}: makespan / ideal", v["ratio"], "x", 1.05, False)
        for k, v in e2e.items()
    ]
    fleet = await fleet_section.run(quick)
    goals += fleet_goals(fleet)
    say("")
    print_goals(goals)
    return {
        "mode": "quick" if quick else "full",
        "mixed": {
            "jobs": n_jobs,
            "class_seconds": class_seconds,
            "speeds": speeds,
            "total_work_s": sum(works),
            "ideal_s": ideal,
            "live": live,
            "offline": offline,
        },
        "crash": {**crashed, "crash_at_s": crash_at, "ideal_s": ideal_crash},
        "e2e_case": e2e,
        "fleet": fleet,
        "note": "2-core machine shared with other tests; offline strategies have no overhead.",
        "goals": goals,
    }


def fleet_goals(fleet: dict[str, Any]) -> list[dict[str, Any]]:
    live = fleet["live"]
    return [
        goal(
            "fleet: makespan / lower bound (one load per model)",
            live["makespan_s"] / fleet["bound_s"],
            "x",
            1.15,
            False,
        ),
        goal(
            "fleet: best model-blind (offline, no overhead) / gateway makespan",
            fleet["best_blind_s"] / live["makespan_s"],
            "x",
            1.5,
            True,
        ),
        goal(
            "fleet: gateway model-blind (live) / gateway makespan",
            fleet["live_blind"]["makespan_s"] / live["makespan_s"],
            "x",
            1.5,
            True,
        ),
        goal(
            "fleet: model loads, gateway / fewest of the baselines (offline)",
            live["loads"] / max(1, fleet["fewest_baseline_loads"]),
            "x",
            1.0,
            False,
        ),
    ]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="60 smaller jobs, one e2e case")
    parser.add_argument("--fleet-only", action="store_true", help="only the fleet workload")
    parser.add_argument("--fairness", action="store_true", help="only fair share between keys")
    args = parser.parse_args()
    if args.fairness:
        write_results("fairness", asyncio.run(fairness.main(args.quick)))
        sys.exit(0)
    name = "balance_fleet" if args.fleet_only else "balance"
    write_results(name, asyncio.run(main(args.quick, args.fleet_only)))
