"""Fair share: a light key's wait while a heavy key floods the fleet, against an idle fleet.

    uv run python bench/fairness.py [--quick]      (or bench/balance.py --fairness)

Four fake servers (speed 1), jobs of 3 nodes at 0.1 s. Two API keys, `heavy` and `light`.
1. Idle: the light key submits a job every 0.5 s; each one's wait is from its submission to its
   end (what the key waits for), and its queue wait from submission to ComfyUI starting it.
2. Flood: the heavy key submits enough jobs at once to keep the fleet busy past the light key's
   run; once the leader has queued them all and binds from them, the light key submits the
   same way.
Goal: the light key's p95 wait during the flood is at most 2x its p95 wait on the idle fleet.
Run with servers of capacity 2 (the default: one running, one queued on ComfyUI) and 1. The
figure for first come, first served is estimated: the flood's work ahead of each light job
when it arrived, over the fleet's speed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    goal,
    pct,
    print_goals,
    running_system,
    say,
    table,
    tiny,
    write_results,
)
from plugins.simulator import SimulatorConfig
from tests.e2e.conftest import System

KEYS = {"ops": "bench-ops-key", "heavy": "bench-heavy-key", "light": "bench-light-key"}
SERVERS = ("b1", "b2", "b3", "b4")
NODE_SECONDS = 0.1
JOB_SECONDS = 3 * NODE_SECONDS
LIGHT_EVERY_S = 0.5


def _auth(who: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[who]}"}


@asynccontextmanager
async def keyed_system(capacity: int) -> AsyncIterator[System]:
    """The system with the three keys, on its own broker, and the servers registered."""
    keys = [f"admin/ops@plain:{KEYS['ops']}"]
    keys += [f"user/{who}@plain:{KEYS[who]}" for who in ("heavy", "light")]
    async with running_system(headers=_auth("ops"), api_keys=keys) as system:
        config = SimulatorConfig(node_seconds=NODE_SECONDS)
        for server_id in SERVERS:
            await system.add_server(server_id, config, capacity=capacity)
        yield system


async def _light_run(
    client: httpx.AsyncClient, jobs: int, seed: int, flood: httpx.AsyncClient | None = None
) -> list[dict[str, Any]]:
    """Submit a light job every LIGHT_EVERY_S seconds; each one's timings once it ended, with
    the flood's jobs waiting when it was submitted (`flood`: the heavy key's client)."""

    async def one(index: int) -> dict[str, Any]:
        await asyncio.sleep(index * LIGHT_EVERY_S)  # the arrival pattern, not a wait for state
        ahead = await _flood_waiting(flood) if flood is not None else 0
        reply = await client.post("/workflow/submit", json={"workflow": tiny(seed + index)})
        reply.raise_for_status()
        job_id = reply.json()["job_id"]
        result = (await client.get(f"/workflow/result/{job_id}", params={"wait": 120})).json()
        assert result["status"] == "succeeded", result
        return {**result["timings"], "flood_waiting": ahead, "at": time.perf_counter()}

    return list(await asyncio.gather(*(one(i) for i in range(jobs))))


async def _draining(client: httpx.AsyncClient) -> None:
    """Until the leader has queued the whole flood and binds from it: its count of the heavy
    key's waiting jobs, having risen, falls (the light run measures a flood, not its intake)."""
    highest = 0
    async with asyncio.timeout(120):
        while True:
            waiting = await _flood_waiting(client)
            if 0 < waiting < highest:
                return
            highest = max(highest, waiting)
            await asyncio.sleep(0.2)  # paced reads of the leader's count


async def _flood_waiting(client: httpx.AsyncClient) -> int:
    """The heavy key's jobs waiting, as the leader last counted them."""
    share = (await client.get("/workflow/queue")).json()
    return int(share["callers"][0]["pending"])


async def measure(capacity: int, light_jobs: int) -> dict[str, Any]:
    """Idle and flood phases on one system of servers of `capacity`."""
    async with keyed_system(capacity) as system:
        heavy = httpx.AsyncClient(base_url=system.url, headers=_auth("heavy"), timeout=180)
        light = httpx.AsyncClient(base_url=system.url, headers=_auth("light"), timeout=180)
        async with heavy, light:
            idle = await _light_run(light, light_jobs, 10_000)
            # Enough to keep every server busy until the light run is over, and then some.
            flood_jobs = int(1.5 * light_jobs * LIGHT_EVERY_S * len(SERVERS) / JOB_SECONDS)
            started = time.perf_counter()
            replies = await asyncio.gather(
                *(
                    heavy.post("/workflow/submit", json={"workflow": tiny(20_000 + i)})
                    for i in range(flood_jobs)
                )
            )
            assert all(r.status_code == 202 for r in replies), {r.status_code for r in replies}
            submitted_s = time.perf_counter() - started
            await _draining(heavy)
            during = await _light_run(light, light_jobs, 30_000, flood=heavy)
    idle_wait = [t["total_s"] for t in idle]
    flood_wait = [t["total_s"] for t in during]
    # First come, first served: a light job would wait for every flood job waiting when it
    # came, at the pace the flood was seen to drain, then run as on the idle fleet.
    # (The leader's count may lag the flood's submission: start from its highest.)
    first = max(during, key=lambda t: t["flood_waiting"])
    last = during[-1]
    drained = first["flood_waiting"] - last["flood_waiting"]
    per_s = drained / max(1e-9, last["at"] - first["at"]) if drained > 0 else float("nan")
    fifo = [t["flood_waiting"] / per_s + pct(idle_wait, 50) for t in during]
    return {
        "capacity": capacity,
        "light_jobs": light_jobs,
        "flood_jobs": flood_jobs,
        "flood_submitted_in_s": submitted_s,
        "flood_waiting_first_last": [first["flood_waiting"], last["flood_waiting"]],
        "flood_drain_per_s": per_s,
        "idle": {
            "p50_wait_s": pct(idle_wait, 50),
            "p95_wait_s": pct(idle_wait, 95),
            "p95_queue_wait_s": pct([t["queue_wait_s"] for t in idle], 95),
        },
        "flood": {
            "p50_wait_s": pct(flood_wait, 50),
            "p95_wait_s": pct(flood_wait, 95),
            "p95_queue_wait_s": pct([t["queue_wait_s"] for t in during], 95),
        },
        "fifo_estimate_p95_wait_s": pct(fifo, 95),
        "ratio": pct(flood_wait, 95) / pct(idle_wait, 95),
    }


async def run(quick: bool) -> dict[str, Any]:
    """Both capacities; the goals and a table."""
    light_jobs = 12 if quick else 30
    load_before = os.getloadavg()
    runs = []
    for capacity in (2, 1):
        say(f"fairness: capacity {capacity}, {light_jobs} light jobs, idle then flooded ...")
        runs.append(await measure(capacity, light_jobs))
    load_after = os.getloadavg()
    rows = [
        [
            r["capacity"],
            r["flood_jobs"],
            r["idle"]["p95_wait_s"],
            r["flood"]["p95_wait_s"],
            r["ratio"],
            r["flood"]["p95_queue_wait_s"],
            r["fifo_estimate_p95_wait_s"],
        ]
        for r in runs
    ]
    say(
        table(
            rows,
            [
                "capacity",
                "flood jobs",
                "idle p95 s",
                "flooded p95 s",
                "x idle",
                "flooded p95 queue s",
                "FIFO p95 s (est.)",
            ],
        )
    )
    say(f"load average before {load_before[0]:.1f}, after {load_after[0]:.1f}")
    goals = [
        goal(
            f"fairness, capacity {r['capacity']}: light key's p95 wait flooded / idle",
            r["ratio"],
            "x",
            2.0,
            False,
        )
        for r in runs
    ]
    return {"runs": runs, "load_average": [load_before[0], load_after[0]], "goals": goals}


async def main(quick: bool) -> dict[str, Any]:
    result = await run(quick)
    say("")
    print_goals(result["goals"])
    return {"mode": "quick" if quick else "full", **result}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="12 light jobs instead of 30")
    args = parser.parse_args()
    write_results("fairness", asyncio.run(main(args.quick)))
