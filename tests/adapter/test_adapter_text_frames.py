"""The adapter's websocket passes ComfyUI's TEXT frames on, with the prompt they belong to."""

from __future__ import annotations

import asyncio
import contextlib
import uuid

import httpx

from plugins.comfyui.progress import Follower, text_with_prompt
from plugins.simulator.hub import text_binary_frame
from tests.native.clients import image_size


async def test_text_frames_of_our_prompts_are_published_with_the_prompt(make_sim):
    published: list[bytes] = []
    arrived = asyncio.Event()

    async def publish(frame: bytes) -> None:
        published.append(frame)
        arrived.set()

    async with make_sim() as sim, httpx.AsyncClient(base_url=sim.url) as http:
        follower = Follower(sim.address, on_preview=publish)
        task = asyncio.create_task(follower.run())
        try:
            await asyncio.wait_for(follower.connected.wait(), 10)
            # Another client's prompt first: the server sends its TEXT frame to every socket,
            # ours included, before any frame of the prompt that follows it.
            foreign = {"prompt": image_size("foreign", 16), "client_id": "someone-else"}
            assert (await http.post("/prompt", json=foreign)).status_code == 200
            ours = str(uuid.uuid4())
            follower.watch(ours)
            body = {"prompt": image_size("ours", 8), "client_id": follower.client_id}
            reply = await http.post("/prompt", json={**body, "prompt_id": ours})
            assert reply.status_code == 200, reply.text
            await asyncio.wait_for(arrived.wait(), 10)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await follower.close()

    text = text_binary_frame("2", "width: 8, height: 8\n batch size: 1")
    assert published == [text_with_prompt(ours, text)]
