"""The bus contract: subject names and every message that crosses NATS.

Every role (gateway, balancer, adapter, log sink, SDK on the bus) imports this module and nothing
else to speak to the others. All payloads are msgspec Structs encoded as JSON; each carries `v`,
the schema version, so a reader can refuse what it does not understand instead of misreading it.

Why this module is long: the contract is one module on purpose, so that every role reads the
same definitions from one place and a change of the wire format is one diff.
"""

from __future__ import annotations

import enum
import time
import uuid
from typing import Any, Final, Literal, TypeVar

import msgspec

SCHEMA_VERSION: Final = 1
DEFAULT_PREFIX: Final = "comfy"

# Characters that would split or wildcard a NATS subject token.
_FORBIDDEN_IN_TOKEN = frozenset(".*> \t\r\n")


class ContractError(ValueError):
    """A message or a name does not follow the bus contract."""


def check_token(value: str, what: str = "id") -> str:
    """Return `value` if it can stand as one NATS subject token, else raise ContractError."""
    if not value or len(value) > 128 or any(ch in _FORBIDDEN_IN_TOKEN for ch in value):
        raise ContractError(
            f"{what} {value!r} is not usable in a subject: 1-128 characters, "
            "no dots, spaces or wildcards"
        )
    return value


class Subjects(msgspec.Struct, frozen=True):
    """Subject, stream and bucket names under one configurable prefix."""

    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        check_token(self.prefix, "subject prefix")

    @property
    def submit(self) -> str:
        return f"{self.prefix}.submit"

    def jobs(self, server_id: str) -> str:
        return f"{self.prefix}.jobs.{check_token(server_id, 'server id')}"

    def heartbeat(self, server_id: str) -> str:
        return f"{self.prefix}.heartbeat.{check_token(server_id, 'server id')}"

    def events(self, job_id: str) -> str:
        return f"{self.prefix}.events.{check_token(job_id, 'job id')}"

    def control(self, server_id: str) -> str:
        return f"{self.prefix}.control.{check_token(server_id, 'server id')}"

    def previews(self, server_id: str) -> str:
        """ComfyUI's binary preview frames from one server, as they came (not persisted)."""
        return f"{self.prefix}.previews.{check_token(server_id, 'server id')}"

    @property
    def all_previews(self) -> str:
        return f"{self.prefix}.previews.*"

    @property
    def logs_query(self) -> str:
        return f"{self.prefix}.logs.query"

    def webhook_sends(self, job_id: str) -> str:
        """Webhook deliveries to make for one job's events (stream WEBHOOKS, a work queue)."""
        return f"{self.prefix}.webhooks.send.{check_token(job_id, 'job id')}"

    @property
    def all_webhook_sends(self) -> str:
        return f"{self.prefix}.webhooks.send.>"

    def webhook_attempts(self, job_id: str) -> str:
        """What each delivery attempt of a job's webhooks came to, for the log sink."""
        return f"{self.prefix}.webhooks.attempts.{check_token(job_id, 'job id')}"

    @property
    def all_webhook_attempts(self) -> str:
        return f"{self.prefix}.webhooks.attempts.>"

    @property
    def all_jobs(self) -> str:
        return f"{self.prefix}.jobs.>"

    @property
    def all_events(self) -> str:
        return f"{self.prefix}.events.>"

    @property
    def all_heartbeats(self) -> str:
        return f"{self.prefix}.heartbeat.*"

    # The default prefix keeps the documented names; another prefix gets its own resources so
    # two deployments can share one NATS without seeing each other's jobs.
    def _resource(self, name: str, sep: str) -> str:
        if self.prefix == DEFAULT_PREFIX:
            return name
        return f"{self.prefix.upper()}{sep}{name}"

    @property
    def jobs_stream(self) -> str:
        return self._resource("JOBS", "_")

    @property
    def events_stream(self) -> str:
        return self._resource("EVENTS", "_")

    @property
    def webhooks_stream(self) -> str:
        return self._resource("WEBHOOKS", "_")

    @property
    def servers_bucket(self) -> str:
        return f"{self.prefix}_servers"

    @property
    def jobs_bucket(self) -> str:
        return f"{self.prefix}_jobs"

    @property
    def outputs_bucket(self) -> str:
        return f"{self.prefix}_outputs"

    @property
    def balancer_bucket(self) -> str:
        return f"{self.prefix}_balancer"

    @property
    def prompts_bucket(self) -> str:
        return f"{self.prefix}_prompts"

    @property
    def idempotency_bucket(self) -> str:
        return f"{self.prefix}_idempotency"

    @property
    def batches_bucket(self) -> str:
        return f"{self.prefix}_batches"


def new_id() -> str:
    """A fresh random id (32 hex characters), usable as a subject token."""
    return uuid.uuid4().hex


def prompt_id_for(job_id: str, attempt: int) -> str:
    """The ComfyUI prompt id of one attempt of a job.

    Derived, not random, so that an adapter that receives a job again after a crash can find the
    prompt it may already have queued on ComfyUI and adopt it instead of running it twice.
    """
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"comfyautomate:{job_id}:{attempt}"))


def now() -> float:
    """Wall-clock time as used in every message: seconds since the epoch."""
    return time.time()


# --------------------------------------------------------------------------------------------
# Job states


class JobStatus(enum.StrEnum):
    QUEUED = "queued"
    DISPATCHED = "dispatched"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES: Final = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})


class _Message(msgspec.Struct, kw_only=True, omit_defaults=False):
    v: int = SCHEMA_VERSION


# --------------------------------------------------------------------------------------------
# Submitting a job


class JobInput(msgspec.Struct, frozen=True, kw_only=True):
    """A file the workflow loads (a LoadImage input), given one of three ways.

    `name` is the file name the workflow refers to; the adapter uploads the file to ComfyUI
    first and rewrites the workflow to the name ComfyUI gives it.
    """

    name: str
    source: Literal["base64", "key", "url"]
    value: str
    content_type: str | None = None


# Bounds of a JobRequest's numbers, checked where a job is accepted: a job's own time limit
# (`timeout_s`, over 0), and a priority that fits the 32-bit integers it is stored and sorted as.
MAX_TIMEOUT_S: Final = 7 * 24 * 3600.0
PRIORITY_MIN: Final = -(2**31)
PRIORITY_MAX: Final = 2**31 - 1


class JobRequest(_Message, kw_only=True):
    """What a client asks for: run this workflow (ComfyUI API format) somewhere suitable."""

    workflow: dict[str, Any]
    overrides: dict[str, Any] = msgspec.field(default_factory=dict)
    inputs: list[JobInput] = msgspec.field(default_factory=list)
    server: str | None = None
    labels: dict[str, str] = msgspec.field(default_factory=dict)
    priority: int = 0
    max_attempts: int = 2
    timeout_s: float | None = None
    job_id: str | None = None
    metadata: dict[str, str] = msgspec.field(default_factory=dict)
    # Who submitted it: the opaque id of the API key the gateway took it from (see
    # gateway/api/auth.py), or None for a job published on the bus directly. A user key sees
    # only jobs with its own caller; the gateway sets it and never takes it from a client.
    caller: str | None = None
    # Where to POST the job's events (signed, see gateway/webhooks), and which of them; None
    # takes the settings' defaults, "" no webhook even when the settings name one.
    webhook_url: str | None = None
    webhook_events: list[str] | None = None
    # The same key with the same request from the same caller makes one job (see
    # gateway/balancer/idempotency.py); REST takes it from the `Idempotency-Key` header.
    idempotency_key: str | None = None
    # The batch the job belongs to (POST /workflow/batch); its id is `<batch_id>-<index>`.
    batch_id: str | None = None


class JobAccepted(_Message, kw_only=True):
    job_id: str
    status: JobStatus = JobStatus.QUEUED
    submitted_at: float
    log_file_path: str
    # True when the request named a job that already existed (the same idempotency key or
    # job id with the same request): `status` is then that job's status now.
    replayed: bool = False


class Error(_Message, kw_only=True):
    """A refusal or failure, with a machine-readable code and a sentence for people."""

    code: str
    message: str
    details: Any = None


class Job(_Message, kw_only=True):
    """One attempt of a job, as handed to the adapter of the server it is bound to."""

    job_id: str
    attempt: int
    server_id: str
    request: JobRequest
    submitted_at: float
    dispatched_at: float

    @property
    def prompt_id(self) -> str:
        return prompt_id_for(self.job_id, self.attempt)


# --------------------------------------------------------------------------------------------
# Servers


class Capabilities(msgspec.Struct, kw_only=True):
    """What a server can run: its node types and model files, and its device."""

    node_types: list[str] = msgspec.field(default_factory=list)
    models: dict[str, list[str]] = msgspec.field(default_factory=dict)
    device: str | None = None
    vram_total: int | None = None
    vram_free: int | None = None


class Heartbeat(_Message, kw_only=True):
    """An adapter's view of its server, published about once a second.

    `capabilities` is sent only when it changed (or on request), since /object_info is large;
    `capabilities_hash` lets a balancer notice that it missed one and ask.
    """

    server_id: str
    address: str
    ts: float
    healthy: bool
    reason: str | None = None
    queue_running: int = 0
    queue_pending: int = 0
    in_flight: list[str] = msgspec.field(default_factory=list)
    capacity: int = 2
    weight: float = 1.0
    labels: dict[str, str] = msgspec.field(default_factory=dict)
    capabilities_hash: str = ""
    capabilities: Capabilities | None = None
    interval_s: float = 1.0
    resident_models: list[str] = msgspec.field(default_factory=list)
    """Model files the server holds, most recently used first, as its prompts told."""
    model_slots: int | None = None
    """How many model files it keeps at once, once the adapter has seen one evicted."""


class ServerRecord(_Message, kw_only=True):
    """A registered server, as kept in KV `comfy_servers` under its id."""

    server_id: str
    name: str
    address: str
    weight: float = 1.0
    capacity: int = 2
    labels: dict[str, str] = msgspec.field(default_factory=dict)
    registered_at: float
    draining: bool = False
    """Set by an admin to take the server out of service: it gets no new jobs and finishes
    those it holds; jobs pinned to it wait. Records written before it existed decode as false."""


# --------------------------------------------------------------------------------------------
# Events: one tagged Struct per kind. On the wire: {"type": "...", "data": {...}, ...}.


class OutputFile(msgspec.Struct, kw_only=True):
    """One stored output of a job."""

    node_id: str
    filename: str
    key: str
    size: int
    content_type: str
    url: str
    kind: str = "images"
    type: str = "output"
    """ComfyUI's folder of the file: "output", or "temp" for previews."""
    index: int | None = None
    """Its place among its node's outputs, from 0."""
    source: Literal["file", "websocket"] = "file"
    """"websocket": an image the node sent over ComfyUI's websocket (SaveImageWebsocket),
    which ComfyUI keeps in no folder and lists in no history."""


class QueuedData(msgspec.Struct, kw_only=True):
    request: JobRequest
    log_file_path: str


class PlacementReason(msgspec.Struct, kw_only=True):
    """Why the balancer chose a server for a job: what it expected there, against the next best.

    Times are estimates in seconds, learnt from the fleet's runs (see docs/ARCHITECTURE.md,
    "Placement"); `finish_s` counts from the moment of choosing.
    """

    estimate_s: float
    """The job's run time there, model loads not counted."""
    estimate_from: str
    """learnt (this shape ran there), scaled (it ran elsewhere), by_size, or fallback."""
    load_s: float = 0.0
    """Time to load the models it needs that the server was not expected to hold."""
    loads: list[str] = msgspec.field(default_factory=list)
    """Those models."""
    queued_s: float = 0.0
    """The work already bound to the server, or planned for it ahead of this job."""
    finish_s: float = 0.0
    """queued_s + load_s + estimate_s: when the job should be done there."""
    evicts_s: float = 0.0
    """Time to load again the models its loads would push out there that jobs waiting behind
    it need (not named: they may be other callers'). The server chosen has the least
    finish_s + evicts_s."""
    bound: int = 0
    """Jobs bound to the server when this one was."""
    held: list[str] = msgspec.field(default_factory=list)
    """The job's models the server was expected to hold (only the job's own: which others
    it held would tell what other callers ran)."""
    next_best: str | None = None
    next_best_finish_s: float | None = None
    next_best_evicts_s: float | None = None


class DispatchedData(msgspec.Struct, kw_only=True):
    server_id: str
    attempt: int
    reason: PlacementReason | None = None
    """Why this server (absent in events written before placement explained itself)."""


class RunningData(msgspec.Struct, kw_only=True):
    attempt: int
    prompt_id: str
    # ComfyUI answered 200 but dropped some output nodes: kept so it is never passed over.
    node_errors: dict[str, Any] = msgspec.field(default_factory=dict)


class NodeStartedData(msgspec.Struct, kw_only=True):
    node_id: str
    class_type: str | None = None


class NodeProgressData(msgspec.Struct, kw_only=True):
    node_id: str
    value: int
    max: int


class NodeCachedData(msgspec.Struct, kw_only=True):
    node_ids: list[str]


class NodeOutputData(msgspec.Struct, kw_only=True):
    node_id: str
    output: dict[str, Any]


class NodeImageData(msgspec.Struct, kw_only=True):
    """An image a node sent over ComfyUI's websocket, stored as the job's output."""

    node_id: str
    index: int
    output: OutputFile


class SucceededData(msgspec.Struct, kw_only=True):
    attempt: int = 0
    outputs: list[OutputFile] = msgspec.field(default_factory=list)
    node_errors: dict[str, Any] = msgspec.field(default_factory=dict)
    duration_s: float | None = None


class FailedData(msgspec.Struct, kw_only=True):
    """Why a job failed. `code` is ours; the exception fields are ComfyUI's when it raised."""

    code: str
    message: str
    attempt: int = 0
    retryable: bool = False
    node_id: str | None = None
    node_type: str | None = None
    exception_type: str | None = None
    traceback: list[str] = msgspec.field(default_factory=list)
    node_errors: dict[str, Any] = msgspec.field(default_factory=dict)


class CancelledData(msgspec.Struct, kw_only=True):
    reason: str = "cancelled by request"
    attempt: int = 0


class RetriedData(msgspec.Struct, kw_only=True):
    """An attempt ended without a result and the job goes back to the queue.

    `attempt` is the attempt that ended. `started` says whether it had reached ComfyUI's
    execution. `counts` says whether the try counts against `max_attempts`: every try that
    failed does, started or not (the server refused, lost or timed out the prompt, or died);
    a job handed back only because its adapter was stopping does not.
    """

    attempt: int
    reason: str
    started: bool = True
    previous_server_id: str | None = None
    counts: bool = True


class HistoryData(msgspec.Struct, kw_only=True):
    prompt_id: str
    history: dict[str, Any]


class _Event(_Message, kw_only=True, tag_field="type"):
    event_id: str
    job_id: str
    seq: int
    ts: float
    server_id: str | None = None


class Queued(_Event, tag="queued", kw_only=True):
    data: QueuedData


class Dispatched(_Event, tag="dispatched", kw_only=True):
    data: DispatchedData


class Running(_Event, tag="running", kw_only=True):
    data: RunningData


class NodeStarted(_Event, tag="node_started", kw_only=True):
    data: NodeStartedData


class NodeProgress(_Event, tag="node_progress", kw_only=True):
    data: NodeProgressData


class NodeCached(_Event, tag="node_cached", kw_only=True):
    data: NodeCachedData


class NodeOutput(_Event, tag="node_output", kw_only=True):
    data: NodeOutputData


class NodeImage(_Event, tag="node_image", kw_only=True):
    data: NodeImageData


class Succeeded(_Event, tag="succeeded", kw_only=True):
    data: SucceededData


class Failed(_Event, tag="failed", kw_only=True):
    data: FailedData


class Cancelled(_Event, tag="cancelled", kw_only=True):
    data: CancelledData


class Retried(_Event, tag="retried", kw_only=True):
    data: RetriedData


class History(_Event, tag="history", kw_only=True):
    data: HistoryData


Event = (
    Queued
    | Dispatched
    | Running
    | NodeStarted
    | NodeProgress
    | NodeCached
    | NodeOutput
    | NodeImage
    | Succeeded
    | Failed
    | Cancelled
    | Retried
    | History
)
EVENT_TYPES: Final[tuple[type[_Event], ...]] = (
    Queued,
    Dispatched,
    Running,
    NodeStarted,
    NodeProgress,
    NodeCached,
    NodeOutput,
    NodeImage,
    Succeeded,
    Failed,
    Cancelled,
    Retried,
    History,
)
TERMINAL_EVENTS: Final = (Succeeded, Failed, Cancelled)

EventData = (
    QueuedData
    | DispatchedData
    | RunningData
    | NodeStartedData
    | NodeProgressData
    | NodeCachedData
    | NodeOutputData
    | NodeImageData
    | SucceededData
    | FailedData
    | CancelledData
    | RetriedData
    | HistoryData
)
# Each kind of payload belongs to exactly one kind of event, so a payload names its event.
EVENT_FOR_DATA: Final[dict[type[EventData], type[_Event]]] = {
    QueuedData: Queued,
    DispatchedData: Dispatched,
    RunningData: Running,
    NodeStartedData: NodeStarted,
    NodeProgressData: NodeProgress,
    NodeCachedData: NodeCached,
    NodeOutputData: NodeOutput,
    NodeImageData: NodeImage,
    SucceededData: Succeeded,
    FailedData: Failed,
    CancelledData: Cancelled,
    RetriedData: Retried,
    HistoryData: History,
}


def make_event(
    data: EventData,
    *,
    job_id: str,
    seq: int,
    server_id: str | None,
    event_id: str | None = None,
    ts: float | None = None,
) -> Event:
    """Wrap a payload in the event it belongs to, stamped with a fresh id and the time."""
    kind: Any = EVENT_FOR_DATA[type(data)]
    event: Event = kind(
        event_id=event_id or new_id(),
        job_id=job_id,
        seq=seq,
        ts=now() if ts is None else ts,
        server_id=server_id,
        data=data,
    )
    return event


# The status a job is in once an event of this kind has happened; node events leave it running.
STATUS_AFTER: Final[dict[type[_Event], JobStatus]] = {
    Queued: JobStatus.QUEUED,
    Dispatched: JobStatus.DISPATCHED,
    Running: JobStatus.RUNNING,
    Succeeded: JobStatus.SUCCEEDED,
    Failed: JobStatus.FAILED,
    Cancelled: JobStatus.CANCELLED,
    Retried: JobStatus.QUEUED,
}


def event_type(event: Event) -> str:
    """The wire tag of an event (`queued`, `node_progress`, ...)."""
    tag = type(event).__struct_config__.tag
    assert isinstance(tag, str)
    return tag


# --------------------------------------------------------------------------------------------
# Control and logs


class _Control(_Message, kw_only=True, tag_field="op"):
    pass


class Cancel(_Control, tag="cancel", kw_only=True):
    """Cancel a job: dequeue it from ComfyUI if pending, interrupt it if running."""

    job_id: str
    reason: str = "cancelled by request"


class Describe(_Control, tag="describe", kw_only=True):
    """Ask an adapter for its server's full capabilities (a balancer that missed them)."""


Control = Cancel | Describe


class ControlReply(_Message, kw_only=True):
    ok: bool
    message: str = ""
    capabilities: Capabilities | None = None


class SqlQuery(_Message, kw_only=True):
    """A query as a client writes it (the body of `POST /logs/query`)."""

    sql: str
    max_rows: int = 10_000
    timeout_s: float = 10.0


class LogQuery(SqlQuery, kw_only=True):
    """A query as the log sink takes it: with whose rows it may see, which only the gateway
    (from the API key) or a trusted bus client sets."""

    # Set for a user key's query: it sees only the rows of jobs with this caller. None: all.
    caller: str | None = None


class Column(msgspec.Struct, frozen=True):
    name: str
    type: str


class LogQueryResult(_Message, kw_only=True):
    columns: list[Column]
    rows: list[list[Any]]
    truncated: bool = False
    elapsed_ms: float = 0.0


class NativePrompt(_Message, kw_only=True):
    """A prompt taken through the ComfyUI-compatible API, kept in KV `comfy_prompts`.

    Its key is the prompt id, which is also its job's id. The entry's revision (the bucket's
    sequence when it was created) is the prompt's `number` unless the client chose one, so every
    gateway numbers prompts alike. `prompt` is the graph exactly as the client sent it. Once
    its job has ended, the entry leaves the bucket with the job's record.
    """

    prompt_id: str
    caller: str
    prompt: dict[str, Any]
    extra_data: dict[str, Any] = msgspec.field(default_factory=dict)
    outputs_to_execute: list[str] = msgspec.field(default_factory=list)
    client_id: str | None = None
    number: int | float | None = None
    front: bool = False
    created_ms: int = 0
    # Set when its job has ended and the entry was written again to expire, as the job's
    # record does (`job_records_retention_s`); `number` is then written out, since the entry's
    # revision changed.
    ended_at: float | None = None


class JobRecord(_Message, kw_only=True):
    """The current state of one job, as kept in KV `comfy_jobs` under its id."""

    job_id: str
    status: JobStatus
    submitted_at: float
    updated_at: float
    log_file_path: str
    priority: int = 0
    server_id: str | None = None
    attempt: int = 0
    runs: int = 0  # tries that count against max_attempts: started, or failed before starting
    max_attempts: int = 2
    last_seq: int = 0
    started_at: float | None = None
    finished_at: float | None = None
    outputs: list[OutputFile] = msgspec.field(default_factory=list)
    error: FailedData | None = None
    caller: str | None = None  # the request's caller, for ownership checks
    webhook: Webhook | None = None  # where the job's events are delivered, fixed at submission
    # What defines the job (idempotency.request_hash): a repeated job id with the same request
    # is the same job, with another request a duplicate.
    request_hash: str | None = None
    batch_id: str | None = None


class Webhook(msgspec.Struct, kw_only=True):
    """A job's webhook: the URL its events are POSTed to, and which event types."""

    url: str
    events: list[str]


# Event types a webhook may ask for: every one but `queued` (the submission itself, with the
# whole workflow) and `history` (ComfyUI's raw account, which may be as large as a message).
WEBHOOK_EVENT_TYPES: Final = frozenset(
    {
        "dispatched",
        "running",
        "node_started",
        "node_progress",
        "node_cached",
        "node_output",
        "retried",
        "succeeded",
        "failed",
        "cancelled",
    }
)
TERMINAL_EVENT_TYPES: Final = ("succeeded", "failed", "cancelled")


def webhook_of(request: JobRequest) -> Webhook | None:
    """The webhook a request asks for once its defaults are filled in; None for none."""
    if not request.webhook_url:
        return None
    return Webhook(url=request.webhook_url, events=list(request.webhook_events or ()))


def delivery_id_for(event_id: str) -> str:
    """The delivery id (`webhook-id`) of an event's webhook: one per event, kept on retries."""
    return f"msg_{event_id}"


class WebhookSend(_Message, kw_only=True):
    """One event to deliver to a job's webhook: a work item of stream WEBHOOKS.

    It names the event (its stream sequence in EVENTS) rather than carrying it: the body is
    built from the event as stored at each attempt, and the item stays small.
    """

    delivery_id: str
    job_id: str
    seq: int
    event_type: str
    stream_seq: int
    url: str
    caller: str | None = None
    created_at: float
    batch_id: str | None = None  # the job's batch, told in the body
    # Set for a delivery asked for again (POST /webhooks/{id}/redeliver): its own token.
    redelivery: str | None = None


WebhookOutcome = Literal["delivered", "retrying", "failed", "gave_up"]


class WebhookAttempt(_Message, kw_only=True, tag="webhook_attempt", tag_field="type"):
    """One attempt to deliver an event to a webhook, as the job's log and index keep it."""

    attempt_id: str
    delivery_id: str
    job_id: str
    event_type: str
    event_seq: int
    stream_seq: int
    attempt: int
    redelivery: str | None = None
    url: str
    outcome: WebhookOutcome
    status_code: int | None = None
    latency_ms: float | None = None
    error: str | None = None
    ts: float
    next_attempt_at: float | None = None


class IdempotencyEntry(_Message, kw_only=True):
    """An idempotency key in KV `comfy_idempotency`: the job it stands for, and its request.

    Written before the job is created, so that a submission cut in between is completed under
    the same job id by the client's retry; the bucket's entries expire (`idempotency_ttl_s`).
    """

    job_id: str
    request_hash: str
    created_at: float


class BatchRecord(_Message, kw_only=True):
    """A batch of jobs in KV `comfy_batches`, under its id; its jobs are `<batch_id>-<index>`.

    Written before any of its jobs; `cancelled` is set before its jobs are cancelled, so that a
    submission still under way stops making them (see gateway/api/batches.py).
    """

    batch_id: str
    caller: str | None = None
    size: int
    request_hash: str
    created_at: float
    cancelled: bool = False
    # Its jobs from the first up to this index are known made (accepted): one of them missing
    # from KV has expired (it ended longer ago than the records' retention), not been skipped.
    made: int = 0


# The key of the leader's Backlog in KV `comfy_balancer`.
BACKLOG_KEY: Final = "backlog"


class CallerBacklog(msgspec.Struct, kw_only=True):
    """One caller's jobs in the leader's queue (`caller` "" for jobs published without one)."""

    caller: str
    pending: int  # waiting to be bound, backoffs included
    bound: int  # dispatched or running
    ended_per_s: float  # its jobs that ended, per second, over the recent window


class Backlog(_Message, kw_only=True):
    """The leading balancer's queue by caller, in KV `comfy_balancer` under BACKLOG_KEY.

    Written a few times a second while it changes (and every second regardless), so the submit
    path of every balancer bounds the queue (gateway/balancer/admission.py) and gateways tell
    why a job waits. `applied_seq`: every event up to this EVENTS sequence is counted.
    """

    at: float
    applied_seq: int
    pending: int
    bound: int
    ended_per_s: float
    # The callers with the most jobs waiting, most first; a caller not listed has at most
    # `unlisted_pending` waiting.
    callers: list[CallerBacklog] = msgspec.field(default_factory=list)
    unlisted_pending: int = 0


# --------------------------------------------------------------------------------------------
# Encoding

_encoder = msgspec.json.Encoder()
M = TypeVar("M", bound=msgspec.Struct)


def encode(message: msgspec.Struct) -> bytes:
    """Encode any contract message as JSON bytes."""
    return _encoder.encode(message)


class _Decoders:
    def __init__(self) -> None:
        self._by_type: dict[Any, msgspec.json.Decoder[Any]] = {}

    def get(self, kind: Any) -> msgspec.json.Decoder[Any]:
        decoder = self._by_type.get(kind)
        if decoder is None:
            decoder = self._by_type[kind] = msgspec.json.Decoder(kind)
        return decoder


_decoders = _Decoders()


def _decode_as(data: bytes, kind: Any, name: str) -> Any:
    try:
        message = _decoders.get(kind).decode(data)
    except msgspec.DecodeError as exc:
        raise ContractError(f"invalid {name}: {exc}") from exc
    except (UnicodeDecodeError, RecursionError) as exc:
        # msgspec reports text that is not UTF-8, and nesting deeper than it recurses, with
        # these rather than DecodeError; both are the sender's fault all the same.
        raise ContractError(f"invalid {name}: {exc}") from exc
    if message.v > SCHEMA_VERSION:
        raise ContractError(
            f"{name} has schema version {message.v}; this build understands up to {SCHEMA_VERSION}"
        )
    return message


def decode(data: bytes, kind: type[M]) -> M:
    """Decode JSON bytes as `kind`, raising ContractError with a readable reason on mismatch."""
    message: M = _decode_as(data, kind, kind.__name__)
    return message


def decode_event(data: bytes) -> Event:
    """Decode one Event of any kind."""
    event: Event = _decode_as(data, Event, "Event")
    return event


def decode_control(data: bytes) -> Control:
    """Decode one control request (Cancel, Describe)."""
    request: Control = _decode_as(data, Control, "control request")
    return request
