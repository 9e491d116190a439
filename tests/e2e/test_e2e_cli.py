"""The client commands as a user types them, against the running system.

One system for the module, with gpu1; the test of a failing job adds a server of its own, pins
its job there and removes it.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from plugins.simulator import SimulatorConfig
from tests.e2e.conftest import System, system_of_its_own, tiny

ROOT = Path(__file__).resolve().parents[2]


@pytest_asyncio.fixture(scope="module")
async def shared(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[System]:
    async with system_of_its_own(tmp_path_factory.mktemp("cli")) as running:
        await running.add_server("gpu1")
        yield running


async def _cli(*args: str, gateway: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.app.cli", *args, "--gateway", gateway,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        async with asyncio.timeout(60):
            out, err = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_submit_wait_prints_the_outputs_and_exits_zero(
    shared: System, tmp_path: Path
) -> None:
    workflow = tmp_path / "w.json"
    workflow.write_text(json.dumps(tiny(31)))
    code, out, err = await _cli(
        "submit", str(workflow), "--wait", "--set", "Save.filename_prefix=cli",
        "--out", str(tmp_path / "out"), gateway=shared.url,
    )  # fmt: skip
    assert code == 0, err
    assert "succeeded" in err
    lines = out.splitlines()
    assert "/images/" in lines[0] and "cli_" in lines[0]
    assert Path(lines[1]).is_file()
    code, out, err = await _cli("servers", "list", gateway=shared.url)
    assert code == 0, err
    assert "gpu1" in out and "healthy" in out
    code, out, _ = await _cli("jobs", "list", gateway=shared.url)
    assert code == 0 and "succeeded" in out


async def test_a_failed_job_exits_non_zero_with_the_reason(shared: System, tmp_path: Path) -> None:
    await shared.add_server("failing", SimulatorConfig(fail_nodes=["ImageInvert"]))
    workflow = tmp_path / "w.json"
    workflow.write_text(json.dumps(tiny(32)))
    pinned = ("--server", "failing")
    code, _, err = await _cli("submit", str(workflow), "--wait", *pinned, gateway=shared.url)
    await shared.remove_server("failing")
    assert code == 1
    assert "failed" in err and "node 2" in err
    code, _, err = await _cli("submit", str(tmp_path / "missing.json"), gateway=shared.url)
    assert code != 0


async def test_a_bad_override_is_refused_without_a_job(shared: System, tmp_path: Path) -> None:
    workflow = tmp_path / "w.json"
    workflow.write_text(json.dumps(tiny(33)))
    code, _, err = await _cli("submit", str(workflow), "--set", "Nope.x=1", gateway=shared.url)
    assert code == 1
    assert "Nope" in err
