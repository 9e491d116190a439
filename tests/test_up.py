"""`comfyautomate up` as a user runs it: a subprocess, the README's quick start, then Ctrl-C."""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
from nats.aio.client import Client

from gateway.app.up import register_server
from gateway.bus.contract import ServerRecord, Subjects, decode, encode
from tests.helpers import pid_alive, wait_pid_gone

ROOT = Path(__file__).resolve().parent.parent


def _children(pid: int) -> list[int]:
    """Every descendant of `pid`, from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if parent == pid:
            child = int(entry.name)
            found += [child, *_children(child)]
    return found


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def running_up(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """`comfyautomate up --simulate 1` on free ports; yields the process and the gateway URL."""
    command = [
        sys.executable, "-m", "gateway.app.cli", "up",
        "--simulate", "1",
        "--port", str(_free_port()),
        "--nats-url", f"nats://127.0.0.1:{_free_port()}",
        "--data-dir", str(tmp_path / "data"),
    ]  # fmt: skip
    log = (tmp_path / "up.log").open("w")
    process = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True, bufsize=1
    )
    try:
        yield process, _gateway_url(process)
    finally:
        if process.poll() is None:
            for pid in _children(process.pid):
                if pid_alive(pid):
                    os.kill(pid, signal.SIGKILL)
            process.kill()
        process.wait()
        assert process.stdout is not None
        process.stdout.close()
        log.close()


def _gateway_url(process: subprocess.Popen[str]) -> str:
    """The URL `up` announces on its first line; fails if it exits or says nothing in 60 s."""
    assert process.stdout is not None
    pidfd = os.pidfd_open(process.pid)
    try:
        readable, _, _ = select.select([process.stdout, pidfd], [], [], 60)
        if process.stdout in readable:
            line = process.stdout.readline()
            match = re.search(r"is up at (http://\S+)", line)
            assert match, line
            return match.group(1)
        if pidfd in readable:
            raise AssertionError(f"comfyautomate up exited with {process.wait()}")
        raise AssertionError("comfyautomate up did not announce itself in 60 s")
    finally:
        os.close(pidfd)


QUICK_START = textwrap.dedent(
    """
    import json, sys
    from sdk import ComfyUISDK

    workflow = json.load(open("workflows/model_free/tiny.json"))
    sdk = ComfyUISDK(gateway_url=sys.argv[1])
    sdk.register_server(name="My Server", address=sys.argv[2])
    result = sdk.execute_workflow(workflow)
    print(result['images']); print(result['log_file_path'])
    print(len(sdk.download_outputs(result, sys.argv[3])))
    """
)


def test_quick_start_runs_verbatim_and_up_stops_cleanly(
    running_up: tuple[subprocess.Popen[str], str], tmp_path: Path
) -> None:
    process, url = running_up
    descendants = _children(process.pid)
    assert any("nats-server" in _cmdline(pid) for pid in descendants)
    import httpx

    # The line after the address: where a person opens the dashboard.
    assert process.stdout is not None
    assert process.stdout.readline().split() == ["dashboard:", f"{url}/"]
    page = httpx.get(f"{url}/", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")

    servers = httpx.get(f"{url}/servers", timeout=10).json()
    sim_address = servers[0]["address"]
    run = subprocess.run(
        [sys.executable, "-c", QUICK_START, url, sim_address, str(tmp_path / "out")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    images, log_path, downloaded = run.stdout.splitlines()
    assert "/images/" in images
    assert log_path.endswith(".jsonl")
    assert downloaded == "1"
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=30) == 0
    for pid in descendants:
        assert wait_pid_gone(pid, timeout=10), f"{_cmdline(pid)} outlived comfyautomate up"


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
    except OSError:
        return ""


def _second_up(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.app.cli", "up", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=90,
    )


def test_a_second_up_on_the_same_broker_refuses_in_one_line_and_sigterm_leaves_nothing(
    running_up: tuple[subprocess.Popen[str], str], tmp_path: Path
) -> None:
    process, url = running_up
    descendants = _children(process.pid)
    command = list(process.args)  # type: ignore[arg-type]
    nats_url = command[command.index("--nats-url") + 1]
    second = _second_up(
        "--port", str(_free_port()), "--nats-url", nats_url, "--data-dir", str(tmp_path / "b")
    )  # fmt: skip
    assert second.returncode == 2, second.stderr
    assert "Traceback" not in second.stderr
    last = second.stderr.strip().splitlines()[-1]
    assert last.startswith(f"comfyautomate: the NATS server at {nats_url} already serves"), last
    assert "--prefix" in last and "--join" in last
    # The first system was not touched: it still takes and runs jobs.
    import httpx

    assert httpx.get(f"{url}/health", timeout=10).status_code == 200
    port = url.rsplit(":", 1)[1]
    taken = _second_up(
        "--port", port, "--nats-url", f"nats://127.0.0.1:{_free_port()}",
        "--data-dir", str(tmp_path / "c"),
    )  # fmt: skip
    assert taken.returncode == 2, taken.stderr
    assert "Traceback" not in taken.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in taken.stderr.strip().splitlines()[-1]
    # The first `up`, stopped by SIGTERM (the quick start's by Ctrl-C), leaves nothing running.
    process.send_signal(signal.SIGTERM)
    try:
        assert process.wait(timeout=30) == 0
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGUSR1)  # it logs what every task is waiting on
        raise
    assert all(wait_pid_gone(pid, timeout=10) for pid in descendants)


async def test_up_started_again_keeps_what_an_admin_set(nc: Client, subjects: Subjects) -> None:
    """`up` registers its servers at every start: a restart must not undo a drain, labels,
    capacity, weight or name set through the API since; the address it was given wins."""
    # The one bucket `up` writes here (the whole contract's resources take a second to make).
    kv = await nc.jetstream().create_key_value(bucket=subjects.servers_bucket)
    first = await register_server(nc, subjects, "sim-1", "Simulated ComfyUI 1", "127.0.0.1:1001")
    assert (first.address, first.draining, first.labels) == ("127.0.0.1:1001", False, {})
    # What POST /servers (registering again) and POST /servers/sim-1/drain leave in the record.
    admin_set = msgspec.structs.replace(
        first, name="gpu box", weight=2.5, capacity=6, labels={"pool": "a"}, draining=True
    )
    await kv.put("sim-1", encode(admin_set))
    # Started again: a simulator listens on another port each time.
    again = await register_server(nc, subjects, "sim-1", "Simulated ComfyUI 1", "127.0.0.1:1002")
    stored = await kv.get("sim-1")
    assert stored.value is not None
    assert decode(stored.value, ServerRecord) == again
    assert again == msgspec.structs.replace(admin_set, address="127.0.0.1:1002")
    # Once more at the same address: nothing to write.
    await register_server(nc, subjects, "sim-1", "Simulated ComfyUI 1", "127.0.0.1:1002")
    assert (await kv.get("sim-1")).revision == stored.revision
