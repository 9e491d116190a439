"""Minimal HTTP plumbing over raw ASGI: requests, responses, multipart forms.

The simulator speaks raw ASGI rather than Litestar because fidelity is the product here:
empty-body 404s without a content type, a text/plain 500 for a body that is not JSON,
`/api` as a prefix of every route (even `/api/api/jobs`) and exact header sets are each one
line here, but would each need a framework override.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

import msgspec

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

JSON_TYPE = "application/json; charset=utf-8"
SERVER_ERROR_TEXT = b"500 Internal Server Error\n\nServer got itself in trouble"


class InvalidBody(Exception):
    """The request body could not be decoded (the real server answers 500)."""


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        try:
            return msgspec.json.decode(self.body)
        except msgspec.DecodeError as exc:
            raise InvalidBody(str(exc)) from exc

    def optional_json(self) -> Any:
        """JSON body, or {} when the body is empty or not JSON (as /interrupt allows)."""
        if not self.body.strip():
            return {}
        try:
            return msgspec.json.decode(self.body)
        except msgspec.DecodeError:
            return {}


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)
    content_length: bool = True
    """False sends no Content-Length, so the server falls back to chunked encoding."""
    head: bool = False


def json_response(data: Any, status: int = 200) -> Response:
    return Response(status, msgspec.json.encode(data), [("Content-Type", JSON_TYPE)])


def empty(status: int = 200) -> Response:
    return Response(status)


def not_found_route() -> Response:
    # What aiohttp sends for an unknown path: chunked, octet-stream, nothing in it.
    return Response(404, b"", [("Content-Type", "application/octet-stream")], content_length=False)


def server_error() -> Response:
    headers = [("Content-Type", "text/plain; charset=utf-8"), ("Connection", "close")]
    return Response(500, SERVER_ERROR_TEXT, headers)


async def read_request(scope: Scope, receive: Receive) -> Request:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    raw_query = scope.get("query_string", b"").decode("latin-1")
    query = dict(parse_qsl(raw_query, keep_blank_values=True))
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
    return Request(scope["method"], scope["path"], query, headers, b"".join(chunks))


async def send_response(send: Send, response: Response) -> None:
    headers = [(k.lower().encode(), v.encode()) for k, v in response.headers]
    if response.content_length and not any(k == b"content-length" for k, _ in headers):
        headers.append((b"content-length", str(len(response.body)).encode()))
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    body = b"" if response.head else response.body
    await send({"type": "http.response.body", "body": body})


@dataclass
class FormFile:
    filename: str
    content: bytes


def parse_multipart(request: Request) -> dict[str, str | FormFile]:
    """Fields of a multipart/form-data body; files become FormFile."""
    content_type = request.headers.get("content-type", "")
    boundary = ""
    for part in content_type.split(";"):
        key, _, value = part.strip().partition("=")
        if key.lower() == "boundary":
            boundary = value.strip('"')
    if not content_type.startswith("multipart/form-data") or not boundary:
        raise InvalidBody("not a multipart/form-data body")
    fields: dict[str, str | FormFile] = {}
    delimiter = b"--" + boundary.encode()
    for chunk in request.body.split(delimiter)[1:]:
        if chunk.startswith(b"--"):
            break
        head, _, content = chunk.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        content = content.removesuffix(b"\r\n")
        disposition = ""
        for line in head.decode("utf-8", "replace").split("\r\n"):
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-disposition":
                disposition = value
        params = _disposition_params(disposition)
        if "name" not in params:
            continue
        if "filename" in params:
            fields[params["name"]] = FormFile(params["filename"], content)
        else:
            fields[params["name"]] = content.decode("utf-8", "replace")
    return fields


def _disposition_params(value: str) -> dict[str, str]:
    params = {}
    for part in value.split(";")[1:]:
        key, _, raw = part.strip().partition("=")
        params[key.lower()] = raw.strip().strip('"')
    return params
