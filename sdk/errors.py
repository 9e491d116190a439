"""The SDK's exceptions, one tree:

ComfyAutomateError
├── ApiError                 the gateway answered with an error
│   ├── InvalidWorkflow      400: the workflow or request is not valid (lists the problems)
│   ├── NotFound             404: no such job or server
│   ├── Unschedulable        422: no server can run it (names what is missing)
│   ├── IdempotencyMismatch  422: the idempotency key was used for another request
│   ├── RateLimited          429: too many requests (still so after `retry_for` of retries)
│   └── Unavailable          503/504: no balancer, or it did not answer (503: after retries)
├── JobFailed                the job ended failed or cancelled (carries the result)
└── GatewayUnreachable       no gateway at that URL
"""

from __future__ import annotations

from typing import Any


class ComfyAutomateError(Exception):
    """Anything the SDK raises."""


class ApiError(ComfyAutomateError):
    """An error answer from the gateway: HTTP status, code and message."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: Any = None,
        *,
        retried: str | None = None,
        tries: int = 1,
    ) -> None:
        said = f"{message} [{code}, HTTP {status}]"
        super().__init__(f"{said}; {retried}" if retried else said)
        self.status = status
        self.code = code
        self.message = message
        self.details = details
        self.tries = tries
        """How many times the request was sent (more than 1 after retries of a 503 or 429)."""


class InvalidWorkflow(ApiError):
    pass


class NotFound(ApiError):
    pass


class Unschedulable(ApiError):
    pass


class Unavailable(ApiError):
    pass


class RateLimited(ApiError):
    """Too many requests: the gateway's rate limit, or it takes no more work for now."""


class IdempotencyMismatch(ApiError):
    """The idempotency key made a job for another request; `details["job_id"]` is that job."""


class JobFailed(ComfyAutomateError):
    """The job ended without success; `result` holds its status, error and log path."""

    def __init__(self, result: Any) -> None:
        error = result.error
        reason = f": {error.message}" if error is not None else ""
        super().__init__(f"job {result.job_id} {result.status}{reason}")
        self.result = result


class GatewayUnreachable(ComfyAutomateError):
    pass


class FileUnusable(ComfyAutomateError):
    """A workflow or input file given by path cannot be read, or is not the JSON it must be."""


_BY_STATUS: dict[int, type[ApiError]] = {
    400: InvalidWorkflow,
    404: NotFound,
    413: InvalidWorkflow,
    422: Unschedulable,
    429: RateLimited,
    503: Unavailable,
    504: Unavailable,
}


# Codes that say more than their HTTP status (and are all a bus answer has).
_BY_CODE: dict[str, type[ApiError]] = {
    "unschedulable": Unschedulable,
    "unknown_server": NotFound,
    "unknown_job": NotFound,
    "invalid_request": InvalidWorkflow,
    "invalid_workflow": InvalidWorkflow,
    "invalid_overrides": InvalidWorkflow,
    "idempotency_mismatch": IdempotencyMismatch,
}


def error_from(status: int, body: Any, *, retried: str | None = None, tries: int = 1) -> ApiError:
    """The exception for an error answer (the gateway's `{code, message, details}` body);
    `retried` says why the request was not sent again, after `tries` tries."""
    if isinstance(body, dict) and "message" in body:
        code, message, details = body.get("code", "error"), body["message"], body.get("details")
    else:
        code, message, details = "error", str(body)[:500], None
    kind = _BY_CODE.get(code) or _BY_STATUS.get(status, ApiError)
    return kind(status, code, message, details, retried=retried, tries=tries)
