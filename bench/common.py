"""Shared pieces of the benchmarks: the whole system in one event loop, workflows, reporting.

The system is built as tests/e2e/conftest.py builds it: an embedded nats-server (a child process
this module starts and stops), then the log sink, the adapter host and a gateway (with its
balancer) as tasks of the caller's event loop; fake ComfyUI servers are registered by REST.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import msgspec

from gateway.adapterhost import AdapterHost
from gateway.bus import session
from gateway.contract import Subjects
from gateway.logsink.sink import run_logsink
from gateway.natsserver import start_nats_server
from gateway.service import storage_for
from gateway.settings import Settings
from plugins.simulator import Simulator, SimulatorConfig, run_simulator
from plugins.simulator.samples import tiny_workflow
from tests.conftest import start_gateway

RESULTS = Path(__file__).resolve().parent / "results"


def tiny(seed: int = 0, prefix: str = "bench") -> dict[str, Any]:
    """The sample workflow, its outputs named for the benchmarks."""
    return tiny_workflow(seed, prefix)


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), nearest rank; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1))))
    return ordered[rank]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def goal(name: str, value: float, unit: str, target: float, higher_is_better: bool) -> dict:
    met = value >= target if higher_is_better else value <= target
    return {
        "name": name,
        "value": round(value, 4),
        "unit": unit,
        "target": target,
        "higher_is_better": higher_is_better,
        "met": bool(met),
    }


def table(rows: list[list[Any]], header: list[str]) -> str:
    cells = [[str(c) for c in header]] + [
        [f"{c:.2f}" if isinstance(c, float) else str(c) for c in row] for row in rows
    ]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def print_goals(goals: list[dict]) -> None:
    rows = [
        [
            g["name"],
            g["value"],
            g["unit"],
            ("≥ " if g["higher_is_better"] else "≤ ") + str(g["target"]),
            "MET" if g["met"] else "missed",
        ]
        for g in goals
    ]
    say(table(rows, ["goal", "value", "unit", "target", ""]))


def say(*parts: Any) -> None:
    """A benchmark reports on the terminal."""
    print(*parts, flush=True)


def write_results(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"name": name, "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())} | (
        payload
    )
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    say(f"\nwrote {path}")
    return path


class System:
    """A running system: its URL, settings, fake servers."""

    def __init__(self, settings: Settings, stack: AsyncExitStack) -> None:
        self.settings = settings
        self.url = ""
        self.sims: dict[str, Simulator] = {}
        self._stack = stack

    async def add_server(
        self, server_id: str, config: SimulatorConfig | None = None, **registration: Any
    ) -> Simulator:
        base = Path(self.settings.data_dir) / "sims" / server_id
        config = msgspec.structs.replace(config or SimulatorConfig(), base_dir=str(base))
        sim = await self._stack.enter_async_context(run_simulator(config))
        self.sims[server_id] = sim
        body = {"name": server_id, "address": sim.address, "server_id": server_id, **registration}
        async with httpx.AsyncClient(base_url=self.url, timeout=30) as client:
            reply = await client.post("/servers", json=body)
            if reply.status_code != 201:
                raise RuntimeError(reply.text)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                servers = (await client.get("/servers")).json()
                if any(
                    s["server_id"] == server_id and s["status"] == "healthy" and s["node_types"]
                    for s in servers
                ):
                    return sim
                await asyncio.sleep(0.05)
        raise RuntimeError(f"server {server_id} never became healthy")


async def _stop_tasks(tasks: list[asyncio.Task[Any]], within: float) -> None:
    """Wait for tasks told to stop; cancel what is still running after `within` seconds."""
    _, pending = await asyncio.wait(tasks, timeout=within)
    for task in pending:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


@asynccontextmanager
async def running_system(**settings_kw: Any) -> AsyncIterator[System]:
    """NATS (child process), log sink, adapter host and gateway in this loop; all stopped.

    The submit rate limit is off unless `submit_rate_per_s` is given: a benchmark submits fast.
    """
    with tempfile.TemporaryDirectory(prefix="comfybench-") as tmp:
        server = await start_nats_server(
            port=0, store_dir=Path(tmp) / "nats", log_file=Path(tmp) / "nats.log"
        )
        try:
            settings = Settings(
                nats_url=server.url,
                data_dir=str(Path(tmp) / "data"),
                port=0,
                **({"submit_rate_per_s": 0.0} | settings_kw),
            )
            subjects = Subjects(settings.subject_prefix)
            stop = asyncio.Event()
            async with AsyncExitStack() as stack:
                nc = await stack.enter_async_context(session(settings.nats_url, "bench", subjects))
                storage = await stack.enter_async_context(storage_for(settings, nc.jetstream()))
                system = System(settings, stack)
                roles = [
                    asyncio.create_task(run_logsink(settings, stop, nc=nc)),
                    asyncio.create_task(AdapterHost(nc, settings, storage).run(stop)),
                ]
                gw_stop = asyncio.Event()
                gw_task: asyncio.Task[None] | None = None
                try:
                    system.url, gw_task = await start_gateway(settings, gw_stop)
                    yield system
                finally:
                    gw_stop.set()
                    if gw_task is not None:
                        await _stop_tasks([gw_task], 20)
                    stop.set()
                    await _stop_tasks(roles, 20)
        finally:
            await server.stop()
