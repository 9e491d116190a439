"""ComfyUI's file routes for the fleet: `/view` (GET and HEAD) and `/upload/image`.

Outputs are read from storage under their prompt's id, uploads from the caller's folder in
storage (see uploads.py); both are served as `gateway.api.served` judges them.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Final

from litestar import HttpMethod, Request, Response, get, post, route
from litestar.datastructures import UploadFile
from litestar.exceptions import ClientException

from gateway.api.errors import ApiError
from gateway.api.images import stream_stored
from gateway.api.native.answers import caller_id, empty, json_answer, native_of, paths, said
from gateway.api.native.uploads import (
    MAX_NAME_BYTES,
    BadUpload,
    check_name,
    save_upload,
    upload_key,
)
from gateway.api.served import how_to_serve
from gateway.api.services import Services, ServicesDep
from gateway.storage import InvalidKey, NotFound, Storage, StoredObject

log = logging.getLogger(__name__)

# How long /view waits for an output whose job is still storing it.
VIEW_WAIT_S: Final = 60.0


class _NoFile(Exception):
    """/view has nothing to send: ComfyUI's status, with an empty body or why in words."""

    def __init__(self, status: int, message: str = "") -> None:
        super().__init__(status)
        self.status = status
        self.message = message

    def response(self) -> Response[bytes]:
        return said(self.status, self.message) if self.message else empty(self.status)


async def _viewed(
    services: Services, request: Request[Any, Any, Any]
) -> tuple[Storage, StoredObject]:
    """The stored file /view names; _NoFile when none."""
    query = request.query_params
    filename = query.get("filename")
    folder = query.get("type") or "output"
    subfolder = query.get("subfolder") or ""
    if not filename:
        raise _NoFile(404)
    try:
        check_name(filename)
    except BadUpload as exc:
        raise _NoFile(400, str(exc)) from None
    storage = services.storage
    native = await native_of(services)
    if storage is None:
        raise _NoFile(404)
    caller = caller_id(request)
    # Outputs are stored under `<prompt id>/<name>`, named with that subfolder exactly.
    entry = native.index.get(subfolder) if folder != "input" and subfolder else None
    if entry is not None and entry.prompt.caller != caller:
        raise _NoFile(404)
    try:
        if entry is not None:
            key = f"{entry.prompt_id}/{filename}"
        else:
            key = upload_key(caller, folder, subfolder, filename)
        try:
            stored = await storage.stat(key)
        except NotFound:
            if entry is None or entry.finished:
                raise
            # `executed` may reach the client while the adapter still stores the file.
            await native.index.settle(entry.prompt_id, VIEW_WAIT_S)
            stored = await storage.stat(key)
    except (InvalidKey, BadUpload) as exc:
        raise _NoFile(400, str(exc)) from None
    except NotFound:
        raise _NoFile(404) from None
    return storage, stored


@get(paths("/view"))
async def view(services: ServicesDep, request: Request[Any, Any, Any]) -> Response[Any]:
    """A file by ComfyUI's name: an output of the caller's prompt, or one of its uploads."""
    try:
        storage, stored = await _viewed(services, request)
    except _NoFile as exc:
        return exc.response()
    return await stream_stored(storage, stored, request, {})


# `route`, not `head`: Litestar's `head` takes only handlers typed to return no content, and
# the empty body here must go with the Content-Length of the file.
@route(paths("/view"), http_method=HttpMethod.HEAD)
async def view_head(services: ServicesDep, request: Request[Any, Any, Any]) -> Response[bytes]:
    """What GET /view would send, without the body (as ComfyUI answers HEAD)."""
    try:
        storage, stored = await _viewed(services, request)
    except _NoFile as exc:
        return exc.response()
    media_type, headers = await how_to_serve(storage, stored)
    headers = {**headers, "Accept-Ranges": "bytes", "Content-Length": str(stored.size)}
    return Response(b"", headers=headers, media_type=media_type)


@post(paths("/upload/image"), status_code=200)
async def upload_image(services: ServicesDep, request: Request[Any, Any, Any]) -> Response[bytes]:
    """Multipart `image` (+ `type`, `subfolder`, `overwrite`) into the caller's uploads."""
    if services.storage is None:
        raise ApiError(503, "no_storage", "no storage backend is configured")
    # Read whole first (the form is parsed from it): a form that cannot be parsed is then
    # still there to say why.
    raw = await request.body()
    try:
        form = await request.form()
    except UnicodeDecodeError:
        # A part without a file name is read as a text field, and an image is not text.
        return said(
            400,
            "a part of the form has no file name, and is not text either: send the image "
            "with its file name",
        )
    except ClientException as exc:
        return said(400, _unreadable_form(raw, exc))
    image = form.get("image")
    if not isinstance(image, UploadFile):
        return said(400, "the form has no file in its 'image' field")
    overwrite = str(form.get("overwrite") or "").lower() in ("true", "1")
    try:
        answer = await save_upload(
            services.storage,
            caller_id(request),
            image.filename,
            await image.read(),
            folder=str(form.get("type") or "input"),
            subfolder=str(form.get("subfolder") or ""),
            overwrite=overwrite,
        )
    except BadUpload as exc:
        log.info("refused an upload: %s", exc)
        return said(400, str(exc))
    return json_answer(answer)


_FILENAME = re.compile(rb'filename\*?="?([^"\r\n;]*)')


def _unreadable_form(raw: bytes, exc: ClientException) -> str:
    """Why Litestar could not parse a form: a file name too long for a part's header, or else
    what the parser said."""
    if any(len(name) > MAX_NAME_BYTES for name in _FILENAME.findall(raw)):
        return f"file name too long (max {MAX_NAME_BYTES} bytes in UTF-8)"
    return f"the form cannot be read: {exc.detail}"


FILE_ROUTES: Final = [view, view_head, upload_image]
