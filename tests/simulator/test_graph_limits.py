"""Graphs at the edges: the longest chain ComfyUI can check, one node more, cycles, and JSON
nested deeper than a decoder goes.

ComfyUI checks a prompt's links by recursing once per linked node, so a chain much longer than
Python's frame limit, or a cycle, ends its check in a RecursionError: a 400
`prompt_outputs_failed_validation` whose node error is `exception_during_inner_validation`. The
fake answers the same (its walks are iterative, so it never fails the way a recursion does), and
the REST submit path refuses the same graphs with its own 400 before they are queued.
"""

from __future__ import annotations

from typing import Any

import httpx

from gateway.comfyui.graph import MAX_CHAIN
from gateway.comfyui.workflow import graph_problems
from plugins.simulator import Simulator
from plugins.simulator.asgi import SERVER_ERROR_TEXT
from tests.simulator.test_features import run_prompt, types


def chain(nodes: int, prefix: str = "chain") -> dict[str, Any]:
    """EmptyImage → (nodes - 2) ImageInverts → SaveImage: `nodes` nodes linked in a line."""
    graph: dict[str, Any] = {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": nodes},
        }
    }
    for index in range(2, nodes):
        graph[str(index)] = {"class_type": "ImageInvert", "inputs": {"image": [str(index - 1), 0]}}
    graph[str(nodes)] = {
        "class_type": "SaveImage",
        "inputs": {"images": [str(nodes - 1), 0], "filename_prefix": prefix},
    }
    return graph


LOOP = {
    "1": {"class_type": "ImageInvert", "inputs": {"image": ["2", 0]}},
    "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
    "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "loop"}},
}
SELF_LOOP = {
    "1": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
    "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "self"}},
}


def _inner_errors(body: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """The node errors of a 400 that ComfyUI's recursion would have given, checked on the way."""
    assert body["error"]["type"] == "prompt_outputs_failed_validation", body["error"]
    found = {node: entry["errors"] for node, entry in body["node_errors"].items()}
    assert found, body
    for errors in found.values():
        assert [e["type"] for e in errors] == ["exception_during_inner_validation"], errors
        assert errors[0]["extra_info"]["exception_type"] == "RecursionError"
        assert "maximum recursion depth exceeded" in errors[0]["details"]
    return found


async def test_the_longest_chain_runs_and_one_node_more_is_refused(sim: Simulator) -> None:
    _, messages = await run_prompt(sim, chain(MAX_CHAIN))
    assert "execution_success" in types(messages), messages[-3:]
    async with httpx.AsyncClient(base_url=sim.url, timeout=30) as http:
        reply = await http.post("/prompt", json={"prompt": chain(MAX_CHAIN + 1)})
        assert reply.status_code == 400, reply.text[:500]
        errors = _inner_errors(reply.json())
        # Filed, as ComfyUI files it, under the node the walk could not go into.
        assert list(errors) == ["1"], errors
        assert "more than" in errors["1"][0]["details"]
        assert (await http.get("/system_stats")).status_code == 200


async def test_a_chain_of_3000_nodes_and_cycles_get_comfyuis_400(sim: Simulator) -> None:
    async with httpx.AsyncClient(base_url=sim.url, timeout=30) as http:
        long = await http.post("/prompt", json={"prompt": chain(3000)})
        assert long.status_code == 400, long.text[:500]
        _inner_errors(long.json())
        for graph, closing in ((LOOP, "1"), (SELF_LOOP, "1")):
            reply = await http.post("/prompt", json={"prompt": graph})
            assert reply.status_code == 400, reply.text[:500]
            errors = _inner_errors(reply.json())
            # The node whose link closes the cycle holds the error, naming the cycle.
            assert list(errors) == [closing], errors
            assert "cycle" in errors[closing][0]["details"]
            assert reply.json()["node_errors"][closing]["dependent_outputs"] == [max(graph)]
        queue = (await http.get("/queue")).json()
    assert queue == {"queue_running": [], "queue_pending": []}


async def test_json_nested_past_the_decoder_is_comfyuis_500(sim: Simulator) -> None:
    """ComfyUI's JSON decoder gives up on deep nesting, and aiohttp answers its usual 500."""
    async with httpx.AsyncClient(base_url=sim.url, timeout=30) as http:
        reply = await http.post("/prompt", content=b"[" * 100_000 + b"]" * 100_000)
        assert reply.status_code == 500
        assert reply.text == SERVER_ERROR_TEXT.decode()
        assert (await http.get("/queue")).status_code == 200


def test_the_submit_path_refuses_the_same_graphs() -> None:
    assert graph_problems(chain(MAX_CHAIN)) == []
    too_long = graph_problems(chain(MAX_CHAIN + 1))
    assert len(too_long) == 1 and f"chain of {MAX_CHAIN + 1} linked nodes" in too_long[0]
    assert "chain of 3000" in graph_problems(chain(3000))[0]
    for graph in (LOOP, SELF_LOOP):
        assert "cycle" in graph_problems(graph)[0]
