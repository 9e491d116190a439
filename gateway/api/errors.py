"""One error shape for every failure the API reports: `{code, message, details}`."""

from __future__ import annotations

import logging
from typing import Any

from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error answer: HTTP status, a code to branch on, a sentence for people."""

    def __init__(self, status: int, code: str, message: str, details: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details


def _body(code: str, message: str, details: Any = None) -> dict[str, Any]:
    return {"code": code, "message": message, "details": details}


def api_error(_: Request[Any, Any, Any], exc: ApiError) -> Response[dict[str, Any]]:
    return Response(_body(exc.code, exc.message, exc.details), status_code=exc.status)


def validation_error(
    _: Request[Any, Any, Any], exc: ValidationException
) -> Response[dict[str, Any]]:
    return Response(
        _body("invalid_request", f"the request is not valid: {exc.detail}", exc.extra),
        status_code=400,
    )


_CODES = {
    400: "invalid_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
    429: "rate_limited",
}


def http_error(_: Request[Any, Any, Any], exc: HTTPException) -> Response[dict[str, Any]]:
    code = _CODES.get(exc.status_code, "http_error")
    return Response(_body(code, exc.detail), status_code=exc.status_code, headers=exc.headers)


def internal_error(request: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, Any]]:
    log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return Response(_body("internal", f"internal error: {exc}"), status_code=500)


EXCEPTION_HANDLERS: dict[Any, Any] = {
    ApiError: api_error,
    ValidationException: validation_error,
    HTTPException: http_error,
    Exception: internal_error,
}
