"""What only the nats backend has: compatibility with other NATS clients, a missing bucket."""

from __future__ import annotations

import asyncio
import hashlib
import io
from collections.abc import AsyncIterator

import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext, api

from gateway.storage import NotFound, StorageError
from plugins.storage.nats import NatsStorage


async def chunks_of(data: bytes, size: int) -> AsyncIterator[bytes]:
    for offset in range(0, len(data), size):
        yield data[offset : offset + size]
        await asyncio.sleep(0)


async def read_all(storage: NatsStorage, key: str) -> bytes:
    return b"".join([chunk async for chunk in storage.open(key)])


async def test_nats_py_reads_what_we_write(nats_storage: NatsStorage, js: JetStreamContext) -> None:
    data = bytes(range(256)) * 2000
    await nats_storage.put("job1/out.webp", chunks_of(data, 10_000))
    store = await js.object_store("comfy_outputs")
    sink = io.BytesIO()
    # nats-py checks the SHA-256 digest of the metadata against the chunks it reads.
    result = await store.get("job1/out.webp", writeinto=sink)
    assert sink.getvalue() == data
    assert result.info.headers == {"Content-Type": ["image/webp"]}
    assert result.info.size == len(data)
    assert result.info.chunks == -(-len(data) // (128 * 1024))


async def test_we_read_what_nats_py_writes(nats_storage: NatsStorage, js: JetStreamContext) -> None:
    data = b"written by another client " * 20_000
    store = await js.object_store("comfy_outputs")
    meta = api.ObjectMeta(name="job2/clip.mp4", headers={"Content-Type": ["video/x-custom"]})
    await store.put("job2/clip.mp4", data, meta=meta)
    info = await nats_storage.stat("job2/clip.mp4")
    assert (info.size, info.content_type) == (len(data), "video/x-custom")
    assert info.sha256 == hashlib.sha256(data).hexdigest()
    assert await read_all(nats_storage, "job2/clip.mp4") == data
    # No header at all: the type comes from the extension.
    await store.put("job2/plain.mp4", b"mp4")
    assert (await nats_storage.stat("job2/plain.mp4")).content_type == "video/mp4"


async def test_overwrite_drops_old_chunks(nats_storage: NatsStorage, js: JetStreamContext) -> None:
    await nats_storage.put("job1/a.bin", chunks_of(b"a" * 500_000, 50_000))
    await nats_storage.put("job1/a.bin", chunks_of(b"b" * 1000, 500))
    await nats_storage.delete("job1/a.bin")
    state = (await js.stream_info("OBJ_comfy_outputs")).state
    # Only the metadata message marking the deletion remains.
    assert state.messages == 1


async def test_failed_put_leaves_no_chunks(nats_storage: NatsStorage, js: JetStreamContext) -> None:
    async def broken() -> AsyncIterator[bytes]:
        yield b"x" * 400_000
        raise ConnectionResetError("upstream closed")

    with pytest.raises(ConnectionResetError):
        await nats_storage.put("job1/broken.bin", broken())
    assert (await js.stream_info("OBJ_comfy_outputs")).state.messages == 0


async def test_replaced_while_reading(nats_storage: NatsStorage) -> None:
    await nats_storage.put("job1/v.bin", chunks_of(b"1" * 600_000, 100_000))
    reader = nats_storage.open("job1/v.bin")
    first = await anext(reader)
    assert first == b"1" * len(first)
    await nats_storage.put("job1/v.bin", chunks_of(b"2" * 600_000, 100_000))
    with pytest.raises(StorageError, match="replaced or deleted while being read"):
        async for _chunk in reader:
            pass


async def test_missing_bucket_is_a_clear_error(js: JetStreamContext) -> None:
    storage = NatsStorage(js, bucket="no_such_bucket")
    with pytest.raises(StorageError, match="bucket 'no_such_bucket' does not exist"):
        await storage.stat("job1/a.png")


async def test_accepts_a_client(nc: Client, js: JetStreamContext) -> None:
    async with NatsStorage(nc) as storage:
        await storage.put("job1/c.txt", chunks_of(b"via client", 3))
        assert await read_all(storage, "job1/c.txt") == b"via client"
        with pytest.raises(NotFound):
            await storage.stat("job1/other.txt")


async def test_bucket_without_direct_get(js: JetStreamContext) -> None:
    # A bucket made by a tool that did not enable direct gets: reads go through the API.
    await js.add_stream(
        api.StreamConfig(
            name="OBJ_nodirect",
            subjects=["$O.nodirect.C.>", "$O.nodirect.M.>"],
            discard=api.DiscardPolicy.NEW,
            allow_rollup_hdrs=True,
            allow_direct=False,
        )
    )
    data = bytes(range(256)) * 3000
    async with NatsStorage(js, bucket="nodirect") as storage:
        await storage.put("job1/a.bin", chunks_of(data, 50_000))
        assert await read_all(storage, "job1/a.bin") == data
        ranged = [c async for c in storage.open("job1/a.bin", start=200_000, end=400_000)]
        assert b"".join(ranged) == data[200_000:400_000]


async def test_failed_put_leaves_no_chunks_after_cancel(
    nats_storage: NatsStorage, js: JetStreamContext
) -> None:
    started = asyncio.Event()

    async def endless() -> AsyncIterator[bytes]:
        while True:
            yield b"z" * 200_000
            started.set()

    task = asyncio.create_task(nats_storage.put("job1/forever.bin", endless()))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (await js.stream_info("OBJ_comfy_outputs")).state.messages == 0
