"""Validation errors, the informational endpoints and credentials, on both targets."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest
import websockets

from tests.native import shapes
from tests.native.clients import Comfy, Target, of_prompt, socket, tiny

pytestmark = pytest.mark.asyncio(loop_scope="module")


def _invalid(client_id: str) -> dict[str, tuple[dict[str, Any], str]]:
    """Rejected POST /prompt bodies and the error.type ComfyUI answers each with."""
    unknown = tiny("invalid")
    unknown["2"]["class_type"] = "NoSuchNode"
    no_output = tiny("invalid")
    del no_output["3"]
    missing_link = tiny("invalid")
    missing_link["2"]["inputs"]["image"] = ["99", 0]
    return {
        "unknown class_type": (
            {"prompt": unknown, "client_id": client_id},
            "missing_node_type",
        ),
        "no output node": ({"prompt": no_output, "client_id": client_id}, "prompt_no_outputs"),
        "no prompt key": ({"client_id": client_id}, "no_prompt"),
        "link to a missing node": (
            {"prompt": missing_link, "client_id": client_id},
            "prompt_outputs_failed_validation",
        ),
    }


async def test_invalid_prompts_get_comfyui_errors_and_custom_ids_are_kept(
    target: Target,
) -> None:
    client_id = f"validation-{uuid.uuid4().hex}"
    custom = f"my-own-{uuid.uuid4().hex}"
    async with socket(target, client_id) as ws, target.http() as http:
        comfy = Comfy(http)
        errors = {}
        for case, (body, _) in _invalid(client_id).items():
            reply = await comfy.post_prompt(body)
            assert reply.status_code == 400, f"{case}: {reply.status_code} {reply.text}"
            errors[case] = shapes.validation_error(reply.json())
        reply = await comfy.post_prompt(
            {"prompt": tiny("custom"), "client_id": client_id, "prompt_id": custom}
        )
        assert reply.status_code == 200, reply.text
        accepted = shapes.accepted(reply.json())
        await ws.done(custom)
        entry = await comfy.history(custom)

    types = {case: error["error"]["type"] for case, error in errors.items()}
    assert types == {case: expected for case, (_, expected) in _invalid(client_id).items()}
    unknown = errors["unknown class_type"]
    assert unknown["error"]["message"].startswith("Node 'NoSuchNode' not found")
    assert unknown["error"]["extra_info"]["node_id"] == "2"
    assert unknown["error"]["extra_info"]["class_type"] == "NoSuchNode"
    for case in ("unknown class_type", "no output node", "no prompt key"):
        assert errors[case]["node_errors"] == {}, case
    # Filed under the node holding the link, the output it feeds named as dependent.
    link = errors["link to a missing node"]["node_errors"]
    assert list(link) == ["2"], link
    assert link["2"]["class_type"] == "ImageInvert"
    assert link["2"]["dependent_outputs"] == ["3"]
    assert [e["type"] for e in link["2"]["errors"]] == ["exception_during_inner_validation"]

    assert accepted["prompt_id"] == custom
    assert entry is not None and entry["status"]["status_str"] == "success"
    # Rejected prompts send nothing on the socket: only the accepted one was heard of.
    assert ws.prompt_ids() == {custom}
    assert {m["type"] for m in ws.messages if not of_prompt(m, custom)} == {"status"}


async def _json(http: httpx.AsyncClient, path: str) -> Any:
    reply = await http.get(path)
    assert reply.status_code == 200, f"{path}: {reply.status_code}"
    assert reply.headers["content-type"].startswith("application/json"), reply.headers
    return reply.json()


_SYSTEM = {
    "os",
    "ram_total",
    "ram_free",
    "comfyui_version",
    "required_frontend_version",
    "python_version",
    "pytorch_version",
    "embedded_python",
    "argv",
}
_DEVICE = {
    "name",
    "type",
    "index",
    "vram_total",
    "vram_free",
    "torch_vram_total",
    "torch_vram_free",
}


@pytest.mark.parametrize("prefix", ["", "/api"])
async def test_informational_endpoints(target: Target, prefix: str) -> None:
    async with target.http() as http:
        stats = await _json(http, f"{prefix}/system_stats")
        every = await _json(http, f"{prefix}/object_info")
        save = await _json(http, f"{prefix}/object_info/SaveImage")
        nope = await _json(http, f"{prefix}/object_info/Nope")
        embeddings = await _json(http, f"{prefix}/embeddings")
        models = await _json(http, f"{prefix}/models")
        checkpoints = await _json(http, f"{prefix}/models/checkpoints")
        no_folder = await http.get(f"{prefix}/models/not_a_folder")
        features = await _json(http, f"{prefix}/features")
        missing = await http.get(f"{prefix}/no_such_route")

    shapes.keys(stats, ("system", "devices"), "system_stats")
    assert set(stats["system"]) >= _SYSTEM, sorted(stats["system"])
    assert isinstance(stats["devices"], list) and stats["devices"]
    for device in stats["devices"]:
        assert set(device) >= _DEVICE, sorted(device)

    assert isinstance(every, dict)
    assert {"EmptyImage", "SaveImage", "LoadImage"} <= set(every)
    for name, definition in every.items():
        assert definition["name"] == name
        assert {"input", "output", "output_node", "category"} <= set(definition), name
    assert list(save) == ["SaveImage"] and save["SaveImage"] == every["SaveImage"]
    assert save["SaveImage"]["output_node"] is True
    assert nope == {}

    assert isinstance(embeddings, list)
    assert isinstance(models, list) and all(isinstance(folder, str) for folder in models)
    assert "checkpoints" in models
    assert isinstance(checkpoints, list) and all(isinstance(name, str) for name in checkpoints)
    assert (no_folder.status_code, no_folder.content) == (404, b"")
    assert isinstance(features["supports_preview_metadata"], bool)
    assert isinstance(features["max_upload_size"], int)
    assert missing.status_code == 404


# A plain ComfyUI has no API keys: this one runs against the fleet only.
@pytest.mark.parametrize("target", ["fleet"], indirect=True)
async def test_fleet_takes_the_key_as_bearer_or_basic_and_nothing_else(target: Target) -> None:
    async with (
        target.http("nobody") as anonymous,
        target.http("nobody", **{"Authorization": "Bearer not-a-key"}) as wrong,
    ):
        assert (await anonymous.get("/prompt")).status_code == 401
        assert (await anonymous.get("/api/queue")).status_code == 401
        assert (await wrong.get("/prompt")).status_code in (401, 403)
    with pytest.raises((websockets.InvalidStatus, websockets.ConnectionClosed)):
        async with websockets.connect(target.ws_url("anonymous"), proxy=None) as conn:
            await conn.recv()  # a socket without a key must not get even the first status

    async with target.http("nobody", **target.basic_headers("main")) as basic:
        comfy = Comfy(basic)
        assert await comfy.queue_remaining() >= 0
        prompt_id = await comfy.submit(tiny("basic"))
        entry = await comfy.wait_history(prompt_id)
    assert entry["status"]["status_str"] == "success"
    client_id = f"basic-{uuid.uuid4().hex}"
    async with socket(target, client_id, headers=target.basic_headers("main")) as ws:
        ws.check()


async def test_an_invalid_output_is_dropped_and_named_in_a_200(target: Target) -> None:
    """The recorded `two_outputs_one_invalid`: the valid output runs, the other is reported."""
    client_id = f"one-invalid-{uuid.uuid4().hex}"
    graph = tiny("one-invalid")
    graph["4"] = {
        "class_type": "SaveImage",
        "inputs": {"images": ["99", 0], "filename_prefix": "one_invalid"},
    }
    async with socket(target, client_id) as ws, target.http() as http:
        comfy = Comfy(http)
        reply = await comfy.post_prompt({"prompt": graph, "client_id": client_id})
        assert reply.status_code == 200, reply.text
        accepted = shapes.accepted(reply.json())
        await ws.done(accepted["prompt_id"])
        entry = await comfy.history(accepted["prompt_id"])

    errors = accepted["node_errors"]
    assert list(errors) == ["4"], errors
    assert errors["4"]["class_type"] == "SaveImage"
    assert errors["4"]["dependent_outputs"] == ["4"]
    assert [e["type"] for e in errors["4"]["errors"]] == ["exception_during_validation"]
    assert entry is not None and entry["status"]["status_str"] == "success"
    assert entry["prompt"][4] == ["3"] and list(entry["outputs"]) == ["3"]
