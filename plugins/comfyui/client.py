"""HTTP to one ComfyUI server: every endpoint the adapter uses, errors made plain.

Transport failures (refused, reset, timed out) and 5xx answers become ComfyUnavailable: the
server is not in a state to run anything, which is never the workflow's fault. A 400 from
POST /prompt becomes PromptRejected with ComfyUI's per-node errors.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import IO, Any, TypeVar

import httpx
import msgspec

from gateway.comfyui.tls import tls_context
from gateway.comfyui.urls import base_url
from plugins.comfyui.messages import (
    HistoryEntry,
    PromptAccepted,
    PromptRejection,
    QueueState,
    SystemStats,
    UploadResult,
)

log = logging.getLogger(__name__)

T = TypeVar("T")


class ComfyError(Exception):
    """ComfyUI answered something the adapter cannot use."""


class ComfyUnavailable(ComfyError):
    """ComfyUI did not answer, or answered with a server error (`status`, then)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class PromptRejected(ComfyError):
    """POST /prompt answered 400: the workflow failed ComfyUI's validation."""

    def __init__(self, rejection: PromptRejection) -> None:
        super().__init__("ComfyUI refused the workflow")
        self.rejection = rejection


class FileMissing(ComfyError):
    """GET /view answered 404 (or another 4xx) for an output file."""


class ComfyClient:
    """One connection pool to one ComfyUI server. Close with `aclose()`."""

    def __init__(self, address: str, *, timeout: float = 10.0) -> None:
        self.address = address
        self.url = base_url(address)
        self._http = httpx.AsyncClient(
            base_url=self.url,
            timeout=httpx.Timeout(timeout),
            follow_redirects=False,
            verify=tls_context(),
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _request(
        self, method: str, path: str, *, time_limit: float | None = None, **kwargs: Any
    ) -> httpx.Response:
        extra: dict[str, Any] = {} if time_limit is None else {"timeout": time_limit}
        try:
            response = await self._http.request(method, path, **kwargs, **extra)
        except httpx.TransportError as exc:
            raise ComfyUnavailable(
                f"ComfyUI at {self.address} did not answer {method} {path}: "
                f"{type(exc).__name__} {exc}".rstrip()
            ) from exc
        if response.status_code >= 500:
            raise ComfyUnavailable(
                f"ComfyUI at {self.address} answered {method} {path} with "
                f"{response.status_code}: {response.text[:200]}",
                response.status_code,
            )
        return response

    async def _get_json(
        self, path: str, kind: type[T], *, time_limit: float | None = None, **params: Any
    ) -> T:
        response = await self._request("GET", path, time_limit=time_limit, params=params or None)
        if response.status_code != 200:
            raise ComfyError(f"GET {path} answered {response.status_code}")
        try:
            return msgspec.json.decode(response.content, type=kind)
        except msgspec.DecodeError as exc:
            raise ComfyError(f"GET {path} answered something unexpected: {exc}") from exc

    # -- reads -----------------------------------------------------------------------------

    async def queue(self, *, time_limit: float | None = None) -> QueueState:
        """GET /queue: what runs and what waits."""
        return await self._get_json("/queue", QueueState, time_limit=time_limit)

    async def history(self, prompt_id: str) -> tuple[dict[str, Any], HistoryEntry] | None:
        """GET /history/{id}: (raw entry, decoded entry), or None while it is not finished.

        ComfyUI answers `{}` both for an unknown id and for a prompt that has not ended yet.
        """
        raw = await self._get_json(f"/history/{prompt_id}", dict[str, Any])
        entry = raw.get(prompt_id)
        if not isinstance(entry, dict):
            return None
        try:
            return entry, msgspec.convert(entry, HistoryEntry)
        except msgspec.ValidationError as exc:
            raise ComfyError(f"the history of {prompt_id} has an unexpected shape: {exc}") from exc

    async def system_stats(self) -> SystemStats:
        return await self._get_json("/system_stats", SystemStats)

    async def object_info(self) -> dict[str, Any]:
        return await self._get_json("/object_info", dict[str, Any], time_limit=30.0)

    async def model_folders(self) -> list[str] | None:
        """GET /models; None on a server too old to have it."""
        response = await self._request("GET", "/models")
        if response.status_code == 404:
            return None
        try:
            return msgspec.json.decode(response.content, type=list[str])
        except msgspec.DecodeError as exc:
            raise ComfyError(f"GET /models answered something unexpected: {exc}") from exc

    async def models(self, folder: str) -> list[str]:
        """GET /models/{folder}; [] for a folder the server does not know."""
        response = await self._request("GET", f"/models/{folder}")
        if response.status_code != 200:
            return []
        try:
            return msgspec.json.decode(response.content, type=list[str])
        except msgspec.DecodeError as exc:
            raise ComfyError(f"GET /models/{folder} answered something unexpected: {exc}") from exc

    @contextlib.asynccontextmanager
    async def view(self, filename: str, subfolder: str, kind: str) -> AsyncIterator[httpx.Response]:
        """GET /view as a streamed response: read it with `aiter_bytes`, never whole."""
        params = {"filename": filename, "subfolder": subfolder, "type": kind}
        request = self._http.build_request("GET", "/view", params=params, timeout=60.0)
        try:
            response = await self._http.send(request, stream=True)
        except httpx.TransportError as exc:
            raise ComfyUnavailable(f"ComfyUI at {self.address} did not send {filename}") from exc
        try:
            if response.status_code >= 500:
                raise ComfyUnavailable(f"GET /view {filename} answered {response.status_code}")
            if response.status_code != 200:
                raise FileMissing(
                    f"ComfyUI has no {kind} file {subfolder + '/' if subfolder else ''}"
                    f"{filename} (HTTP {response.status_code})"
                )
            yield response
        finally:
            await response.aclose()

    # -- writes ----------------------------------------------------------------------------

    async def submit(
        self, workflow: dict[str, Any], *, client_id: str, prompt_id: str
    ) -> PromptAccepted:
        """POST /prompt with our client id (always: see the protocol notes) and prompt id."""
        body = {"prompt": workflow, "client_id": client_id, "prompt_id": prompt_id}
        response = await self._request("POST", "/prompt", content=msgspec.json.encode(body))
        if response.status_code == 200:
            return msgspec.json.decode(response.content, type=PromptAccepted)
        try:
            rejection = msgspec.json.decode(response.content, type=PromptRejection)
        except msgspec.DecodeError:
            rejection = PromptRejection(error=f"HTTP {response.status_code}: {response.text[:500]}")
        raise PromptRejected(rejection)

    async def upload_image(
        self,
        name: str,
        file: IO[bytes],
        content_type: str,
        *,
        subfolder: str = "",
        overwrite: bool = False,
        time_limit: float = 120.0,
    ) -> UploadResult:
        """POST /upload/image into the input folder (`subfolder` of it, made if missing).

        Without `overwrite` ComfyUI may rename the file (`x (1).png`), so use the answer.
        """
        data = {"type": "input", "subfolder": subfolder}
        if overwrite:
            data["overwrite"] = "true"
        response = await self._request(
            "POST",
            "/upload/image",
            files={"image": (name, file, content_type)},
            data=data,
            time_limit=time_limit,
        )
        if response.status_code != 200:
            raise ComfyError(
                f"ComfyUI refused the upload of {name!r} (HTTP {response.status_code})"
            )
        try:
            return msgspec.json.decode(response.content, type=UploadResult)
        except msgspec.DecodeError as exc:
            raise ComfyError(f"uploading {name!r} answered something unexpected: {exc}") from exc

    async def interrupt(self, prompt_id: str) -> None:
        """Interrupt `prompt_id` only if it is the running prompt (ComfyUI checks the id)."""
        await self._request("POST", "/interrupt", json={"prompt_id": prompt_id})

    async def delete_pending(self, prompt_ids: list[str]) -> None:
        """Remove pending prompts from the queue; running ones are not affected."""
        await self._request("POST", "/queue", json={"delete": prompt_ids})

    async def free(self) -> None:
        """Unload models and free memory (after an out-of-memory error)."""
        await self._request("POST", "/free", json={"unload_models": True, "free_memory": True})
