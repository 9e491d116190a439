"""The system with its roles as processes, as deployed: for benchmarks that time or weigh roles.

`split_system(n)` starts nats-server, `comfyautomate gateway` (REST API and balancer),
`comfyautomate logsink`, one process with n adapters and one with n fake ComfyUIs
(bench/roles.py), waits until every server is healthy, and stops them all (by PID, SIGTERM then
SIGKILL) when the block ends, also on failure.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from gateway.bus.natsserver import start_nats_server

ROOT = Path(__file__).resolve().parents[1]
_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class SplitSystem:
    """Where the running system answers, and the PID of each role's process."""

    url: str
    nats_url: str
    addresses: list[str]
    data_dir: Path
    pids: dict[str, int] = field(default_factory=dict)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def start_child(*argv: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
    )


async def stop_child(process: asyncio.subprocess.Process) -> None:
    if process.returncode is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(process.wait(), 20)
    except TimeoutError:
        process.kill()
        await process.wait()


async def wait_healthy(url: str, count: int, within: float) -> None:
    deadline = time.monotonic() + within
    async with httpx.AsyncClient(base_url=url, timeout=5) as client:
        while time.monotonic() < deadline:
            try:
                servers = (await client.get("/servers")).json()
            except httpx.HTTPError:
                servers = []
            healthy = [s for s in servers if s["status"] == "healthy" and s["node_types"] > 0]
            if len(healthy) >= count:
                return
            await asyncio.sleep(0.2)
    raise TimeoutError(f"{count} servers did not turn healthy within {within} s")


@asynccontextmanager
async def split_system(servers: int) -> AsyncIterator[SplitSystem]:
    """The whole system, each role a process of its own, over `servers` fake ComfyUIs."""
    cli = ["-m", "gateway.app.cli"]
    with tempfile.TemporaryDirectory(prefix="comfybench-") as tmp:
        data = Path(tmp) / "data"
        broker = await start_nats_server(
            port=0, store_dir=Path(tmp) / "nats", log_file=Path(tmp) / "nats.log"
        )
        children: dict[str, asyncio.subprocess.Process] = {}
        try:
            common = ["--nats-url", broker.url, "--data-dir", str(data), "--log-level", "WARNING"]
            children[f"fake ComfyUIs ({servers}, bench/roles.py)"] = sims = await start_child(
                str(ROOT / "bench" / "roles.py"), "sims", "--count", str(servers),
                "--base-dir", str(Path(tmp) / "sims"),
            )  # fmt: skip
            assert sims.stdout is not None
            addresses = json.loads(await sims.stdout.readline())["addresses"]
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            children["gateway (REST + balancer)"] = await start_child(
                *cli, "gateway", *common, "--port", str(port)
            )
            children["log sink"] = await start_child(*cli, "logsink", *common)
            children[f"adapters ({servers}, one process)"] = await start_child(
                str(ROOT / "bench" / "roles.py"), "adapters", "--nats-url", broker.url,
                "--data-dir", str(data),
                *[arg for k, a in enumerate(addresses) for arg in ("--server", f"sim{k}={a}")],
            )  # fmt: skip
            await wait_healthy(url, servers, 60)
            pids = {name: p.pid for name, p in children.items()} | {"nats-server": broker.pid}
            yield SplitSystem(url, broker.url, addresses, data, pids)
        finally:
            for process in reversed(list(children.values())):
                await stop_child(process)
            await broker.stop()
