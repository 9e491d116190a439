"""Section 4 of `bench/balance.py`: the fleet workload, live, replayed and offline.

The gateway runs the jobs of `bench/fleetload.py` live (`bench/fleetlive.py`) as it is and
model-blind, and its own placement code replays them on a simulated clock (`bench/fleetsim.py`:
no overhead, so what is left is the rule's), as they are and with every run stretched as the
live run's were; the offline strategies get the same jobs. The lower bound is the issue's: all
the work plus one load of each model, over the total speed, and never less than a burst's
arrival plus the work from it on. The bound with one load per model per server the live run
loaded it on is shown too: it grows with the run's own loads, so it flatters a run that loads
often.
"""

from __future__ import annotations

from typing import Any

from bench.common import say, table
from bench.fleetlive import live
from bench.fleetload import (
    CHECKPOINTS,
    SLOTS,
    STRATEGIES,
    load_time,
    lower_bound,
    simulate,
    workload,
)
from bench.fleetsim import replay


async def run(quick: bool) -> dict[str, Any]:
    """Section 4 of balance.py: the fleet workload, live and offline; figures and goals."""
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
