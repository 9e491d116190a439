"""Files on the gateway's ComfyUI-compatible API: binary previews, and outputs by range.

One system for the module, with two servers (a and b)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
import websockets

from gateway.api.native.frames import parse_preview
from plugins.simulator.config import SimulatorConfig
from plugins.simulator.samples import tiny_workflow
from tests.e2e.conftest import System, system_of_its_own

# SaveImageWebsocket sends one preview per image: four here (two batches of two).
HEAVY = Path(__file__).parents[1] / "data" / "comfyui-protocol" / "workflows" / "heavy.json"
TEXT = (3).to_bytes(4, "big")
PLAIN_PNG = (1).to_bytes(4, "big") + (2).to_bytes(4, "big")
FLAGS = {"type": "feature_flags", "data": {"supports_preview_metadata": True}}


@pytest_asyncio.fixture(scope="module")
async def shared(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[System]:
    async with system_of_its_own(tmp_path_factory.mktemp("native-files")) as running:
        await running.add_server("a", SimulatorConfig())
        await running.add_server("b", SimulatorConfig())
        yield running


async def _until_done(socket: Any, prompt_id: str) -> list[str | bytes]:
    """Every frame up to `executing` with node null for the prompt."""
    frames: list[str | bytes] = []
    async with asyncio.timeout(60):
        while True:
            frame = await socket.recv()
            frames.append(frame)
            if isinstance(frame, str):
                message = json.loads(frame)
                data = message["data"]
                closing = message["type"] == "executing" and data.get("node") is None
                if closing and data.get("prompt_id") == prompt_id:
                    return frames


async def test_each_socket_gets_images_in_the_layout_it_negotiated(shared: System) -> None:
    heavy = json.loads(HEAVY.read_text())
    base = shared.url.replace("http", "ws", 1)
    async with (
        websockets.connect(f"{base}/ws?clientId=flagged") as flagged,
        websockets.connect(f"{base}/ws?clientId=plain") as plain,
        httpx.AsyncClient(base_url=shared.url) as http,
    ):
        await flagged.send(json.dumps(FLAGS))
        assert json.loads(await flagged.recv())["type"] == "status"
        answer = json.loads(await flagged.recv())
        assert answer["type"] == "feature_flags"
        assert answer["data"]["supports_preview_metadata"] is True
        assert json.loads(await plain.recv())["type"] == "status"

        ids = {}
        for client in ("flagged", "plain"):
            reply = await http.post("/prompt", json={"prompt": heavy, "client_id": client})
            assert reply.status_code == 200, reply.text
            ids[client] = reply.json()["prompt_id"]

        flagged_frames = await _until_done(flagged, ids["flagged"])
        previews = [f for f in flagged_frames if isinstance(f, bytes) and f[:4] != TEXT]
        assert len(previews) == 4
        for frame in previews:
            parsed = parse_preview(frame)
            assert parsed is not None
            metadata, image = parsed
            assert metadata["prompt_id"] == ids["flagged"]  # ours, not the server's
            assert metadata["node_id"] == "11"
            assert image.startswith(b"\x89PNG")
        plain_frames = await _until_done(plain, ids["plain"])
        # GetImageSize's TEXT frames go to every socket; previews with metadata only to the
        # flagged one, and SaveImageWebsocket's images to the other as to a client without
        # feature flags: type 1, PNG.
        images = [f for f in plain_frames if isinstance(f, bytes) and f[:4] != TEXT]
        assert [f[:8] for f in images] == [PLAIN_PNG] * 4


async def test_outputs_are_served_whole_or_by_range(shared: System) -> None:
    async with httpx.AsyncClient(base_url=shared.url) as http:
        reply = await http.post("/prompt", json={"prompt": tiny_workflow(5, "ranged")})
        prompt_id = reply.json()["prompt_id"]
        result = (await http.get(f"/workflow/result/{prompt_id}", params={"wait": 30})).json()
        assert result["status"] == "succeeded", result
        history = (await http.get(f"/history/{prompt_id}")).json()[prompt_id]
        image = history["outputs"]["3"]["images"][0]
        whole = await http.get("/view", params=image)
        assert whole.status_code == 200 and whole.content.startswith(b"\x89PNG")
        assert whole.headers["accept-ranges"] == "bytes"
        size = len(whole.content)
        for url, params in (("/view", image), (result["images"][0], None)):
            part = await http.get(url, params=params, headers={"Range": "bytes=1-3"})
            assert part.status_code == 206, url
            assert part.content == whole.content[1:4]
            assert part.headers["content-range"] == f"bytes 1-3/{size}"
