from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from gateway.bus import contract as c

REQUEST = c.JobRequest(
    workflow={"1": {"class_type": "EmptyImage", "inputs": {"width": 64}}},
    overrides={"1.width": 128, "Save.filename_prefix": "x"},
    inputs=[c.JobInput(name="in.png", source="base64", value="aGk=", content_type="image/png")],
    server="gpu-1",
    labels={"gpu": "a100"},
    priority=5,
    max_attempts=3,
    timeout_s=60.0,
    job_id="job1",
    metadata={"user": "ann"},
)
OUTPUT = c.OutputFile(
    node_id="9",
    filename="a_00001_.png",
    key="job1/a_00001_.png",
    size=10,
    content_type="image/png",
    url="/images/job1/a_00001_.png",
)
FAILED = c.FailedData(
    code="execution_error",
    message="boom",
    retryable=True,
    node_id="3",
    node_type="SaveImage",
    exception_type="ValueError",
    traceback=["line 1"],
    node_errors={"3": {"errors": []}},
)
_BASE: dict[str, Any] = {"event_id": "e1", "job_id": "job1", "seq": 1, "ts": 1.5, "server_id": "s"}

# One fully populated instance of every message of the contract, events included.
SAMPLES: list[msgspec.Struct] = [
    REQUEST,
    c.JobAccepted(job_id="job1", submitted_at=1.0, log_file_path="data/logs/prompts/x.jsonl"),
    c.Error(code="invalid_request", message="bad", details={"nodes": ["1"]}),
    c.Job(
        job_id="job1", attempt=2, server_id="s", request=REQUEST, submitted_at=1, dispatched_at=2
    ),
    c.Heartbeat(
        server_id="s",
        address="127.0.0.1:8188",
        ts=3.0,
        healthy=False,
        reason="ComfyUI does not answer",
        queue_running=1,
        queue_pending=4,
        in_flight=["job1"],
        capacity=3,
        weight=2.0,
        labels={"gpu": "4090"},
        capabilities_hash="abc",
        capabilities=c.Capabilities(
            node_types=["SaveImage"],
            models={"checkpoints": ["sd15.safetensors"]},
            device="cuda:0",
            vram_total=24,
            vram_free=20,
        ),
        interval_s=0.5,
    ),
    c.ServerRecord(
        server_id="s",
        name="Box",
        address="10.0.0.1:8188",
        weight=2,
        capacity=3,
        labels={"a": "b"},
        registered_at=9.0,
        draining=True,
    ),
    c.Cancel(job_id="job1", reason="user"),
    c.ControlReply(ok=False, message="unknown job"),
    c.LogQuery(sql="SELECT 1", max_rows=5, timeout_s=1.0),
    c.LogQueryResult(
        columns=[c.Column("n", "INTEGER")], rows=[[1], [None]], truncated=True, elapsed_ms=2.5
    ),
    c.JobRecord(
        job_id="job1",
        status=c.JobStatus.FAILED,
        submitted_at=1.0,
        updated_at=2.0,
        log_file_path="p",
        priority=1,
        server_id="s",
        attempt=2,
        max_attempts=2,
        last_seq=7,
        outputs=[OUTPUT],
        error=FAILED,
    ),
    c.Queued(**_BASE, data=c.QueuedData(request=REQUEST, log_file_path="p")),
    c.Dispatched(**_BASE, data=c.DispatchedData(server_id="s", attempt=1)),
    c.Running(**_BASE, data=c.RunningData(attempt=1, prompt_id="p", node_errors={"5": {}})),
    c.NodeStarted(**_BASE, data=c.NodeStartedData(node_id="1", class_type="EmptyImage")),
    c.NodeProgress(**_BASE, data=c.NodeProgressData(node_id="1", value=3, max=20)),
    c.NodeCached(**_BASE, data=c.NodeCachedData(node_ids=["1", "2"])),
    c.NodeOutput(**_BASE, data=c.NodeOutputData(node_id="3", output={"images": []})),
    c.NodeImage(
        **_BASE,
        data=c.NodeImageData(
            node_id="11",
            index=2,
            output=c.OutputFile(
                node_id="11",
                filename="ws~11_00002.png",
                key="job1/ws~11_00002.png",
                size=3,
                content_type="image/png",
                url="/images/job1/ws~11_00002.png",
                index=2,
                source="websocket",
            ),
        ),
    ),
    c.Succeeded(**_BASE, data=c.SucceededData(outputs=[OUTPUT], duration_s=1.25)),
    c.Failed(**_BASE, data=FAILED),
    c.Cancelled(**_BASE, data=c.CancelledData(reason="user asked")),
    c.Retried(**_BASE, data=c.RetriedData(attempt=2, reason="server died", previous_server_id="s")),
    c.History(**_BASE, data=c.HistoryData(prompt_id="p", history={"outputs": {}})),
]


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips(message: msgspec.Struct) -> None:
    wire = c.encode(message)
    assert json.loads(wire)["v"] == c.SCHEMA_VERSION
    if isinstance(message, c.EVENT_TYPES):
        assert c.decode_event(wire) == message
        assert json.loads(wire)["type"] == c.event_type(message)
    else:
        assert c.decode(wire, type(message)) == message


def test_every_event_kind_has_a_sample_and_a_distinct_tag() -> None:
    sampled = {type(m) for m in SAMPLES if isinstance(m, c.EVENT_TYPES)}
    assert sampled == set(c.EVENT_TYPES)
    tags = [t.__struct_config__.tag for t in c.EVENT_TYPES]
    assert len(set(tags)) == len(tags)
    assert set(tags) >= {
        "queued",
        "dispatched",
        "running",
        "node_started",
        "node_progress",
        "node_cached",
        "node_output",
        "node_image",
        "succeeded",
        "failed",
        "cancelled",
        "retried",
        "history",
    }


def test_queued_event_carries_the_whole_workflow() -> None:
    event = c.Queued(**_BASE, data=c.QueuedData(request=REQUEST, log_file_path="p"))
    assert json.loads(c.encode(event))["data"]["request"]["workflow"] == REQUEST.workflow


def test_event_wire_shape_has_the_documented_fields() -> None:
    wire = json.loads(c.encode(c.NodeCached(**_BASE, data=c.NodeCachedData(node_ids=[]))))
    assert set(wire) == {"v", "type", "event_id", "job_id", "seq", "ts", "server_id", "data"}


def test_a_newer_schema_version_is_refused_clearly() -> None:
    wire = json.dumps({"v": 2, "workflow": {}}).encode()
    with pytest.raises(c.ContractError, match="schema version 2"):
        c.decode(wire, c.JobRequest)
    event = json.loads(c.encode(SAMPLES[-1]))
    event["v"] = 99
    with pytest.raises(c.ContractError, match="schema version 99"):
        c.decode_event(json.dumps(event).encode())


def test_a_server_record_written_before_draining_existed_is_not_draining() -> None:
    wire = b'{"v": 1, "server_id": "s", "name": "s", "address": "h:1", "registered_at": 1.0}'
    assert c.decode(wire, c.ServerRecord).draining is False


@pytest.mark.parametrize(
    ("wire", "reason"),
    [
        (b"not json", "malformed"),
        (b'{"workflow": 3}', "workflow"),
        (b"{}", "workflow"),
        (b'{"workflow": {}, "priority": "high"}', "priority"),
        (b'{"workflow": {}, "inputs": [{"name": "a", "source": "ftp", "value": "x"}]}', "source"),
    ],
)
def test_bad_requests_raise_contract_errors_naming_the_problem(wire: bytes, reason: str) -> None:
    with pytest.raises(c.ContractError, match=reason):
        c.decode(wire, c.JobRequest)


def test_unknown_event_type_is_refused() -> None:
    with pytest.raises(c.ContractError, match="Invalid value 'exploded'"):
        c.decode_event(json.dumps({**_BASE, "type": "exploded", "data": {}}).encode())


def test_subjects_follow_the_prefix() -> None:
    s = c.Subjects()
    assert s.submit == "comfy.submit"
    assert s.jobs("gpu-1") == "comfy.jobs.gpu-1"
    assert s.heartbeat("gpu-1") == "comfy.heartbeat.gpu-1"
    assert s.events("j1") == "comfy.events.j1"
    assert s.control("gpu-1") == "comfy.control.gpu-1"
    assert s.logs_query == "comfy.logs.query"
    assert (s.jobs_stream, s.events_stream) == ("JOBS", "EVENTS")
    assert (s.servers_bucket, s.jobs_bucket, s.outputs_bucket) == (
        "comfy_servers",
        "comfy_jobs",
        "comfy_outputs",
    )
    other = c.Subjects(prefix="lab")
    assert other.events("j") == "lab.events.j"
    assert other.jobs_stream == "LAB_JOBS"
    assert other.jobs_bucket == "lab_jobs"


@pytest.mark.parametrize("bad", ["", "a.b", "a b", "*", ">", "x" * 129])
def test_ids_that_would_break_a_subject_are_refused(bad: str) -> None:
    with pytest.raises(c.ContractError):
        c.Subjects().jobs(bad)
    with pytest.raises(c.ContractError):
        c.Subjects(prefix=bad)


def test_prompt_id_is_stable_per_attempt() -> None:
    job = c.Job(
        job_id="j", attempt=1, server_id="s", request=REQUEST, submitted_at=0, dispatched_at=0
    )
    assert job.prompt_id == c.prompt_id_for("j", 1)
    assert c.prompt_id_for("j", 1) != c.prompt_id_for("j", 2)
    assert len(c.prompt_id_for("j", 1)) == 36


def test_terminal_statuses() -> None:
    assert {s for s in c.JobStatus if s.terminal} == {"succeeded", "failed", "cancelled"}
    assert all(c.STATUS_AFTER[t].terminal for t in c.TERMINAL_EVENTS)
