"""What makes a job request acceptable: every check of the submit path, before anything is
written (a refusal changes nothing).

Also for a gateway that checks each job of a batch before it submits any.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Final

from gateway.balancer.placement import missing, requirements
from gateway.balancer.servers import ServerTable
from gateway.bus.contract import (
    MAX_TIMEOUT_S,
    PRIORITY_MAX,
    PRIORITY_MIN,
    ContractError,
    Error,
    JobInput,
    JobRequest,
    encode,
)
from gateway.comfyui.jobfiles import job_file_problems
from gateway.comfyui.workflow import (
    WorkflowError,
    apply_overrides,
    graph_problems,
    workflow_problems,
)
from gateway.storage import MAX_SEGMENT_BYTES, InvalidKey, validate_key

MAX_ATTEMPTS_LIMIT: Final = 20

# The `queued` event and each Job handed to an adapter carry the whole request, and the streams
# take messages of at most 1 MiB (gateway/bus/connection.py); what surrounds the request is far
# below 16 KiB.
MAX_REQUEST_BYTES: Final = 1024 * 1024 - 16 * 1024
# A job id is a KV key, a subject token, part of a file name and a REST path segment.
_JOB_ID: Final = re.compile(r"[A-Za-z0-9_=-]{1,128}")


def check_job_id(job_id: str) -> str:
    """Return `job_id` if a job could have it, else raise ContractError."""
    if _JOB_ID.fullmatch(job_id) is None:
        raise ContractError(
            f"job id {job_id!r} is not usable: 1-128 letters, digits, '-', '_' or '='"
        )
    return job_id


def input_problems(inputs: list[JobInput]) -> list[str]:
    """Why input files could not be fetched or named safely; empty when they can."""
    problems = []
    for item in inputs:
        name = item.name
        parts = name.replace("\\", "/").split("/")
        if not name.strip():
            problems.append("an input has an empty name")
        elif any(unicodedata.category(ch) == "Cc" for ch in name):
            problems.append(f"input {name!r}: the name has a control character")
        elif name.startswith(("/", "\\")) or ".." in parts:
            problems.append(f"input {name!r}: the name must be a relative path without '..'")
        elif any(len(part.encode("utf-8", "surrogatepass")) > MAX_SEGMENT_BYTES for part in parts):
            # ComfyUI's upload would fail on it, try after try, as if the server were at fault.
            problems.append(
                f"input {name[:40]!r}...: a file name is at most {MAX_SEGMENT_BYTES} bytes in UTF-8"
            )
        if item.source == "key":
            try:
                validate_key(item.value)
            except InvalidKey as exc:
                problems.append(f"input {name!r}: {exc}")
    return problems


class Refused(Exception):
    """A request that cannot be accepted; carries the Error to answer with."""

    def __init__(self, code: str, message: str, details: object = None) -> None:
        super().__init__(message)
        self.error = Error(code=code, message=message, details=details)


def check_request(request: JobRequest, servers: ServerTable) -> None:
    """Raise Refused if `request` cannot be accepted: every check of the submit path.

    Also for a gateway that checks each job of a batch before it submits any.
    """
    size = len(encode(request))
    if size > MAX_REQUEST_BYTES:
        raise Refused(
            "too_large",
            f"the request is {size} bytes; a job carries at most {MAX_REQUEST_BYTES}: "
            "pass large files as inputs (source 'key' or 'url')",
            {"size": size, "max_request_bytes": MAX_REQUEST_BYTES},
        )
    problems = workflow_problems(request.workflow)
    if problems:
        raise Refused("invalid_workflow", "; ".join(problems), {"problems": problems})
    try:
        workflow = apply_overrides(request.workflow, request.overrides)
    except WorkflowError as exc:
        raise Refused("invalid_overrides", str(exc)) from None
    problems = graph_problems(workflow) or job_file_problems(workflow)
    if problems:
        raise Refused("invalid_workflow", "; ".join(problems), {"problems": problems})
    problems = input_problems(request.inputs)
    if problems:
        raise Refused("invalid_request", "; ".join(problems), {"problems": problems})
    if request.job_id is not None:
        try:
            check_job_id(request.job_id)
        except ContractError as exc:
            raise Refused("invalid_request", str(exc)) from None
    if not 1 <= request.max_attempts <= MAX_ATTEMPTS_LIMIT:
        raise Refused("invalid_request", f"max_attempts must be between 1 and {MAX_ATTEMPTS_LIMIT}")
    if request.timeout_s is not None and not 0 < request.timeout_s <= MAX_TIMEOUT_S:
        raise Refused(
            "invalid_request", f"timeout_s must be over 0 and at most {MAX_TIMEOUT_S:g} s"
        )
    if not PRIORITY_MIN <= request.priority <= PRIORITY_MAX:
        raise Refused(
            "invalid_request", f"priority must be between {PRIORITY_MIN} and {PRIORITY_MAX}"
        )
    _check_runnable(request, servers)


def _check_runnable(request: JobRequest, servers: ServerTable) -> None:
    """Refuse a job that no known server could ever run; wait if none is known yet."""
    need = requirements(request)
    if need.server is not None:
        state = servers.get(need.server)
        if state is None:
            raise Refused("unknown_server", f"no server {need.server!r} is registered")
        states = [state]
    else:
        states = list(servers)
    judged = [(s, missing(need, s.capabilities, s.labels)) for s in states if s.capabilities]
    if not judged or any(not lack for _, lack in judged):
        return
    closest, lack = min(judged, key=lambda pair: len(pair[1].describe()))
    raise Refused(
        "unschedulable",
        f"no server can run this workflow; the closest, {closest.server_id}, lacks "
        + lack.describe(),
        {state.server_id: lack.describe() for state, lack in judged},
    )
