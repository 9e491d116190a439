"""The `local` backend: outputs as plain files under one folder (`<data_dir>/outputs`).

Writes go to a hidden temporary file in the destination folder and are renamed over the key
once complete, so a reader sees the old object or the new one, never half of one. All file
I/O runs in worker threads, a chunk at a time, so the event loop never blocks on the disk.

Content types: derived from the key's extension through the fixed table of `base`, so the
folder stays a plain folder of media files that any static server (or a person) can use. Only
when a caller declares a type that the extension does not imply is it kept in a hidden sidecar
beside the file (`.<name>.content-type`): what was put is what `stat` answers, as with `nats`.
Hidden names cannot collide with keys because `validate_key` refuses hidden segments.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import os
import secrets
import stat as stat_mode
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Callable
from pathlib import Path
from typing import Any, BinaryIO

from gateway.files import fsync_dir
from gateway.storage import (
    CHUNK_SIZE,
    InvalidKey,
    NotFound,
    Storage,
    StorageError,
    StorageFull,
    StoredObject,
    check_content_type,
    guess_content_type,
)

log = logging.getLogger(__name__)

# errno values that mean "no room": disk full, quota exceeded, file larger than allowed.
_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
_SIDECAR_SUFFIX = ".content-type"


def _translate(exc: OSError, key: str, doing: str) -> StorageError:
    """Our error for an OSError met while `doing` something with `key`."""
    if exc.errno in _FULL:
        return StorageFull(f"no space left to store {key!r}: {exc.strerror}")
    if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.EISDIR) and doing != "write":
        return NotFound(f"no object stored under {key!r}")
    if exc.errno == errno.ELOOP:
        return InvalidKey(f"storage key {key!r} names a symbolic link")
    if exc.errno == errno.ENAMETOOLONG:
        return InvalidKey(f"storage key {key!r} is too long for this file system")
    return StorageError(f"cannot {doing} {key!r}: {exc}")


def _sidecar(path: Path) -> Path:
    return path.with_name(f".{path.name}{_SIDECAR_SUFFIX}")


async def _chained(head: list[bytes], rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    for chunk in head:
        yield chunk
    async for chunk in rest:
        yield chunk


def _write_all(file: BinaryIO, digest: hashlib._Hash, data: bytes | bytearray) -> None:
    # Hashing here, in the worker thread, keeps it off the loop too (hashlib drops the GIL).
    digest.update(data)
    file.write(data)


class LocalStorage(Storage):
    """Files under `root`; `url(key)` is `{base_url}/images/{key}`, served by the gateway."""

    def __init__(
        self,
        root: Path | str,
        base_url: str = "",
        *,
        chunk_size: int = CHUNK_SIZE,
        fsync: bool = True,
    ) -> None:
        super().__init__(base_url=base_url)
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        # Every path is checked against the real location of root, symlinks resolved.
        self.root = root.resolve()
        self._chunk_size = chunk_size
        self._fsync = fsync

    def __repr__(self) -> str:
        return f"LocalStorage(root={str(self.root)!r}, base_url={self.base_url!r})"

    # -- paths (called in worker threads: resolving touches the disk) ----------------------------

    def _path(self, key: str) -> Path:
        """The real path of `key`, refused if it leaves root (through a symlink, say)."""
        try:
            real = self.root.joinpath(*key.split("/")).resolve()
        except (OSError, RuntimeError) as exc:
            # Python 3.11 reports a symlink loop as RuntimeError, later versions as OSError.
            raise InvalidKey(f"storage key {key!r} cannot be resolved: {exc}") from exc
        if not real.is_relative_to(self.root) or real == self.root:
            raise InvalidKey(f"storage key {key!r} resolves outside the storage root")
        return real

    def _prepare_target(self, key: str) -> Path:
        target = self._path(key)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _translate(exc, key, "create the folder of") from exc
        # Checked again: a folder created between the first check and mkdir could be a link.
        return self._path(key)

    def _create_temp(self, directory: Path, name: str) -> tuple[Path, BinaryIO]:
        """A new hidden temporary file in `directory` for the object `name`, open for writing.

        A hook for tests, which return a file whose writes fail (`/dev/full`).
        """
        path = directory / f".{name}.{secrets.token_hex(8)}.part"
        # O_EXCL and O_NOFOLLOW: never write through something planted under that name; mode
        # 0o666 lets the umask decide, as for any file the process creates.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666)
        return path, os.fdopen(fd, "wb")

    # -- writing ---------------------------------------------------------------------------------

    async def _put(self, key: str, chunks: AsyncIterable[bytes], content_type: str) -> StoredObject:
        stream = aiter(chunks)
        head: list[bytes] = []
        size = 0
        async for chunk in stream:
            head.append(chunk)
            size += len(chunk)
            if size >= self._chunk_size:
                break
        else:
            # Small objects (most images) are written whole in one thread hop: folder, file,
            # sync and rename, instead of a hop for each.
            work = asyncio.ensure_future(
                asyncio.to_thread(self._put_small, key, b"".join(head), content_type)
            )
            try:
                return await asyncio.shield(work)
            except asyncio.CancelledError:
                # A thread cannot be stopped: let it end before the caller goes on, so that
                # nothing lands in storage after, say, the caller deleted the key.
                await asyncio.wait({work})
                if not work.cancelled() and work.exception() is not None:
                    log.warning("a cancelled write of %r failed: %s", key, work.exception())
                raise
            except OSError as exc:
                raise _translate(exc, key, "write") from exc
        return await self._put_stream(key, _chained(head, stream), content_type)

    def _put_small(self, key: str, data: bytes, content_type: str) -> StoredObject:
        target = self._prepare_target(key)
        temp, file = self._create_temp(target.parent, target.name)
        digest = hashlib.sha256()
        try:
            _write_all(file, digest, data)
            self._commit(file, temp, target, key, content_type)
        except BaseException as exc:
            self._discard(file, temp, exc)
            raise
        return StoredObject(
            key=key, size=len(data), content_type=content_type, sha256=digest.hexdigest()
        )

    async def _put_stream(
        self, key: str, chunks: AsyncIterable[bytes], content_type: str
    ) -> StoredObject:
        target = await asyncio.to_thread(self._prepare_target, key)
        try:
            temp, file = await asyncio.to_thread(self._create_temp, target.parent, target.name)
        except OSError as exc:
            raise _translate(exc, key, "write") from exc
        digest = hashlib.sha256()
        size = 0
        try:
            # Small chunks are gathered so each thread hop writes a useful amount; a big chunk
            # goes straight through without being copied.
            pending = bytearray()
            async for chunk in chunks:
                size += len(chunk)
                if not pending and len(chunk) >= self._chunk_size:
                    await self._in_thread(key, _write_all, file, digest, chunk)
                    continue
                pending += chunk
                if len(pending) >= self._chunk_size:
                    await self._in_thread(key, _write_all, file, digest, pending)
                    pending = bytearray()
            if pending:
                await self._in_thread(key, _write_all, file, digest, pending)
            await self._in_thread(key, self._commit, file, temp, target, key, content_type)
        except BaseException as exc:
            # Also on cancellation and on errors of the caller's iterator (passed on as they
            # are): no temporary file stays behind.
            self._discard(file, temp, exc)
            raise
        return StoredObject(
            key=key, size=size, content_type=content_type, sha256=digest.hexdigest()
        )

    @staticmethod
    async def _in_thread(key: str, func: Callable[..., None], *args: Any) -> None:
        # Only our own file operations are translated; an OSError of the caller's iterator
        # (a dropped download) is not a storage failure and stays what it is.
        try:
            await asyncio.to_thread(func, *args)
        except OSError as exc:
            raise _translate(exc, key, "write") from exc

    def _commit(
        self, file: BinaryIO, temp: Path, target: Path, key: str, content_type: str
    ) -> None:
        file.flush()
        if self._fsync:
            os.fsync(file.fileno())
        file.close()
        sidecar = _sidecar(target)
        if content_type == guess_content_type(key):
            sidecar.unlink(missing_ok=True)
        else:
            side_temp = sidecar.with_name(f"{sidecar.name}.{secrets.token_hex(8)}.part")
            try:
                side_temp.write_text(content_type, encoding="ascii")
                side_temp.replace(sidecar)
            except BaseException:
                side_temp.unlink(missing_ok=True)
                raise
        temp.replace(target)
        if self._fsync:
            fsync_dir(target.parent)

    @staticmethod
    def _discard(file: BinaryIO, temp: Path, cause: BaseException) -> None:
        # Runs on the loop, synchronously, so it also completes when the task is cancelled.
        try:
            file.close()
        except OSError as exc:
            # Closing flushes; on a full disk that fails again. The first error is the story.
            cause.add_note(f"closing the temporary file also failed: {exc}")
        try:
            temp.unlink(missing_ok=True)
        except OSError as exc:
            cause.add_note(f"removing the temporary file {temp} also failed: {exc}")

    # -- reading ---------------------------------------------------------------------------------

    def _open_file(self, key: str, start: int) -> tuple[BinaryIO, int]:
        path = self._path(key)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError as exc:
            raise _translate(exc, key, "read") from exc
        file = os.fdopen(fd, "rb", buffering=0)
        try:
            info = os.fstat(fd)
            if not stat_mode.S_ISREG(info.st_mode):
                raise NotFound(f"no object stored under {key!r} (it is a folder)")
            if start:
                file.seek(start)
        except BaseException:
            file.close()
            raise
        return file, info.st_size

    async def _open(self, key: str, start: int, end: int | None) -> AsyncGenerator[bytes, None]:
        # Holding the open file keeps this version readable even if it is replaced meanwhile.
        file, size = await asyncio.to_thread(self._open_file, key, start)
        try:
            remaining = (size if end is None else min(end, size)) - start
            while remaining > 0:
                try:
                    data = await asyncio.to_thread(file.read, min(self._chunk_size, remaining))
                except OSError as exc:
                    raise _translate(exc, key, "read") from exc
                if not data:
                    raise StorageError(f"{key!r} was truncated while being read")
                remaining -= len(data)
                yield data
        finally:
            file.close()

    def _stat_sync(self, key: str) -> StoredObject:
        path = self._path(key)
        try:
            info = path.stat()
        except OSError as exc:
            raise _translate(exc, key, "stat") from exc
        if not stat_mode.S_ISREG(info.st_mode):
            raise NotFound(f"no object stored under {key!r} (it is a folder)")
        try:
            declared = _sidecar(path).read_text(encoding="ascii").strip()
        except FileNotFoundError:
            content_type = guess_content_type(key)
        except (OSError, UnicodeDecodeError) as exc:
            raise StorageError(f"cannot read the content type of {key!r}: {exc}") from exc
        else:
            content_type = check_content_type(declared)
        return StoredObject(key=key, size=info.st_size, content_type=content_type)

    async def _stat(self, key: str) -> StoredObject:
        return await asyncio.to_thread(self._stat_sync, key)

    # -- deleting --------------------------------------------------------------------------------

    def _delete_sync(self, key: str) -> None:
        path = self._path(key)
        try:
            info = path.lstat()
            if not stat_mode.S_ISREG(info.st_mode):
                raise NotFound(f"no object stored under {key!r} (it is a folder)")
            path.unlink()
            _sidecar(path).unlink(missing_ok=True)
        except OSError as exc:
            raise _translate(exc, key, "delete") from exc
        # Folders of deleted objects stay: removing them would race with a put into the same
        # folder (its temp file would find the folder gone).

    async def _delete(self, key: str) -> None:
        await asyncio.to_thread(self._delete_sync, key)
