"""Bench children: fake ComfyUI servers, or adapters, as one process of their own.

    python bench/roles.py sims --count N --base-dir DIR
        prints one JSON line {"addresses": [...]} once all listen; runs until SIGTERM
    python bench/roles.py adapters --nats-url URL --data-dir DIR --server ID=HOST:PORT ...
        the adapters of these servers on one NATS connection; runs until SIGTERM
        (with COMFYBENCH_PROFILE_ADAPTERS=FILE and pyinstrument: a profile written to FILE)

`throughput.py --split` starts these next to `comfyautomate gateway` and `comfyautomate
logsink`, so that each role's CPU time can be read from /proc on its own, as in a deployment
where the roles are processes (and ComfyUI is on other machines).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from contextlib import AsyncExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.app.serve import storage_for
from gateway.bus.connection import session
from gateway.bus.contract import Subjects
from gateway.lifecycle import stop_on_signals
from gateway.settings import Settings
from plugins.comfyui.adapter import run_adapter
from plugins.simulator import SimulatorConfig, run_simulator


async def sims(count: int, base_dir: str) -> None:
    stop = asyncio.Event()
    with stop_on_signals(stop):
        async with AsyncExitStack() as stack:
            addresses = []
            for k in range(count):
                config = SimulatorConfig(node_seconds=0.0, base_dir=f"{base_dir}/sim{k}")
                sim = await stack.enter_async_context(run_simulator(config))
                addresses.append(sim.address)
            print(json.dumps({"addresses": addresses}), flush=True)
            await stop.wait()


async def adapters(nats_url: str, data_dir: str, servers: list[str], capacity: int) -> None:
    settings = Settings(nats_url=nats_url, data_dir=data_dir)
    subjects = Subjects(settings.subject_prefix)
    stop = asyncio.Event()
    with stop_on_signals(stop):
        async with (
            session(nats_url, "bench-adapters", subjects) as nc,
            storage_for(settings, nc.jetstream()) as storage,
        ):
            runs = []
            for item in servers:
                server_id, _, address = item.partition("=")
                runs.append(
                    run_adapter(
                        nc,
                        settings,
                        stop,
                        server_id=server_id,
                        address=address,
                        capacity=capacity,
                        storage=storage,
                    )
                )
            await asyncio.gather(*runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    roles = parser.add_subparsers(dest="role", required=True)
    s = roles.add_parser("sims")
    s.add_argument("--count", type=int, required=True)
    s.add_argument("--base-dir", required=True)
    a = roles.add_parser("adapters")
    a.add_argument("--nats-url", required=True)
    a.add_argument("--data-dir", required=True)
    a.add_argument("--server", action="append", default=[], metavar="ID=HOST:PORT")
    a.add_argument("--capacity", type=int, default=2)
    args = parser.parse_args()
    profile_to = os.environ.get("COMFYBENCH_PROFILE_ADAPTERS")
    profiler = None
    if profile_to and args.role == "adapters":
        from pyinstrument import Profiler  # needs: uv run --with pyinstrument

        profiler = Profiler(interval=0.002, async_mode="disabled")
        profiler.start()
    try:
        if args.role == "sims":
            asyncio.run(sims(args.count, args.base_dir))
        else:
            asyncio.run(adapters(args.nats_url, args.data_dir, args.server, args.capacity))
    finally:
        if profiler is not None and profile_to:
            profiler.stop()
            Path(profile_to).write_text(profiler.output_text(unicode=False, color=False))


if __name__ == "__main__":
    main()
