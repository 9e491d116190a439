"""The ways scripts drive ComfyUI, each run against one ComfyUI and against the fleet.

The clients follow the protocol recordings: a websocket client waiting for the done signal,
a polling client without a socket, prompts without a client_id, and image uploads.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from tests.helpers import poll_until
from tests.native.clients import (
    HOLD_CLASS,
    OTHER_HOLD_CLASS,
    Comfy,
    Target,
    hold,
    inverted,
    load_image,
    of_prompt,
    png,
    png_facts,
    same_colour,
    socket,
    tiny,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")


def steps(messages: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """The messages without `status`, reduced to what their order is about."""
    out: list[tuple[Any, ...]] = []
    for message in messages:
        name, data = message["type"], message["data"]
        if name == "progress_state":
            states = tuple(sorted((node, s["state"]) for node, s in data["nodes"].items()))
            out.append((name, states))
        elif name in ("executing", "executed"):
            out.append((name, data["node"]))
        elif name != "status":
            out.append((name,))
    return out


def fresh_run(nodes: list[str], outputs: set[str]) -> list[tuple[Any, ...]]:
    """The README's order for a prompt run with nothing cached, nodes in execution order."""
    expected: list[tuple[Any, ...]] = [("execution_start",), ("execution_cached",)]
    finished: list[tuple[str, str]] = []
    for node in nodes:
        expected.append(("progress_state", tuple(sorted([*finished, (node, "running")]))))
        expected.append(("executing", node))
        if node in outputs:
            expected.append(("executed", node))
        finished.append((node, "finished"))
        expected.append(("progress_state", tuple(sorted(finished))))
    return [*expected, ("execution_success",), ("executing", None)]


def colour_of(graph: dict[str, Any]) -> tuple[int, int, int]:
    """The RGB of the EmptyImage in node "1"."""
    color = graph["1"]["inputs"]["color"]
    return (color >> 16 & 255, color >> 8 & 255, color & 255)


@pytest.mark.parametrize("prefix", ["", "/api"])
async def test_websocket_client_follows_a_prompt_and_downloads_its_images(
    target: Target, prefix: str
) -> None:
    client_id = f"ws-{uuid.uuid4().hex}"
    graph = tiny("ws")
    async with socket(target, client_id, prefix=prefix) as ws, target.http() as http:
        comfy = Comfy(http, prefix)
        prompt_id = await comfy.submit(graph, client_id)
        messages = await ws.done(prompt_id)
        # The done signal comes after the history entry is stored: no polling needed.
        entry = await comfy.history(prompt_id)
        assert entry is not None, "no history right after executing null"
        images, heads = [], []
        for ref in entry["outputs"]["3"]["images"]:
            images.append(await comfy.view(ref))
            heads.append(await comfy.view_headers(ref))

    assert steps(messages) == fresh_run(["1", "2", "3"], {"3"})
    names = [m["type"] for m in messages]
    success = names.index("execution_success")
    assert "status" in names[success:-1], f"no status between success and done: {names}"
    cached = next(m for m in messages if m["type"] == "execution_cached")
    assert cached["data"]["nodes"] == []
    executed = next(m for m in messages if m["type"] == "executed")
    # The files are the ones history names, whatever they are called on this target.
    assert executed["data"]["output"] == entry["outputs"]["3"]
    assert entry["prompt"][1:3] == [prompt_id, graph]
    assert entry["prompt"][3]["client_id"] == client_id
    assert entry["prompt"][4] == ["3"]
    assert entry["status"]["status_str"] == "success" and entry["status"]["completed"] is True
    kinds = [event for event, _ in entry["status"]["messages"]]
    assert kinds == ["execution_start", "execution_cached", "execution_success"]
    assert set(entry["meta"]) == {"3"}
    assert images, "history lists no image"
    for image, head in zip(images, heads, strict=True):
        width, height, pixel = png_facts(image)
        assert (width, height) == (64, 64)
        assert same_colour(pixel, inverted(colour_of(graph))), pixel
        # HEAD tells what GET would send.
        assert (head["content-type"], head["content-length"]) == ("image/png", str(len(image)))


@pytest.mark.parametrize("prefix", ["", "/api"])
async def test_polling_client_sees_its_prompt_queued_then_in_history(
    target: Target, prefix: str
) -> None:
    async with target.http() as http:
        comfy = Comfy(http, prefix)
        blocker = await comfy.submit(hold("poll-blocker"))
        graph = hold("poll", nodes=1)
        prompt_id = await comfy.submit(graph)

        async def blocker_runs() -> bool:
            running, _ = await comfy.queue()
            return [item[1] for item in running] == [blocker]

        await poll_until(blocker_runs, "the blocking prompt running")
        running, pending = await comfy.queue()
        mine = [item for item in pending if item[1] == prompt_id]
        assert [item[1] for item in running] == [blocker] and len(mine) == 1, (running, pending)
        assert mine[0][2] == graph and mine[0][4] == ["3"]
        assert "client_id" not in mine[0][3]
        assert await comfy.queue_remaining() >= 2
        assert await comfy.history(prompt_id) is None

        await comfy.interrupt(blocker)

        async def finished() -> bool:
            # Asked before history: if history still lacks the prompt, it was not finished
            # when this count was taken, so the count must include it.
            remaining = await comfy.queue_remaining()
            running, _ = await comfy.queue()
            # Both prompts need the one slow class, so they run one after the other here too.
            assert len(running) <= 1, running
            if await comfy.history(prompt_id) is not None:
                return True
            assert remaining >= 1, "queue_remaining was 0 before the prompt was in history"
            return False

        await poll_until(finished, f"history of {prompt_id}")
        entry = await comfy.history(prompt_id)
        stopped = await comfy.history(blocker)
        everything = await comfy.all_history()
        newest = await comfy.all_history(max_items=1)
        newest_two = await comfy.all_history(max_items=2)
        assert entry is not None
        image = await comfy.view(entry["outputs"]["3"]["images"][0])

    assert entry["prompt"][1:3] == [prompt_id, graph]
    assert entry["prompt"][4] == ["3"]
    assert entry["status"]["status_str"] == "success"
    assert list(entry["outputs"]) == ["3"] and len(entry["outputs"]["3"]["images"]) == 1
    assert png_facts(image)[:2] == (8, 8)
    assert stopped is not None
    assert (stopped["status"]["status_str"], stopped["status"]["completed"]) == ("error", False)
    assert stopped["outputs"] == {}
    order = list(everything)
    assert order.index(blocker) < order.index(prompt_id), "history is not oldest first"
    assert list(newest) == [prompt_id]
    assert list(newest_two) == [blocker, prompt_id]


async def test_prompt_without_client_id_is_seen_only_as_progress(target: Target) -> None:
    ids = [f"observer-{uuid.uuid4().hex}" for _ in range(2)]
    async with (
        socket(target, ids[0]) as first,
        socket(target, ids[1]) as second,
        target.http() as http,
    ):
        comfy = Comfy(http)
        prompt_id = await comfy.submit(tiny("anonymous"))

        def last_progress(message: dict[str, Any]) -> bool:
            nodes = message["data"].get("nodes", {})
            return (
                message["type"] == "progress_state"
                and of_prompt(message, prompt_id)
                and set(nodes) == {"1", "2", "3"}
                and all(node["state"] == "finished" for node in nodes.values())
            )

        for observer in (first, second):
            await observer.wait_for(last_progress, "the prompt's final progress_state")
        entry = await comfy.wait_history(prompt_id)
        # A prompt of each observer's own marks the end: whatever the anonymous prompt would
        # have sent them was produced before it.
        markers = [await comfy.submit(tiny("marker"), observer) for observer in ids]
        for observer, marker in zip((first, second), markers, strict=True):
            await observer.done(marker)

    assert entry["status"]["status_str"] == "success"
    assert "client_id" not in entry["prompt"][3]
    for observer in (first, second):
        kinds = {m["type"] for m in observer.messages if of_prompt(m, prompt_id)}
        assert kinds == {"progress_state"}, f"{observer.client_id} got {kinds}"


async def test_uploaded_image_is_served_and_loaded_by_every_prompt(target: Target) -> None:
    stem = f"upload_{uuid.uuid4().hex[:8]}"
    name = f"{stem}.png"
    first, second = png(12, 10, (10, 200, 30)), png(12, 10, (200, 20, 90))
    as_input = {"subfolder": "", "type": "input"}
    async with target.http() as http:
        comfy = Comfy(http)
        uploaded = await comfy.upload(name, first)
        assert uploaded == {"name": name, **as_input}
        assert await comfy.upload(name, first) == uploaded, "same content must keep its name"
        renamed = await comfy.upload(name, second)
        assert renamed == {"name": f"{stem} (1).png", **as_input}
        nested = await comfy.upload(name, first, subfolder="native_sub")
        assert nested == {"name": name, "subfolder": "native_sub", "type": "input"}
        assert await comfy.view({"filename": name, **as_input}) == first
        assert await comfy.view({"filename": renamed["name"], **as_input}) == second
        assert (
            await comfy.view({"filename": name, "subfolder": "native_sub", "type": "input"})
            == first
        )
        assert await comfy.upload(name, second, overwrite="true") == uploaded
        assert await comfy.view({"filename": name, **as_input}) == second

        # Several at once; on the fleet the hold classes send two of them to "a" and "b".
        graphs = [
            load_image(name, "loaded"),
            load_image(name, "loaded"),
            load_image(name, "loaded", through=HOLD_CLASS),
            load_image(name, "loaded", through=OTHER_HOLD_CLASS),
        ]
        prompt_ids = await asyncio.gather(*(comfy.submit(graph) for graph in graphs))
        entries = [await comfy.wait_history(prompt_id) for prompt_id in prompt_ids]
        outputs = [await comfy.view(entry["outputs"]["3"]["images"][0]) for entry in entries]
        servers: set[str] = set()
        if target.fleet:
            for prompt_id in prompt_ids:
                reply = await http.get(f"/workflow/status/{prompt_id}")
                assert reply.status_code == 200, reply.text
                servers.add(reply.json()["server_id"])

    assert [e["status"]["status_str"] for e in entries] == ["success"] * len(entries)
    # ImageInvert of the overwritten upload: every server read the newest content.
    for output in outputs:
        width, height, pixel = png_facts(output)
        assert (width, height) == (12, 10)
        assert same_colour(pixel, inverted((200, 20, 90))), pixel
    if target.fleet:
        assert servers >= {"a", "b"}, f"the LoadImage prompts ran on {servers}"
