"""Children of bench/memory.py: fake ComfyUIs it can hang, and a role run under tracemalloc.

    python bench/memprobe.py sims --count N --base-dir DIR [--big-bytes B]
        N fake ComfyUIs (sim0..) and, with --big-bytes, one more ("big") whose SaveImage
        writes a file of B bytes for images of at least 1024x1024; prints one JSON line
        {"addresses": {id: "host:port"}} once all listen. SIGUSR2 hangs every queue (prompts
        accepted, never run). Runs until SIGTERM.
    python bench/memprobe.py run -m MODULE ARGS... | run SCRIPT ARGS...
        runs a role as `python -m MODULE ARGS` (or `python SCRIPT ARGS`) would. With
        COMFYBENCH_TRACEMALLOC=FILE it runs under tracemalloc: each SIGUSR2 takes a snapshot
        (after gc.collect) and from the second on writes to FILE (JSON) the allocation sites
        that grew most since the first.

SIGUSR2, not SIGUSR1: every role's `stop_on_signals` takes SIGUSR1 (it dumps the tasks).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import runpy
import signal
import sys
import tracemalloc
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TRACE_ENV = "COMFYBENCH_TRACEMALLOC"
BIG_PIXELS = 1024 * 1024
_FRAMES = 8  # enough to see past asyncio and msgspec into the caller that keeps the memory


# -- fake servers ------------------------------------------------------------------------------


def make_outputs_big(size: int) -> None:
    """SaveImage of a large image writes `size` bytes: a PNG signature, then zeros.

    Only the adapter's streaming is measured, so the content need not be a real image; a
    zeroed bytearray costs the fake no memory until its pages are touched.
    """
    from plugins.simulator import nodes

    small = nodes._encode

    async def encode(image: Any) -> bytes:
        if image.width * image.height < BIG_PIXELS:
            return await small(image)
        data = bytearray(size)
        data[:8] = b"\x89PNG\r\n\x1a\n"
        return data  # type: ignore[return-value]  # write_bytes takes any buffer

    nodes._encode = encode


async def sims(count: int, base_dir: str, big_bytes: int) -> None:
    from gateway.lifecycle import stop_on_signals
    from plugins.simulator import SimulatorConfig, run_simulator

    if big_bytes:
        make_outputs_big(big_bytes)
    names = [f"sim{k}" for k in range(count)] + (["big"] if big_bytes else [])
    stop = asyncio.Event()
    with stop_on_signals(stop):
        async with AsyncExitStack() as stack:
            running = {}
            for name in names:
                config = SimulatorConfig(node_seconds=0.0, base_dir=f"{base_dir}/{name}")
                running[name] = await stack.enter_async_context(run_simulator(config))

            def hang_all() -> None:
                for sim in running.values():
                    sim.set_hang(True)

            asyncio.get_running_loop().add_signal_handler(signal.SIGUSR2, hang_all)
            addresses = {name: sim.address for name, sim in running.items()}
            print(json.dumps({"addresses": addresses}), flush=True)
            await stop.wait()


# -- tracemalloc -------------------------------------------------------------------------------


def _short(path: str) -> str:
    for marker in ("/site-packages/", "/work/main/", "/lib/python3.11/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Tracer:
    """Snapshots on SIGUSR2; the growth since the first one, by site, written as JSON."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.first: tracemalloc.Snapshot | None = None
        self.points: list[dict[str, float]] = []

    def install(self) -> None:
        tracemalloc.start(_FRAMES)
        signal.signal(signal.SIGUSR2, self.on_signal)

    def on_signal(self, _signum: int, _frame: Any) -> None:
        rss = _rss_mb()  # before the snapshot, which costs memory of its own
        gc.collect()  # what survives a collection is kept, not garbage waiting for one
        snapshot = tracemalloc.take_snapshot().filter_traces(
            [tracemalloc.Filter(False, tracemalloc.__file__)]
        )
        traced, _ = tracemalloc.get_traced_memory()
        self.points.append({"rss_mb": rss, "traced_mb": traced / 2**20})
        if self.first is None:
            self.first = snapshot
            return
        self.write(snapshot)

    def write(self, snapshot: tracemalloc.Snapshot) -> None:
        assert self.first is not None
        by_line = snapshot.compare_to(self.first, "lineno")
        by_stack = snapshot.compare_to(self.first, "traceback")[:10]
        report = {
            "points": self.points,
            # The program's own growth: traced_mb also counts the first snapshot, kept meanwhile.
            "heap_growth_kb": sum(s.size_diff for s in by_line) / 1024,
            "top_lines": [
                {
                    "site": f"{_short(s.traceback[0].filename)}:{s.traceback[0].lineno}",
                    "size_diff_kb": s.size_diff / 1024,
                    "count_diff": s.count_diff,
                }
                for s in by_line[:25]
            ],
            "top_stacks": [
                {
                    "size_diff_kb": s.size_diff / 1024,
                    "count_diff": s.count_diff,
                    # innermost frame first
                    "stack": [f"{_short(f.filename)}:{f.lineno}" for f in reversed(s.traceback)],
                }
                for s in by_stack
            ],
        }
        temp = self.out.with_suffix(".tmp")
        temp.write_text(json.dumps(report, indent=2))
        temp.replace(self.out)  # the bench polls the file: it must never see half of it


def run_role(argv: list[str]) -> None:
    """Run a module (`-m NAME ARGS`) or a script (`PATH ARGS`) as its own command would."""
    out = os.environ.get(TRACE_ENV)
    if out:
        Tracer(Path(out)).install()
    if argv[0] == "-m":
        sys.argv = [argv[1], *argv[2:]]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = argv
        runpy.run_path(argv[0], run_name="__main__")


def main() -> None:
    if sys.argv[1:2] == ["run"]:
        run_role(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    roles = parser.add_subparsers(dest="role", required=True)
    s = roles.add_parser("sims")
    s.add_argument("--count", type=int, required=True)
    s.add_argument("--base-dir", required=True)
    s.add_argument("--big-bytes", type=int, default=0)
    args = parser.parse_args()
    asyncio.run(sims(args.count, args.base_dir, args.big_bytes))


if __name__ == "__main__":
    main()
