"""The client commands as a user types them, against the running system."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from plugins.simulator import SimulatorConfig
from tests.e2e.conftest import System, tiny

ROOT = Path(__file__).resolve().parents[2]


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
    system: System, tmp_path: Path
) -> None:
    await system.add_server("gpu1")
    workflow = tmp_path / "w.json"
    workflow.write_text(json.dumps(tiny(31)))
    code, out, err = await _cli(
        "submit", str(workflow), "--wait", "--set", "Save.filename_prefix=cli",
        "--out", str(tmp_path / "out"), gateway=system.url,
    )  # fmt: skip
    assert code == 0, err
    assert "succeeded" in err
    lines = out.splitlines()
    assert "/images/" in lines[0] and "cli_" in lines[0]
    assert Path(lines[1]).is_file()
    code, out, err = await _cli("servers", "list", gateway=system.url)
    assert code == 0, err
    assert "gpu1" in out and "healthy" in out
    code, out, _ = await _cli("jobs", "list", gateway=system.url)
    assert code == 0 and "succeeded" in out


async def test_a_failed_job_exits_non_zero_with_the_reason(system: System, tmp_path: Path) -> None:
    await system.add_server("gpu1", SimulatorConfig(fail_nodes=["ImageInvert"]))
    workflow = tmp_path / "w.json"
    workflow.write_text(json.dumps(tiny(32)))
    code, _, err = await _cli("submit", str(workflow), "--wait", gateway=system.url)
    assert code == 1
    assert "failed" in err and "node 2" in err
    code, _, err = await _cli("submit", str(tmp_path / "missing.json"), gateway=system.url)
    assert code != 0


async def test_a_bad_override_is_refused_without_a_job(system: System, tmp_path: Path) -> None:
    workflow = tmp_path / "w.json"
    workflow.write_text(json.dumps(tiny(33)))
    code, _, err = await _cli("submit", str(workflow), "--set", "Nope.x=1", gateway=system.url)
    assert code == 1
    assert "Nope" in err
