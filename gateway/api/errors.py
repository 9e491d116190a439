"""One error shape for every failure the API reports: `{code, message, details}`."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from http import HTTPStatus
from typing import Any

import msgspec
from litestar import Request, Response
from litestar.connection import ASGIConnection
from litestar.enums import ScopeType
from litestar.exceptions import HTTPException, ValidationException
from litestar.openapi import ResponseSpec
from litestar.serialization import msgspec_hooks
from litestar.types import ASGIApp, Guard, Receive, Scope, Send
from litestar.types.asgi_types import (
    WebSocketCloseEvent,
    WebSocketResponseBodyEvent,
    WebSocketResponseStartEvent,
)

from gateway.api.schemas import ErrorBody
from gateway.bus.retry import transient

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error answer: HTTP status, a code to branch on, a sentence for people."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: Any = None,
        *,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details
        self.retry_after = retry_after  # seconds, sent as `Retry-After` when set


def _body(code: str, message: str, details: Any = None) -> dict[str, Any]:
    return {"code": code, "message": message, "details": details}


def api_error(_: Request[Any, Any, Any], exc: ApiError) -> Response[dict[str, Any]]:
    headers = {} if exc.retry_after is None else {"Retry-After": str(exc.retry_after)}
    return Response(
        _body(exc.code, exc.message, exc.details), status_code=exc.status, headers=headers
    )


def validation_error(
    _: Request[Any, Any, Any], exc: ValidationException
) -> Response[dict[str, Any]]:
    # Litestar's detail names only the route; each field's own complaint is in `extra`.
    fields = [
        f"{item['key']}: {item['message']}"
        for item in exc.extra or []
        if isinstance(item, dict) and item.get("key") and item.get("message")
    ]
    why = "; ".join(fields) if fields else exc.detail
    return Response(
        _body("invalid_request", f"the request is not valid: {why}", exc.extra),
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


def _from_body_decoding(exc: BaseException) -> bool:
    """Whether `exc` came out of Litestar's JSON decoder, reading the request's body.

    The decoder turns malformed JSON into a 400 but lets a few errors through (a string that is
    not UTF-8, nesting deeper than the decoder goes): those are the body's fault, not ours.
    """
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == msgspec_hooks.__file__:
            return True
        tb = tb.tb_next
    return False


def internal_error(request: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, Any]]:
    if isinstance(exc, UnicodeDecodeError | RecursionError) and _from_body_decoding(exc):
        why = "it is not UTF-8" if isinstance(exc, UnicodeDecodeError) else "it nests too deeply"
        return Response(
            _body("invalid_request", f"the request body is not usable JSON: {why}"),
            status_code=400,
        )
    if transient(exc) or (exc.__cause__ is not None and transient(exc.__cause__)):
        # NATS is electing a leader (a broker node was lost): the same request soon succeeds.
        # (Storage on NATS reports it as a StorageError caused by the NATS error.)
        log.warning("%s %s: NATS unavailable: %s", request.method, request.url.path, exc)
        return Response(
            _body("unavailable", "the message bus is electing a leader; try again shortly"),
            status_code=503,
            headers={"Retry-After": "1"},
        )
    log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    # The exception's text can hold the server's paths and internals: it goes to the log only.
    message = f"internal error ({type(exc).__name__}); the gateway's log has the details"
    return Response(_body("internal", message), status_code=500)


def error_responses(*statuses: int) -> dict[int, ResponseSpec]:
    """OpenAPI entries for a handler's error answers, in the one shape every error has.

    Without them the document would describe Litestar's own error body, which the handlers
    above never send.
    """
    return {
        status: ResponseSpec(
            data_container=ErrorBody,
            description=HTTPStatus(status).phrase,
            generate_examples=False,
        )
        for status in (400, *statuses)
    }


def refuse_websockets_over_http(guards: Sequence[Guard]) -> Any:
    """Middleware: a websocket the guards refuse gets their HTTP answer to its upgrade.

    Litestar answers a guard's refusal of a websocket with a close before the accept, which the
    server turns into a bare 403 whatever the reason: a missing key would read as a wrong one.
    So the guards are asked first, here, and a refusal goes back as the status it names (401
    with its `WWW-Authenticate`, 403), with the API's error body, through the ASGI websocket
    denial response; a server without that extension gets the close, with code 4000 + status.
    The guards run again inside, at no cost, for a websocket they let through.
    """

    def middleware(app: ASGIApp) -> ASGIApp:
        async def refusing(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == ScopeType.WEBSOCKET:
                connection: ASGIConnection[Any, Any, Any, Any] = ASGIConnection(scope, receive)
                try:
                    for guard in guards:
                        checked = guard(connection, scope["route_handler"])
                        if inspect.isawaitable(checked):
                            await checked
                except HTTPException as exc:
                    await _deny_upgrade(scope, send, exc)
                    return
            await app(scope, receive, send)

        return refusing

    return middleware


async def _deny_upgrade(scope: Scope, send: Send, exc: HTTPException) -> None:
    status = exc.status_code
    if "websocket.http.response" not in (scope.get("extensions") or {}):
        close: WebSocketCloseEvent = {
            "type": "websocket.close",
            "code": 4000 + status,
            "reason": exc.detail[:120],
        }
        await send(close)
        return
    body = msgspec.json.encode(_body(_CODES.get(status, "http_error"), exc.detail))
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    headers += [(k.lower().encode(), v.encode()) for k, v in (exc.headers or {}).items()]
    start: WebSocketResponseStartEvent = {
        "type": "websocket.http.response.start",
        "status": status,
        "headers": headers,
    }
    answer: WebSocketResponseBodyEvent = {
        "type": "websocket.http.response.body",
        "body": body,
        "more_body": False,
    }
    await send(start)
    await send(answer)


EXCEPTION_HANDLERS: dict[Any, Any] = {
    ApiError: api_error,
    ValidationException: validation_error,
    HTTPException: http_error,
    Exception: internal_error,
}
