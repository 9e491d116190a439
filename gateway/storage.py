"""The storage protocol: one small abstract class that every backend subclasses.

Exception tree (everything a backend raises on purpose is a StorageError; errors of the libraries
underneath are translated at the backend's boundary with `raise ... from exc`):

    StorageError
    ├── NotFound             no object under that key
    ├── InvalidKey           the key could leave its backend or is not a plain relative path
    ├── InvalidContentType   the content type would corrupt an HTTP or NATS header
    ├── StorageFull          disk, quota or bucket limit reached: fail now, never hang
    └── UnknownBackend       no backend of that name is installed (registry)

Public methods here do the bookkeeping (key validation, content type, closed state) and call
small private hooks that backends implement, so a third-party backend cannot forget a check.
"""

from __future__ import annotations

import abc
import mimetypes
import re
import unicodedata
from collections.abc import AsyncGenerator, AsyncIterable
from types import TracebackType
from typing import Final, Self
from urllib.parse import quote

import msgspec


class StorageError(Exception):
    """Base of every error a storage backend raises."""


class NotFound(StorageError):
    """No object is stored under the key."""


class InvalidKey(StorageError, ValueError):
    """The key is refused; the message names the problem."""


class InvalidContentType(StorageError, ValueError):
    """The content type is not a plain `type/subtype` header value."""


class StorageFull(StorageError):
    """The backend has no room left (disk full, quota, bucket max_bytes)."""


class UnknownBackend(StorageError, LookupError):
    """No storage backend of that name is installed."""


# Keys must fit in every backend: 1024 bytes is S3's limit too, 255 bytes per segment is the
# usual file-name limit (NAME_MAX) of local file systems.
MAX_KEY_BYTES: Final = 1024
MAX_SEGMENT_BYTES: Final = 255
DEFAULT_CONTENT_TYPE: Final = "application/octet-stream"
# Reading and writing move data in pieces of this size: large enough that per-chunk overhead
# (a thread hop, a NATS request) stays small, small enough that memory stays flat.
CHUNK_SIZE: Final = 256 * 1024


class StoredObject(msgspec.Struct, frozen=True, kw_only=True):
    """What is stored under a key. `sha256` (hex) is given when the backend knows it cheaply."""

    key: str
    size: int
    content_type: str
    sha256: str | None = None


def validate_key(key: str) -> str:
    """Return `key` if it is a safe relative POSIX path (`<job_id>/<filename>`), else raise.

    Refused: empty keys, absolute paths, backslashes, control characters (NUL included), empty,
    `.` and `..` segments, segments starting with a dot (hidden names are reserved for the
    backends' own temporary and sidecar files), keys over 1024 bytes or segments over 255 bytes
    (UTF-8).
    """
    if not isinstance(key, str):
        raise InvalidKey(f"storage key must be a string, not {type(key).__name__}")
    if not key:
        raise InvalidKey("storage key is empty")
    shown = repr(key[:80]) + ("..." if len(key) > 80 else "")
    if len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        raise InvalidKey(f"storage key {shown} is too long: more than {MAX_KEY_BYTES} bytes")
    if "\x00" in key:
        raise InvalidKey(f"storage key {shown} contains a NUL character")
    if any(unicodedata.category(ch) in ("Cc", "Cs") for ch in key):
        raise InvalidKey(f"storage key {shown} contains a control character")
    if "\\" in key:
        raise InvalidKey(f"storage key {shown} contains a backslash; use '/' between segments")
    if key.startswith("/"):
        raise InvalidKey(f"storage key {shown} is an absolute path; keys are relative")
    for segment in key.split("/"):
        if not segment:
            raise InvalidKey(f"storage key {shown} has an empty segment ('//' or a trailing '/')")
        if segment == "..":
            raise InvalidKey(f"storage key {shown} has a '..' segment")
        if segment == ".":
            raise InvalidKey(f"storage key {shown} has a '.' segment")
        if segment.startswith("."):
            raise InvalidKey(f"storage key {shown} has a hidden segment {segment!r}")
        if len(segment.encode("utf-8")) > MAX_SEGMENT_BYTES:
            raise InvalidKey(
                f"storage key {shown} has a segment longer than {MAX_SEGMENT_BYTES} bytes"
            )
    return key


# A fixed table instead of the module-level `mimetypes` functions, which also read
# /etc/mime.types: the same key must get the same type on every machine of the fleet.
_MIME: Final = mimetypes.MimeTypes()
_EXTRA_TYPES: Final = {
    ".webp": "image/webp",
    ".avif": "image/avif",
    ".wav": "audio/wav",
    ".flac": "audio/flac",
    ".ogg": "audio/ogg",
    ".mkv": "video/x-matroska",
    ".glb": "model/gltf-binary",
    ".gltf": "model/gltf+json",
}
_CONTENT_TYPE_RE: Final = re.compile(r"^[A-Za-z0-9!#$&^_.+-]+/[A-Za-z0-9!#$&^_.+-]+(;[ -~]*)?$")


def guess_content_type(key: str) -> str:
    """The content type a key's extension implies, from a built-in table; octet-stream if none."""
    name = key.rsplit("/", 1)[-1].lower()
    dot = name.rfind(".")
    if dot > 0 and name[dot:] in _EXTRA_TYPES:
        return _EXTRA_TYPES[name[dot:]]
    guessed, encoding = _MIME.guess_type(name, strict=False)
    # A compressed file (x.tar.gz) is served as what it is on the wire, not what it unpacks to.
    if guessed is None or encoding is not None:
        return DEFAULT_CONTENT_TYPE
    return guessed


def check_content_type(content_type: str) -> str:
    """Return `content_type` if it is a plain header value (`type/subtype; params`), else raise."""
    if len(content_type) > 255 or not _CONTENT_TYPE_RE.match(content_type):
        raise InvalidContentType(f"content type {content_type[:80]!r} is not type/subtype")
    return content_type


def check_range(start: int, end: int | None) -> None:
    """Refuse a byte range that no object could satisfy (negative, or end before start)."""
    if start < 0:
        raise ValueError(f"range start {start} is negative")
    if end is not None and end < start:
        raise ValueError(f"range end {end} is before its start {start}")


class Storage(abc.ABC):
    """A place to stream job outputs to and from, by key.

    Subclasses implement `_put`, `_open`, `_stat`, `_delete` and, if they own resources,
    `_close`; they receive keys already validated. `url` has a default (the gateway's
    `/images/{key}` route) that a backend serving its own URLs (S3 presigned, say) overrides.
    """

    def __init__(self, *, base_url: str = "") -> None:
        # The gateway's public address, e.g. "https://gw.example.com"; "" gives root-relative URLs.
        self.base_url = base_url.rstrip("/")
        self._closed = False

    # -- public API ---------------------------------------------------------------------------

    async def put(
        self,
        key: str,
        chunks: AsyncIterable[bytes],
        *,
        content_type: str | None = None,
    ) -> StoredObject:
        """Store the chunks under `key`, replacing what was there once everything is written.

        The data is streamed: a backend holds a bounded amount in memory whatever the total.
        `content_type` defaults to what the key's extension implies. A failure leaves the
        previous object (or nothing) in place.
        """
        self._check_open()
        validate_key(key)
        kind = check_content_type(content_type or guess_content_type(key))
        return await self._put(key, chunks, kind)

    def open(
        self, key: str, *, start: int = 0, end: int | None = None
    ) -> AsyncGenerator[bytes, None]:
        """Stream the bytes of `key` from offset `start` up to `end` (exclusive, like a slice).

        `end=None` reads to the end; a range past the end is cut at the object's size (so it may
        yield nothing). An HTTP `Range: bytes=a-b` is `start=a, end=b + 1`. NotFound is raised
        by the first iteration: call `stat` first when the answer is needed before streaming.
        Key and range are checked at once, before iterating. Close the generator (`aclose`,
        `contextlib.aclosing`) when stopping early, to release the file or request at once.
        """
        self._check_open()
        validate_key(key)
        check_range(start, end)
        return self._open(key, start, end)

    async def stat(self, key: str) -> StoredObject:
        """Size and content type of `key`; NotFound when nothing is stored there."""
        self._check_open()
        validate_key(key)
        return await self._stat(key)

    async def delete(self, key: str) -> None:
        """Remove `key`; NotFound when nothing is stored there."""
        self._check_open()
        validate_key(key)
        await self._delete(key)

    def url(self, key: str) -> str:
        """Where clients fetch `key`: the gateway's `/images/{key}` under `base_url`."""
        validate_key(key)
        return f"{self.base_url}/images/{quote(key, safe='/')}"

    async def close(self) -> None:
        """Release what the backend owns; safe to call twice. Later calls raise StorageError."""
        if self._closed:
            return
        self._closed = True
        await self._close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise StorageError(f"{type(self).__name__} is closed")

    # -- backend hooks ------------------------------------------------------------------------

    @abc.abstractmethod
    async def _put(self, key: str, chunks: AsyncIterable[bytes], content_type: str) -> StoredObject:
        """Store the stream under a validated key."""

    @abc.abstractmethod
    def _open(self, key: str, start: int, end: int | None) -> AsyncGenerator[bytes, None]:
        """Yield the bytes in [start, end) of a validated key (an async generator)."""

    @abc.abstractmethod
    async def _stat(self, key: str) -> StoredObject:
        """Describe a validated key, or raise NotFound."""

    @abc.abstractmethod
    async def _delete(self, key: str) -> None:
        """Remove a validated key, or raise NotFound."""

    async def _close(self) -> None:  # noqa: B027 - optional hook: most backends own nothing
        """Release resources the backend owns."""
