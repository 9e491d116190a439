"""ComfyUI's own HTTP and websocket API, served by the gateway for the whole fleet.

Scripts written for one ComfyUI server point at the gateway instead and keep working. Every
route is also served under `/api`, as ComfyUI does. Bodies and status codes follow the protocol
recordings; where ComfyUI answers a malformed body with a 500, these answer 400. The file routes
are in files.py, the ways all of them answer in answers.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from typing import Any, Final

import msgspec
from litestar import Request, Response, Router, WebSocket, get, post, websocket
from litestar.exceptions import WebSocketDisconnect
from litestar.params import FromPath

from gateway.api.bodies import nests_deeper
from gateway.api.errors import ApiError
from gateway.api.limits import submit_rate_limit, take_stream
from gateway.api.native.answers import (
    NotJson,
    caller_id,
    decoded,
    empty,
    json_answer,
    json_body,
    native_of,
    not_json,
    paths,
    reject_deep_json,
)
from gateway.api.native.files import FILE_ROUTES
from gateway.api.native.fleetinfo import features_of
from gateway.api.native.frames import StoredFrame
from gateway.api.native.messages import queue_item
from gateway.api.native.service import NativeService
from gateway.api.native.sockets import NativeSocket, frame
from gateway.api.openapi import COMFYUI_TAG
from gateway.api.services import ServicesDep
from gateway.storage import StorageError

log = logging.getLogger(__name__)

SEND_TIMEOUT_S: Final = 30.0


# -- prompts ---------------------------------------------------------------------------------


@post(paths("/prompt"), status_code=200, guards=[submit_rate_limit])
async def post_prompt(services: ServicesDep, request: Request[Any, Any, Any]) -> Response[bytes]:
    """Queue a prompt on the fleet; ComfyUI's answer (`prompt_id`, `number`, `node_errors`)."""
    body = decoded(await request.body())
    status, answer = await (await native_of(services)).enqueue(caller_id(request), body)
    response = json_answer(answer, status)
    wait = answer.get("error", {}).get("extra_info", {}).get("retry_after_s")
    if isinstance(wait, int):  # a full queue: when to come back
        response.headers["Retry-After"] = str(wait)
    return response


@get(paths("/prompt"))
async def get_prompt(services: ServicesDep, request: Request[Any, Any, Any]) -> Response[bytes]:
    """`exec_info.queue_remaining`: the caller's running plus pending prompts."""
    remaining = (await native_of(services)).index.remaining(caller_id(request))
    return json_answer({"exec_info": {"queue_remaining": remaining}})


@get(paths("/queue"))
async def get_queue(services: ServicesDep, request: Request[Any, Any, Any]) -> Response[bytes]:
    """The caller's queue as one server shows it: at most one running."""
    running, pending = (await native_of(services)).index.queue_of(caller_id(request))
    return json_answer(
        {
            "queue_running": [queue_item(running)] if running is not None else [],
            "queue_pending": [queue_item(entry) for entry in pending],
        }
    )


@post(paths("/queue"), status_code=200)
async def post_queue(services: ServicesDep, request: Request[Any, Any, Any]) -> Response[bytes]:
    """`{"delete": [ids]}` or `{"clear": true}`: the caller's pending prompts only."""
    body = await json_body(request)
    native = await native_of(services)
    if isinstance(body, dict):
        if body.get("clear"):
            await native.delete_pending(caller_id(request), None)
        if isinstance(body.get("delete"), list):
            await native.delete_pending(caller_id(request), body["delete"])
    return empty()


@post(paths("/interrupt"), status_code=200)
async def post_interrupt(services: ServicesDep, request: Request[Any, Any, Any]) -> Response[bytes]:
    """Interrupt the caller's running prompt, or only the named one if it is running."""
    body = await json_body(request)
    prompt_id = body.get("prompt_id") if isinstance(body, dict) else None
    await (await native_of(services)).interrupt(caller_id(request), prompt_id)
    return empty()


# -- history ---------------------------------------------------------------------------------


@get(paths("/history"))
async def get_history(services: ServicesDep, request: Request[Any, Any, Any]) -> Response[bytes]:
    """Every ended prompt of the caller, oldest first; `max_items` keeps the newest N, or N
    from position `offset`."""
    native = await native_of(services)
    entries = native.history(caller_id(request))
    max_items = _int(request.query_params.get("max_items"))
    offset = _int(request.query_params.get("offset"))
    # A negative offset is ComfyUI's "none given" (its default is -1).
    if offset is None or offset < 0:
        offset = 0 if max_items is None else max(0, len(entries) - max_items)
    end = None if max_items is None else offset + max(0, max_items)
    await native.logged(entries[offset:end])
    return json_answer(await native.reader.entries(entries[offset:end]))


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


@get(paths("/history/{prompt_id:str}"))
async def get_history_entry(
    prompt_id: FromPath[str], services: ServicesDep, request: Request[Any, Any, Any]
) -> Response[bytes]:
    """`{id: entry}`, or `{}` while the prompt has not ended (or is not the caller's)."""
    native = await native_of(services)
    entry = native.owned(caller_id(request), prompt_id)
    if entry is None or not entry.settled.is_set() or entry.record is None:
        return json_answer({})
    await native.logged([entry])
    return json_answer({entry.prompt_id: await native.reader.entry(entry)})


@post(paths("/history"), status_code=200)
async def post_history(services: ServicesDep, request: Request[Any, Any, Any]) -> Response[bytes]:
    """`{"delete": [ids]}` or `{"clear": true}` on the caller's history."""
    body = await json_body(request)
    native = await native_of(services)
    if isinstance(body, dict):
        if body.get("clear"):
            await native.delete_history(caller_id(request), None)
        if isinstance(body.get("delete"), list):
            await native.delete_history(caller_id(request), body["delete"])
    return empty()


# -- the fleet as one server -----------------------------------------------------------------


@get(paths("/system_stats"))
async def system_stats(services: ServicesDep) -> Response[bytes]:
    """This gateway's system and one device per live server."""
    return json_answer((await native_of(services)).fleet.system_stats())


@get(paths("/object_info"))
async def object_info(services: ServicesDep) -> Response[bytes]:
    """Every node class some live server has."""
    return json_answer(await (await native_of(services)).fleet.object_info())


@get(paths("/object_info/{node_class:str}"))
async def object_info_class(node_class: FromPath[str], services: ServicesDep) -> Response[bytes]:
    """One class's definition, or `{}` when no server has it."""
    info = await (await native_of(services)).fleet.object_info()
    return json_answer({node_class: info[node_class]} if node_class in info else {})


@get(paths("/embeddings"))
async def embeddings(services: ServicesDep) -> Response[bytes]:
    """The embedding files the live servers have, by name."""
    return json_answer((await native_of(services)).fleet.models().get("embeddings", []))


@get(paths("/models"))
async def model_folders(services: ServicesDep) -> Response[bytes]:
    """The model folders of the live servers."""
    return json_answer(list((await native_of(services)).fleet.models()))


@get(paths("/models/{folder:str}"))
async def model_files(folder: FromPath[str], services: ServicesDep) -> Response[bytes]:
    """The files of one model folder across the live servers; 404 for an unknown folder."""
    models = (await native_of(services)).fleet.models()
    if folder not in models:
        return empty(404)
    return json_answer(models[folder])


@get(paths("/features"))
async def features(services: ServicesDep) -> Response[bytes]:
    """ComfyUI's feature flags, as this gateway supports them."""
    return json_answer(features_of(services.settings))


# -- websocket -------------------------------------------------------------------------------


@websocket(paths("/ws"))
async def native_ws(socket: WebSocket[Any, Any, Any], services: ServicesDep) -> None:
    """ComfyUI's socket: `status` with `sid` first, then the caller's prompts' messages."""
    native = await native_of(services)
    await socket.accept()
    try:
        slot = take_stream(socket)
    except ApiError as exc:
        await socket.close(code=4000 + exc.status, reason=exc.message[:120])
        return
    client_id = socket.query_params.get("clientId") or uuid.uuid4().hex
    with slot:
        conn = await native.hub.connect(caller_id(socket), client_id)
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
                # Only a first message may negotiate features, as on ComfyUI; anything else,
                # JSON or not, deep or not, is ignored.
                if nests_deeper(text.encode()):
                    continue
                with contextlib.suppress(msgspec.DecodeError):
                    message = msgspec.json.decode(text)
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
                if isinstance(item, StoredFrame):
                    await _send_stored(socket, item)
                elif isinstance(item, bytes):
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


async def _send_stored(socket: WebSocket[Any, Any, Any], item: StoredFrame) -> None:
    try:
        data = await item.read()
    except StorageError as exc:
        # Gone with its job's outputs (a failed or cancelled run), or storage is down.
        log.warning("an image for a socket could not be read (%s): %s", item.key, exc)
        return
    await socket.send_bytes(data)


# One router, so that ComfyUI's routes answer a body they cannot read in ComfyUI's shape.
NATIVE_ROUTES: Final = [
    Router(
        path="/",
        tags=[COMFYUI_TAG],
        before_request=reject_deep_json,
        exception_handlers={NotJson: not_json},
        route_handlers=[
            post_prompt,
            get_prompt,
            get_queue,
            post_queue,
            post_interrupt,
            get_history,
            get_history_entry,
            post_history,
            *FILE_ROUTES,
            system_stats,
            object_info,
            object_info_class,
            embeddings,
            model_folders,
            model_files,
            features,
            native_ws,
        ],
    )
]
