"""What only the local backend has: a folder on disk, symlinks, sidecars, temp files."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.storage import InvalidKey, NotFound, StorageFull
from plugins.storage.local import LocalStorage


async def chunks_of(data: bytes, size: int) -> AsyncIterator[bytes]:
    for offset in range(0, len(data), size):
        yield data[offset : offset + size]
        await asyncio.sleep(0)


async def read_all(storage: LocalStorage, key: str) -> bytes:
    return b"".join([chunk async for chunk in storage.open(key)])


def hidden_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob(".*"))


async def test_files_are_plain_files(local_storage: LocalStorage) -> None:
    await local_storage.put("job1/out.png", chunks_of(b"png!", 2))
    root = local_storage.root
    assert (root / "job1" / "out.png").read_bytes() == b"png!"
    # The type follows from the extension: no sidecar, no temporary file left behind.
    assert hidden_files(root) == []


async def test_sidecar_only_for_declared_types(local_storage: LocalStorage) -> None:
    root = local_storage.root
    await local_storage.put("job1/a.bin", chunks_of(b"x", 1), content_type="image/png")
    assert hidden_files(root) == ["job1/.a.bin.content-type"]
    await local_storage.put("job1/a.bin", chunks_of(b"y", 1))
    assert hidden_files(root) == []
    await local_storage.put("job1/b.bin", chunks_of(b"x", 1), content_type="image/png")
    await local_storage.delete("job1/b.bin")
    assert hidden_files(root) == []


async def test_root_is_created(tmp_path: Path) -> None:
    async with LocalStorage(tmp_path / "a" / "b") as storage:
        await storage.put("k/v.txt", chunks_of(b"v", 1))
    assert (tmp_path / "a" / "b" / "k" / "v.txt").read_bytes() == b"v"


async def test_symlinked_folder_pointing_outside_is_refused(
    local_storage: LocalStorage, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_bytes(b"secret")
    (local_storage.root / "job1").symlink_to(outside, target_is_directory=True)

    with pytest.raises(InvalidKey, match="outside the storage root"):
        await local_storage.stat("job1/secret.txt")
    with pytest.raises(InvalidKey, match="outside the storage root"):
        await read_all(local_storage, "job1/secret.txt")
    with pytest.raises(InvalidKey, match="outside the storage root"):
        await local_storage.put("job1/planted.txt", chunks_of(b"evil", 4))
    with pytest.raises(InvalidKey, match="outside the storage root"):
        await local_storage.delete("job1/secret.txt")
    assert sorted(p.name for p in outside.iterdir()) == ["secret.txt"]
    assert (outside / "secret.txt").read_bytes() == b"secret"


async def test_symlinked_file_pointing_outside_is_refused(
    local_storage: LocalStorage, tmp_path: Path
) -> None:
    outside = tmp_path / "passwd"
    outside.write_bytes(b"root:x:0:0")
    (local_storage.root / "job1").mkdir()
    (local_storage.root / "job1" / "out.png").symlink_to(outside)
    with pytest.raises(InvalidKey, match="outside the storage root"):
        await read_all(local_storage, "job1/out.png")
    with pytest.raises(InvalidKey, match="outside the storage root"):
        await local_storage.put("job1/out.png", chunks_of(b"overwrite", 4))
    assert outside.read_bytes() == b"root:x:0:0"


async def test_symlink_inside_root_is_followed(local_storage: LocalStorage) -> None:
    await local_storage.put("real/a.txt", chunks_of(b"inside", 3))
    (local_storage.root / "alias").symlink_to(local_storage.root / "real")
    assert await read_all(local_storage, "alias/a.txt") == b"inside"


async def test_disk_full_is_storage_full(local_full_storage: LocalStorage) -> None:
    await asyncio.wait_for(
        _expect_full(local_full_storage), timeout=5
    )  # ENOSPC must surface at once, not retry
    assert hidden_files(local_full_storage.root) == []


async def _expect_full(storage: LocalStorage) -> None:
    with pytest.raises(StorageFull, match="no space left"):
        await storage.put("job1/video.mp4", chunks_of(os.urandom(1_000_000), 100_000))


async def test_symlink_loop_is_refused(local_storage: LocalStorage) -> None:
    (local_storage.root / "loop").symlink_to(local_storage.root / "loop")
    with pytest.raises(InvalidKey):
        await local_storage.stat("loop/a.png")


async def test_cancelled_put_leaves_nothing(local_storage: LocalStorage) -> None:
    started = asyncio.Event()

    async def endless() -> AsyncIterator[bytes]:
        while True:
            yield b"z" * 65_536
            started.set()
            await asyncio.sleep(0)

    task = asyncio.create_task(local_storage.put("job1/forever.bin", endless()))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert hidden_files(local_storage.root) == []
    with pytest.raises(NotFound):
        await local_storage.stat("job1/forever.bin")


async def test_parent_that_is_a_file(local_storage: LocalStorage) -> None:
    await local_storage.put("job1", chunks_of(b"file", 4))
    with pytest.raises(NotFound):
        await local_storage.stat("job1/child.png")
