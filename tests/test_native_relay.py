"""How a prompt's job events become ComfyUI's websocket messages (gateway/api/native/messages)."""

from __future__ import annotations

from typing import Any

from gateway.api.native.messages import PromptRelay, rename_output
from gateway.contract import (
    CancelledData,
    DispatchedData,
    EventData,
    FailedData,
    NodeCachedData,
    NodeOutputData,
    NodeStartedData,
    RetriedData,
    RunningData,
    SucceededData,
    make_event,
)
from plugins.comfyui.outputs import OutputRef, output_key

PROMPT = "p-1"
IMAGE = {"images": [{"filename": "x_00001_.png", "subfolder": "", "type": "output"}]}


def feed(relay: PromptRelay, *payloads: EventData, start: int = 1) -> list[dict[str, Any]]:
    messages = []
    for seq, data in enumerate(payloads, start=start):
        event = make_event(data, job_id=PROMPT, seq=seq, server_id="a", ts=1.0)
        messages += [{"type": m.type, **m.data} for m in relay.translate(event)]
    return messages


def run(*nodes: str) -> list[EventData]:
    payloads: list[EventData] = [RunningData(attempt=1, prompt_id="x")]
    for node in nodes:
        payloads.append(NodeStartedData(node_id=node))
        if node == "3":
            payloads.append(NodeOutputData(node_id=node, output=IMAGE))
    return payloads


def types(messages: list[dict[str, Any]]) -> list[str]:
    return [
        f"{m['type']}:{m.get('node', '')}" if m["type"] in ("executing", "executed") else m["type"]
        for m in messages
    ]


def test_a_fresh_run_reads_like_comfyui() -> None:
    messages = feed(PromptRelay(PROMPT), *run("1", "2", "3"), SucceededData(attempt=1))
    assert types(messages) == [
        "execution_start",
        "execution_cached",
        "progress_state",
        "executing:1",
        "progress_state",
        "progress_state",
        "executing:2",
        "progress_state",
        "progress_state",
        "executing:3",
        "executed:3",
        "progress_state",
        "execution_success",
    ]
    assert all(m["prompt_id"] == PROMPT for m in messages)
    finished = messages[-2]["nodes"]
    assert [n["state"] for n in finished.values()] == ["finished"] * 3
    executed = messages[-3]["output"]["images"][0]
    # Served from storage under the prompt's folder, as history names it too.
    assert executed == {"filename": "x_00001_.png", "subfolder": PROMPT, "type": "output"}


def test_cached_nodes_are_announced_once() -> None:
    relay = PromptRelay(PROMPT)
    messages = feed(
        relay,
        RunningData(attempt=1, prompt_id="x"),
        NodeCachedData(node_ids=["1", "2"]),
        NodeStartedData(node_id="3"),
    )
    cached = [m for m in messages if m["type"] == "execution_cached"]
    assert [m["nodes"] for m in cached] == [["1", "2"]]


def test_an_event_seen_twice_is_told_once() -> None:
    relay = PromptRelay(PROMPT)
    first = feed(relay, *run("1"))
    again = feed(relay, *run("1"))  # the same seqs redelivered
    assert first and again == []


def test_a_retried_run_starts_over() -> None:
    relay = PromptRelay(PROMPT)
    feed(relay, *run("1", "2"))
    retried = RetriedData(attempt=1, reason="server lost")
    later = feed(relay, retried, DispatchedData(server_id="b", attempt=2), *run("1"), start=5)
    opening = ["execution_start", "execution_cached", "progress_state", "executing:1"]
    assert types(later)[:4] == opening
    assert list(later[2]["nodes"]) == ["1"]  # the new run's nodes only


def test_failure_and_interruption() -> None:
    failed = feed(
        PromptRelay(PROMPT),
        *run("1"),
        FailedData(code="node_error", message="boom", node_id="1", exception_type="RuntimeError"),
    )
    error = failed[-1]
    assert error["type"] == "execution_error"
    assert (error["node_id"], error["exception_message"], error["exception_type"]) == (
        "1",
        "boom",
        "RuntimeError",
    )
    interrupted = feed(PromptRelay(PROMPT), *run("1", "2"), CancelledData())
    assert interrupted[-1]["type"] == "execution_interrupted"
    assert interrupted[-1]["node_id"] == "2"
    # A prompt cancelled before it ran says nothing (ComfyUI drops a deleted pending prompt).
    assert feed(PromptRelay(PROMPT), CancelledData()) == []


def test_files_apart_only_by_subfolder_or_type_keep_apart_names() -> None:
    files = [
        ("11", "same_00001_.png", "x", "output"),
        ("13", "same_00001_.png", "y", "output"),
        ("15", "same_00001_.png", "", "temp"),
    ]
    told = [
        rename_output(PROMPT, {"images": [{"filename": f, "subfolder": s, "type": t}]})
        for _, f, s, t in files
    ]
    names = [output["images"][0]["filename"] for output in told]
    assert len(set(names)) == 3
    # The adapter stores each file under the very name the socket told the client.
    taken: set[str] = set()
    keys = [
        output_key(
            PROMPT, OutputRef(node_id=n, kind="images", filename=f, subfolder=s, type=t), taken
        )
        for n, f, s, t in files
    ]
    assert [key.split("/", 1)[1] for key in keys] == names
