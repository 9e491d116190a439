"""The adapter as a process (its CLI entry): killed mid-job, and a 50 MB output in flat memory."""

from __future__ import annotations

import asyncio
import hashlib
import signal
import struct
import zlib
from pathlib import Path

import pytest

from gateway.bus.contract import Succeeded
from gateway.bus.natsserver import NatsServer
from plugins.simulator import Simulator, nodes
from plugins.simulator.images import Image
from tests.adapter.kit import SERVER, Bus, adapter_process, tiny


def _count_posts(sim: Simulator, route: tuple[str, str]) -> list[object]:
    """Record the requests the fake receives on one route (instrumenting the fake only)."""
    seen: list[object] = []
    original = sim.app._routes[route]

    async def counting(request, param):
        seen.append(request.path)
        return await original(request, param)

    sim.app._routes[route] = counting
    return seen


def _healthy_from(bus: Bus, pid_start: float):
    return next(
        (b for t, b in bus.heartbeats if t >= pid_start and b.healthy and b.server_id == SERVER),
        None,
    )


async def test_adapter_killed_mid_job_is_redelivered_and_adopted(
    bus: Bus, make_sim, nats_server: NatsServer, tmp_path: Path
):
    loop = asyncio.get_running_loop()
    log = tmp_path / "adapter.log"
    async with make_sim(class_seconds={"ImageInvert": 2.5}) as sim:
        posts = _count_posts(sim, ("POST", "/prompt"))
        with adapter_process(sim.address, nats_server.url, tmp_path / "data", log) as first:
            started = loop.time()
            await bus.wait(lambda: _healthy_from(bus, started), 20, "the adapter's heartbeat")
            job = await bus.dispatch(tiny())
            await bus.wait_event(job.job_id, "node_started")
            first.send_signal(signal.SIGKILL)
            await asyncio.to_thread(first.wait, 10)
        assert sim.engine.running is not None  # the prompt is still running on ComfyUI
        with adapter_process(sim.address, nats_server.url, tmp_path / "data", log) as second:
            end = await bus.wait_event(job.job_id, within=30)
            assert isinstance(end, Succeeded), (end, log.read_text()[-3000:])
            assert len(end.data.outputs) == 1
            # Ends exactly once, and ComfyUI was asked to run it exactly once.
            ends = [t for t in bus.types(job.job_id) if t in ("succeeded", "failed", "retried")]
            assert ends == ["succeeded"], bus.types(job.job_id)
            assert bus.types(job.job_id).count("running") == 1
            assert posts == ["/prompt"]
            assert len(sim.engine.history.items()) == 1
            # SIGTERM: a graceful stop, exit code 0.
            second.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(second.wait, 15) == 0


def _uncompressed_png(width: int, height: int) -> bytes:
    """A valid PNG of about width*height*3 bytes: zlib level 0 stores instead of compressing."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

    raw = (b"\x00" + b"\x10\x80\xf0" * width) * height
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw, 0))
        + chunk(b"IEND", b"")
    )


def _peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc status")


def _reset_peak(pid: int) -> bool:
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


async def test_fifty_megabyte_output_streams_in_flat_memory(
    bus: Bus, make_sim, nats_server: NatsServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    # The fake writes solid-colour PNGs that compress to kilobytes; for this test its SaveImage
    # encodes without compression, so a 4096x4096 image is a real 50 MB file.
    async def encode(image: Image) -> bytes:
        return _uncompressed_png(image.width, image.height)

    monkeypatch.setattr(nodes, "_encode", encode)
    loop = asyncio.get_running_loop()
    log = tmp_path / "adapter.log"
    async with make_sim() as sim:
        with adapter_process(sim.address, nats_server.url, tmp_path / "data", log) as process:
            started = loop.time()
            await bus.wait(lambda: _healthy_from(bus, started), 20, "the adapter's heartbeat")
            warm = await bus.dispatch(tiny(width=8))  # imports and pools warmed up
            assert isinstance(await bus.wait_event(warm.job_id), Succeeded)
            baseline = _peak_rss(process.pid)
            if _reset_peak(process.pid):
                baseline = _peak_rss(process.pid)
            big = tiny("big")
            big["1"]["inputs"].update(width=4096, height=4096)
            job = await bus.dispatch(big)
            end = await bus.wait_event(job.job_id, within=40)
            assert isinstance(end, Succeeded), (end, log.read_text()[-3000:])
            growth = _peak_rss(process.pid) - baseline
        output = end.data.outputs[0]
        assert output.size > 50_000_000
        stored = tmp_path / "data" / "outputs" / output.key
        source = sim.folders.output / output.filename
        assert stored.stat().st_size == output.size == source.stat().st_size
        assert (
            hashlib.sha256(stored.read_bytes()).digest()
            == hashlib.sha256(source.read_bytes()).digest()
        )
        # Whole in memory would be +50 MB at least; streaming stays within a few chunks.
        print(f"peak RSS growth of the adapter: {growth / 2**20:.1f} MB")  # noqa: T201
        assert growth < 20 * 1024 * 1024, f"peak RSS grew by {growth / 2**20:.1f} MB"
