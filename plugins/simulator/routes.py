"""The ASGI application: ComfyUI's HTTP routes and the `/ws` websocket."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import mimetypes
import os
import sys
import uuid
from collections.abc import Awaitable, Callable
from email.utils import formatdate
from pathlib import Path
from typing import Any

from . import png
from .asgi import (
    FormFile,
    InvalidBody,
    Receive,
    Request,
    Response,
    Scope,
    Send,
    empty,
    json_response,
    not_found_route,
    parse_multipart,
    read_request,
    send_response,
    server_error,
)
from .config import DEFAULT_MODEL_FOLDERS
from .engine import BadRequest, Engine
from .history import job_from_history, job_from_queue, list_jobs
from .hub import Connection, text_frame

log = logging.getLogger(__name__)

FEATURES = {
    "supports_preview_metadata": True,
    "max_upload_size": 104857600,
    "extension": {"manager": {"supports_v4": True}},
}
_ANNOTATIONS = {" [output]": "output", " [input]": "input", " [temp]": "temp"}
Handler = Callable[[Request, str], Awaitable[Response]]


class App:
    """ComfyUI's HTTP API over one Engine. `abort_client` cuts a TCP connection abruptly."""

    def __init__(self, engine: Engine, abort_client: Callable[[Any], None]) -> None:
        self.engine = engine
        self.abort_client = abort_client
        self.argv: list[str] = ["main.py"]
        self.hang_http = engine.config.hang_http
        self._release = asyncio.Event()
        self._routes: dict[tuple[str, str], Handler] = {
            ("GET", "/system_stats"): self._system_stats,
            ("GET", "/features"): self._features,
            ("GET", "/prompt"): self._get_prompt,
            ("POST", "/prompt"): self._post_prompt,
            ("GET", "/queue"): self._get_queue,
            ("POST", "/queue"): self._post_queue,
            ("GET", "/history"): self._get_history,
            ("POST", "/history"): self._post_history,
            ("GET", "/history/"): self._get_history_item,
            ("POST", "/interrupt"): self._interrupt,
            ("POST", "/free"): self._free,
            ("GET", "/object_info"): self._object_info,
            ("GET", "/object_info/"): self._object_info_item,
            ("GET", "/view"): self._view,
            ("POST", "/upload/image"): self._upload,
            ("GET", "/embeddings"): self._embeddings,
            ("GET", "/models"): self._models,
            ("GET", "/models/"): self._models_folder,
            ("GET", "/extensions"): self._extensions,
            ("GET", "/internal/folder_paths"): self._folder_paths,
            ("GET", "/internal/logs"): self._logs,
            ("GET", "/settings"): self._settings,
            ("GET", "/users"): self._users,
            ("GET", "/api/jobs"): self._jobs,
            ("GET", "/api/jobs/"): self._job,
            ("GET", "/"): self._index,
        }

    def release_hangs(self) -> None:
        """Let requests held by `hang_http` finish (used on shutdown)."""
        self._release.set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await self._websocket(scope, receive, send)
        elif scope["type"] == "http":
            request = await read_request(scope, receive)
            if self.hang_http:
                await self._release.wait()
                return
            await send_response(send, await self._dispatch(request))

    def _find(self, method: str, path: str) -> tuple[Handler, str] | None:
        lookup = "GET" if method == "HEAD" else method
        candidates = [path]
        if path.startswith("/api/"):
            candidates.append(path[4:])
        for candidate in candidates:
            handler = self._routes.get((lookup, candidate))
            if handler is not None:
                return handler, ""
            head, sep, tail = candidate.rpartition("/")
            handler = self._routes.get((lookup, head + sep))
            if handler is not None and head and tail:
                return handler, tail
        return None

    async def _dispatch(self, request: Request) -> Response:
        found = self._find(request.method, request.path)
        if found is None:
            return not_found_route()
        handler, param = found
        try:
            response = await handler(request, param)
        # RecursionError: JSON nested too deeply for the decoder, which ComfyUI's fails on too.
        except (InvalidBody, BadRequest, ValueError, TypeError, KeyError, RecursionError) as exc:
            log.warning("%s %s failed: %r", request.method, request.path, exc)
            return server_error()
        response.head = request.method == "HEAD"
        return response

    # --- websocket -----------------------------------------------------------------------

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (await receive())["type"] != "websocket.connect":
            return
        if self.hang_http:
            await self._release.wait()
            return
        await send({"type": "websocket.accept"})
        query = dict(
            part.split("=", 1) if "=" in part else (part, "")
            for part in scope.get("query_string", b"").decode().split("&")
            if part
        )
        sid = query.get("clientId") or uuid.uuid4().hex
        client = scope.get("client")
        conn = Connection(sid, lambda: self.abort_client(client))
        hub = self.engine.hub
        hub.register(conn)
        conn.put(text_frame("status", {**self.engine.status_data(), "sid": sid}))
        if self.engine.client_id == sid and self.engine.last_node_id is not None:
            conn.put(text_frame("executing", {"node": self.engine.last_node_id}))
        writer = asyncio.create_task(self._writer(conn, send))
        try:
            first = True
            while True:
                message = await receive()
                if message["type"] == "websocket.disconnect":
                    break
                if first and message.get("text"):
                    self._first_message(conn, message["text"])
                first = False
        finally:
            hub.unregister(sid)
            conn.close()
            await writer

    def _first_message(self, conn: Connection, text: str) -> None:
        request = Request("WS", "", {}, {}, text.encode())
        data = request.optional_json()
        if isinstance(data, dict) and data.get("type") == "feature_flags":
            flags = data.get("data")
            conn.supports_preview_metadata = isinstance(flags, dict) and bool(
                flags.get("supports_preview_metadata")
            )
            conn.put(text_frame("feature_flags", FEATURES))

    async def _writer(self, conn: Connection, send: Send) -> None:
        while (frame := await conn.queue.get()) is not None:
            key = "bytes" if isinstance(frame, bytes) else "text"
            message: dict[str, Any] = {"type": "websocket.send", key: frame}
            try:
                await send(message)
            except OSError as exc:
                log.debug("websocket %s went away: %r", conn.sid, exc)
                return

    # --- simple GETs ---------------------------------------------------------------------

    async def _system_stats(self, request: Request, param: str) -> Response:
        total, free = _memory()
        device = {"name": "cpu", "type": "cpu", "index": None, "vram_total": total}
        device.update(vram_free=free, torch_vram_total=total, torch_vram_free=free)
        system = {
            "os": sys.platform,
            "ram_total": total,
            "ram_free": free,
            "comfyui_version": "0.12.1",
            "required_frontend_version": "1.37.11",
            "installed_templates_version": "0.8.31",
            "required_templates_version": "0.8.31",
            "python_version": sys.version,
            "pytorch_version": "2.13.0+cpu",
            "embedded_python": False,
            "argv": self.argv,
        }
        return json_response({"system": system, "devices": [device]})

    async def _features(self, request: Request, param: str) -> Response:
        return json_response(FEATURES)

    async def _get_prompt(self, request: Request, param: str) -> Response:
        return json_response({"exec_info": {"queue_remaining": self.engine.queue_remaining()}})

    async def _get_queue(self, request: Request, param: str) -> Response:
        running = self.engine.running
        return json_response(
            {
                "queue_running": [running.as_list()] if running is not None else [],
                "queue_pending": [item.as_list() for item in self.engine.pending()],
            }
        )

    async def _get_history(self, request: Request, param: str) -> Response:
        max_items = request.query.get("max_items")
        offset = request.query.get("offset")
        page = self.engine.history.page(
            int(max_items) if max_items is not None else None,
            int(offset) if offset is not None else -1,
        )
        return json_response(page)

    async def _get_history_item(self, request: Request, param: str) -> Response:
        return json_response(self.engine.history.get(param))

    async def _object_info(self, request: Request, param: str) -> Response:
        return json_response(self.engine.registry.object_info())

    async def _object_info_item(self, request: Request, param: str) -> Response:
        if param not in self.engine.registry:
            return json_response({})
        return json_response({param: self.engine.registry.object_info_entry(param)})

    async def _embeddings(self, request: Request, param: str) -> Response:
        return json_response([])

    def _model_folders(self) -> list[str]:
        extra = [name for name in self.engine.config.models if name not in DEFAULT_MODEL_FOLDERS]
        return [*DEFAULT_MODEL_FOLDERS, *extra]

    async def _models(self, request: Request, param: str) -> Response:
        return json_response(self._model_folders())

    async def _models_folder(self, request: Request, param: str) -> Response:
        if param not in self._model_folders():
            return empty(404)
        return json_response(list(self.engine.config.models.get(param, [])))

    async def _extensions(self, request: Request, param: str) -> Response:
        return json_response([])

    async def _folder_paths(self, request: Request, param: str) -> Response:
        base = self.engine.folders.output.parent / "models"
        return json_response({name: [str(base / name)] for name in self._model_folders()})

    async def _logs(self, request: Request, param: str) -> Response:
        return json_response("")

    async def _settings(self, request: Request, param: str) -> Response:
        return json_response({})

    async def _users(self, request: Request, param: str) -> Response:
        return json_response({"storage": "server", "migrated": True})

    async def _index(self, request: Request, param: str) -> Response:
        page = b"<!doctype html><title>ComfyUI simulator</title><p>ComfyUI simulator</p>\n"
        return Response(200, page, [("Content-Type", "text/html")])

    # --- queue and history ---------------------------------------------------------------

    async def _post_prompt(self, request: Request, param: str) -> Response:
        if self.engine.config.fail_prompt:
            # What aiohttp sends for an exception that escapes a handler.
            text = b"500 Internal Server Error\n\nServer got itself in trouble"
            return Response(500, text, [("Content-Type", "text/plain; charset=utf-8")])
        status, body = self.engine.submit(request.json())
        return json_response(body, status)

    async def _post_queue(self, request: Request, param: str) -> Response:
        body = request.json()
        if body.get("clear"):
            self.engine.clear_pending()
        if "delete" in body:
            self.engine.delete_pending(list(body["delete"]))
        return empty()

    async def _post_history(self, request: Request, param: str) -> Response:
        body = request.json()
        if body.get("clear"):
            self.engine.history.clear()
        for prompt_id in body.get("delete", []):
            self.engine.history.delete(prompt_id)
        return empty()

    async def _interrupt(self, request: Request, param: str) -> Response:
        body = request.optional_json()
        self.engine.interrupt(body.get("prompt_id") if isinstance(body, dict) else None)
        return empty()

    async def _free(self, request: Request, param: str) -> Response:
        body = request.json()
        if isinstance(body, dict) and (body.get("unload_models") or body.get("free_memory")):
            self.engine.free_models(free_memory=bool(body.get("free_memory")))
        return empty()

    async def _jobs(self, request: Request, param: str) -> Response:
        engine = self.engine
        running = [engine.running] if engine.running is not None else []
        return json_response(list_jobs(running, engine.pending(), engine.history, request.query))

    async def _job(self, request: Request, param: str) -> Response:
        engine = self.engine
        if engine.running is not None and engine.running.prompt_id == param:
            return json_response(job_from_queue(engine.running, True, True))
        for item in engine.pending():
            if item.prompt_id == param:
                return json_response(job_from_queue(item, False, True))
        entry = engine.history.get(param)
        if entry:
            return json_response(job_from_history(param, entry[param], True))
        return json_response({"error": "Job not found"}, 404)

    # --- files ---------------------------------------------------------------------------

    async def _view(self, request: Request, param: str) -> Response:
        query = request.query
        if "filename" not in query:
            return empty(404)
        name, kind = query["filename"], None
        for suffix, folder_kind in _ANNOTATIONS.items():
            if name.endswith(suffix):
                name, kind = name[: -len(suffix)], folder_kind
        if not name or name.startswith("/") or ".." in name:
            return empty(400)
        try:
            folder = str(self.engine.folders.get(kind or query.get("type", "output")))
        except KeyError:
            return empty(400)
        if "subfolder" in query:
            full = os.path.join(folder, query["subfolder"])  # noqa: PTH118
            if os.path.commonpath((os.path.abspath(full), folder)) != folder:  # noqa: PTH100
                return empty(403)
            folder = full
        path = Path(folder) / Path(name).name
        if not path.is_file():
            return empty(404)
        disposition = ("Content-Disposition", f'filename="{path.name}"')
        channel = query.get("channel", "rgba")
        if channel in ("rgb", "a"):
            info = png.read_info(path.read_bytes())
            pixel = info.first_pixel
            if channel == "a":
                alpha = pixel[-1] if info.color_type in (4, 6) else 255
                data = png.encode_solid(info.width, info.height, (0, 0, 0), alpha)
            else:
                rgb = (pixel[0], pixel[1 % len(pixel)], pixel[2 % len(pixel)])
                data = png.encode_solid(info.width, info.height, rgb)
            return Response(200, data, [disposition, ("Content-Type", "image/png")])
        stat = path.stat()
        content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        headers = [
            disposition,
            ("Content-Type", content_type),
            ("Etag", f'"{stat.st_mtime_ns:x}-{stat.st_size:x}"'),
            ("Last-Modified", formatdate(stat.st_mtime, usegmt=True)),
            ("Accept-Ranges", "bytes"),
        ]
        return Response(200, path.read_bytes(), headers)

    async def _upload(self, request: Request, param: str) -> Response:
        fields = parse_multipart(request)
        image = fields.get("image")
        if not isinstance(image, FormFile) or not image.filename:
            return empty(400)
        kind = fields.get("type")
        kind = kind if isinstance(kind, str) and kind else "input"
        try:
            upload_dir = str(self.engine.folders.get(kind))
        except KeyError:
            return empty(400)
        subfolder = str(fields.get("subfolder", ""))
        folder = os.path.join(upload_dir, os.path.normpath(subfolder))  # noqa: PTH118
        filepath = os.path.abspath(os.path.join(folder, image.filename))  # noqa: PTH100, PTH118
        if os.path.commonpath((upload_dir, filepath)) != upload_dir:
            return empty(400)
        Path(folder).mkdir(parents=True, exist_ok=True)
        filename = image.filename
        stem, ext = os.path.splitext(filename)  # noqa: PTH122
        overwrite = fields.get("overwrite") in ("true", "1")
        duplicate = False
        counter = 1
        while not overwrite and Path(filepath).exists():
            if _sha256(Path(filepath).read_bytes()) == _sha256(image.content):
                duplicate = True
                break
            filename = f"{stem} ({counter}){ext}"
            filepath = os.path.join(folder, filename)  # noqa: PTH118
            counter += 1
        if not duplicate:
            Path(filepath).write_bytes(image.content)
        return json_response({"name": filename, "subfolder": subfolder, "type": kind})


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _memory() -> tuple[int, int]:
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        return page * os.sysconf("SC_PHYS_PAGES"), page * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30, 4 * 2**30  # a plausible machine where sysconf is missing
