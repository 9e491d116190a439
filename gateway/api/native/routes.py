"""ComfyUI's own HTTP and websocket API, served by the gateway for the whole fleet.

Scripts written for one ComfyUI server point at the gateway instead and keep working. Every
route is also served under `/api`, as ComfyUI does. Bodies and status codes follow the protocol
recordings; where ComfyUI answers a malformed body with a 500, these answer 400.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from typing import Any, Final

import msgspec
from litestar import HttpMethod, Request, Response, WebSocket, get, post, route, websocket
from litestar.datastructures import UploadFile
from litestar.exceptions import WebSocketDisconnect
from litestar.params import FromPath

from gateway.api.auth import CLIENT_ID_STATE
from gateway.api.errors import ApiError
from gateway.api.images import stream_stored
from gateway.api.limits import limits_of, submit_rate_limit
from gateway.api.native.fleetinfo import features_of
from gateway.api.native.messages import queue_item
from gateway.api.native.service import ANONYMOUS, NativeService
from gateway.api.native.sockets import NativeSocket, frame
from gateway.api.native.uploads import BadUpload, save_upload, upload_key
from gateway.api.services import Services, ServicesDep
from gateway.storage import InvalidKey, NotFound, Storage, StoredObject

log = logging.getLogger(__name__)

JSON: Final = "application/json; charset=utf-8"
# How long /view waits for an output whose job is still storing it.
VIEW_WAIT_S: Final = 60.0
# How long a request waits for a starting gateway to have read the prompts already taken.
READY_WAIT_S: Final = 10.0
SEND_TIMEOUT_S: Final = 30.0
_encoder = msgspec.json.Encoder()


def _paths(path: str) -> list[str]:
    return [path, "/api" + path]


def _json(body: Any, status: int = 200) -> Response[bytes]:
    return Response(_encoder.encode(body), status_code=status, media_type=JSON)


def _empty(status: int = 200) -> Response[bytes]:
    return Response(b"", status_code=status, media_type="text/plain")


async def _native(services: Services) -> NativeService:
    """The native API's state, once it knows every prompt taken so far (503 until then)."""
    native = services.native
    if native is not None and not native.index.ready.is_set():
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(READY_WAIT_S):
                await native.index.ready.wait()
    if native is None or not native.index.ready.is_set():
        raise ApiError(503, "starting", "the gateway is still starting")
    return native


def _caller(connection: Request[Any, Any, Any] | WebSocket[Any, Any, Any]) -> str:
    caller = connection.state.get(CLIENT_ID_STATE)
    return caller if isinstance(caller, str) else ANONYMOUS


async def _body(request: Request[Any, Any, Any]) -> Any:
    """The JSON body, {} when empty; ApiError 400 when it is not JSON."""
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        return msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise ApiError(400, "invalid_json", f"the body is not JSON: {exc}") from None


# -- prompts ---------------------------------------------------------------------------------


@post(_paths("/prompt"), status_code=200, include_in_schema=False, guards=[submit_rate_limit])
async def post_prompt(services: ServicesDep, request: Request[Any, Any, Any]) -> Response[bytes]:
    """Queue a prompt on the fleet; ComfyUI's answer (`prompt_id`, `number`, `node_errors`)."""
    raw = await request.body()
    try:
        body = msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        return _json(_bad_json(exc), 400)
    status, answer = await (await _native(services)).enqueue(_caller(request), body)
    return _json(answer, status)


def _bad_json(exc: Exception) -> dict[str, Any]:
    error = {"type": "invalid_json", "message": "The body is not JSON", "details": str(exc)}
    return {"error": {**error, "extra_info": {}}, "node_errors": {}}


@get(_paths("/prompt"), include_in_schema=False)
async def get_prompt(services: ServicesDep, request: Request[Any, Any, Any]) -> Response[bytes]:
    """`exec_info.queue_remaining`: the caller's running plus pending prompts."""
    remaining = (await _native(services)).index.remaining(_caller(request))
    return _json({"exec_info": {"queue_remaining": remaining}})


@get(_paths("/queue"), include_in_schema=False)
async def get_queue(services: ServicesDep, request: Request[Any, Any, Any]) -> Response[bytes]:
    """The caller's queue as one server shows it: at most one running."""
    running, pending = (await _native(services)).index.queue_of(_caller(request))
    return _json(
        {
            "queue_running": [queue_item(running)] if running is not None else [],
            "queue_pending": [queue_item(entry) for entry in pending],
        }
    )


@post(_paths("/queue"), status_code=200, include_in_schema=False)
async def post_queue(services: ServicesDep, request: Request[Any, Any, Any]) -> Response[bytes]:
    """`{"delete": [ids]}` or `{"clear": true}`: the caller's pending prompts only."""
    body = await _body(request)
    native = await _native(services)
    if isinstance(body, dict):
        if body.get("clear"):
            await native.delete_pending(_caller(request), None)
        if isinstance(body.get("delete"), list):
            await native.delete_pending(_caller(request), body["delete"])
    return _empty()


@post(_paths("/interrupt"), status_code=200, include_in_schema=False)
async def post_interrupt(services: ServicesDep, request: Request[Any, Any, Any]) -> Response[bytes]:
    """Interrupt the caller's running prompt, or only the named one if it is running."""
    body = await _body(request)
    prompt_id = body.get("prompt_id") if isinstance(body, dict) else None
    await (await _native(services)).interrupt(_caller(request), prompt_id)
    return _empty()


# -- history ---------------------------------------------------------------------------------


@get(_paths("/history"), include_in_schema=False)
async def get_history(services: ServicesDep, request: Request[Any, Any, Any]) -> Response[bytes]:
    """Every ended prompt of the caller, oldest first; `max_items` keeps the newest N, or N
    from position `offset`."""
    native = await _native(services)
    entries = native.history(_caller(request))
    max_items = _int(request.query_params.get("max_items"))
    offset = _int(request.query_params.get("offset"))
    # A negative offset is ComfyUI's "none given" (its default is -1).
    if offset is None or offset < 0:
        offset = 0 if max_items is None else max(0, len(entries) - max_items)
    end = None if max_items is None else offset + max(0, max_items)
    await native.logged(entries[offset:end])
    return _json(await native.reader.entries(entries[offset:end]))


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


@get(_paths("/history/{prompt_id:str}"), include_in_schema=False)
async def get_history_entry(
    prompt_id: FromPath[str], services: ServicesDep, request: Request[Any, Any, Any]
) -> Response[bytes]:
    """`{id: entry}`, or `{}` while the prompt has not ended (or is not the caller's)."""
    native = await _native(services)
    entry = native.owned(_caller(request), prompt_id)
    if entry is None or not entry.settled.is_set() or entry.record is None:
        return _json({})
    await native.logged([entry])
    return _json({entry.prompt_id: await native.reader.entry(entry)})


@post(_paths("/history"), status_code=200, include_in_schema=False)
async def post_history(services: ServicesDep, request: Request[Any, Any, Any]) -> Response[bytes]:
    """`{"delete": [ids]}` or `{"clear": true}` on the caller's history."""
    body = await _body(request)
    native = await _native(services)
    if isinstance(body, dict):
        if body.get("clear"):
            await native.delete_history(_caller(request), None)
        if isinstance(body.get("delete"), list):
            await native.delete_history(_caller(request), body["delete"])
    return _empty()


# -- files -----------------------------------------------------------------------------------


class _NoFile(Exception):
    """/view has nothing to send: ComfyUI's status, with an empty body."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


async def _viewed(
    services: Services, request: Request[Any, Any, Any]
) -> tuple[Storage, StoredObject, dict[str, str]]:
    """The stored file /view names, with the headers ComfyUI adds; _NoFile when none."""
    query = request.query_params
    filename = query.get("filename")
    folder = query.get("type") or "output"
    subfolder = query.get("subfolder") or ""
    if not filename:
        raise _NoFile(404)
    if "/" in filename or "\\" in filename or filename.startswith(".."):
        raise _NoFile(400)
    storage = services.storage
    native = await _native(services)
    if storage is None:
        raise _NoFile(404)
    caller = _caller(request)
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
    except (InvalidKey, BadUpload):
        raise _NoFile(400) from None
    except NotFound:
        raise _NoFile(404) from None
    return storage, stored, {"Content-Disposition": f'filename="{filename}"'}


@get(_paths("/view"), include_in_schema=False)
async def view(services: ServicesDep, request: Request[Any, Any, Any]) -> Response[Any]:
    """A file by ComfyUI's name: an output of the caller's prompt, or one of its uploads."""
    try:
        storage, stored, headers = await _viewed(services, request)
    except _NoFile as exc:
        return _empty(exc.status)
    return stream_stored(storage, stored, request, headers)


# `route`, not `head`: Litestar's `head` takes only handlers typed to return no content, and
# the empty body here must go with the Content-Length of the file.
@route(_paths("/view"), http_method=HttpMethod.HEAD, include_in_schema=False)
async def view_head(services: ServicesDep, request: Request[Any, Any, Any]) -> Response[bytes]:
    """What GET /view would send, without the body (as ComfyUI answers HEAD)."""
    try:
        _, stored, headers = await _viewed(services, request)
    except _NoFile as exc:
        return _empty(exc.status)
    headers = {**headers, "Accept-Ranges": "bytes", "Content-Length": str(stored.size)}
    return Response(b"", headers=headers, media_type=stored.content_type)


@post(_paths("/upload/image"), status_code=200, include_in_schema=False)
async def upload_image(services: ServicesDep, request: Request[Any, Any, Any]) -> Response[bytes]:
    """Multipart `image` (+ `type`, `subfolder`, `overwrite`) into the caller's uploads."""
    if services.storage is None:
        raise ApiError(503, "no_storage", "no storage backend is configured")
    form = await request.form()
    image = form.get("image")
    if not isinstance(image, UploadFile):
        return _empty(400)
    overwrite = str(form.get("overwrite") or "").lower() in ("true", "1")
    try:
        answer = await save_upload(
            services.storage,
            _caller(request),
            image.filename,
            await image.read(),
            folder=str(form.get("type") or "input"),
            subfolder=str(form.get("subfolder") or ""),
            overwrite=overwrite,
            content_type=image.content_type or None,
        )
    except BadUpload as exc:
        log.info("refused an upload: %s", exc)
        return _empty(400)
    return _json(answer)


# -- the fleet as one server -----------------------------------------------------------------


@get(_paths("/system_stats"), include_in_schema=False)
async def system_stats(services: ServicesDep) -> Response[bytes]:
    """This gateway's system and one device per live server."""
    return _json((await _native(services)).fleet.system_stats())


@get(_paths("/object_info"), include_in_schema=False)
async def object_info(services: ServicesDep) -> Response[bytes]:
    """Every node class some live server has."""
    return _json(await (await _native(services)).fleet.object_info())


@get(_paths("/object_info/{node_class:str}"), include_in_schema=False)
async def object_info_class(node_class: FromPath[str], services: ServicesDep) -> Response[bytes]:
    """One class's definition, or `{}` when no server has it."""
    info = await (await _native(services)).fleet.object_info()
    return _json({node_class: info[node_class]} if node_class in info else {})


@get(_paths("/embeddings"), include_in_schema=False)
async def embeddings(services: ServicesDep) -> Response[bytes]:
    return _json((await _native(services)).fleet.models().get("embeddings", []))


@get(_paths("/models"), include_in_schema=False)
async def model_folders(services: ServicesDep) -> Response[bytes]:
    return _json(list((await _native(services)).fleet.models()))


@get(_paths("/models/{folder:str}"), include_in_schema=False)
async def model_files(folder: FromPath[str], services: ServicesDep) -> Response[bytes]:
    models = (await _native(services)).fleet.models()
    if folder not in models:
        return _empty(404)
    return _json(models[folder])


@get(_paths("/features"), include_in_schema=False)
async def features(services: ServicesDep) -> Response[bytes]:
    return _json(features_of(services.settings))


# -- websocket -------------------------------------------------------------------------------


@websocket(_paths("/ws"))
async def native_ws(socket: WebSocket[Any, Any, Any], services: ServicesDep) -> None:
    """ComfyUI's socket: `status` with `sid` first, then the caller's prompts' messages."""
    native = await _native(services)
    await socket.accept()
    try:
        slot = limits_of(socket.app).streams.acquire()
    except ApiError as exc:
        await socket.close(code=4000 + exc.status, reason=exc.message[:120])
        return
    client_id = socket.query_params.get("clientId") or uuid.uuid4().hex
    with slot:
        conn = await native.hub.connect(_caller(socket), client_id)
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(_read(socket, conn, native))
                tasks.create_task(_write(socket, conn))
        finally:
            await native.hub.disconnect(conn)


async def _read(
    socket: WebSocket[Any, Any, Any], conn: NativeSocket, native: NativeService
) -> None:
    first = True
    try:
        while True:
            text = await socket.receive_text()
            if first:
                first = False
                with contextlib.suppress(msgspec.DecodeError):
                    message = msgspec.json.decode(text)
                    # Only a first message may negotiate features, as on ComfyUI.
                    if isinstance(message, dict) and message.get("type") == "feature_flags":
                        data = message.get("data")
                        if isinstance(data, dict) and data.get("supports_preview_metadata"):
                            native.hub.want_previews(conn)
                        conn.send(frame("feature_flags", features_of(native.settings)))
    except WebSocketDisconnect:
        pass
    finally:
        conn.close()


async def _write(socket: WebSocket[Any, Any, Any], conn: NativeSocket) -> None:
    try:
        while (item := await conn.frames.get()) is not None:
            # A client that stops reading must not hold its slot and backlog for ever.
            async with asyncio.timeout(SEND_TIMEOUT_S):
                if isinstance(item, bytes):
                    await socket.send_bytes(item)
                else:
                    await socket.send_text(item)
            conn.sent(item)
    except WebSocketDisconnect:
        pass
    except TimeoutError:
        log.warning(
            "socket %s took over %s s to take a frame; closing it", conn.client_id, SEND_TIMEOUT_S
        )
    finally:
        conn.close()
        # Closing a socket the client already left raises; there is nothing left to tell it.
        with contextlib.suppress(Exception):
            async with asyncio.timeout(SEND_TIMEOUT_S):
                await socket.close()


NATIVE_ROUTES: Final = [
    post_prompt,
    get_prompt,
    get_queue,
    post_queue,
    post_interrupt,
    get_history,
    get_history_entry,
    post_history,
    view,
    view_head,
    upload_image,
    system_stats,
    object_info,
    object_info_class,
    embeddings,
    model_folders,
    model_files,
    features,
    native_ws,
]
