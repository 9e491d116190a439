"""Files uploaded through `/upload/image`: kept in storage, so they follow a job to any server.

A single ComfyUI keeps uploads in its input folder; here each caller has a folder in storage
(`uploads/<caller>/<type>/<subfolder>/<name>`). When a prompt names an uploaded file (LoadImage's
`image` is "name.png" or "subfolder/name.png"), the job carries it as an input, and the adapter
uploads it to whichever server runs the job.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import AsyncIterator
from pathlib import PurePosixPath
from typing import Any, Final

from gateway.bus.contract import JobInput
from gateway.storage import InvalidKey, NotFound, Storage, validate_key

UPLOADS: Final = "uploads"
FOLDERS: Final = ("input", "temp", "output")
_ANNOTATION = re.compile(r"^(.*?) \[(input|output|temp)\]$")
_MAX_NAME_TRIES: Final = 1000


class BadUpload(ValueError):
    """An upload ComfyUI would refuse with a 400 and an empty body."""


def caller_folder(caller: str) -> str:
    """The folder under `uploads/` that holds a caller's uploads."""
    return caller.replace(":", "-")


def upload_key(caller: str, folder: str, subfolder: str, name: str) -> str:
    """The storage key of an uploaded file; InvalidKey/BadUpload for names that escape."""
    if folder not in FOLDERS:
        raise BadUpload(f"unknown upload type {folder!r}")
    parts = [UPLOADS, caller_folder(caller), folder]
    sub = subfolder.strip("/")
    if sub:
        parts.append(sub)
    parts.append(name)
    return validate_key("/".join(parts))


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def _stored_digest(storage: Storage, key: str) -> str | None:
    try:
        stored = await storage.stat(key)
    except NotFound:
        return None
    if stored.sha256:
        return stored.sha256
    hasher = hashlib.sha256()
    async for chunk in storage.open(key):
        hasher.update(chunk)
    return hasher.hexdigest()


async def _one(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def save_upload(
    storage: Storage,
    caller: str,
    filename: str,
    data: bytes,
    *,
    folder: str = "input",
    subfolder: str = "",
    overwrite: bool = False,
    content_type: str | None = None,
) -> dict[str, str]:
    """Store an upload with ComfyUI's naming rules; the `{name, subfolder, type}` answer."""
    name = PurePosixPath(filename.replace("\\", "/")).name
    if not name or name.startswith("."):
        raise BadUpload(f"unusable file name {filename!r}")
    stem, dot, suffix = name.rpartition(".")
    if not dot:
        stem, suffix = name, ""
    digest = _digest(data)
    try:
        candidate = name
        for attempt in range(1, _MAX_NAME_TRIES + 1):
            key = upload_key(caller, folder, subfolder, candidate)
            existing = None if overwrite else await _stored_digest(storage, key)
            if existing is None or existing == digest:
                if existing is None:
                    await storage.put(key, _one(data), content_type=content_type)
                return {"name": candidate, "subfolder": subfolder, "type": folder}
            # Same name, other content: ComfyUI picks "name (1).png", "name (2).png", ...
            candidate = f"{stem} ({attempt}){dot}{suffix}"
    except InvalidKey as exc:
        raise BadUpload(str(exc)) from None
    raise BadUpload(f"too many files named like {name!r}")


def _file_reference(value: str) -> tuple[str, str]:
    """(folder, "subfolder/name") of a LoadImage-style value such as "a.png [input]"."""
    match = _ANNOTATION.match(value)
    if match:
        return match.group(2), match.group(1)
    return "input", value


def _candidates(prompt: dict[str, Any]) -> set[str]:
    """String inputs that could name a file: short, one line, with an extension."""
    found: set[str] = set()
    for node in prompt.values():
        inputs = node.get("inputs") if isinstance(node, dict) else None
        if not isinstance(inputs, dict):
            continue
        for value in inputs.values():
            if (
                isinstance(value, str)
                and 0 < len(value) < 512
                and "\n" not in value
                and "." in value.rsplit("/", 1)[-1]
            ):
                found.add(value)
    return found


async def uploads_in(storage: Storage, caller: str, prompt: dict[str, Any]) -> list[JobInput]:
    """The caller's uploaded files the prompt names, as inputs for its job."""
    inputs = []
    for value in sorted(_candidates(prompt)):
        folder, reference = _file_reference(value)
        subfolder, _, name = reference.rpartition("/")
        try:
            key = upload_key(caller, folder, subfolder, name)
            await storage.stat(key)
        except (InvalidKey, BadUpload, NotFound):
            continue
        inputs.append(JobInput(name=value, source="key", value=key))
    return inputs
