"""Request and response bodies of the REST API (msgspec Structs; OpenAPI is generated)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from gateway.bus.contract import (
    MAX_TIMEOUT_S,
    PRIORITY_MAX,
    PRIORITY_MIN,
    FailedData,
    JobInput,
    JobStatus,
    OutputFile,
)
from gateway.bus.replication import Replication


class _ReadsLikeADict:
    """Lets a result answer `result["images"]` as well as `result.images`."""

    __slots__ = ()

    def __getitem__(self, name: str) -> Any:
        if name not in self.__struct_fields__:  # type: ignore[attr-defined]
            raise KeyError(name)
        return getattr(self, name)

    def get(self, name: str, default: Any = None) -> Any:
        return getattr(self, name, default)

    def to_dict(self) -> dict[str, Any]:
        return msgspec.to_builtins(self)  # type: ignore[no-any-return]


# The bounds the submit path checks, in the schema as well (so OpenAPI shows them). A timeout
# must also be over 0: the workflow routes check that themselves, with a message of their own.
Priority = Annotated[int, msgspec.Meta(ge=PRIORITY_MIN, le=PRIORITY_MAX)]
Timeout = Annotated[float, msgspec.Meta(le=MAX_TIMEOUT_S)]


class WorkflowSubmission(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A workflow to run, in ComfyUI's API format, with how to run it."""

    workflow: dict[str, Any]
    overrides: dict[str, Any] = msgspec.field(default_factory=dict)
    inputs: list[JobInput] = msgspec.field(default_factory=list)
    server: str | None = None
    labels: dict[str, str] = msgspec.field(default_factory=dict)
    priority: Priority = 0
    max_attempts: int | None = None
    timeout: Timeout | None = None  # execute: seconds to wait before answering 202
    job_id: str | None = None
    metadata: dict[str, str] = msgspec.field(default_factory=dict)
    webhook_url: str | None = None
    """Where to POST the job's events, signed (Standard Webhooks); "" for none."""
    webhook_events: list[str] | None = None
    """Which event types; the gateway's default (the job's end) without it."""


class BatchSubmission(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Many jobs under one batch id: one workflow with a list of override sets (a job each), or
    a list of workflows (each with the override set at its index, if `overrides` is given);
    the other fields are shared by every job, as for a submission."""

    workflow: dict[str, Any] | None = None
    workflows: list[dict[str, Any]] | None = None
    overrides: list[dict[str, Any]] | None = None
    batch_id: str | None = None
    inputs: list[JobInput] = msgspec.field(default_factory=list)
    server: str | None = None
    labels: dict[str, str] = msgspec.field(default_factory=dict)
    priority: Priority = 0
    max_attempts: int | None = None
    timeout: Timeout | None = None
    metadata: dict[str, str] = msgspec.field(default_factory=dict)
    webhook_url: str | None = None
    """Where every job's events are POSTed (signed), as for a submission."""
    webhook_events: list[str] | None = None


class Timings(_ReadsLikeADict, msgspec.Struct, kw_only=True):
    submitted_at: float
    started_at: float | None = None
    finished_at: float | None = None
    queue_wait_s: float | None = None
    run_s: float | None = None
    total_s: float | None = None


class JobResult(_ReadsLikeADict, msgspec.Struct, kw_only=True):
    """A job as the API reports it: status, where it ran, what it made, where its log is."""

    job_id: str
    status: JobStatus
    server_id: str | None
    attempts: int
    images: list[str]
    outputs: list[OutputFile]
    log_file_path: str
    timings: Timings
    error: FailedData | None = None


class BatchStatus(_ReadsLikeADict, msgspec.Struct, kw_only=True):
    """A batch now: its jobs in order, and how many are in each status."""

    batch_id: str
    size: int
    counts: dict[str, int]
    """Jobs per status; `unsubmitted` counts those a cut-short submission did not make,
    `expired` those made that ended too long ago to be told."""
    done: bool
    """Whether every job of the batch has ended."""
    cancelled: bool
    jobs: list[JobResult]
    """The batch's jobs that exist, in index order (job `<batch_id>-<index>`)."""
    unsubmitted: list[int] = msgspec.field(default_factory=list)
    """Indexes of the jobs not made (yet): submit the same batch again to make them."""
    expired: list[int] = msgspec.field(default_factory=list)
    """Indexes of jobs made that are known no more: they ended longer ago than the records'
    retention, and their log is gone too (or cannot be read now)."""


class Submitted(_ReadsLikeADict, msgspec.Struct, kw_only=True):
    job_id: str
    status: JobStatus
    log_file_path: str
    status_url: str
    result_url: str
    events_url: str


class ServerRegistration(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A ComfyUI server to add to the fleet."""

    name: str
    address: str
    server_id: str | None = None
    weight: float = 1.0
    capacity: int = 2
    labels: dict[str, str] = msgspec.field(default_factory=dict)


class ServerHealth(_ReadsLikeADict, msgspec.Struct, kw_only=True):
    server_id: str
    name: str
    address: str | None
    """Where the server is; shown to admin keys only (the fleet's network is theirs)."""
    status: str  # healthy, unhealthy, offline, unknown
    reason: str | None
    last_seen_s: float | None
    queue_running: int
    queue_pending: int
    in_flight: int
    capacity: int
    weight: float
    labels: dict[str, str]
    node_types: int
    models: dict[str, int]
    device: str | None
    seconds_per_job: float | None
    seconds_per_unit: float | None = None
    """Learnt by the leading balancer: run time per 512 x 512 sampler step, loads excluded."""
    shapes_learnt: int = 0
    """Job shapes whose run time here the balancer has measured."""
    load_seconds: dict[str, float] = msgspec.field(default_factory=dict)
    """Learnt load time of each model it loaded (admin keys only)."""
    resident_models: list[str] = msgspec.field(default_factory=list)
    """Models it holds, most recently used first (admin keys only)."""
    model_slots: int | None = None
    """How many models it keeps at once, once learnt."""
    draining: bool = False
    """Taken out of service by an admin: it gets no new jobs, finishes those it holds, and
    jobs pinned to it wait."""
    jobs_held: int | None = None
    """For a draining server, the jobs it still holds (running, or on their way to it): 0 means
    drained, safe to stop. Null for a server that is not draining."""


class HealthReport(_ReadsLikeADict, msgspec.Struct, kw_only=True):
    status: str
    nats: bool
    servers: int
    healthy_servers: int
    leader: bool
    """Whether this gateway's balancer leads (`balancer` says whether any does)."""
    balancer: bool = False
    log_sink: bool = False
    missing: list[str] = msgspec.field(default_factory=list)
    """What the system lacks to take, run and log a job; empty when status is ok."""
    replication: list[Replication] = msgspec.field(default_factory=list)
    """Each stream, bucket and object store: its replicas, its leader, whether every copy is
    current (lagging or offline copies and a missing leader are named)."""


class CallerShare(_ReadsLikeADict, msgspec.Struct, kw_only=True):
    """One caller's jobs in the queue, with its weight and cap."""

    caller: str | None
    """Its id (a key's name, `key-...`, `anonymous`); null for jobs published on the bus."""
    pending: int
    """Its jobs waiting to be bound."""
    running: int
    """Its jobs bound to servers (dispatched or running)."""
    max_running: int | None
    """Its cap on `running`; null: none."""
    weight: float
    at_cap: bool
    """Whether its jobs wait because `running` is at `max_running`."""


class QueueShare(_ReadsLikeADict, msgspec.Struct, kw_only=True):
    """The pending queue by caller, as the leading balancer last told it."""

    you: str
    """The caller id of the key that asks."""
    pending: int
    running: int
    max_pending: int | None
    max_pending_per_caller: int | None
    callers: list[CallerShare]
    """The asking caller's own entry first; for an admin key, every caller with jobs after it
    (those with the most waiting, up to a thousand)."""
    as_of: float | None
    """When the leader counted them (seconds since the epoch); null: no leader has yet."""


class Identity(msgspec.Struct, kw_only=True):
    """Who the asking key is: what a page needs to offer only what the key may do."""

    caller: str
    """The key's caller id (its name, or an opaque id; `anonymous` without api_keys)."""
    role: Literal["admin", "user"]


class ErrorBody(msgspec.Struct, kw_only=True):
    """Every error answer: a code to branch on, a sentence for people, details if any."""

    code: str
    message: str
    details: Any = None
