"""Memory: RSS of `comfyautomate up --simulate 2` idle, with many jobs in flight, and after.

    uv run python bench/memory.py [--quick]

Starts `python -m gateway.cli up --simulate 2` as a child process on free ports (its own
embedded nats-server on a free port, a temporary data folder) and reads VmRSS from
/proc/<pid>/status. `up` runs gateway, balancer, adapters, log sink and the two fake servers in
ONE process, so the figure is their sum; the nats-server it starts is reported apart. Two
rounds of N jobs submitted at once (REST); RSS is sampled idle, at the peak while jobs are in
flight, and after each round once idle (5 s). Growth = after round 2 - after round 1.
The child is stopped with SIGINT (SIGKILL after 20 s), and the nats-server it started is killed
by PID if it outlived it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx

from bench.common import goal, print_goals, say, table, tiny, write_results
from bench.throughput import Completions
from gateway.bus import connect
from sdk import AsyncComfyUISDK

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            out += [int(c) for c in (task / "children").read_text().split()]
    return out


def nats_child(pid: int) -> int | None:
    for child in children(pid):
        with contextlib.suppress(OSError):
            if "nats-server" in Path(f"/proc/{child}/cmdline").read_bytes().decode(errors="ignore"):
                return child
    return None


async def run_round(url: str, nats_url: str, n: int, pid: int, base: int) -> tuple[float, float]:
    """Submit n jobs at once, wait for all; return (peak RSS MB, seconds).

    Completion is read from the jobs KV bucket by one watcher of our own: n concurrent
    `/workflow/result?wait=` calls fail with "maximum consumers limit reached" (see README).
    """
    peak = rss_mb(pid)
    started = time.perf_counter()
    nc = await connect(nats_url, "bench-mem")
    completions = Completions()
    watch = asyncio.create_task(completions.run(nc.jetstream()))
    try:
        async with AsyncComfyUISDK(url, timeout=300) as sdk:
            sem = asyncio.Semaphore(32)

            async def submit(i: int) -> str:
                async with sem:
                    return await sdk.submit_workflow(tiny(base + i, "mem"))

            ids = set(await asyncio.gather(*(submit(i) for i in range(n))))
            while not ids <= completions.done.keys():
                peak = max(peak, rss_mb(pid))
                if time.perf_counter() - started > 170:
                    raise TimeoutError(f"{len(ids - completions.done.keys())} jobs unfinished")
                await asyncio.sleep(0.25)
    finally:
        watch.cancel()
        await asyncio.gather(watch, return_exceptions=True)
        await nc.close()
    return peak, time.perf_counter() - started


async def main(quick: bool) -> dict[str, Any]:
    n = 300 if quick else 1500
    port, nats_port = free_port(), free_port()
    nats_url = f"nats://127.0.0.1:{nats_port}"
    with tempfile.TemporaryDirectory(prefix="comfybench-mem-") as tmp:
        env = os.environ | {"COMFYAUTOMATE_SUBMIT_RATE_PER_S": "0"}
        cmd = [
            sys.executable, "-m", "gateway.cli", "up", "--log-level", "WARNING",
            "--nats-url", f"nats://127.0.0.1:{nats_port}", "--data-dir", f"{tmp}/data",
            "--port", str(port), "--simulate", "2",
        ]  # fmt: skip
        log = Path(tmp, "up.log").open("wb")  # noqa: SIM115, ASYNC230 - closed in finally
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)  # noqa: ASYNC220
        nats_pid = None
        try:
            url = f"http://127.0.0.1:{port}"
            async with httpx.AsyncClient(base_url=url) as client:
                deadline = time.monotonic() + 60
                while True:
                    if proc.poll() is not None:
                        raise RuntimeError(Path(tmp, "up.log").read_text()[-2000:])
                    with contextlib.suppress(httpx.HTTPError):
                        servers = (await client.get("/servers")).json()
                        if len(servers) >= 2 and all(s["status"] == "healthy" for s in servers):
                            break
                    if time.monotonic() > deadline:
                        raise RuntimeError("`up` did not become ready within 60 s")
                    await asyncio.sleep(0.25)
            nats_pid = nats_child(proc.pid)
            await asyncio.sleep(3)
            rows = [["idle after start", rss_mb(proc.pid), rss_mb(nats_pid) if nats_pid else ""]]
            say(f"round 1: {n} jobs ...")
            peak1, s1 = await run_round(url, nats_url, n, proc.pid, 0)
            rows.append([f"peak, {n} jobs in flight (round 1)", peak1, ""])
            await asyncio.sleep(5)
            after1 = rss_mb(proc.pid)
            rows.append(["idle after round 1", after1, rss_mb(nats_pid) if nats_pid else ""])
            say(f"round 2: {n} jobs ...")
            peak2, s2 = await run_round(url, nats_url, n, proc.pid, 10**7)
            rows.append([f"peak, {n} jobs in flight (round 2)", peak2, ""])
            await asyncio.sleep(5)
            after2 = rss_mb(proc.pid)
            rows.append(["idle after round 2", after2, rss_mb(nats_pid) if nats_pid else ""])
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    await asyncio.to_thread(proc.wait, 20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    await asyncio.to_thread(proc.wait, 10)
            if nats_pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(nats_pid, signal.SIGTERM)
            log.close()
    say("\nRSS (MB) of `up --simulate 2` (one process: gateway+balancer+adapters+sink+2 fakes)")
    say(table(rows, ["moment", "up process MB", "nats-server MB"]))
    say(f"rounds took {s1:.1f} s and {s2:.1f} s")
    growth = after2 - after1
    goals = [goal("RSS growth idle round 2 vs round 1", growth, "MB", 20, False)]
    say("")
    print_goals(goals)
    return {
        "mode": "quick" if quick else "full",
        "jobs_per_round": n,
        "rss_mb": {r[0]: r[1] for r in rows},
        "nats_rss_mb": {r[0]: r[2] for r in rows if r[2] != ""},
        "round_seconds": [s1, s2],
        "note": "`up` is one process; per-role RSS needs the roles run as separate processes.",
        "goals": goals,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="300 jobs per round")
    args = parser.parse_args()
    write_results("memory", asyncio.run(main(args.quick)))
