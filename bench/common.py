"""Shared pieces of the benchmarks: the whole system in one event loop, workflows, reporting.

The system is built as tests/e2e/conftest.py builds it: an embedded nats-server (a child process
this module starts and stops), then the log sink, the adapter host and a gateway (with its
balancer) as tasks of the caller's event loop; fake ComfyUI servers are registered by REST.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from gateway.bus.natsserver import start_nats_server
from gateway.settings import Settings
from plugins.simulator.samples import tiny_workflow
from tests.e2e.conftest import System
from tests.e2e.conftest import running_system as system_on_broker

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


@asynccontextmanager
async def running_system(
    headers: Mapping[str, str] | None = None, **settings_kw: Any
) -> AsyncIterator[System]:
    """NATS (child process), log sink, adapter host and gateway in this loop; all stopped.
    `headers` authenticate the system's own REST calls (with `api_keys` set).

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
            async with system_on_broker(settings, headers=headers) as system:
                yield system
        finally:
            await server.stop()
