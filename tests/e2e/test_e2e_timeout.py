"""A job's own `timeout` over REST, on the whole system: a long job with a short timeout ends
`failed` (code timeout), its prompt interrupted on ComfyUI, with no outputs, by submit and by
execute alike. One system for the module, with one such long-running server."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from gateway.bus.contract import prompt_id_for
from plugins.simulator import Simulator, SimulatorConfig
from tests.e2e.conftest import System, system_of_its_own

WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows"


# 10 ms a step: 10,000 steps outlast the timeout however fast the machine is.
LONG = SimulatorConfig(step_seconds=0.01)


@pytest_asyncio.fixture(scope="module")
async def shared(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[System]:
    async with system_of_its_own(tmp_path_factory.mktemp("timeout")) as running:
        await running.add_server("gpu1", LONG)
        yield running


def _long_sampler(seed: int) -> dict[str, Any]:
    """The SD 1.5 example with 10,000 sampler steps: a long run of quick steps."""
    workflow: dict[str, Any] = json.loads((WORKFLOWS / "text_to_image_sd15.json").read_text())
    workflow["3"]["inputs"].update(steps=10_000, seed=seed)
    return workflow


def _assert_timed_out(result: dict[str, Any], sim: Simulator) -> None:
    assert result["status"] == "failed", result
    assert result["error"]["code"] == "timeout", result
    assert result["outputs"] == [] and result["images"] == [], result
    prompt_id = prompt_id_for(result["job_id"], result["attempts"])
    entry = sim.engine.history.get(prompt_id)[prompt_id]
    event, data = entry["status"]["messages"][-1]
    assert (event, data["node_type"]) == ("execution_interrupted", "KSampler"), entry["status"]


async def test_a_submitted_job_past_its_timeout_fails_and_its_prompt_is_interrupted(
    shared: System,
) -> None:
    sim = shared.sims["gpu1"]
    body = {"workflow": _long_sampler(98765), "job_id": "to-3", "timeout": 1}
    async with httpx.AsyncClient(base_url=shared.url, timeout=60) as client:
        reply = await client.post("/workflow/submit", json=body)
        assert reply.status_code == 202, reply.text
        reply = await client.get("/workflow/result/to-3", params={"wait": 30})
        assert reply.status_code == 200, reply.text
        _assert_timed_out(reply.json(), sim)
        status = (await client.get("/workflow/status/to-3")).json()
        assert (status["status"], status["error"]["code"]) == ("failed", "timeout")


async def test_an_executed_job_past_its_timeout_fails_too(shared: System) -> None:
    # `execute` waits `timeout` seconds from the request, while the job's own time runs on
    # its server: the answer may come just before the job's end (202).
    sim = shared.sims["gpu1"]
    body = {"workflow": _long_sampler(4321), "timeout": 1}
    async with httpx.AsyncClient(base_url=shared.url, timeout=60) as client:
        reply = await client.post("/workflow/execute", json=body)
        assert reply.status_code in (200, 202), reply.text
        job_id = reply.json()["job_id"]
        reply = await client.get(f"/workflow/result/{job_id}", params={"wait": 30})
        assert reply.status_code == 200, reply.text
        _assert_timed_out(reply.json(), sim)
