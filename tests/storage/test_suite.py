"""The storage contract, written once and run against every backend (fixture `storage`)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import tracemalloc
from collections.abc import AsyncIterator, Iterable

import pytest

from gateway.storage import (
    InvalidContentType,
    InvalidKey,
    NotFound,
    Storage,
    StorageError,
    StorageFull,
)


async def chunks_of(data: bytes, sizes: Iterable[int]) -> AsyncIterator[bytes]:
    """Yield `data` cut at the given sizes (cycled), the way a download arrives."""
    sizes = list(sizes)
    offset = 0
    index = 0
    while offset < len(data):
        size = sizes[index % len(sizes)]
        yield data[offset : offset + size]
        offset += size
        index += 1
        await asyncio.sleep(0)


async def read_all(storage: Storage, key: str, start: int = 0, end: int | None = None) -> bytes:
    return b"".join([chunk async for chunk in storage.open(key, start=start, end=end)])


def random_bytes(size: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)


# --- round trips ----------------------------------------------------------------------------


async def test_round_trip_many_uneven_chunks(storage: Storage) -> None:
    data = random_bytes(1_000_003)
    # Empty, tiny, odd and larger-than-a-backend-chunk pieces.
    stored = await storage.put(
        "job1/out.png", chunks_of(data, [0, 1, 7, 4096, 300_001, 65_536]), content_type=None
    )
    assert stored.key == "job1/out.png"
    assert stored.size == len(data)
    assert stored.sha256 == hashlib.sha256(data).hexdigest()
    assert await read_all(storage, "job1/out.png") == data
    info = await storage.stat("job1/out.png")
    assert (info.key, info.size, info.content_type) == ("job1/out.png", len(data), "image/png")
    assert info.sha256 in (None, stored.sha256)


async def test_one_huge_chunk(storage: Storage) -> None:
    data = random_bytes(3 * 1024 * 1024 + 5)
    stored = await storage.put("job1/one.bin", chunks_of(data, [len(data)]))
    assert stored.size == len(data)
    assert await read_all(storage, "job1/one.bin") == data


async def test_empty_object(storage: Storage) -> None:
    stored = await storage.put("job1/empty.txt", chunks_of(b"", [1]))
    assert stored.size == 0
    assert stored.sha256 == hashlib.sha256(b"").hexdigest()
    assert await read_all(storage, "job1/empty.txt") == b""
    assert (await storage.stat("job1/empty.txt")).size == 0


async def test_chunks_are_bounded(storage: Storage) -> None:
    data = random_bytes(2_000_000)
    await storage.put("job1/big.bin", chunks_of(data, [len(data)]))
    sizes = [len(chunk) async for chunk in storage.open("job1/big.bin")]
    assert sum(sizes) == len(data)
    assert max(sizes) <= 1024 * 1024


async def test_overwrite_replaces_data_and_type(storage: Storage) -> None:
    await storage.put("job1/a.bin", chunks_of(b"first version, longer", [5]))
    await storage.put("job1/a.bin", chunks_of(b"second", [2]), content_type="text/plain")
    assert await read_all(storage, "job1/a.bin") == b"second"
    info = await storage.stat("job1/a.bin")
    assert (info.size, info.content_type) == (6, "text/plain")
    # Back to the type the extension implies.
    await storage.put("job1/a.bin", chunks_of(b"third", [5]))
    assert (await storage.stat("job1/a.bin")).content_type == "application/octet-stream"


async def test_keys_are_independent(storage: Storage) -> None:
    await asyncio.gather(
        *(storage.put(f"job{i}/x.bin", chunks_of(bytes([i]) * 1000, [100])) for i in range(5))
    )
    for i in range(5):
        assert await read_all(storage, f"job{i}/x.bin") == bytes([i]) * 1000


@pytest.mark.parametrize("error", [RuntimeError, ConnectionResetError])
async def test_failing_source_keeps_previous_object(
    storage: Storage, error: type[Exception]
) -> None:
    await storage.put("job1/keep.bin", chunks_of(b"old", [3]))

    async def broken() -> AsyncIterator[bytes]:
        yield b"x" * 500_000
        raise error("download dropped")

    # The source's own error comes through unchanged, even an OSError.
    with pytest.raises(error, match="download dropped"):
        await storage.put("job1/keep.bin", broken())
    assert await read_all(storage, "job1/keep.bin") == b"old"
    with pytest.raises(error):
        await storage.put("job1/new.bin", broken())
    with pytest.raises(NotFound):
        await storage.stat("job1/new.bin")


async def test_cancelled_put_leaves_no_object(storage: Storage) -> None:
    await storage.put("job1/old.bin", chunks_of(b"old", [3]))
    started = asyncio.Event()

    async def endless() -> AsyncIterator[bytes]:
        while True:
            yield b"z" * 65_536
            started.set()
            await asyncio.sleep(0)

    for key in ("job1/forever.bin", "job1/old.bin"):
        task = asyncio.create_task(storage.put(key, endless()))
        await started.wait()
        started.clear()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    with pytest.raises(NotFound):
        await storage.stat("job1/forever.bin")
    assert await read_all(storage, "job1/old.bin") == b"old"


# --- content types --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "declared", "expected"),
    [
        ("j/a.png", None, "image/png"),
        ("j/a.JPG", None, "image/jpeg"),
        ("j/a.webp", None, "image/webp"),
        ("j/a.mp4", None, "video/mp4"),
        ("j/a.webm", None, "video/webm"),
        ("j/a.latent", None, "application/octet-stream"),
        ("j/noext", None, "application/octet-stream"),
        ("j/a.tar.gz", None, "application/octet-stream"),
        ("j/a.bin", "image/png", "image/png"),
        ("j/a.png", "image/png", "image/png"),
        ("j/a.txt", "text/plain; charset=utf-8", "text/plain; charset=utf-8"),
    ],
)
async def test_content_types(
    storage: Storage, key: str, declared: str | None, expected: str
) -> None:
    stored = await storage.put(key, chunks_of(b"data", [4]), content_type=declared)
    assert stored.content_type == expected
    assert (await storage.stat(key)).content_type == expected


@pytest.mark.parametrize("bad", ["image/png\r\nX-Evil: 1", "png", "/", "a/b\x00", "x" * 300])
async def test_content_type_refused(storage: Storage, bad: str) -> None:
    with pytest.raises(InvalidContentType):
        await storage.put("j/a.png", chunks_of(b"data", [4]), content_type=bad)


# --- ranges ---------------------------------------------------------------------------------

RANGE_DATA = random_bytes(700_001, seed=7)


@pytest.mark.parametrize(
    ("start", "end"),
    [
        (0, 10),
        (5, 300_000),
        (131_000, 131_100),  # across the nats chunk boundary (128 KiB)
        (262_100, 262_200),  # across the local read size (256 KiB)
        (131_072, 262_144),  # exactly one nats chunk
        (600_000, None),  # open-ended
        (0, None),
        (699_990, 800_000),  # end past the end: cut at the size
        (700_000, 700_001),  # the last byte
        (700_001, None),  # start at the end: nothing
        (800_000, 900_000),  # entirely past the end: nothing
        (10, 10),  # empty range
    ],
)
async def test_range_reads(storage: Storage, start: int, end: int | None) -> None:
    await storage.put("job1/range.bin", chunks_of(RANGE_DATA, [65_536, 1000]))
    assert await read_all(storage, "job1/range.bin", start, end) == RANGE_DATA[start:end]


@pytest.mark.parametrize(("start", "end"), [(-1, None), (10, 5)])
async def test_bad_ranges_refused(storage: Storage, start: int, end: int | None) -> None:
    await storage.put("job1/r.bin", chunks_of(b"0123456789", [10]))
    with pytest.raises(ValueError, match="range"):
        storage.open("job1/r.bin", start=start, end=end)


async def test_reader_can_stop_early(storage: Storage) -> None:
    await storage.put("job1/s.bin", chunks_of(random_bytes(1_000_000), [100_000]))
    async with contextlib.aclosing(storage.open("job1/s.bin")) as reader:
        async for _chunk in reader:
            break
    # The storage still works after an abandoned read.
    assert len(await read_all(storage, "job1/s.bin")) == 1_000_000


# --- missing and deleted --------------------------------------------------------------------


async def test_missing_key(storage: Storage) -> None:
    with pytest.raises(NotFound):
        await storage.stat("job1/nothing.png")
    with pytest.raises(NotFound):
        await read_all(storage, "job1/nothing.png")
    with pytest.raises(NotFound):
        await storage.delete("job1/nothing.png")


async def test_delete_then_not_found(storage: Storage) -> None:
    await storage.put("job1/d.png", chunks_of(b"png bytes", [3]), content_type="image/x-odd")
    await storage.delete("job1/d.png")
    with pytest.raises(NotFound):
        await storage.stat("job1/d.png")
    with pytest.raises(NotFound):
        await read_all(storage, "job1/d.png")
    with pytest.raises(NotFound):
        await storage.delete("job1/d.png")
    # The key can be used again, and gets the type of its new content.
    await storage.put("job1/d.png", chunks_of(b"again", [5]))
    info = await storage.stat("job1/d.png")
    assert (info.size, info.content_type) == (5, "image/png")


async def test_folder_is_not_an_object(storage: Storage) -> None:
    await storage.put("job1/sub/x.png", chunks_of(b"x", [1]))
    with pytest.raises(NotFound):
        await storage.stat("job1/sub")
    with pytest.raises(NotFound):
        await storage.stat("job1")


# --- keys and URLs --------------------------------------------------------------------------

UNICODE_KEY = "job-ü/Ünïcödé 画像 🎨 (1).png"


async def test_unicode_file_names(storage: Storage) -> None:
    await storage.put(UNICODE_KEY, chunks_of(b"pixels", [2]))
    assert await read_all(storage, UNICODE_KEY) == b"pixels"
    assert (await storage.stat(UNICODE_KEY)).content_type == "image/png"
    assert storage.url(UNICODE_KEY) == (
        "http://gw.example:8000/images/job-%C3%BC/"
        "%C3%9Cn%C3%AFc%C3%B6d%C3%A9%20%E7%94%BB%E5%83%8F%20%F0%9F%8E%A8%20%281%29.png"
    )
    await storage.delete(UNICODE_KEY)


BAD_KEYS = [
    ("../x", "'..'"),
    ("/etc/passwd", "absolute"),
    ("a/../../b", "'..'"),
    ("a/./b", "'.'"),
    ("a\\b", "backslash"),
    ("a//b", "empty segment"),
    ("a/b/", "empty segment"),
    ("", "empty"),
    ("a/b\x00.png", "NUL"),
    ("a/b\n.png", "control"),
    ("a/\x7f", "control"),
    ("a/.hidden", "hidden"),
    ("a/" + "x" * 1100, "too long"),
    ("a/" + "y" * 256, "longer than 255"),
]


@pytest.mark.parametrize(("key", "problem"), BAD_KEYS, ids=[repr(k[:20]) for k, _ in BAD_KEYS])
async def test_bad_keys_refused_everywhere(storage: Storage, key: str, problem: str) -> None:
    with pytest.raises(InvalidKey, match=problem):
        await storage.put(key, chunks_of(b"x", [1]))
    with pytest.raises(InvalidKey, match=problem):
        storage.open(key)
    with pytest.raises(InvalidKey, match=problem):
        await storage.stat(key)
    with pytest.raises(InvalidKey, match=problem):
        await storage.delete(key)
    with pytest.raises(InvalidKey, match=problem):
        storage.url(key)


def test_url_shape(storage: Storage) -> None:
    assert storage.url("job1/out 1.png") == "http://gw.example:8000/images/job1/out%201.png"
    assert storage.url("job1/a#b?.png") == "http://gw.example:8000/images/job1/a%23b%3F.png"
    storage.base_url = ""
    assert storage.url("job1/out.png") == "/images/job1/out.png"


# --- limits and lifecycle -------------------------------------------------------------------


async def test_full_storage_fails_clearly(full_storage: Storage) -> None:
    data = random_bytes(2 * 1024 * 1024)
    async with asyncio.timeout(10):  # a full disk must fail, never hang
        with pytest.raises(StorageFull, match=r"full|space"):
            await full_storage.put("job1/video.mp4", chunks_of(data, [65_536]))
    with pytest.raises(NotFound):
        await full_storage.stat("job1/video.mp4")


async def test_closed_storage_refuses(storage: Storage) -> None:
    await storage.close()
    await storage.close()
    with pytest.raises(StorageError, match="closed"):
        await storage.stat("job1/a.png")
    with pytest.raises(StorageError, match="closed"):
        await storage.put("job1/a.png", chunks_of(b"x", [1]))


async def test_large_object_streams_in_flat_memory(storage: Storage) -> None:
    total = 50 * 1024 * 1024
    piece = 64 * 1024
    expected = hashlib.sha256()

    async def generated() -> AsyncIterator[bytes]:
        rng = random.Random(42)
        for _ in range(total // piece):
            chunk = rng.randbytes(piece)
            expected.update(chunk)
            yield chunk

    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        stored = await storage.put("job1/video.mp4", generated())
        put_peak = tracemalloc.get_traced_memory()[1] - baseline
        tracemalloc.reset_peak()
        baseline = tracemalloc.get_traced_memory()[0]
        actual = hashlib.sha256()
        size = 0
        async for chunk in storage.open("job1/video.mp4"):
            actual.update(chunk)
            size += len(chunk)
        read_peak = tracemalloc.get_traced_memory()[1] - baseline
    finally:
        tracemalloc.stop()
    assert stored.size == size == total
    assert stored.sha256 == actual.hexdigest() == expected.hexdigest()
    assert (await storage.stat("job1/video.mp4")).size == total
    limit = 20 * 1024 * 1024
    assert put_peak < limit, f"put peaked at {put_peak / 2**20:.1f} MiB"
    assert read_peak < limit, f"read peaked at {read_peak / 2**20:.1f} MiB"
