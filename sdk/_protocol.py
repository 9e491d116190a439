"""What the sync and async clients share: request bodies, response decoding, SSE parsing.

The two clients only move bytes; everything they say and understand is built here once.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote

import msgspec

from gateway.api.schemas import BatchStatus, JobResult, QueueShare, ServerHealth
from gateway.bus.contract import TERMINAL_STATUSES, ServerRecord
from sdk._retry import RETRIED_STATUS, Retries, new_batch_id, new_key, repeatable
from sdk.errors import FileUnusable, GatewayUnreachable, JobFailed, NotFound, error_from

Inputs = Mapping[str, "str | Path | bytes"]


def submission(
    workflow: Mapping[str, Any] | str | Path,
    *,
    overrides: Mapping[str, Any] | None = None,
    inputs: Inputs | None = None,
    server: str | None = None,
    labels: Mapping[str, str] | None = None,
    priority: int = 0,
    max_attempts: int | None = None,
    timeout: float | None = None,
    job_id: str | None = None,
    webhook_url: str | None = None,
    webhook_events: list[str] | None = None,
) -> dict[str, Any]:
    """The JSON body of /workflow/submit and /workflow/execute.

    `workflow` may be the graph itself or a path to its JSON file. Each input is a file path or
    bytes (sent inline) or a `http(s)://` URL the server side downloads; its name is the file
    name the workflow's LoadImage refers to.
    """
    graph = _workflow_file(workflow) if isinstance(workflow, str | Path) else dict(workflow)
    body: dict[str, Any] = {"workflow": graph, "priority": priority}
    if overrides:
        body["overrides"] = dict(overrides)
    if inputs:
        body["inputs"] = [_input(name, value) for name, value in inputs.items()]
    if server is not None:
        body["server"] = server
    if labels:
        body["labels"] = dict(labels)
    if max_attempts is not None:
        body["max_attempts"] = max_attempts
    if timeout is not None:
        body["timeout"] = timeout
    if job_id is not None:
        body["job_id"] = job_id
    if webhook_url is not None:
        body["webhook_url"] = webhook_url
    if webhook_events is not None:
        body["webhook_events"] = list(webhook_events)
    return body


Workflow = Mapping[str, Any] | str | Path


def batch_submission(
    workflows: Workflow | Sequence[Workflow],
    *,
    overrides: Sequence[Mapping[str, Any]] | None = None,
    batch_id: str | None = None,
    **options: Any,
) -> dict[str, Any]:
    """The JSON body of /workflow/batch.

    One workflow (the graph or its file) with `overrides`, a list of override sets (a job
    each), or a list of workflows (with `overrides` at the same indexes, or none); `options`
    (inputs, server, labels, priority, max_attempts, timeout) are shared by every job.
    """
    if isinstance(workflows, Mapping | str | Path):
        body = submission(workflows, **options)
    else:
        graphs = [submission(one)["workflow"] for one in workflows]
        body = submission({}, **options)
        del body["workflow"]
        body["workflows"] = graphs
    if overrides is not None:
        body["overrides"] = [dict(chosen) for chosen in overrides]
    if batch_id is not None:
        body["batch_id"] = batch_id
    return body


def batch_status(content: bytes) -> BatchStatus:
    return msgspec.json.decode(content, type=BatchStatus)


def key_headers(idempotency_key: str | None) -> dict[str, str]:
    """The headers that carry an idempotency key (none without one)."""
    return {} if idempotency_key is None else {"Idempotency-Key": idempotency_key}


def submit_headers(
    idempotency_key: str | None, body: Mapping[str, Any], retry_for: float
) -> dict[str, str]:
    """The headers of a submission: the caller's idempotency key; else, while retries are on
    and the body names no job, a key of this call's own, so that sending it again after a 503
    or 429 cannot make a second job."""
    if idempotency_key is None and retry_for > 0 and not body.get("job_id"):
        idempotency_key = new_key()
    return key_headers(idempotency_key)


def batch_id_for(batch_id: str | None, idempotency_key: str | None, retry_for: float) -> str | None:
    """The batch id a submit_batch call sends: the caller's; else, while retries are on and no
    idempotency key names the batch, one of this call's own (for the same reason)."""
    if batch_id is None and idempotency_key is None and retry_for > 0:
        return new_batch_id()
    return batch_id


def retries_for(
    method: str, path: str, retry_for: float, kwargs: Mapping[str, Any]
) -> Retries | None:
    """The retries of one request (None for one never sent again: see `repeatable`)."""
    if not repeatable(method, path, kwargs.get("headers"), kwargs.get("json")):
        return None
    return Retries(retry_for)


def _workflow_file(path: str | Path) -> dict[str, Any]:
    try:
        graph = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise FileUnusable(f"workflow file {path}: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FileUnusable(f"workflow file {path} is not JSON: {exc}") from None
    if not isinstance(graph, dict):
        raise FileUnusable(f"workflow file {path} holds a {type(graph).__name__}, not a workflow")
    return graph


def _input(name: str, value: str | Path | bytes) -> dict[str, str]:
    if isinstance(value, str) and value.startswith(("http://", "https://")):
        return {"name": name, "source": "url", "value": value}
    if isinstance(value, bytes):
        data = value
    else:
        try:
            data = Path(value).read_bytes()
        except OSError as exc:
            raise FileUnusable(f"input file {value}: {exc.strerror or exc}") from None
    return {"name": name, "source": "base64", "value": base64.b64encode(data).decode()}


def check(status: int, content: bytes, retries: Retries | None = None) -> bytes:
    """The body of a successful answer; raise the matching SDK error otherwise (saying, for
    a request that was retried or could have been, why it was not sent again)."""
    if status < 400:
        return content
    try:
        body: Any = json.loads(content)
    except ValueError:
        body = content.decode(errors="replace")
    if retries is not None and status in RETRIED_STATUS:
        raise error_from(status, body, retried=retries.account(), tries=retries.tries)
    raise error_from(status, body)


def job_result(content: bytes) -> JobResult:
    return msgspec.json.decode(content, type=JobResult)


def job_result_id(content: bytes) -> str:
    """The job id of a /workflow/submit answer."""
    return str(json.loads(content)["job_id"])


def json_object(content: bytes) -> dict[str, Any]:
    value = json.loads(content)
    if not isinstance(value, dict):
        raise ValueError("the gateway answered with something other than a JSON object")
    return value


def json_list(content: bytes) -> list[dict[str, Any]]:
    value = json.loads(content)
    if not isinstance(value, list):
        raise ValueError("the gateway answered with something other than a JSON list")
    return value


def finished(result: JobResult) -> bool:
    return result.status in TERMINAL_STATUSES


def raise_if_failed(result: JobResult) -> JobResult:
    if result.status != "succeeded":
        raise JobFailed(result)
    return result


def servers(content: bytes) -> list[ServerHealth]:
    return msgspec.json.decode(content, type=list[ServerHealth])


def queue_share(content: bytes) -> QueueShare:
    return msgspec.json.decode(content, type=QueueShare)


def server_record(content: bytes) -> ServerRecord:
    return msgspec.json.decode(content, type=ServerRecord)


def server_health(content: bytes) -> ServerHealth:
    return msgspec.json.decode(content, type=ServerHealth)


def server_path(server_id: str, action: str = "") -> str:
    """`/servers/{id}` (and an action under it), the id quoted as a path segment."""
    path = f"/servers/{quote(server_id, safe='')}"
    return f"{path}/{action}" if action else path


def server_in(content: bytes, server_id: str) -> ServerHealth:
    """The server `server_id` of a GET /servers answer; NotFound when it is not listed."""
    for server in servers(content):
        if server.server_id == server_id:
            return server
    raise NotFound(404, "unknown_server", f"no server {server_id!r} is registered")


def drain_settled(server: ServerHealth) -> bool:
    """Whether waiting for a drain is over: the server holds no jobs, or is not draining."""
    return not server.draining or server.jobs_held == 0


# How often wait_drained asks for the fleet while the server still holds jobs.
DRAIN_POLL_S: Final = 0.5


class SSEParser:
    """Turns the lines of a Server-Sent Events stream into events, one line at a time."""

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed(self, line: str) -> dict[str, Any] | None:
        """The event that `line` completes, if it completes one."""
        if line.startswith("data:"):
            self._data.append(line[5:].lstrip())
            return None
        if line.strip() or not self._data:
            return None  # event:, id:, comments, or a blank line with nothing pending
        data, self._data = "\n".join(self._data), []
        if not data:
            return None  # an empty data buffer is no event (a keep-alive: `: comment`, `data:`)
        event: dict[str, Any] = json.loads(data)
        return event


def is_last_event(event: Mapping[str, Any]) -> bool:
    """Whether a job's stream ends with `event`: its end, or `expired` (told for a job whose
    events are no longer kept: how it ended, from its record)."""
    return event.get("type") in {"succeeded", "failed", "cancelled", "expired"}


# An event stream that breaks is resumed this many times in a row (after the last event seen,
# with Last-Event-ID), waiting RESUME_DELAY_S * 2**n between tries; a line heard resets the
# count. A busy or restarting gateway (502, 503, 504) is a break too: its stream slot of the
# broken connection may be held a moment longer.
# How often wait_batch asks for a batch that has not ended.
BATCH_POLL_S: Final = 0.5
RESUMABLE_STATUS: Final = frozenset({502, 503, 504})
RESUME_TRIES: Final = 5
RESUME_DELAY_S: Final = 0.5


class Resume:
    """Where a broken event stream picks up: the last event's `key` (a job's events: `seq`;
    the fleet's: `id`), and the tries left."""

    def __init__(self, key: str = "seq", after: int = 0) -> None:
        self.key = key
        self.last_seq = after
        self.failures = 0

    def headers(self) -> dict[str, str]:
        """The headers of the next connection: none on the first, Last-Event-ID after."""
        return {"Last-Event-ID": str(self.last_seq)} if self.last_seq else {}

    def heard(self) -> None:
        """A line came on the stream (a keep-alive too): the gateway answers, breaks start over."""
        self.failures = 0

    def saw(self, event: Mapping[str, Any]) -> bool:
        """Note an event; whether it is new (one seen before a break is not given again)."""
        seq = event.get(self.key)
        if not isinstance(seq, int) or seq <= self.last_seq:
            return False
        self.last_seq = seq
        return True

    def broke(self, what: str, why: str) -> float:
        """Seconds to wait before resuming `what` (a job id, or the fleet); GatewayUnreachable
        once the tries are spent."""
        self.failures += 1
        if self.failures > RESUME_TRIES:
            raise GatewayUnreachable(
                f"event stream of {what} broke {RESUME_TRIES + 1} times in a row: {why}"
            )
        return float(RESUME_DELAY_S * 2 ** (self.failures - 1))


FLEET: Final = "the fleet"
Query = tuple[tuple[str, str], ...]


def fleet_query(
    *,
    status: Iterable[str] = (),
    server: Iterable[str] = (),
    labels: Mapping[str, str] | None = None,
    caller: str | None = None,
    progress: bool = False,
    since: float | None = None,
) -> Query:
    """The query of GET /events: its filters and start."""
    query = [("status", s) for s in status] + [("server", s) for s in server]
    query += [("label", f"{k}={v}") for k, v in (labels or {}).items()]
    if caller is not None:
        query.append(("caller", caller))
    if progress:
        query.append(("progress", "true"))
    if since is not None:
        query.append(("since", repr(since)))
    return tuple(query)


def output_path(directory: Path, key: str) -> Path:
    """Where `download_outputs` puts an output: its key, kept inside `directory`."""
    target = (directory / key).resolve()
    if not target.is_relative_to(directory.resolve()):
        raise ValueError(f"output key {key!r} would leave {directory}")
    return target
