"""How ComfyUI's routes on the gateway answer, and what each of them needs first.

JSON bodies with ComfyUI's content type, empty or worded refusals where ComfyUI sends an empty
body, ComfyUI's error shape for a body that cannot be read, the caller, the native API's state.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Final

import msgspec
from litestar import Request, Response, WebSocket

from gateway.api.auth import caller_of
from gateway.api.bodies import body_nests_too_deeply, too_deep_message
from gateway.api.errors import ApiError
from gateway.api.native.service import NativeService, comfy_error
from gateway.api.services import Services

JSON: Final = "application/json; charset=utf-8"
# How long a request waits for a starting gateway to have read the prompts already taken.
READY_WAIT_S: Final = 10.0
_encoder = msgspec.json.Encoder()


def paths(path: str) -> list[str]:
    """A route's path, and the same under `/api`, as ComfyUI serves every route."""
    return [path, "/api" + path]


def json_answer(body: Any, status: int = 200) -> Response[bytes]:
    """`body` as JSON, with ComfyUI's content type."""
    return Response(_encoder.encode(body), status_code=status, media_type=JSON)


def empty(status: int = 200) -> Response[bytes]:
    """An answer with no body, as ComfyUI gives for a 404 and for most refusals."""
    return Response(b"", status_code=status, media_type="text/plain")


def said(status: int, message: str) -> Response[bytes]:
    """A refusal where ComfyUI sends an empty body: the same status, with why in words."""
    return Response(message.encode(), status_code=status, media_type="text/plain")


class NotJson(Exception):
    """A body ComfyUI's routes cannot read: 400 in ComfyUI's error shape (see `not_json`)."""

    def __init__(self, details: str, message: str = "The body is not JSON") -> None:
        super().__init__(details)
        self.message = message
        self.details = details


def not_json(_: Request[Any, Any, Any], exc: NotJson) -> Response[bytes]:
    return json_answer(comfy_error("invalid_json", exc.message, exc.details), 400)


async def reject_deep_json(request: Request[Any, Any, Any]) -> None:
    """ComfyUI's routes' own hook before each handler (it takes the place of the app's
    `bodies.reject_deep_json`): the same judgement, answered in ComfyUI's error shape."""
    if await body_nests_too_deeply(request):
        raise NotJson(too_deep_message(), "The body nests too deeply")


def decoded(raw: bytes) -> Any:
    """The JSON value of `raw`; NotJson when it is not JSON (or not UTF-8)."""
    try:
        return msgspec.json.decode(raw)
    # msgspec reports text that is not UTF-8 with UnicodeDecodeError, not DecodeError.
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise NotJson(str(exc)) from None


async def native_of(services: Services) -> NativeService:
    """The native API's state, once it knows every prompt taken so far (503 until then)."""
    native = services.native
    if native is not None and not native.index.ready.is_set():
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(READY_WAIT_S):
                await native.index.ready.wait()
    if native is None or not native.index.ready.is_set():
        raise ApiError(503, "starting", "the gateway is still starting")
    return native


def caller_id(connection: Request[Any, Any, Any] | WebSocket[Any, Any, Any]) -> str:
    """Whose prompts the connection sees: its API key's caller id (`anonymous` without keys).

    Per caller for every role: an admin's `/queue` is its own, as one ComfyUI's would be.
    """
    return caller_of(connection).id


async def json_body(request: Request[Any, Any, Any]) -> Any:
    """The JSON body, {} when empty; a 400 in ComfyUI's shape when it is not JSON."""
    raw = await request.body()
    if not raw.strip():
        return {}
    return decoded(raw)
