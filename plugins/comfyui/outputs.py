"""A finished prompt's output files: found in its history, streamed from /view into storage.

Every list in a node's output object whose items carry {filename, subfolder, type} is a file:
`images` (SaveImage, PreviewImage), `gifs`/`video` (video nodes), `audio`, `3d`, and whatever a
custom node names its list. Files are copied chunk by chunk, never whole in memory: a video can
be gigabytes.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import httpx
import msgspec

from gateway.contract import OutputFile
from plugins.comfyui.client import ComfyClient, ComfyUnavailable
from plugins.storage.base import (
    CHUNK_SIZE,
    DEFAULT_CONTENT_TYPE,
    InvalidContentType,
    Storage,
    check_content_type,
    guess_content_type,
)

log = logging.getLogger(__name__)

_TRIES = 3


class OutputRef(msgspec.Struct, frozen=True, kw_only=True):
    """One file a node produced, as ComfyUI names it."""

    node_id: str
    kind: str
    filename: str
    subfolder: str = ""
    type: str = "output"


def _is_file(item: Any) -> bool:
    return (
        isinstance(item, dict)
        and isinstance(item.get("filename"), str)
        and bool(item["filename"])
        and "type" in item
    )


def output_files(outputs: dict[str, dict[str, Any]]) -> list[OutputRef]:
    """Every file named in a history's `outputs`, in node order."""
    return [
        OutputRef(
            node_id=node_id,
            kind=kind,
            filename=item["filename"],
            subfolder=str(item.get("subfolder") or ""),
            type=str(item.get("type") or "output"),
        )
        for node_id, output in outputs.items()
        if isinstance(output, dict)
        for kind, items in output.items()
        if isinstance(items, list)
        for item in items
        if _is_file(item)
    ]


def stored_name(filename: str, subfolder: str = "", folder: str = "output") -> str:
    """The name a ComfyUI output is stored under in its job's folder (before clashes).

    ComfyUI tells files apart by folder type, subfolder and name; all three go into the name
    (`temp~ComfyUI_temp_x_00001_.png`, `sub~a_00001_.png`) so that files which differ only in
    the first two do not collide. The gateway names files with this too, before they are stored.
    """
    # A storage key segment may not be hidden or hold a slash; ComfyUI names are plain anyway.
    name = filename.replace("\\", "/").rsplit("/", 1)[-1].lstrip(".") or "output"
    parts = [] if folder == "output" else [folder]
    parts += [p.lstrip(".") for p in subfolder.replace("\\", "/").split("/")]
    parts = [p for p in parts if p]
    return "~".join([*parts, name])


def output_key(job_id: str, ref: OutputRef, taken: set[str]) -> str:
    """`<job_id>/<stored name>`, or `<job_id>/<node_id>-<name>` if two outputs share a name.

    Only the very same file reported by two nodes gets the second form.
    """
    name = stored_name(ref.filename, ref.subfolder, ref.type)
    key = f"{job_id}/{name}"
    if key in taken:
        key = f"{job_id}/{ref.node_id}-{name}"
        counter = 1
        while key in taken:
            counter += 1
            key = f"{job_id}/{ref.node_id}-{counter}-{name}"
    taken.add(key)
    return key


def _content_type(header: str | None, key: str) -> str:
    if header:
        value = header.split(";", 1)[0].strip()
        if value and value != DEFAULT_CONTENT_TYPE:
            try:
                return check_content_type(value)
            except InvalidContentType:
                log.warning("ComfyUI sent an unusable content type %r for %s", header, key)
    return guess_content_type(key)


async def store_output(
    client: ComfyClient, storage: Storage, ref: OutputRef, key: str
) -> OutputFile:
    """Stream one file from ComfyUI into storage under `key`; retried on transient errors."""
    for attempt in range(_TRIES):
        try:
            async with client.view(ref.filename, ref.subfolder, ref.type) as response:
                content_type = _content_type(response.headers.get("content-type"), key)
                stored = await storage.put(
                    key, response.aiter_bytes(CHUNK_SIZE), content_type=content_type
                )
        except (ComfyUnavailable, httpx.TransportError) as exc:
            if attempt + 1 == _TRIES:
                raise ComfyUnavailable(
                    f"could not fetch {ref.filename} from ComfyUI: {exc}"
                ) from exc
            log.warning("fetching %s failed; retrying", ref.filename, exc_info=True)
            await asyncio.sleep(0.2 * 2**attempt)
            continue
        return OutputFile(
            node_id=ref.node_id,
            filename=ref.filename,
            key=stored.key,
            size=stored.size,
            content_type=stored.content_type,
            url=storage.url(stored.key),
            kind=ref.kind,
            type=ref.type,
        )
    raise AssertionError("unreachable")  # pragma: no cover


async def store_outputs(
    client: ComfyClient, storage: Storage, job_id: str, outputs: dict[str, dict[str, Any]]
) -> list[OutputFile]:
    """Store every output file of a history's `outputs`, one after the other."""
    taken: set[str] = set()
    return [
        await store_output(client, storage, ref, output_key(job_id, ref, taken))
        for ref in output_files(outputs)
    ]
