"""Images SaveImageWebsocket sends: outputs in the result (REST and SDK), and on the gateway's
ComfyUI-compatible `/ws` as ComfyUI sends them to a client without `feature_flags`."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

import httpx
import websockets

from plugins.simulator import SimulatorConfig, png
from sdk import AsyncComfyUISDK
from tests.e2e.conftest import System

HEAVY = Path(__file__).parents[1] / "data" / "comfyui-protocol" / "workflows" / "heavy.json"
SAVE_IMAGE_WEBSOCKET = "11"  # heavy.json's: 2 images, repeated twice
PNG_FRAME = (1).to_bytes(4, "big") + (2).to_bytes(4, "big")  # PREVIEW_IMAGE, format PNG


async def _images_as_the_example_collects_them(
    socket: Any, prompt_id: str
) -> tuple[list[bytes], list[str | bytes]]:
    """ComfyUI's `websockets_api_example_ws_images.py`: the binary frames that come while the
    SaveImageWebsocket node executes, up to `executing` null; and every frame seen."""
    images: list[bytes] = []
    frames: list[str | bytes] = []
    current_node = ""
    async with asyncio.timeout(60):
        while True:
            out = await socket.recv()
            frames.append(out)
            if isinstance(out, str):
                message = json.loads(out)
                if message["type"] == "executing":
                    data = message["data"]
                    if data["prompt_id"] == prompt_id:
                        if data["node"] is None:
                            return images, frames
                        current_node = data["node"]
            elif current_node == SAVE_IMAGE_WEBSOCKET:
                images.append(out)


async def test_the_websocket_image_example_gets_its_images(system: System) -> None:
    await system.add_server("a", SimulatorConfig())
    heavy = json.loads(HEAVY.read_text())
    client_id = uuid.uuid4().hex
    base = system.url.replace("http", "ws", 1)
    async with (
        websockets.connect(f"{base}/ws?clientId={client_id}") as socket,
        httpx.AsyncClient(base_url=system.url) as http,
    ):
        assert json.loads(await socket.recv())["type"] == "status"
        reply = await http.post("/prompt", json={"prompt": heavy, "client_id": client_id})
        assert reply.status_code == 200, reply.text
        prompt_id = reply.json()["prompt_id"]
        frames, seen = await _images_as_the_example_collects_them(socket, prompt_id)

        assert len(frames) == 4
        images = []
        for frame in frames:
            assert frame[:8] == PNG_FRAME
            images.append(frame[8:])  # what the example keeps
            info = png.read_info(frame[8:])
            assert (info.width, info.height) == (128, 128)
        # As in ws_heavy.jsonl: each image right after the `progress_state` and `progress` of
        # its step.
        at = [i for i, f in enumerate(seen) if isinstance(f, bytes) and f[:8] == PNG_FRAME]
        for index, position in enumerate(at):
            state, progress = (json.loads(str(f)) for f in seen[position - 2 : position])
            assert progress["type"] == "progress", progress
            assert progress["data"] == {
                "value": index,
                "max": 4,
                "prompt_id": prompt_id,
                "node": SAVE_IMAGE_WEBSOCKET,
            }
            assert state["type"] == "progress_state", state
            node = state["data"]["nodes"][SAVE_IMAGE_WEBSOCKET]
            assert (node["value"], node["max"], node["state"]) == (index, 4, "running")

        # The same images are the job's outputs, with their node and index.
        result = await http.get(f"/workflow/result/{prompt_id}", params={"wait": 30})
        body = result.json()
        assert body["status"] == "succeeded", body
        sent = [o for o in body["outputs"] if o["source"] == "websocket"]
        assert [(o["node_id"], o["index"]) for o in sent] == [
            (SAVE_IMAGE_WEBSOCKET, index) for index in range(4)
        ]
        for output, image in zip(sent, images, strict=True):
            assert output["url"] in body["images"]
            assert (await http.get(output["url"])).content == image
        # ComfyUI's history lists files only: SaveImage's two, not the websocket's images.
        history = (await http.get(f"/history/{prompt_id}")).json()[prompt_id]
        assert set(history["outputs"]) == {"8"}

    async with AsyncComfyUISDK(gateway_url=system.url) as sdk:
        outputs = (await sdk.get_result(prompt_id)).outputs
        assert [(o.node_id, o.index) for o in outputs if o.source == "websocket"] == [
            (SAVE_IMAGE_WEBSOCKET, index) for index in range(4)
        ]
