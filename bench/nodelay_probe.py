"""Why a keep-alive request to the gateway takes ~44 ms: TCP_NODELAY is off on its sockets.

    uv run python bench/nodelay_probe.py

Times GET /servers on one keep-alive connection (as the SDK makes them), as the gateway runs
today and with TCP_NODELAY set on each accepted socket by a runtime patch of this process only
(no product file changes), and reports TCP_NODELAY as found on the accepted sockets.
"""

from __future__ import annotations

import asyncio
import socket
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx
from uvicorn.protocols.http import h11_impl

from bench.common import median, running_system, say, table, write_results
from plugins.simulator import SimulatorConfig

_seen: list[int] = []
_fix = {"on": False}
_original = h11_impl.H11Protocol.connection_made


def _connection_made(self: Any, transport: Any) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        _seen.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        if _fix["on"]:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    _original(self, transport)


def install(fix: bool) -> None:
    """Wrap uvicorn's connection_made in this process (records TCP_NODELAY; sets it if `fix`)."""
    _fix["on"] = fix
    h11_impl.H11Protocol.connection_made = _connection_made  # type: ignore[method-assign]


async def timed(base: str, path: str, n: int = 30) -> float:
    async with httpx.AsyncClient(base_url=base) as client:
        await client.get(path)
        times = []
        for _ in range(n):
            t = time.perf_counter()
            await client.get(path)
            times.append((time.perf_counter() - t) * 1000)
    return median(times)


async def main() -> dict[str, Any]:
    install(fix=False)
    async with running_system() as system:
        sim = await system.add_server("sim", SimulatorConfig())
        _seen.clear()
        today = await timed(system.url, "/servers")
        seen_today = list(_seen)
        _fix["on"] = True
        fixed = await timed(system.url, "/servers")
        simulator = await timed(sim.url, "/queue")
    rows = [
        ["gateway GET /servers, as today", today, seen_today[-1] if seen_today else "?"],
        ["gateway GET /servers, TCP_NODELAY set (patched here)", fixed, 1],
        ["fake ComfyUI GET /queue (reference)", simulator, ""],
    ]
    say("median of 30 keep-alive requests (ms)")
    say(table(rows, ["request", "median ms", "TCP_NODELAY on accepted socket"]))
    return {
        "keepalive_ms": {"gateway_today": today, "gateway_nodelay": fixed, "simulator": simulator},
        "goals": [],
    }


if __name__ == "__main__":
    write_results("nodelay_probe", asyncio.run(main()))
