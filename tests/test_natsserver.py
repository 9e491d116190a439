from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gateway.bus.connection import connect
from gateway.bus.natsserver import NatsServer, answers, embedded_nats, host_port, start_nats_server
from tests.helpers import pid_alive, wait_pid_gone


async def test_started_server_answers_and_has_jetstream(tmp_path: Path) -> None:
    server = await start_nats_server(port=0, store_dir=tmp_path)
    try:
        assert server.port > 0
        assert await answers(server.url)
        nc = await connect(server.url, "t")
        try:
            info = await nc.jetstream().account_info()
            assert info.limits is not None
        finally:
            await nc.close()
        # The store directory is ours, not the one written in nats.conf.
        assert (tmp_path / "jetstream").is_dir()
    finally:
        await server.stop()
    assert server.process.returncode is not None
    assert not await answers(server.url)
    await server.stop()  # a second stop is harmless


async def test_embedded_nats_reuses_a_broker_that_answers(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    async with embedded_nats(nats_server.url, tmp_path / "unused") as url:
        assert url == nats_server.url
    assert not (tmp_path / "unused").exists()
    assert await answers(nats_server.url)  # not ours to stop


async def test_embedded_nats_starts_and_stops_its_own(tmp_path: Path) -> None:
    # Find a port nothing listens on by letting a throwaway broker pick one and stopping it.
    probe = await start_nats_server(port=0, store_dir=tmp_path / "probe")
    await probe.stop()
    url = probe.url
    async with embedded_nats(url, tmp_path / "data") as got:
        assert got == url
        assert await answers(url)
        assert (tmp_path / "data" / "nats-server.log").read_text().count("Server is ready") == 1
    assert not await answers(url)


def test_host_port_parses_nats_urls() -> None:
    assert host_port("nats://10.0.0.5:4333") == ("10.0.0.5", 4333)
    assert host_port("127.0.0.1:5000,nats://b:1") == ("127.0.0.1", 5000)
    assert host_port("nats://localhost") == ("localhost", 4222)


async def test_start_failure_reports_the_broker_output(tmp_path: Path) -> None:
    bad = tmp_path / "bad.conf"
    bad.write_text("this is { not a config")
    with pytest.raises(RuntimeError, match="exited with code"):
        await start_nats_server(port=0, store_dir=tmp_path, config=bad)


_PARENT = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from gateway.bus.natsserver import start_nats_server

    async def main():
        server = await start_nats_server(port=0, store_dir=Path(sys.argv[1]))
        print(server.pid, flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())
    """
)


def test_broker_dies_when_its_parent_is_killed(tmp_path: Path) -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", _PARENT, str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    broker_pid = 0
    try:
        assert parent.stdout is not None
        broker_pid = int(parent.stdout.readline())
        assert pid_alive(broker_pid)
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        assert wait_pid_gone(broker_pid, timeout=10), "nats-server outlived its killed parent"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if parent.stdout is not None:
            parent.stdout.close()
        if broker_pid and pid_alive(broker_pid) and _is_nats_server(broker_pid):
            os.kill(broker_pid, signal.SIGKILL)


def _is_nats_server(pid: int) -> bool:
    try:
        return "nats-server" in Path(f"/proc/{pid}/cmdline").read_text()
    except OSError:
        return False


async def test_stop_kills_a_broker_that_ignores_sigterm(tmp_path: Path) -> None:
    server = await start_nats_server(port=0, store_dir=tmp_path)
    os.kill(server.pid, signal.SIGSTOP)  # a stopped process cannot act on SIGTERM
    try:
        await asyncio.wait_for(server.stop(grace=0.5), 10)
    finally:
        if server.process.returncode is None:
            server.process.kill()
            await server.process.wait()
    assert server.process.returncode == -signal.SIGKILL
