"""A job's input files: fetched from where the request says, uploaded to ComfyUI, renamed.

A JobInput comes as base64, as a key of the storage backend, or as an http(s) URL. Each is
spooled (memory up to 1 MB, then a temporary file) with a size limit, uploaded with
/upload/image into the attempt's own folder (inputfiles.py: cleared when the attempt ends), and
every workflow input naming it is rewritten to the name ComfyUI gave it there.

A URL is fetched only from public addresses unless an allowlist says otherwise: the adapter
sits next to ComfyUI and often inside a private network, so a job must not make it read
loopback, link-local (cloud metadata), private or multicast addresses. The host is resolved
here, every address it has is checked (gateway/comfyui/addresses.py), and the connection goes
to the checked address (a second lookup could answer differently). Redirects are followed one
by one, each checked alike.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import tempfile
from collections.abc import AsyncIterable, Iterable
from pathlib import PurePosixPath
from typing import IO, Any, Final
from urllib.parse import urljoin

import httpx

from gateway.bus.contract import Job, JobInput
from gateway.comfyui.addresses import Allowlist, IPAddress, host_key, kind_of, pinned, resolve
from gateway.comfyui.jobfiles import without_annotation
from gateway.comfyui.tls import tls_context
from gateway.comfyui.workflow import apply_overrides
from gateway.storage import Storage, StorageError, guess_content_type
from plugins.comfyui.client import ComfyClient
from plugins.comfyui.inputfiles import JobFiles

log = logging.getLogger(__name__)

_SPOOL_IN_MEMORY = 1024 * 1024
_MAX_REDIRECTS: Final = 5
_REDIRECTS: Final = frozenset({301, 302, 303, 307, 308})
_DEFAULT_PORTS: Final = {"http": 80, "https": 443}


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


async def _checked_addresses(url: httpx.URL, allowlist: Allowlist, what: str) -> list[IPAddress]:
    """Every address of the host of `url`, once each passed the check."""
    host = url.raw_host.decode("ascii")
    port = url.port or _DEFAULT_PORTS[url.scheme]
    try:
        addresses = await resolve(host, port)
    except OSError as exc:
        raise InputProblem(f"{what}: cannot resolve host {host!r}: {exc}") from exc
    if not addresses:
        raise InputProblem(f"{what}: host {host!r} has no address")
    for address in addresses:
        kind = kind_of(address)
        if kind is not None and not allowlist.allows(host, address):
            shown = host if host_key(host) == str(address) else f"{host} ({address})"
            raise InputProblem(
                f"{what}: host {shown} is refused ({kind} address): URL inputs are fetched from "
                "public addresses only, unless the setting url_input_allowlist names the host "
                "or its network"
            )
    return addresses


async def _from_url(
    item: JobInput, file: IO[bytes], limit: int, time_limit: float, allowlist: Allowlist
) -> None:
    what = f"input {item.name!r} ({item.value})"
    try:
        url = httpx.URL(item.value)
    except httpx.InvalidURL as exc:
        raise InputProblem(f"{what}: not a valid URL: {exc}") from exc
    try:
        # Proxies from the environment are ignored: the address checked must be the one reached.
        async with httpx.AsyncClient(
            timeout=time_limit, trust_env=False, verify=tls_context(trust_env=False)
        ) as http:
            for _ in range(_MAX_REDIRECTS + 1):
                if url.scheme not in _DEFAULT_PORTS or not url.host:
                    raise InputProblem(f"{what}: only http and https URLs can be fetched ({url})")
                async with asyncio.timeout(time_limit):
                    addresses = await _checked_addresses(url, allowlist, what)
                redirect = await _fetch(http, url, addresses, file, limit, what)
                if redirect is None:
                    return
                url = redirect
            raise InputProblem(f"{what}: more than {_MAX_REDIRECTS} redirects")
    except httpx.HTTPError as exc:
        raise InputProblem(f"{what}: download failed: {type(exc).__name__} {exc}") from exc
    except TimeoutError as exc:
        raise InputProblem(f"{what}: resolving the host took over {time_limit:g} s") from exc


async def _fetch(
    http: httpx.AsyncClient,
    url: httpx.URL,
    addresses: list[IPAddress],
    file: IO[bytes],
    limit: int,
    what: str,
) -> httpx.URL | None:
    """Save what `url` holds into `file`, trying its checked addresses in turn.

    Returns where it redirects to instead, or None once saved.
    """
    for index, address in enumerate(addresses):
        target, headers, extensions = pinned(url, address)
        try:
            async with http.stream("GET", target, headers=headers, extensions=extensions) as reply:
                location = reply.headers.get("location")
                if reply.status_code in _REDIRECTS and location:
                    return httpx.URL(urljoin(str(url), location))
                await _save(reply, file, limit, what)
                return None
        except httpx.ConnectError:
            if index == len(addresses) - 1:
                raise
    raise AssertionError("unreachable: a host has at least one address")


async def _save(response: httpx.Response, file: IO[bytes], limit: int, what: str) -> None:
    if response.status_code != 200:
        raise InputProblem(f"{what}: the server answered HTTP {response.status_code}")
    declared = response.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise InputProblem(f"{what} is larger than the limit of {limit} bytes")
    await _copy(response.aiter_bytes(), file, limit, what)


def upload_name(name: str) -> str:
    """The file name to upload under: the last path segment without a folder annotation
    ("x.png [input]" names x.png for ComfyUI), never hidden or empty."""
    base = PurePosixPath(without_annotation(name).replace("\\", "/")).name.lstrip(".")
    return base or "input.png"


async def upload_inputs(
    client: ComfyClient,
    storage: Storage,
    inputs: list[JobInput],
    *,
    files: JobFiles,
    max_bytes: int,
    url_timeout: float,
    url_allowlist: Iterable[str] = (),
) -> dict[str, str]:
    """Upload every input into `files`' folder; return {name in the workflow: name ComfyUI
    knows it by}. `files` learns each name before its upload, to clear it whatever happens.

    `url_allowlist` names the hosts and networks besides public ones that URLs may point at.
    """
    allowlist = Allowlist(url_allowlist)
    renames: dict[str, str] = {}
    for item in inputs:
        with _spool() as file:
            if item.source == "base64":
                await _from_base64(item, file, max_bytes)
            elif item.source == "key":
                await _from_storage(item, file, storage, max_bytes)
            else:
                await _from_url(item, file, max_bytes, url_timeout, allowlist)
            name = upload_name(item.name)
            content_type = item.content_type or guess_content_type(name)
            files.expect(name)
            result = await client.upload_image(name, file, content_type, subfolder=files.folder)
            files.uploaded(result)
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
    files: JobFiles,
    max_bytes: int,
    url_timeout: float,
    url_allowlist: Iterable[str] = (),
) -> dict[str, Any]:
    """The workflow to submit: overrides applied, inputs uploaded and renamed.

    Overrides go first, so an override may name an input file of the request too.
    Raises WorkflowError (bad overrides) or InputProblem (an input cannot be had).
    """
    request = job.request
    workflow = apply_overrides(request.workflow, request.overrides)
    renames = await upload_inputs(
        client,
        storage,
        request.inputs,
        files=files,
        max_bytes=max_bytes,
        url_timeout=url_timeout,
        url_allowlist=url_allowlist,
    )
    return rename_inputs(workflow, renames)
