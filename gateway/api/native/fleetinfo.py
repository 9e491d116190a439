"""The fleet described as one ComfyUI server: node definitions, models, devices.

`/object_info` is the union of every live server's node definitions. Heartbeats carry only the
node type names, so the definitions are read from the servers themselves and kept per
capabilities digest: a server is asked again only when what it can run has changed.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import os
import platform
import sys
import time
from typing import Any, Final

import httpx

from gateway.balancer.servers import ServerState, ServerTable
from gateway.comfyui.nodedef import NodeDef
from gateway.comfyui.tls import tls_context
from gateway.comfyui.urls import base_url
from gateway.settings import Settings

log = logging.getLogger(__name__)


def features_of(settings: Settings) -> dict[str, Any]:
    """`/features`: ComfyUI's flags, with the upload size this gateway takes."""
    return {
        "supports_preview_metadata": True,
        "max_upload_size": settings.max_body_bytes,
        "extension": {"manager": {"supports_v4": True}},
    }


VERSION: Final = "0.1.0"
_FETCH_TIMEOUT_S: Final = 10.0
# A server whose /object_info could not be read is asked again after this long, not by every
# request meanwhile (each would wait out the time-out).
_RETRY_FAILED_S: Final = 30.0


class FleetInfo:
    """Node definitions of the live servers, merged; fetched lazily and cached by digest."""

    def __init__(self, table: ServerTable) -> None:
        self._table = table
        self._by_digest: dict[str, dict[str, Any]] = {}
        self._failed_at: dict[str, float] = {}  # digest -> when its fetch last failed
        self._lock = asyncio.Lock()

    def live(self) -> list[ServerState]:
        now = self._table.now()
        return [state for state in self._table if state.is_live(now)]

    async def object_info(self) -> dict[str, Any]:
        """Every node class some live server has, with the first such server's definition."""
        merged: dict[str, Any] = {}
        # A class on several servers: the first definition, with the union of the choices.
        for state in self.live():
            for name, definition in (await self._definitions(state)).items():
                if name in merged:
                    merged[name] = _union(merged[name], definition)
                else:
                    merged[name] = definition
        return merged

    async def registry(self) -> FleetRegistry:
        return FleetRegistry(await self.object_info())

    async def _definitions(self, state: ServerState) -> dict[str, Any]:
        digest = state.capabilities_hash or f"unhashed:{state.server_id}"
        cached = self._by_digest.get(digest)
        if cached is not None:
            return cached
        if time.monotonic() - self._failed_at.get(digest, -_RETRY_FAILED_S) < _RETRY_FAILED_S:
            return {}  # a server that did not answer lately: do not make every caller wait
        async with self._lock:
            cached = self._by_digest.get(digest)
            if cached is not None:
                return cached
            try:
                async with httpx.AsyncClient(
                    timeout=_FETCH_TIMEOUT_S, verify=tls_context()
                ) as client:
                    reply = await client.get(f"{base_url(state.address)}/object_info")
                reply.raise_for_status()
                definitions: dict[str, Any] = reply.json()
            except (httpx.HTTPError, ValueError) as exc:
                # Not cached: a request after _RETRY_FAILED_S asks again.
                log.warning("cannot read /object_info of %s: %s", state.server_id, exc)
                self._failed_at[digest] = time.monotonic()
                return {}
            if state.capabilities_hash:
                self._by_digest[digest] = definitions
            return definitions

    def models(self) -> dict[str, list[str]]:
        """Model files per folder across the fleet."""
        folders: dict[str, set[str]] = {}
        for state in self.live():
            if state.capabilities is None:
                continue
            for folder, files in state.capabilities.models.items():
                folders.setdefault(folder, set()).update(files)
        return {folder: sorted(files) for folder, files in sorted(folders.items())}

    def system_stats(self) -> dict[str, Any]:
        """`/system_stats`: this gateway's system, and one device per live server."""
        memory = _memory()
        devices = []
        for index, state in enumerate(self.live()):
            caps = state.capabilities
            device = (caps.device if caps else None) or "unknown"
            devices.append(
                {
                    "name": f"{state.server_id}: {device}",
                    "type": device.split(":", 1)[0].split(" ", 1)[0] or "unknown",
                    "index": index,
                    "vram_total": (caps.vram_total if caps else None) or 0,
                    "vram_free": (caps.vram_free if caps else None) or 0,
                    "torch_vram_total": (caps.vram_total if caps else None) or 0,
                    "torch_vram_free": (caps.vram_free if caps else None) or 0,
                }
            )
        system = {
            "os": sys.platform,
            "ram_total": memory[0],
            "ram_free": memory[1],
            "comfyui_version": VERSION,
            "required_frontend_version": "",
            "installed_templates_version": "",
            "required_templates_version": "",
            "python_version": sys.version,
            "pytorch_version": "",
            "embedded_python": False,
            "argv": [platform.node() or "comfyautomate"],
        }
        return {"system": system, "devices": devices}


class FleetRegistry:
    """Node definitions by class, as the ComfyUI validation rules read them."""

    def __init__(self, object_info: dict[str, Any]) -> None:
        self.object_info = object_info
        self._defs: dict[str, NodeDef] = {}

    def get(self, class_type: object) -> NodeDef | None:
        if not isinstance(class_type, str) or class_type not in self.object_info:
            return None
        found = self._defs.get(class_type)
        if found is None:
            found = self._defs[class_type] = NodeDef(class_type, self.object_info[class_type])
        return found

    def input_files(self) -> set[str]:
        """LoadImage's choices on the servers: files already in their input folders."""
        spec = self.object_info.get("LoadImage", {}).get("input", {}).get("required", {})
        choices = spec.get("image", [[]])[0]
        return {c for c in choices if isinstance(c, str)} if isinstance(choices, list) else set()


def _union(first: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """`first` with each choice list extended by `other`'s choices (models differ per server)."""
    merged = copy.deepcopy(first)
    for category in ("required", "optional"):
        mine = merged.get("input", {}).get(category, {})
        theirs = other.get("input", {}).get(category, {})
        for name, spec in mine.items():
            extra = theirs.get(name)
            choices = isinstance(spec, list) and spec and isinstance(spec[0], list)
            if choices and extra and isinstance(extra[0], list):
                spec[0] = spec[0] + [c for c in extra[0] if c not in spec[0]]
    return merged


def _memory() -> tuple[int, int]:
    try:
        pages = os.sysconf("SC_PHYS_PAGES")
        free = os.sysconf("SC_AVPHYS_PAGES")
        size = os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 0, 0
    return pages * size, free * size
