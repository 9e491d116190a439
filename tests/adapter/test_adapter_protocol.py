"""The traps of the ComfyUI protocol notes, one test each, plus the recorded 400 bodies."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import msgspec

from gateway.bus.contract import Running, Succeeded
from plugins.comfyui.client import ComfyClient
from plugins.comfyui.failures import validation_failure
from plugins.comfyui.messages import Executing, PromptRejection, Status, decode_ws
from tests.adapter.kit import FAST, Bus, tiny

RECORDINGS = Path(__file__).resolve().parent.parent / "data" / "comfyui-protocol"


def test_executing_with_null_node_is_the_end_and_unknown_types_are_skipped():
    end = decode_ws('{"type":"executing","data":{"node":null,"prompt_id":"p"}}')
    assert isinstance(end, Executing) and end.data.node is None and end.data.prompt_id == "p"
    rejoin = decode_ws('{"type":"executing","data":{"node":"3"}}')  # on reconnect: no prompt id
    assert isinstance(rejoin, Executing) and rejoin.data.prompt_id is None
    status = decode_ws(
        '{"type":"status","data":{"status":{"exec_info":{"queue_remaining":2}},"sid":"x"}}'
    )
    assert isinstance(status, Status) and status.data.status.exec_info.queue_remaining == 2
    assert decode_ws('{"type":"progress_state","data":{"prompt_id":"p","nodes":{}}}') is None
    assert decode_ws('{"type":"something_new","data":{}}') is None
    assert decode_ws("not json") is None


async def test_queue_pending_is_read_in_run_order(make_sim):
    async with make_sim(hang_queue=True) as sim:
        async with httpx.AsyncClient(base_url=sim.url) as http:
            for number in (5, 1, 4, 2, 3):
                body = {"prompt": tiny(f"n{number}"), "prompt_id": f"p{number}", "number": number}
                assert (await http.post("/prompt", json=body)).status_code == 200
            raw = (await http.get("/queue")).json()["queue_pending"]
        assert [item[1] for item in raw] != ["p1", "p2", "p3", "p4", "p5"]  # heap order
        client = ComfyClient(sim.address)
        try:
            queue = await client.queue()
        finally:
            await client.aclose()
        assert queue.pending_ids() == ["p1", "p2", "p3", "p4", "p5"]
        assert queue.position("p1") == 1 and queue.position("p5") == 5
        assert queue.position("nope") is None


async def test_empty_history_means_not_finished_yet(bus: Bus, make_sim, start_adapter):
    # /history/{id} answers {} until the prompt ends: a pending prompt is waited for, not lost.
    async with make_sim(hang_queue=True) as sim:
        await start_adapter(sim.address)
        job = await bus.dispatch(tiny())
        await bus.wait_pending(sim, job)
        client = ComfyClient(sim.address)
        try:
            assert await client.history(job.prompt_id) is None
            # Several silent-socket cross-checks pass while it waits (silence_s is short here).
            await bus.wait(
                lambda: len(bus.heartbeats) >= 4 * FAST.silence_s, what="some heartbeats"
            )
            assert bus.types(job.job_id) == []  # pending: no `running` yet, and no end
            sim.set_hang(False)
            assert isinstance(await bus.wait_event(job.job_id), Succeeded)
            assert await client.history(job.prompt_id) is not None
        finally:
            await client.aclose()


async def test_two_hundred_with_node_errors_is_reported(bus: Bus, make_sim, start_adapter):
    workflow = tiny()
    workflow["4"] = {
        "class_type": "SaveImage",
        "inputs": {"images": ["99", 0], "filename_prefix": "broken"},
    }
    async with make_sim() as sim:
        await start_adapter(sim.address)
        job = await bus.dispatch(workflow)
        end = await bus.wait_event(job.job_id)
        running = bus.events[job.job_id][0]
        assert isinstance(running, Running) and "4" in running.data.node_errors
        assert isinstance(end, Succeeded) and "4" in end.data.node_errors


def test_every_recorded_refusal_is_put_in_plain_words():
    lines = (RECORDINGS / "validation_errors.jsonl").read_text().splitlines()
    refusals = [
        record
        for record in map(json.loads, lines)
        if record.get("kind") == "http" and record.get("status") == 400
    ]
    assert len(refusals) >= 10
    for record in refusals:
        workflow = record["request_json"].get("prompt", {})
        rejection = msgspec.convert(record["body_json"], PromptRejection)
        failed = validation_failure(rejection, workflow, attempt=1)
        assert failed.code == "validation_error" and not failed.retryable
        assert failed.message.startswith("ComfyUI refused the workflow: ")
        for node_id in record["body_json"]["node_errors"]:
            assert f"node {node_id} " in failed.message, (record["label"], failed.message)
            assert node_id in failed.node_errors
