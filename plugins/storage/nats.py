"""The `nats` backend: outputs in the JetStream object store (`comfy_outputs`).

Objects are laid out as every NATS client expects (ADR-20): chunks on `$O.<bucket>.C.<nuid>`,
one metadata message per object on `$O.<bucket>.M.<base64url(name)>` (size, chunk count,
SHA-256 digest, headers). The content type is the `Content-Type` header of that metadata, in
Go's `nats.Header` shape (`{"Content-Type": ["image/png"]}`), so the `nats` CLI and Go clients
see it too.

Both directions stream truly, on the event loop, without threads or temporary files:

- put: nats-py's `ObjectStore.put` reads a file-like through `readinto` in the loop's default
  thread pool. Bridging that to an async iterator would park one pool thread per upload while it
  waits for the loop, and a source that itself needs a pool thread (reading a local file, say)
  deadlocks once enough uploads run at once. So chunks are published here, one at a time, each
  awaited until JetStream acknowledges it; memory holds one chunk.
- open: nats-py's `get` subscribes an ordered push consumer, which the server runs ahead of a
  slow reader by a flow-control window (about 24 MB measured). Here each chunk is fetched with a
  direct get of the next message on the object's chunk subject: nothing is fetched before it is
  wanted, and a range read stops as soon as it has its bytes.

A test checks that nats-py reads what this module writes and the other way round.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import json
import logging
import secrets
from collections.abc import AsyncGenerator, AsyncIterable
from datetime import UTC, datetime
from typing import Any, Final

import nats.errors
from nats.aio.client import Client
from nats.js import JetStreamContext, api
from nats.js.errors import APIError, BucketNotFoundError, NotFoundError, ObjectNotFoundError
from nats.js.object_store import (
    OBJ_CHUNKS_PRE_TEMPLATE,
    OBJ_DIGEST_TYPE,
    OBJ_META_PRE_TEMPLATE,
    OBJ_STREAM_TEMPLATE,
    ObjectStore,
)

from gateway.storage import (
    NotFound,
    Storage,
    StorageError,
    StorageFull,
    StoredObject,
    check_content_type,
    guess_content_type,
)

log = logging.getLogger(__name__)

# The object store's default chunk size; well under the 1 MB message limit.
DEFAULT_CHUNK_SIZE: Final = 128 * 1024
# JetStream error codes that mean "no room" (nats-server's errors.json).
_FULL_CODES: Final = frozenset(
    {
        10002,  # resource limits exceeded for account
        10023,  # insufficient resources
        10028,  # insufficient memory resources available
        10047,  # insufficient storage resources available
    }
)
# "stream store failed: {err}"; full when the error is a limit ("maximum bytes exceeded").
_STORE_FAILED: Final = 10077
# How long a failed or cancelled put waits for the acknowledgement of a message already sent.
_SETTLE_S: Final = 5.0
# Per the object store spec, replacing the metadata message drops the older ones of that subject.
_ROLLUP: Final = {api.Header.ROLLUP.value: "sub"}


def _digest_hex(digest: str | None) -> str | None:
    """Hex SHA-256 from the object store's `SHA-256=<base64url>` form, None if absent/odd."""
    if not digest or not digest.upper().startswith(OBJ_DIGEST_TYPE.upper()):
        return None
    try:
        return base64.urlsafe_b64decode(digest[len(OBJ_DIGEST_TYPE) :]).hex()
    except (binascii.Error, ValueError):
        return None


def _content_type(info: api.ObjectInfo) -> str:
    headers: dict[str, Any] = info.headers or {}
    for name, value in headers.items():
        if name.lower() == "content-type":
            # Go writes a list of values; a plain string is accepted from other writers.
            first = value[0] if isinstance(value, list) and value else value
            if isinstance(first, str):
                return check_content_type(first)
    return guess_content_type(info.name)


class NatsStorage(Storage):
    """Objects in a JetStream object store bucket that already exists (see ensure_resources)."""

    def __init__(
        self,
        js: JetStreamContext | Client,
        bucket: str = "comfy_outputs",
        base_url: str = "",
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        super().__init__(base_url=base_url)
        self._js: JetStreamContext = js.jetstream() if isinstance(js, Client) else js
        self.bucket = bucket
        self._stream = OBJ_STREAM_TEMPLATE.format(bucket=bucket)
        self._chunk_size = chunk_size
        self._store: ObjectStore | None = None
        self._direct = True

    def __repr__(self) -> str:
        return f"NatsStorage(bucket={self.bucket!r}, base_url={self.base_url!r})"

    async def _object_store(self) -> ObjectStore:
        # Looked up on first use, not in __init__, so a backend can be built before connecting.
        if self._store is None:
            try:
                store = await self._js.object_store(self.bucket)
                info = await self._js.stream_info(self._stream)
            except BucketNotFoundError as exc:
                raise StorageError(
                    f"object store bucket {self.bucket!r} does not exist; it is created by "
                    "gateway.bus.connection.ensure_resources (or `nats object add`)"
                ) from exc
            except nats.errors.Error as exc:
                raise StorageError(f"cannot reach object store {self.bucket!r}: {exc!r}") from exc
            # Buckets made by the NATS clients allow direct gets; fall back to the API otherwise.
            self._direct = bool(info.config.allow_direct)
            self._store = store
        return self._store

    def _error(self, exc: Exception, key: str, doing: str) -> StorageError:
        if isinstance(exc, ObjectNotFoundError):
            return NotFound(f"no object stored under {key!r}")
        if isinstance(exc, APIError) and (
            exc.err_code in _FULL_CODES
            or (exc.err_code == _STORE_FAILED and "exceeded" in (exc.description or ""))
        ):
            return StorageFull(
                f"object store {self.bucket!r} is full, cannot store {key!r}: {exc.description}"
            )
        return StorageError(f"cannot {doing} {key!r} in bucket {self.bucket!r}: {exc!r}")

    # -- writing ---------------------------------------------------------------------------------

    async def _put(self, key: str, chunks: AsyncIterable[bytes], content_type: str) -> StoredObject:
        store = await self._object_store()
        try:
            previous: api.ObjectInfo | None = await store.get_info(key)
        except ObjectNotFoundError:
            previous = None
        except nats.errors.Error as exc:
            raise self._error(exc, key, "store") from exc

        # A fresh chunk subject per version: readers of the old version keep reading theirs
        # until the new metadata message switches the key over.
        nuid = secrets.token_hex(11)
        chunk_subject = OBJ_CHUNKS_PRE_TEMPLATE.format(bucket=self.bucket, obj=nuid)
        digest = hashlib.sha256()
        size = 0
        count = 0
        in_flight: asyncio.Future[api.PubAck] | None = None
        meta: asyncio.Future[api.PubAck] | None = None
        try:
            async with contextlib.aclosing(self._rechunk(chunks)) as pieces:
                async for piece in pieces:
                    digest.update(piece)
                    in_flight = self._publish(chunk_subject, piece)
                    await asyncio.shield(in_flight)
                    size += len(piece)
                    count += 1
            info = api.ObjectInfo(
                name=key,
                bucket=self.bucket,
                nuid=nuid,
                size=size,
                chunks=count,
                mtime=datetime.now(UTC).isoformat(),
                digest=OBJ_DIGEST_TYPE + base64.urlsafe_b64encode(digest.digest()).decode(),
                headers={"Content-Type": [content_type]},
                options=api.ObjectMetaOptions(max_chunk_size=self._chunk_size),
            )
            in_flight = meta = self._publish(
                self._meta_subject(key), json.dumps(info.as_dict()).encode(), dict(_ROLLUP)
            )
            await asyncio.shield(meta)
        except BaseException as exc:
            # A cancelled wait does not unsend a message: let the one in flight land first, or
            # the purge could overtake it. If it was the metadata, the new version is complete.
            landed = in_flight is not None and await self._settle(in_flight)
            if landed and in_flight is meta:
                await self._purge_previous(key, previous)
            else:
                # Chunks of an unfinished version would only take space.
                await self._purge(chunk_subject, exc)
            if isinstance(exc, nats.errors.Error):
                raise self._error(exc, key, "store") from exc
            raise
        await self._purge_previous(key, previous)
        return StoredObject(
            key=key, size=size, content_type=content_type, sha256=digest.hexdigest()
        )

    def _publish(
        self, subject: str, payload: bytes, headers: dict[str, str] | None = None
    ) -> asyncio.Future[api.PubAck]:
        # A task, so that a cancelled put can still wait for the acknowledgement (see _settle).
        return asyncio.ensure_future(
            self._js.publish(subject, payload, stream=self._stream, headers=headers)
        )

    @staticmethod
    async def _settle(publish: asyncio.Future[api.PubAck]) -> bool:
        """Wait (bounded) for a publish already sent; True if JetStream stored it."""
        if not publish.done():
            await asyncio.wait([publish], timeout=_SETTLE_S)
        if not publish.done():
            publish.cancel()
            return False
        # Reading the exception marks it retrieved; the caller reports the original error.
        return not publish.cancelled() and publish.exception() is None

    async def _purge_previous(self, key: str, previous: api.ObjectInfo | None) -> None:
        if previous is None or not previous.nuid:
            return
        old = OBJ_CHUNKS_PRE_TEMPLATE.format(bucket=self.bucket, obj=previous.nuid)
        try:
            await self._js.purge_stream(self._stream, subject=old)
        except nats.errors.Error as exc:
            # The new version is stored and visible; failing the put now would tell the
            # caller otherwise. The old chunks only take space until the bucket is cleaned.
            log.warning("stored %r but could not purge its previous chunks: %r", key, exc)

    async def _rechunk(self, chunks: AsyncIterable[bytes]) -> AsyncGenerator[bytes, None]:
        """Re-cut the caller's chunks, whatever their sizes, into full object-store chunks."""
        size = self._chunk_size
        pending = bytearray()
        async for chunk in chunks:
            # A view, so a caller's huge chunk is cut into pieces without being copied whole.
            view = memoryview(chunk)
            if pending:
                room = size - len(pending)
                pending += view[:room]
                view = view[room:]
                if len(pending) < size:
                    continue
                yield bytes(pending)
                pending = bytearray()
            while len(view) >= size:
                yield bytes(view[:size])
                view = view[size:]
            pending += view
        if pending:
            yield bytes(pending)

    async def _purge(self, subject: str, cause: BaseException) -> None:
        try:
            await self._js.purge_stream(self._stream, subject=subject)
        except (nats.errors.Error, OSError) as exc:
            cause.add_note(f"removing the chunks already stored also failed: {exc!r}")

    def _meta_subject(self, key: str) -> str:
        encoded = base64.urlsafe_b64encode(key.encode()).decode()
        return OBJ_META_PRE_TEMPLATE.format(bucket=self.bucket, obj=encoded)

    # -- reading ---------------------------------------------------------------------------------

    async def _info(self, key: str) -> api.ObjectInfo:
        store = await self._object_store()
        try:
            info = await store.get_info(key)
        except nats.errors.Error as exc:
            raise self._error(exc, key, "read") from exc
        if info.is_link():
            raise StorageError(f"{key!r} is an object store link; links are not supported")
        return info

    async def _stat(self, key: str) -> StoredObject:
        info = await self._info(key)
        return StoredObject(
            key=key,
            size=info.size or 0,
            content_type=_content_type(info),
            sha256=_digest_hex(info.digest),
        )

    async def _open(self, key: str, start: int, end: int | None) -> AsyncGenerator[bytes, None]:
        info = await self._info(key)
        size = info.size or 0
        stop = size if end is None else min(end, size)
        if start >= stop:
            return
        subject = OBJ_CHUNKS_PRE_TEMPLATE.format(bucket=self.bucket, obj=info.nuid)
        # The digest covers the whole object, so it can only be checked on a full read.
        digest = hashlib.sha256() if start == 0 and stop == size else None
        offset = 0
        seq = 1
        while offset < stop:
            try:
                msg = await self._js.get_msg(
                    self._stream, seq=seq, subject=subject, next=True, direct=self._direct
                )
            except NotFoundError as exc:
                raise StorageError(
                    f"{key!r} was replaced or deleted while being read "
                    f"({offset} of {size} bytes read)"
                ) from exc
            except nats.errors.Error as exc:
                raise self._error(exc, key, "read") from exc
            data = msg.data or b""
            seq = (msg.seq or seq) + 1
            if digest is not None:
                digest.update(data)
            begin = offset
            offset += len(data)
            if offset <= start:
                continue
            if begin >= start and offset <= stop:
                yield data
            else:
                yield data[max(start - begin, 0) : stop - begin]
        if digest is not None and digest.hexdigest() != _digest_hex(info.digest):
            raise StorageError(f"{key!r} is corrupt: its SHA-256 does not match its metadata")

    # -- deleting --------------------------------------------------------------------------------

    async def _delete(self, key: str) -> None:
        store = await self._object_store()
        try:
            await store.delete(key)
        except nats.errors.Error as exc:
            raise self._error(exc, key, "delete") from exc
