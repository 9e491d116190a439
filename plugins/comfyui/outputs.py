"""A prompt's output files: named by `executed` messages and its history, streamed from /view
into storage.

Every list in a node's output object whose items carry {filename, subfolder, type} is a file:
`images` (SaveImage, PreviewImage), `gifs`/`video` (video nodes), `audio`, `3d`, and whatever a
custom node names its list. Files are copied chunk by chunk, never whole in memory: a video can
be gigabytes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import msgspec

from gateway.bus.contract import OutputFile
from gateway.bus.retry import ELECTION_S, pauses, transient
from gateway.comfyui.outputs import stored_name, websocket_image_name
from gateway.storage import (
    CHUNK_SIZE,
    DEFAULT_CONTENT_TYPE,
    InvalidContentType,
    NotFound,
    Storage,
    StorageError,
    check_content_type,
    guess_content_type,
)
from plugins.comfyui.client import ComfyClient, ComfyUnavailable

log = logging.getLogger(__name__)

_TRIES = 3
_EARLY_AT_ONCE = 4


class OutputRef(msgspec.Struct, frozen=True, kw_only=True):
    """One file a node produced, as ComfyUI names it."""

    node_id: str
    kind: str
    filename: str
    subfolder: str = ""
    type: str = "output"
    index: int = 0


def _is_file(item: Any) -> bool:
    return (
        isinstance(item, dict)
        and isinstance(item.get("filename"), str)
        and bool(item["filename"])
        and "type" in item
    )


def output_files(outputs: dict[str, dict[str, Any]]) -> list[OutputRef]:
    """Every file named in a history's `outputs`, in node order."""
    refs: list[OutputRef] = []
    for node_id, output in outputs.items():
        if not isinstance(output, dict):
            continue
        index = 0
        for kind, items in output.items():
            if not isinstance(items, list):
                continue
            for item in items:
                if _is_file(item):
                    refs.append(
                        OutputRef(
                            node_id=node_id,
                            kind=kind,
                            filename=item["filename"],
                            subfolder=str(item.get("subfolder") or ""),
                            type=str(item.get("type") or "output"),
                            index=index,
                        )
                    )
                    index += 1
    return refs


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
    """Stream one file from ComfyUI into storage under `key`; retried on transient errors.

    ComfyUI not answering is tried a few times; a storage on NATS electing a leader is waited
    for as long as an election takes (the file is read from ComfyUI again each time).
    """
    failures = 0
    backoff = pauses()
    deadline = time.monotonic() + ELECTION_S
    while True:
        try:
            async with client.view(ref.filename, ref.subfolder, ref.type) as response:
                content_type = _content_type(response.headers.get("content-type"), key)
                stored = await storage.put(
                    key, response.aiter_bytes(CHUNK_SIZE), content_type=content_type
                )
        except (ComfyUnavailable, httpx.TransportError) as exc:
            failures += 1
            if failures == _TRIES:
                raise ComfyUnavailable(
                    f"could not fetch {ref.filename} from ComfyUI: {exc}"
                ) from exc
            log.warning("fetching %s failed; retrying", ref.filename, exc_info=True)
            await asyncio.sleep(0.2 * 2 ** (failures - 1))
            continue
        except StorageError as exc:
            if not transient(exc.__cause__ or exc) or time.monotonic() > deadline:
                raise
            log.warning("storing %s: %s; retrying while NATS elects a leader", key, exc)
            await asyncio.sleep(backoff.next())
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
            index=ref.index,
        )


class OutputSaver:
    """Stores one prompt's output files: each as soon as ComfyUI reports it, the rest at the end.

    A node's `executed` message names its files once they are written, so they can be copied
    while later nodes run and while the history is fetched. The history decides in the end
    (`finish`): what it names and was not copied yet is copied then, and a file copied early
    under another key than the history order gives it is copied again under that key. Every
    key written is remembered, so that what is not an output in the end can be deleted.
    """

    def __init__(self, client: ComfyClient, storage: Storage, job_id: str) -> None:
        self._client = client
        self._storage = storage
        self._job_id = job_id
        self._early: dict[tuple[str, str, str, str], asyncio.Task[OutputFile]] = {}
        self._websocket: list[OutputFile] = []  # images sent over the websocket, stored
        self._websocket_failure: StorageError | None = None
        self._websocket_sent: dict[str, int] = {}  # images each node sent so far
        self._taken: set[str] = set()
        self._written: set[str] = set()  # keys this prompt's copies may have written
        # A node with many files should not open as many downloads at once.
        self._slots = asyncio.Semaphore(_EARLY_AT_ONCE)

    def early(self, node_id: str, output: dict[str, Any]) -> None:
        """Start copying the files of one node's `executed` output."""
        for ref in output_files({node_id: output}):
            key = output_key(self._job_id, ref, self._taken)
            ident = (ref.filename, ref.subfolder, ref.type, key)
            if ident not in self._early:
                self._written.add(key)
                self._early[ident] = asyncio.create_task(
                    self._store_early(ref, key), name=f"output-{key}"
                )

    async def _store_early(self, ref: OutputRef, key: str) -> OutputFile:
        async with self._slots:
            return await store_output(self._client, self._storage, ref, key)

    async def websocket_image(
        self, node_id: str, content_type: str, frame: bytes, offset: int
    ) -> OutputFile | None:
        """Store the image in `frame[offset:]` that `node_id` sent over the websocket.

        Awaited before the next frame is read, so at most one frame is held. A failure is
        logged and kept for `finish`, which raises it: the job's outputs would be incomplete.
        """
        index = self._websocket_sent.get(node_id, 0)
        self._websocket_sent[node_id] = index + 1
        key = f"{self._job_id}/{websocket_image_name(node_id, index, content_type)}"
        self._taken.add(key)
        self._written.add(key)
        try:
            stored = await self._storage.put(
                key, _chunks(memoryview(frame)[offset:]), content_type=content_type
            )
        except StorageError as exc:
            log.error("job %s: could not store an image of node %s: %s", self._job_id, node_id, exc)
            self._websocket_failure = self._websocket_failure or exc
            return None
        output = OutputFile(
            node_id=node_id,
            filename=key.rsplit("/", 1)[-1],
            key=stored.key,
            size=stored.size,
            content_type=stored.content_type,
            url=self._storage.url(stored.key),
            index=index,
            source="websocket",
        )
        self._websocket.append(output)
        return output

    async def finish(self, outputs: dict[str, dict[str, Any]]) -> list[OutputFile]:
        """Every file of the history's `outputs`, stored, in node order, then the images
        sent over the websocket in the order they came.

        On failure the caller calls `discard`, which also takes back what this stored.
        """
        if self._websocket_failure is not None:
            raise self._websocket_failure
        taken: set[str] = {output.key for output in self._websocket}
        stored: list[OutputFile] = []
        for ref in output_files(outputs):
            key = output_key(self._job_id, ref, taken)
            task = self._early.pop((ref.filename, ref.subfolder, ref.type, key), None)
            if task is None:
                self._written.add(key)
                stored.append(await store_output(self._client, self._storage, ref, key))
            else:
                done = await task
                stored.append(
                    msgspec.structs.replace(
                        done, node_id=ref.node_id, kind=ref.kind, index=ref.index
                    )
                )
        stored += self._websocket
        # Copied early but not in the history: not an output after all. A key the history
        # uses is kept, even if an early copy of another file had it first.
        await self._take_back(keep={output.key for output in stored})
        return stored

    async def discard(self) -> None:
        """Stop early copies and delete everything stored: the prompt did not succeed."""
        await self._take_back(keep=set())

    async def abandon(self) -> None:
        """Stop early copies and delete nothing: the attempt was superseded, and a later one
        may have stored its outputs under the same keys."""
        await self._settle()
        self._written.clear()

    def cancel(self) -> None:
        """Stop early copies without waiting (the run itself is being cancelled)."""
        for task in self._early.values():
            task.cancel()

    async def _settle(self) -> None:
        """Cancel the early copies still running and wait until each has ended.

        A storage write that cannot be interrupted (a thread) finishes first, so nothing is
        written after this returns.
        """
        tasks = list(self._early.values())
        self._early.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _take_back(self, keep: set[str]) -> None:
        await self._settle()
        # What is kept stays this attempt's: a job cancelled after its outputs were stored
        # still has them deleted.
        unused, self._written = sorted(self._written - keep), self._written & keep
        for key in unused:
            try:
                await self._storage.delete(key)
            except NotFound:
                pass  # the copy never got as far as storing it
            except StorageError as exc:
                log.warning("could not delete the unused output %s: %s", key, exc)


async def _chunks(data: memoryview) -> AsyncIterator[bytes]:
    for start in range(0, len(data), CHUNK_SIZE):
        yield bytes(data[start : start + CHUNK_SIZE])
