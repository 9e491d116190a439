"""A job's input files: fetched from where the request says, uploaded to ComfyUI, renamed.

A JobInput comes as base64, as a key of the storage backend, or as an http(s) URL. Each is
spooled (memory up to 1 MB, then a temporary file) with a size limit, uploaded with
/upload/image, and every workflow input naming it is rewritten to the name ComfyUI gave it.
"""

from __future__ import annotations

import base64
import binascii
import logging
import tempfile
from collections.abc import AsyncIterable
from pathlib import PurePosixPath
from typing import IO, Any

import httpx

from gateway.contract import Job, JobInput
from gateway.workflow import apply_overrides
from plugins.comfyui.client import ComfyClient
from plugins.storage.base import Storage, StorageError, guess_content_type

log = logging.getLogger(__name__)

_SPOOL_IN_MEMORY = 1024 * 1024


class InputProblem(Exception):
    """An input file cannot be obtained; the message says which and why, in plain words."""


def _spool() -> IO[bytes]:
    return tempfile.SpooledTemporaryFile(max_size=_SPOOL_IN_MEMORY)


async def _copy(chunks: AsyncIterable[bytes], file: IO[bytes], limit: int, what: str) -> int:
    size = 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise InputProblem(f"{what} is larger than the limit of {limit} bytes")
        file.write(chunk)
    file.seek(0)
    return size


async def _from_base64(item: JobInput, file: IO[bytes], limit: int) -> None:
    if len(item.value) * 3 // 4 > limit + 3:
        raise InputProblem(f"input {item.name!r} is larger than the limit of {limit} bytes")
    try:
        file.write(base64.b64decode(item.value, validate=True))
    except (binascii.Error, ValueError) as exc:
        raise InputProblem(f"input {item.name!r} is not valid base64: {exc}") from exc
    file.seek(0)


async def _from_storage(item: JobInput, file: IO[bytes], storage: Storage, limit: int) -> None:
    try:
        await _copy(storage.open(item.value), file, limit, f"input {item.name!r}")
    except StorageError as exc:
        raise InputProblem(f"input {item.name!r}: cannot read key {item.value!r}: {exc}") from exc


async def _from_url(item: JobInput, file: IO[bytes], limit: int, time_limit: float) -> None:
    if not item.value.lower().startswith(("http://", "https://")):
        raise InputProblem(f"input {item.name!r}: only http and https URLs can be fetched")
    what = f"input {item.name!r} ({item.value})"
    try:
        async with (
            httpx.AsyncClient(timeout=time_limit, follow_redirects=True, max_redirects=5) as http,
            http.stream("GET", item.value) as response,
        ):
            if response.status_code != 200:
                raise InputProblem(f"{what}: the server answered HTTP {response.status_code}")
            declared = response.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > limit:
                raise InputProblem(f"{what} is larger than the limit of {limit} bytes")
            await _copy(response.aiter_bytes(), file, limit, what)
    except httpx.HTTPError as exc:
        raise InputProblem(f"{what}: download failed: {type(exc).__name__} {exc}") from exc


def upload_name(name: str) -> str:
    """The file name to upload under: the last path segment, never hidden or empty."""
    base = PurePosixPath(name.replace("\\", "/")).name.lstrip(".")
    return base or "input.png"


async def upload_inputs(
    client: ComfyClient,
    storage: Storage,
    inputs: list[JobInput],
    *,
    max_bytes: int,
    url_timeout: float,
) -> dict[str, str]:
    """Upload every input; return {name in the workflow: name ComfyUI knows it by}."""
    renames: dict[str, str] = {}
    for item in inputs:
        with _spool() as file:
            if item.source == "base64":
                await _from_base64(item, file, max_bytes)
            elif item.source == "key":
                await _from_storage(item, file, storage, max_bytes)
            else:
                await _from_url(item, file, max_bytes, url_timeout)
            name = upload_name(item.name)
            content_type = item.content_type or guess_content_type(name)
            result = await client.upload_image(name, file, content_type)
        renames[item.name] = result.reference
        log.info("uploaded input %r as %r", item.name, result.reference)
    return renames


def rename_inputs(workflow: dict[str, Any], renames: dict[str, str]) -> dict[str, Any]:
    """`workflow` with every string input equal to a key of `renames` replaced (in place)."""
    if not renames:
        return workflow
    for node in workflow.values():
        inputs = node.get("inputs") if isinstance(node, dict) else None
        if not isinstance(inputs, dict):
            continue
        for input_name, value in inputs.items():
            if isinstance(value, str) and value in renames:
                inputs[input_name] = renames[value]
    return workflow


async def prepare_workflow(
    client: ComfyClient,
    storage: Storage,
    job: Job,
    *,
    max_bytes: int,
    url_timeout: float,
) -> dict[str, Any]:
    """The workflow to submit: overrides applied, inputs uploaded and renamed.

    Overrides go first, so an override may name an input file of the request too.
    Raises WorkflowError (bad overrides) or InputProblem (an input cannot be had).
    """
    request = job.request
    workflow = apply_overrides(request.workflow, request.overrides)
    renames = await upload_inputs(
        client, storage, request.inputs, max_bytes=max_bytes, url_timeout=url_timeout
    )
    return rename_inputs(workflow, renames)
