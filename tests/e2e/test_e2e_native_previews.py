"""Binary previews on the gateway's ComfyUI-compatible socket: only for clients that asked."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import websockets

from gateway.api.native.sockets import parse_preview
from plugins.simulator.config import SimulatorConfig
from tests.e2e.conftest import System

# SaveImageWebsocket sends one preview per image: four here (two batches of two).
HEAVY = Path(__file__).parents[1] / "data" / "comfyui-protocol" / "workflows" / "heavy.json"
FLAGS = {"type": "feature_flags", "data": {"supports_preview_metadata": True}}


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


async def test_previews_go_only_to_sockets_that_negotiated_them(system: System) -> None:
    await system.add_server("a", SimulatorConfig())
    await system.add_server("b", SimulatorConfig())
    heavy = json.loads(HEAVY.read_text())
    base = system.url.replace("http", "ws", 1)
    async with (
        websockets.connect(f"{base}/ws?clientId=flagged") as flagged,
        websockets.connect(f"{base}/ws?clientId=plain") as plain,
        httpx.AsyncClient(base_url=system.url) as http,
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

        previews = [f for f in await _until_done(flagged, ids["flagged"]) if isinstance(f, bytes)]
        assert len(previews) == 4
        for frame in previews:
            parsed = parse_preview(frame)
            assert parsed is not None
            metadata, image = parsed
            assert metadata["prompt_id"] == ids["flagged"]  # ours, not the server's
            assert metadata["node_id"] == "11"
            assert image.startswith(b"\x89PNG")
        plain_frames = await _until_done(plain, ids["plain"])
        assert not [f for f in plain_frames if isinstance(f, bytes)]
