"""Input files through the whole system: each job's own, gone from the server after it, and out
of reach of other workflows, over REST and ComfyUI's own API alike.

One system for the module, with one server ("a"); every test leaves no job open behind it.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from plugins.simulator import png
from tests.e2e.conftest import System, system_of_its_own

RED = (220, 20, 20)
GREEN = (20, 220, 20)
FOLDER = "comfyautomate-jobs"


def load(name: str = "input.png", prefix: str = "in") -> dict[str, Any]:
    """LoadImage(name) → SaveImage: the output has the colour of the file loaded."""
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": name}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix}},
    }


@pytest_asyncio.fixture(scope="module")
async def shared(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[System]:
    async with system_of_its_own(tmp_path_factory.mktemp("inputs")) as running:
        await running.add_server("a")
        yield running


def _holding(folder: Path, data: bytes) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and p.read_bytes() == data]


async def _colour(http: httpx.AsyncClient, result: dict[str, Any]) -> tuple[int, ...]:
    reply = await http.get(result["outputs"][0]["url"])
    assert reply.status_code == 200
    return png.read_info(reply.content).first_pixel[:3]


async def test_rest_jobs_load_their_own_input_and_leave_none_behind(shared: System) -> None:
    sim = shared.sims["a"]
    red, green = png.encode_solid(8, 8, RED), png.encode_solid(8, 8, GREEN)
    async with httpx.AsyncClient(base_url=shared.url, timeout=60) as http:
        for data, rgb in ((red, RED), (green, GREEN)):
            value = base64.b64encode(data).decode()
            body = {
                "workflow": load(),
                "inputs": [{"name": "input.png", "source": "base64", "value": value}],
            }
            reply = await http.post("/workflow/execute", json=body)
            assert reply.status_code == 200, reply.text
            result = reply.json()
            assert result["status"] == "succeeded", result
            assert await _colour(http, result) == rgb
            assert _holding(sim.folders.input, data) == []

        reply = await http.post("/workflow/execute", json={"workflow": load()})
        result = reply.json()
        assert result["status"] == "failed", result
        assert "Invalid image file: input.png" in result["error"]["message"]


async def test_an_upload_of_comfyuis_api_is_gone_from_the_server_after_its_prompt(
    shared: System,
) -> None:
    sim = shared.sims["a"]
    data = png.encode_solid(8, 8, RED)
    async with httpx.AsyncClient(base_url=shared.url, timeout=60) as http:
        files = {"image": ("mine.png", data, "image/png")}
        reply = await http.post("/upload/image", files=files, data={"subfolder": "sub"})
        assert reply.status_code == 200, reply.text
        reply = await http.post("/prompt", json={"prompt": load("sub/mine.png", "native")})
        assert reply.status_code == 200, reply.text
        prompt_id = reply.json()["prompt_id"]
        reply = await http.get(f"/workflow/result/{prompt_id}", params={"wait": 60})
        result = reply.json()
        assert result["status"] == "succeeded", result
        assert await _colour(http, result) == RED
    assert _holding(sim.folders.input, data) == []


JOB_FILE = f"{FOLDER}/0123abcd-1/input.png"


def _nested(value: str) -> dict[str, Any]:
    workflow = load()
    workflow["1"]["inputs"]["extra"] = ["a", {"path": value}]
    return workflow


@pytest.mark.parametrize(
    ("workflow", "overrides"),
    [
        pytest.param(load(JOB_FILE), {}, id="plain"),
        pytest.param(load("ComfyAutomate-Jobs\\0123abcd-1\\input.png"), {}, id="case-backslashes"),
        pytest.param(load(f"/srv/comfy-input/{JOB_FILE}"), {}, id="absolute"),
        pytest.param(load(f"../comfy-input/{JOB_FILE} [output]"), {}, id="annotated"),
        pytest.param(load(f"./{FOLDER}. /0123abcd-1/input.png"), {}, id="windows-trailing"),
        pytest.param(_nested(JOB_FILE), {}, id="nested"),
        pytest.param(load(), {"1.image": JOB_FILE}, id="override"),
        pytest.param(load("x.png", f"{FOLDER}/out"), {}, id="any-input"),
    ],
)
async def test_a_workflow_naming_the_job_files_folder_is_refused(
    shared: System, workflow: dict[str, Any], overrides: dict[str, Any]
) -> None:
    async with httpx.AsyncClient(base_url=shared.url) as http:
        body = {"workflow": workflow, "overrides": overrides}
        reply = await http.post("/workflow/submit", json=body)
    assert reply.status_code == 400, reply.text
    error = reply.json()
    assert error["code"] == "invalid_workflow"
    assert f"{FOLDER}/" in error["message"] and "node '" in error["message"]


async def test_comfyuis_api_refuses_a_prompt_naming_the_job_files_folder(system: System) -> None:
    # A system of its own, without servers: with one, ComfyUI's validation of the LoadImage
    # input (a file the server does not list) would answer first.
    async with httpx.AsyncClient(base_url=system.url) as http:
        reply = await http.post("/prompt", json={"prompt": load(JOB_FILE)})
        assert reply.status_code == 400, reply.text
        assert reply.json()["error"]["type"] == "invalid_workflow"
        queue = (await http.get("/queue")).json()
    assert queue == {"queue_running": [], "queue_pending": []}


async def test_names_that_only_resemble_the_folder_are_taken(shared: System) -> None:
    near = [f"{FOLDER}-old/x.png", f"my {FOLDER} notes.png", f"x{FOLDER}/y.png"]
    async with httpx.AsyncClient(base_url=shared.url) as http:
        for name in near:
            reply = await http.post("/workflow/submit", json={"workflow": load("x.png", name)})
            assert reply.status_code == 202, reply.text
            job_id = reply.json()["job_id"]
            # Taken, it runs (and fails on the missing x.png, which is not the point here).
            ended = await http.get(f"/workflow/result/{job_id}", params={"wait": 60}, timeout=70)
            assert ended.json()["status"] == "failed"
