"""How a prompt's job events become ComfyUI's websocket messages and history (native API)."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gateway.api.native import sockets
from gateway.api.native.history import recorded_messages
from gateway.api.native.messages import (
    HISTORY_TYPES,
    OutgoingImage,
    PromptRelay,
    history_messages,
    rename_output,
)
from gateway.api.native.prompts import Entry, PromptIndex
from gateway.api.native.sockets import NativeSocket, SocketHub
from gateway.bus.contract import (
    CancelledData,
    DispatchedData,
    Event,
    EventData,
    FailedData,
    JobRecord,
    JobStatus,
    NativePrompt,
    NodeCachedData,
    NodeImageData,
    NodeOutputData,
    NodeProgressData,
    NodeStartedData,
    OutputFile,
    RetriedData,
    RunningData,
    Subjects,
    SucceededData,
    encode,
    make_event,
)
from plugins.comfyui.outputs import OutputRef, output_key
from plugins.comfyui.progress import text_with_prompt
from plugins.simulator.hub import text_binary_frame
from tests.native import shapes

RECORDINGS = Path(__file__).parent / "data" / "comfyui-protocol"
PROMPT = "p-1"
IMAGE = {"images": [{"filename": "x_00001_.png", "subfolder": "", "type": "output"}]}


def events(*payloads: EventData, start: int = 1) -> list[Event]:
    return [
        make_event(data, job_id=PROMPT, seq=seq, server_id="a", ts=1.0)
        for seq, data in enumerate(payloads, start=start)
    ]


def feed(relay: PromptRelay, *payloads: EventData, start: int = 1) -> list[dict[str, Any]]:
    messages = []
    for event in events(*payloads, start=start):
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


def _told(relay: PromptRelay, *payloads: EventData) -> list[list[Any]]:
    """What a socket was told of the history's message types, as [type, data] pairs."""
    told = []
    for event in events(*payloads):
        told += [[m.type, m.data] for m in relay.translate(event) if m.type in HISTORY_TYPES]
    return told


def test_history_keeps_the_messages_the_socket_was_told_of_the_last_run() -> None:
    failed = FailedData(code="node_error", message="boom", node_id="3", node_type="SaveImage")
    payloads: list[EventData] = [
        *run("1"),
        RetriedData(attempt=1, reason="server lost"),
        RunningData(attempt=2, prompt_id="y"),
        NodeCachedData(node_ids=["1"]),
        NodeStartedData(node_id="2"),
        NodeStartedData(node_id="3"),
        failed,
    ]
    told = _told(PromptRelay(PROMPT), *payloads)
    stored = history_messages(PROMPT, events(*payloads))

    assert [name for name, _ in stored] == [
        "execution_start",
        "execution_cached",
        "execution_error",
    ]
    assert stored == told[-3:], "history differs from what the socket said"
    assert stored[1][1]["nodes"] == ["1"]
    assert stored[2][1]["executed"] == ["2"]
    for name, data in stored:
        shapes.ws_message({"type": name, "data": data}, first=False)


def _entry(status: JobStatus, **record: Any) -> Entry:
    prompt = NativePrompt(prompt_id=PROMPT, caller="main", prompt={}, created_ms=1)
    entry = Entry(prompt=prompt, revision=1)
    entry.record = JobRecord(
        job_id=PROMPT,
        status=status,
        submitted_at=1.0,
        updated_at=3.0,
        log_file_path="",
        finished_at=3.0,
        **record,
    )
    return entry


@pytest.mark.parametrize("status", [JobStatus.SUCCEEDED, JobStatus.CANCELLED])
def test_a_record_alone_tells_the_ending_in_comfyuis_key_order(status: JobStatus) -> None:
    # What history says when the job's events cannot be read back.
    messages = recorded_messages(_entry(status, started_at=2.0))
    assert [name for name, _ in messages][:2] == ["execution_start", "execution_cached"]
    for name, data in messages:
        shapes.ws_message({"type": name, "data": data}, first=False)


def test_the_recordings_pass_the_shape_checks() -> None:
    """The shapes (keys and their order) are the recorded server's, message by message."""
    checked = 0
    for path in sorted(RECORDINGS.glob("*.jsonl")):
        first: set[str] = set()
        for line in path.read_text().splitlines():
            item = json.loads(line)
            if item["kind"] == "ws_connect":
                first.add(item["client"])
            elif item["kind"] == "ws" and "msg" in item:
                shapes.ws_message(item["msg"], first=item["client"] in first)
                first.discard(item["client"])
                checked += 1
            elif item["kind"] == "http" and "/history" in item["path"] and item["method"] == "GET":
                shapes.history(item["body_json"])
                checked += 1
    assert checked > 500


@dataclass
class _Msg:
    subject: str
    data: bytes


class _Nats:
    """Enough of a NATS client for a socket hub that is fed by hand."""

    async def subscribe(self, subject: str, cb: Any) -> Any:
        return self

    async def unsubscribe(self) -> None:
        pass


def _frames(sock: NativeSocket) -> list[str]:
    """The types of the text frames waiting to be written."""
    frames = []
    while not sock.frames.empty():
        frame = sock.frames.get_nowait()
        if isinstance(frame, str):
            frames.append(json.loads(frame)["type"])
    return frames


async def test_events_that_come_before_their_prompt_is_known_are_held_for_it() -> None:
    """A second gateway's KV watch may bring the prompt after its first events."""
    subjects = Subjects()
    # Neither the buckets nor history are read here.
    index = PromptIndex(prompts_kv=None, jobs_kv=None)  # type: ignore[arg-type]
    hub = SocketHub(_Nats(), subjects, index, history=None)  # type: ignore[arg-type]
    sock = await hub.connect("main", "client-1")
    for event in events(*run("1")):
        await hub._on_event(_Msg(subjects.events(PROMPT), encode(event)))  # type: ignore[arg-type]
    for event in events(*run("2"), start=10):  # another caller's job, never known here
        await hub._on_event(_Msg(subjects.events("other"), encode(event)))  # type: ignore[arg-type]
    prompt = NativePrompt(prompt_id=PROMPT, caller="main", prompt={}, client_id="client-1")
    index.add(prompt, revision=1)
    await hub.close()

    assert _frames(sock) == [
        "status",  # on connecting
        "status",  # picked up
        "execution_start",
        "execution_cached",
        "progress_state",
        "executing",
    ]


async def _next(sock: NativeSocket, count: int) -> list[str | bytes]:
    """The next `count` frames written to the socket, waiting for each a few seconds at most."""
    frames = []
    for _ in range(count):
        item = await asyncio.wait_for(sock.frames.get(), timeout=5)
        assert item is not None, "the socket was closed"
        frames.append(item)
    return frames


def _texts(frames: list[str | bytes]) -> list[dict[str, Any]]:
    return [json.loads(frame) for frame in frames if isinstance(frame, str)]


def _hub(index: PromptIndex, history: Any = None) -> tuple[SocketHub, Subjects]:
    subjects = Subjects()
    return SocketHub(_Nats(), subjects, index, history=history), subjects  # type: ignore[arg-type]


async def _feed(hub: SocketHub, subjects: Subjects, *payloads: EventData, start: int = 1) -> None:
    for event in events(*payloads, start=start):
        await hub._on_event(_Msg(subjects.events(PROMPT), encode(event)))  # type: ignore[arg-type]


def _running(index: PromptIndex, client_id: str | None = "client-1") -> None:
    prompt = NativePrompt(prompt_id=PROMPT, caller="main", prompt={}, client_id=client_id)
    index.add(prompt, revision=1)
    record = JobRecord(
        job_id=PROMPT,
        status=JobStatus.RUNNING,
        submitted_at=1.0,
        updated_at=1.0,
        log_file_path="",
        started_at=1.0,
    )
    index.on_record(record)


def _assert_rejoined(told: list[dict[str, Any]], at: str, states: dict[str, str]) -> None:
    """What ComfyUI tells a socket joining its client id's running prompt, then one node more."""
    assert [m["type"] for m in told] == [
        "status",
        "executing",
        "progress_state",
        "progress_state",
        "executing",
    ]
    assert told[1]["data"] == {"node": at}  # where it is, without prompt_id
    assert {node: s["state"] for node, s in told[3]["data"]["nodes"].items()} == states


async def test_a_socket_rejoining_after_the_last_one_closed_hears_where_the_prompt_is() -> None:
    index = PromptIndex(prompts_kv=None, jobs_kv=None)  # type: ignore[arg-type]
    hub, subjects = _hub(index)
    first = await hub.connect("main", "client-1")
    _running(index)
    await _feed(hub, subjects, *run("1", "2"))
    await hub.disconnect(first)
    await _feed(hub, subjects, NodeStartedData(node_id="3"), start=4)  # heard by no socket
    again = await hub.connect("main", "client-1")
    await _feed(hub, subjects, NodeStartedData(node_id="4"), start=5)
    told = _texts(await _next(again, 5))
    await hub.close()

    _assert_rejoined(told, "3", {"1": "finished", "2": "finished", "3": "finished", "4": "running"})


class _Stored:
    """A history reader that hands out the prompt's stored events when the test lets it."""

    def __init__(self, stored: list[Event]) -> None:
        self.stored = stored
        self.asked = asyncio.Event()
        self.release = asyncio.Event()

    async def events(self, job_id: str) -> list[Event]:
        self.asked.set()
        await self.release.wait()
        return self.stored


async def test_a_socket_joining_a_prompt_followed_elsewhere_is_caught_up_from_its_events() -> None:
    """Started while no socket listened here (or taken by another gateway)."""
    index = PromptIndex(prompts_kv=None, jobs_kv=None)  # type: ignore[arg-type]
    stored = _Stored(events(*run("1", "2")))
    hub, subjects = _hub(index, stored)
    other = await hub.connect("main", "client-2")  # hears of the prompt's status only
    _running(index)
    joining = asyncio.create_task(hub.connect("main", "client-1"))
    await asyncio.wait_for(stored.asked.wait(), timeout=5)
    # Live events while the stored ones are read: one of them among those, one after.
    await _feed(hub, subjects, NodeStartedData(node_id="2"), start=3)
    await _feed(hub, subjects, NodeStartedData(node_id="3"), start=4)
    stored.release.set()
    sock = await asyncio.wait_for(joining, timeout=5)
    told = _texts(await _next(sock, 5))
    await hub.close()

    _assert_rejoined(told, "2", {"1": "finished", "2": "finished", "3": "running"})
    assert _frames(other) == ["status"]


async def test_text_frames_go_to_every_socket_of_the_prompts_caller_only() -> None:
    index = PromptIndex(prompts_kv=None, jobs_kv=None)  # type: ignore[arg-type]
    hub, subjects = _hub(index)
    prompt = NativePrompt(prompt_id=PROMPT, caller="main", prompt={}, client_id="client-1")
    index.add(prompt, revision=1)
    mine = [await hub.connect("main", "client-1"), await hub.connect("main", "client-2")]
    theirs = await hub.connect("alice", "client-1")
    comfy_text = [
        text_binary_frame("6", f"width: {n}, height: {n}\n batch size: 2") for n in (1, 2)
    ]
    # The first comes before the run's `running` event: held until then.
    await hub._on_frame(_Msg(subjects.previews("a"), text_with_prompt("x", comfy_text[0])))  # type: ignore[arg-type]
    await _feed(hub, subjects, RunningData(attempt=1, prompt_id="x"))
    await hub._on_frame(_Msg(subjects.previews("a"), text_with_prompt("x", comfy_text[1])))  # type: ignore[arg-type]
    await hub._on_frame(_Msg(subjects.previews("a"), comfy_text[1]))  # type: ignore[arg-type]
    # status, text, status ("picked up"), execution_start (to client-1 only), text
    counts = (5, 4)
    got = [
        [f for f in await _next(sock, n) if isinstance(f, bytes)]
        for sock, n in zip(mine, counts, strict=True)
    ]
    await hub.close()

    assert got == [comfy_text, comfy_text]  # as the server sent them
    heard = [theirs.frames.get_nowait() for _ in range(theirs.frames.qsize())]
    assert [json.loads(f)["type"] for f in heard if isinstance(f, str)] == ["status"]
    assert not [f for f in heard if isinstance(f, bytes)]


async def test_a_status_counting_a_prompt_whose_end_was_late_is_corrected(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sockets, "SETTLE_S", 0.01)
    index = PromptIndex(prompts_kv=None, jobs_kv=None)  # type: ignore[arg-type]
    hub, subjects = _hub(index)
    sock = await hub.connect("main", "client-1")
    _running(index)
    await _feed(hub, subjects, *run("1"), SucceededData(attempt=1))
    told = _texts(await _next(sock, 10))
    assert [m["type"] for m in told[-3:]] == ["execution_success", "status", "executing"]
    assert told[-2]["data"]["status"]["exec_info"]["queue_remaining"] == 1  # no record yet
    index.on_record(_entry(JobStatus.SUCCEEDED).record)  # type: ignore[arg-type]
    late = _texts(await _next(sock, 1))
    await hub.close()

    assert late[0]["type"] == "status"
    assert late[0]["data"]["status"]["exec_info"]["queue_remaining"] == 0


def _said(relay: PromptRelay, *payloads: EventData) -> list[tuple[str, Any]]:
    """What the relay says of node 11: a websocket image as ("image", (index, flagged)),
    `progress_state` as its value and state, `progress` as its value."""
    said: list[tuple[str, Any]] = []
    for event in events(*payloads):
        for m in relay.translate(event):
            if isinstance(m, OutgoingImage):
                said.append(("image", (m.output.index, m.flagged)))
            elif m.type == "progress_state":
                node = m.data["nodes"]["11"]
                said.append((m.type, (node["value"], node["max"], node["state"])))
            else:
                said.append((m.type, m.data.get("value")))
    return said


def _image(index: int) -> NodeImageData:
    output = OutputFile(
        node_id="11",
        filename=f"ws~11_{index:05d}.png",
        key=f"{PROMPT}/ws~11_{index:05d}.png",
        size=1,
        content_type="image/png",
        url="",
        index=index,
        source="websocket",
    )
    return NodeImageData(node_id="11", index=index, output=output)


def test_a_websocket_image_comes_where_comfyui_sends_it_to_each_kind_of_client() -> None:
    """Each step is `progress_state` then `progress`, with the image between them for a client
    with preview metadata and after them for one without (ws_heavy_feature_flags.jsonl,
    ws_heavy.jsonl), whichever order the server sent image and progress in."""
    start = [RunningData(attempt=1, prompt_id="r"), NodeStartedData(node_id="11")]
    image_first = _said(
        PromptRelay(PROMPT),
        *start,
        _image(0),
        NodeProgressData(node_id="11", value=0, max=2),
        _image(1),
        NodeProgressData(node_id="11", value=1, max=2),
        SucceededData(attempt=1),
    )
    progress_first = _said(
        PromptRelay(PROMPT),
        *start,
        NodeProgressData(node_id="11", value=0, max=2),
        _image(0),
        NodeProgressData(node_id="11", value=1, max=2),
        _image(1),
        SucceededData(attempt=1),
    )
    running = ("progress_state", (0, 1, "running"))
    for said in (image_first, progress_first):
        assert said[:3] == [("execution_start", None), ("execution_cached", None), running]
        assert said[3] == ("executing", None)
        assert said[-2:] == [("progress_state", (2, 2, "finished")), ("execution_success", None)]
        plain = [s for s in said[4:-2] if s[0] != "image" or not s[1][1]]
        assert plain == [
            ("progress_state", (0, 2, "running")),
            ("progress", 0),
            ("image", (0, False)),
            ("progress_state", (1, 2, "running")),
            ("progress", 1),
            ("image", (1, False)),
        ]
    flagged = [s for s in image_first[4:-2] if s[0] != "image" or s[1][1]]
    assert flagged == [
        ("progress_state", (0, 2, "running")),
        ("image", (0, True)),
        ("progress", 0),
        ("progress_state", (1, 2, "running")),
        ("image", (1, True)),
        ("progress", 1),
    ]


def test_prompts_ended_before_the_retention_leave_the_view() -> None:
    """Their entries leave KV by a TTL that no watcher hears of: each gateway drops them."""
    index = PromptIndex(prompts_kv=None, jobs_kv=None)  # type: ignore[arg-type]
    for revision, (prompt_id, status, ended) in enumerate(
        [("old", JobStatus.SUCCEEDED, 100.0), ("new", JobStatus.FAILED, 200.0)], start=1
    ):
        index.add(NativePrompt(prompt_id=prompt_id, caller="main", prompt={}), revision)
        record = JobRecord(
            job_id=prompt_id,
            status=status,
            submitted_at=1.0,
            updated_at=ended,
            log_file_path="",
            finished_at=ended,
        )
        index.on_record(record)
    index.add(NativePrompt(prompt_id="open", caller="main", prompt={}), 3)
    assert index.forget_ended_before(150.0) == ["old"]
    assert [e.prompt_id for e in index.history_of("main")] == ["new"]
    assert index.knows("open") and not index.knows("old")
