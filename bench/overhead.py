"""Gateway overhead: the same tiny workflow on the same fake ComfyUI, direct vs through the gateway.

    uv run python bench/overhead.py [--quick] [--jobs N] [--split]

Direct: a minimal ComfyUI client (one websocket, POST /prompt with client_id, wait for
`executing` with node null for that prompt, GET /history for its outputs' names: the least
that gets the result, as the SDK's answer carries the outputs). Gateway:
AsyncComfyUISDK.execute_workflow. By default every role runs in this process's event loop;
--split runs them as processes, as deployed (bench/split.py). Jobs are
run one at a time, alternating direct / gateway, each with a different EmptyImage color so that
ComfyUI's cache never answers. Node time is zero. Afterwards every gateway job's log is read
back and split into stages by the events' timestamps.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx
import websockets

from bench.common import (
    goal,
    median,
    pct,
    print_goals,
    running_system,
    say,
    table,
    tiny,
    write_results,
)
from bench.split import split_system
from gateway.bus.connection import connect
from gateway.bus.contract import JobRecord, Subjects, decode
from plugins.simulator import SimulatorConfig
from sdk import AsyncComfyUISDK


class DirectClient:
    """The least a ComfyUI client does: one websocket, POST /prompt, wait for the end."""

    def __init__(self, base_url: str, ws_url: str) -> None:
        self.client_id = uuid.uuid4().hex
        self.http = httpx.AsyncClient(base_url=base_url, timeout=60)
        self.ws_url = f"{ws_url}?clientId={self.client_id}"
        self.waiting: dict[str, asyncio.Future[None]] = {}
        self.early: set[str] = set()

    async def __aenter__(self) -> DirectClient:
        self.ws = await websockets.connect(self.ws_url, max_size=None)
        self.reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *_: object) -> None:
        self.reader.cancel()
        await asyncio.gather(self.reader, return_exceptions=True)
        await self.ws.close()
        await self.http.aclose()

    async def _read(self) -> None:
        async for message in self.ws:
            if not isinstance(message, str):
                continue
            msg = json.loads(message)
            data = msg.get("data") or {}
            if msg.get("type") == "executing" and data.get("node") is None:
                prompt_id = data.get("prompt_id")
                future = self.waiting.pop(prompt_id, None)
                if future is not None and not future.done():
                    future.set_result(None)
                elif prompt_id:
                    self.early.add(prompt_id)

    async def run(self, workflow: dict[str, Any]) -> None:
        reply = await self.http.post(
            "/prompt", json={"prompt": workflow, "client_id": self.client_id}
        )
        reply.raise_for_status()
        prompt_id = reply.json()["prompt_id"]
        if prompt_id in self.early:
            self.early.discard(prompt_id)
        else:
            future = asyncio.get_running_loop().create_future()
            self.waiting[prompt_id] = future
            await asyncio.wait_for(future, 60)
        outputs = (await self.http.get(f"/history/{prompt_id}")).json()[prompt_id]["outputs"]
        if not outputs:
            raise RuntimeError(f"prompt {prompt_id} ended without outputs")


STAGES = [
    ("submit→queued", None, "queued"),
    ("queued→dispatched", "queued", "dispatched"),
    ("dispatched→running", "dispatched", "running"),
    ("running→last node event", "running", "_last_node"),
    ("last node→history", "_last_node", "history"),
    ("history→succeeded", "history", "succeeded"),
    ("succeeded→KV record terminal", "succeeded", "_kv_terminal"),
    ("KV record terminal→client has result", "_kv_terminal", None),
    ("(succeeded→client has result)", "succeeded", None),
]


async def watch_terminal(js: Any, bucket: str, seen: dict[str, float]) -> None:
    """Wall-clock time at which each job's KV record (what /execute waits on) turned terminal."""
    kv = await js.key_value(bucket)
    watcher = await kv.watchall()
    try:
        async for entry in watcher:
            if entry is None or entry.value is None:
                continue
            record = decode(entry.value, JobRecord)
            if record.status.terminal and record.job_id not in seen:
                seen[record.job_id] = time.time()
    finally:
        await watcher.stop()


def stages_of(
    entries: list[dict[str, Any]], t_submit: float, t_done: float, t_kv: float | None
) -> dict[str, float]:
    """Milliseconds spent in each stage of one job, from its events' timestamps (wall clock)."""
    first: dict[str, float] = {}
    if t_kv is not None:
        first["_kv_terminal"] = t_kv
    last_node = None
    for entry in entries:
        kind = entry.get("type")
        ts = entry.get("ts")
        if kind is None or ts is None:
            continue
        first.setdefault(kind, ts)
        if kind.startswith("node_"):
            last_node = ts
    if last_node is not None:
        first["_last_node"] = last_node
    out: dict[str, float] = {}
    for name, a, b in STAGES:
        ta = t_submit if a is None else first.get(a)
        tb = t_done if b is None else first.get(b)
        if ta is not None and tb is not None:
            out[name] = (tb - ta) * 1000
    return out


@asynccontextmanager
async def system_with_one_fake(split: bool) -> AsyncIterator[tuple[str, str, str, str]]:
    """The gateway's URL, the broker's, the fake ComfyUI's HTTP and websocket URLs."""
    if split:
        async with split_system(1) as split_sys:
            address = split_sys.addresses[0]
            yield split_sys.url, split_sys.nats_url, f"http://{address}", f"ws://{address}/ws"
        return
    async with running_system() as system:
        sim = await system.add_server("sim", SimulatorConfig(node_seconds=0.0))
        yield system.url, system.settings.nats_url, sim.url, sim.ws_url


async def main(jobs: int, quick: bool, split: bool) -> dict[str, Any]:
    async with system_with_one_fake(split) as (url, nats_url, sim_url, sim_ws_url):
        direct_ms: list[float] = []
        gateway_ms: list[float] = []
        timed: list[tuple[str, float, float]] = []
        kv_seen: dict[str, float] = {}
        nc = await connect(nats_url, "bench-watch")
        watch = asyncio.create_task(watch_terminal(nc.jetstream(), Subjects().jobs_bucket, kv_seen))
        async with (
            DirectClient(sim_url, sim_ws_url) as direct,
            AsyncComfyUISDK(url, timeout=60) as sdk,
        ):
            # Warm-up: both paths, a few jobs, not counted.
            for i in range(5):
                await direct.run(tiny(10_000_000 + i, "warm"))
                await sdk.execute_workflow(tiny(11_000_000 + i, "warm"))
            say(f"running {jobs} jobs each, alternating direct / gateway ...")
            started = time.perf_counter()
            for i in range(jobs):
                t0 = time.perf_counter()
                await direct.run(tiny(2 * i, "direct"))
                direct_ms.append((time.perf_counter() - t0) * 1000)
                w0 = time.time()
                t0 = time.perf_counter()
                result = await sdk.execute_workflow(tiny(2 * i + 1, "gw"))
                gateway_ms.append((time.perf_counter() - t0) * 1000)
                timed.append((result.job_id, w0, time.time()))
            wall = time.perf_counter() - started
            say(f"done in {wall:.1f} s; reading {len(timed)} job logs for the stages ...")
            per_stage: dict[str, list[float]] = {name: [] for name, _, _ in STAGES}
            for job_id, w0, w1 in timed:
                log = await sdk.get_logs(job_id)
                stages = stages_of(log["entries"], w0, w1, kv_seen.get(job_id))
                for name, ms in stages.items():
                    per_stage[name].append(ms)
        watch.cancel()
        await asyncio.gather(watch, return_exceptions=True)
        await nc.close()
    rows = []
    for name, values in (("direct", direct_ms), ("gateway", gateway_ms)):
        rows.append([name, len(values), pct(values, 50), pct(values, 95), pct(values, 99)])
    added = {q: pct(gateway_ms, q) - pct(direct_ms, q) for q in (50, 95, 99)}
    rows.append(["added by gateway", "", added[50], added[95], added[99]])
    rows.append(
        [
            "ratio gateway/direct",
            "",
            *(pct(gateway_ms, q) / pct(direct_ms, q) for q in (50, 95, 99)),
        ]
    )
    say("\nlatency per job (ms), node time 0, jobs run one at a time")
    say(table(rows, ["path", "jobs", "p50", "p95", "p99"]))
    stage_rows = [[name, len(v), median(v), pct(v, 95)] for name, v in per_stage.items()]
    say("\ngateway job stages (ms, from event timestamps; wall clock of one machine)")
    say(table(stage_rows, ["stage", "n", "median", "p95"]))
    goals = [
        goal("gateway added latency p50", added[50], "ms", 5, False),
        goal("gateway added latency p99", added[99], "ms", 20, False),
    ]
    say("")
    print_goals(goals)
    return {
        "mode": "quick" if quick else "full",
        "roles": "processes" if split else "one process",
        "jobs_per_path": jobs,
        "latency_ms": {
            "direct": {f"p{q}": pct(direct_ms, q) for q in (50, 95, 99)},
            "gateway": {f"p{q}": pct(gateway_ms, q) for q in (50, 95, 99)},
            "added": {f"p{q}": v for q, v in added.items()},
        },
        "stages_ms": {
            name: {"median": median(v), "p95": pct(v, 95), "n": len(v)}
            for name, v in per_stage.items()
        },
        "note": "2-core machine shared with other engineers' tests: compare side by side.",
        "goals": goals,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="60 jobs per path (< 60 s)")
    parser.add_argument("--jobs", type=int, default=None)
    parser.add_argument(
        "--split", action="store_true", help="roles as processes; results in overhead_split.json"
    )
    args = parser.parse_args()
    n = args.jobs or (60 if args.quick else 500)
    result = asyncio.run(main(n, args.quick, args.split))
    write_results("overhead_split" if args.split else "overhead", result)
