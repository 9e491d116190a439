"""Files uploaded through `/upload/image`: kept in storage, so they follow a job to any server.

A single ComfyUI keeps uploads in its input folder; here each caller has a folder in storage
(`uploads/<caller>/<type>/<subfolder>/<name>`). When a prompt names an uploaded file (LoadImage's
`image` is "name.png" or "subfolder/name.png"), the job carries it as an input, and the adapter
uploads it to whichever server runs the job.
"""

from __future__ import annotations

import hashlib
import logging
import re
import unicodedata
from collections.abc import AsyncIterator
from pathlib import PurePosixPath
from typing import Any, Final

from gateway.bus.contract import JobInput
from gateway.comfyui.jobfiles import JOB_FILES, names_job_files
from gateway.storage import (
    MAX_SEGMENT_BYTES,
    InvalidKey,
    NotFound,
    Storage,
    StorageError,
    StorageFull,
    validate_key,
)

log = logging.getLogger(__name__)

UPLOADS: Final = "uploads"
FOLDERS: Final = ("input", "temp", "output")
# A file name is one path segment of every storage backend, whose file systems allow 255 bytes.
MAX_NAME_BYTES: Final = MAX_SEGMENT_BYTES
MAX_SUBFOLDER_BYTES: Final = MAX_SEGMENT_BYTES
_ANNOTATION = re.compile(r"^(.*?) \[(input|output|temp)\]$")
_MAX_NAME_TRIES: Final = 1000


class BadUpload(ValueError):
    """An upload or a file name refused with a 400; the message says what to change."""


def _has_control(text: str) -> bool:
    return any(unicodedata.category(char) in ("Cc", "Cs") for char in text)


def check_name(name: str) -> str:
    """`name` if it can name an uploaded or stored file by itself, else BadUpload."""
    if not name:
        raise BadUpload("the file has no name")
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        raise BadUpload(f"file name too long (max {MAX_NAME_BYTES} bytes in UTF-8)")
    if _has_control(name):
        raise BadUpload("the file name holds control characters")
    if "/" in name or "\\" in name:
        raise BadUpload(f"the file name {name!r} holds a path; give the folder as subfolder")
    if name.startswith("."):
        raise BadUpload(f"file names may not start with '.': {name!r}")
    return name


def check_subfolder(subfolder: str) -> str:
    """`subfolder` without a trailing '/', if it stays inside its folder, else BadUpload."""
    if len(subfolder.encode("utf-8", "surrogatepass")) > MAX_SUBFOLDER_BYTES:
        raise BadUpload(f"subfolder too long (max {MAX_SUBFOLDER_BYTES} bytes in UTF-8)")
    if _has_control(subfolder):
        raise BadUpload("the subfolder holds control characters")
    if subfolder.startswith("/") or "\\" in subfolder:
        raise BadUpload(
            f"subfolder {subfolder!r} must be a relative path with '/' between its folders"
        )
    sub = subfolder.rstrip("/")
    for segment in sub.split("/") if sub else ():
        if segment in ("", ".", ".."):
            raise BadUpload(f"subfolder {subfolder!r} may not hold '..', '.' or '//'")
        if segment.startswith("."):
            raise BadUpload(f"subfolder {subfolder!r}: folder names may not start with '.'")
    if names_job_files(sub):
        # A prompt naming such a file is refused at submit (jobfiles.py): refuse it here first.
        raise BadUpload(f"subfolder {subfolder!r}: {JOB_FILES}/ holds jobs' own input files")
    return sub


def caller_folder(caller: str) -> str:
    """The folder under `uploads/` that holds a caller's uploads: its id, which is a safe path
    segment (names, `key-<hex>`, `anonymous`: see gateway/api/auth.py)."""
    return caller


def upload_key(caller: str, folder: str, subfolder: str, name: str) -> str:
    """The storage key of an uploaded file; BadUpload for a type, folder or name refused."""
    if folder not in FOLDERS:
        raise BadUpload(f"unknown upload type {folder!r}: one of {', '.join(FOLDERS)}")
    parts = [UPLOADS, caller_folder(caller), folder]
    sub = check_subfolder(subfolder)
    if sub:
        parts.append(sub)
    parts.append(check_name(name))
    try:
        return validate_key("/".join(parts))
    except InvalidKey as exc:
        raise BadUpload(str(exc)) from None


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
) -> dict[str, str]:
    """Store an upload with ComfyUI's naming rules; the `{name, subfolder, type}` answer.

    A file name with a path (some browsers send one) keeps its last part. The type the client
    declared is not kept: a file is served as what its bytes are (gateway.api.served).
    """
    name = check_name(PurePosixPath(filename.replace("\\", "/")).name)
    stem, dot, suffix = name.rpartition(".")
    if not dot:
        stem, suffix = name, ""
    digest = _digest(data)
    candidate = name
    for attempt in range(1, _MAX_NAME_TRIES + 1):
        key = upload_key(caller, folder, subfolder, candidate)
        existing = None if overwrite else await _stored_digest(storage, key)
        if existing is None or existing == digest:
            if existing is None:
                await _put(storage, key, data)
            return {"name": candidate, "subfolder": subfolder, "type": folder}
        # Same name, other content: ComfyUI picks "name (1).png", "name (2).png", ...
        candidate = f"{stem} ({attempt}){dot}{suffix}"
    raise BadUpload(f"too many files named like {name!r}")


async def _put(storage: Storage, key: str, data: bytes) -> None:
    """Store an upload; BadUpload when its name cannot be stored where it was asked to be."""
    try:
        await storage.put(key, _one(data))
    except InvalidKey as exc:
        raise BadUpload(str(exc)) from None
    except StorageFull:
        raise
    except StorageError as exc:
        # Uploads name their own folders: a file where a folder is wanted (or the reverse) is
        # the one way a valid key cannot be written on a file system. What the backend said
        # (with its own paths) goes to the log, not to the client.
        log.warning("an upload could not be stored under %r: %s", key, exc)
        name = key.rsplit("/", 1)[-1]
        raise BadUpload(
            f"{name!r} cannot be stored in that subfolder: a file and a folder there would share "
            "a name; choose another name or subfolder"
        ) from None


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
        except (BadUpload, NotFound):
            continue
        inputs.append(JobInput(name=value, source="key", value=key))
    return inputs
