"""History entries as ComfyUI stores them, and what scripts do to history, on both targets."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest

from tests.helpers import poll_until
from tests.native.clients import WORKFLOWS, Comfy, Target, hold, socket, tiny, unique

pytestmark = pytest.mark.asyncio(loop_scope="module")


def _told(messages: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    """The data of the one message of that type."""
    found = [m["data"] for m in messages if m["type"] == kind]
    assert len(found) == 1, [m["type"] for m in messages]
    return found[0]


def _stored(entry: dict[str, Any], kind: str) -> dict[str, Any]:
    found = [data for name, data in entry["status"]["messages"] if name == kind]
    assert len(found) == 1, entry["status"]["messages"]
    data: dict[str, Any] = found[0]
    return data


async def test_history_names_the_cached_nodes_the_socket_named(target: Target) -> None:
    client_id = f"cached-{uuid.uuid4().hex}"
    # One hold node: on the fleet only server "a" runs it, so the second run finds its cache.
    graph = hold("cached", nodes=1)
    async with socket(target, client_id) as ws, target.http() as http:
        comfy = Comfy(http)
        runs = []
        for _ in range(2):
            prompt_id = await comfy.submit(graph, client_id)
            runs.append((await ws.done(prompt_id), await comfy.history(prompt_id)))

    for messages, entry in runs:
        assert entry is not None
        told = _told(messages, "execution_cached")
        assert _stored(entry, "execution_cached") == told
    assert _told(runs[1][0], "execution_cached")["nodes"], "the second run used no cache"


async def test_history_names_the_nodes_executed_before_a_runtime_error(target: Target) -> None:
    client_id = f"runtime-error-{uuid.uuid4().hex}"
    graph = json.loads((WORKFLOWS / "runtime_error.json").read_text())
    graph["1"]["inputs"]["color"] = unique("runtime-error")[0]  # nothing cached
    async with socket(target, client_id) as ws, target.http() as http:
        comfy = Comfy(http)
        prompt_id = await comfy.submit(graph, client_id)
        messages = await ws.done(prompt_id)
        entry = await comfy.history(prompt_id)

    assert entry is not None
    told = _told(messages, "execution_error")
    stored = _stored(entry, "execution_error")
    assert told["executed"], "the socket named no executed node"
    assert stored["executed"] == told["executed"]
    assert (stored["node_id"], stored["node_type"]) == ("3", "SaveImage")


async def test_history_is_paged_deleted_and_cleared(target: Target) -> None:
    async with target.http() as http:
        comfy = Comfy(http)
        # From nothing: earlier tests of this module left entries.
        await comfy.history_action({"clear": True})
        assert await comfy.all_history() == {}
        ids = []
        for _ in range(3):  # one after the other, so they end in this order on the fleet too
            ids.append(await comfy.submit(tiny("paged")))
            await comfy.wait_history(ids[-1])

        pages = {
            "all": await comfy.all_history(),
            "newest two": await comfy.all_history(max_items=2),
            "two from the oldest": await comfy.all_history(max_items=2, offset=0),
            "one from the second": await comfy.all_history(max_items=1, offset=1),
            "from the third": await comfy.all_history(offset=2),
            "past the end": await comfy.all_history(offset=3),
            "offset -1 is none given": await comfy.all_history(max_items=1, offset=-1),
        }
        await comfy.history_action({"delete": [ids[1], f"unknown-{uuid.uuid4().hex}"]})
        deleted = await comfy.history(ids[1])
        after_delete = await comfy.all_history()
        await comfy.history_action({"clear": True})
        after_clear = await comfy.all_history()
        cleared = await comfy.history(ids[0])

    assert {name: list(page) for name, page in pages.items()} == {
        "all": ids,
        "newest two": ids[1:],
        "two from the oldest": ids[:2],
        "one from the second": ids[1:2],
        "from the third": ids[2:],
        "past the end": [],
        "offset -1 is none given": ids[2:],
    }
    assert deleted is None
    assert list(after_delete) == [ids[0], ids[2]]
    assert after_clear == {} and cleared is None


async def test_a_reused_prompt_id(target: Target) -> None:
    chosen = f"reused-{uuid.uuid4().hex}"
    first_graph, second_graph = tiny("reused"), tiny("reused")
    async with target.http() as http:
        comfy = Comfy(http)
        first = await comfy.submit(first_graph, prompt_id=chosen)
        await comfy.wait_history(first)
        second = await comfy.submit(second_graph, prompt_id=chosen)
        if target.fleet:
            # Each prompt is a job and job ids are never reused: the second prompt gets an id
            # of its own, told in the answer, and the first keeps its entry.
            assert second != chosen
            entry = await comfy.wait_history(second)
            kept = await comfy.history(chosen)
            assert kept is not None and kept["prompt"][2] == first_graph
        else:
            # ComfyUI runs both under that id; history keeps the last one.
            assert second == chosen

            async def replaced() -> bool:
                entry = await comfy.history(chosen)
                return entry is not None and entry["prompt"][2] == second_graph

            await poll_until(replaced, "the second prompt's entry under the reused id")
            entry = await comfy.wait_history(chosen)

    assert first == chosen
    assert entry["prompt"][1:3] == [second, second_graph]
    assert entry["status"]["status_str"] == "success"
