"""How a stored file is served so that it cannot attack the browser that opens it.

Files come from clients (uploads) and from workflows (any node may write any bytes under any
name), and they are served from the gateway's own origin, where the API and its keys live. So
the content type is judged from the file's first bytes, never from its name or the type it was
stored with: images, video and audio are shown inline as what their bytes say they are; anything
else (HTML, SVG, which carries script, text, PDF, ...) is an `application/octet-stream`
download. Every file also goes with `X-Content-Type-Options: nosniff` (the browser may not guess
otherwise) and a sandboxing Content-Security-Policy (no script runs, nothing else loads).
`/images/{key}` and ComfyUI's `/view` both serve through `how_to_serve`.
"""

from __future__ import annotations

import contextlib
import unicodedata
from typing import Final
from urllib.parse import quote

from gateway.storage import Storage, StoredObject

DOWNLOAD: Final = "application/octet-stream"
SAFETY_HEADERS: Final = {
    "X-Content-Type-Options": "nosniff",
    # The file's own document may show the file (and its styling, for the browser's image
    # viewer); no script, frame, form or other origin.
    "Content-Security-Policy": (
        "sandbox; default-src 'none'; img-src 'self'; media-src 'self'; style-src 'unsafe-inline'"
    ),
}
# Enough for every signature below (the latest, WebM's doctype, lies within the first 64).
SNIFF_BYTES: Final = 64

_PREFIXES: Final = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"II*\x00", "image/tiff"),
    (b"MM\x00*", "image/tiff"),
    (b"\x00\x00\x01\x00", "image/x-icon"),
    (b"fLaC", "audio/flac"),
    (b"OggS", "audio/ogg"),
    (b"ID3", "audio/mpeg"),
)
_RIFF: Final = {b"WEBP": "image/webp", b"WAVE": "audio/wav", b"AVI ": "video/x-msvideo"}
# ISO base media files (MP4, MOV, AVIF, ...) name their kind in the `ftyp` box's brand.
_BRANDS: Final = {
    b"avif": "image/avif",
    b"avis": "image/avif",
    b"heic": "image/heic",
    b"heix": "image/heic",
    b"mif1": "image/heif",
    b"msf1": "image/heif",
    b"qt  ": "video/quicktime",
    b"M4A ": "audio/mp4",
    b"3gp4": "video/3gpp",
    b"3gp5": "video/3gpp",
}
_BMP_HEADER_SIZES: Final = frozenset({12, 40, 52, 56, 64, 108, 124})


def sniff(head: bytes) -> str | None:
    """The image, video or audio type that a file's first bytes show it to be; None otherwise.

    Only formats a browser shows without running anything are named; SVG is not one of them.
    """
    for prefix, media_type in _PREFIXES:
        if head.startswith(prefix):
            return media_type
    if head.startswith(b"RIFF") and head[8:12] in _RIFF:
        return _RIFF[head[8:12]]
    if head[4:8] == b"ftyp":
        return _BRANDS.get(head[8:12], "video/mp4")
    if head.startswith(b"\x1a\x45\xdf\xa3"):  # EBML: Matroska, or WebM by its doctype
        return "video/webm" if b"webm" in head else "video/x-matroska"
    if head.startswith(b"BM") and int.from_bytes(head[14:18], "little") in _BMP_HEADER_SIZES:
        return "image/bmp"
    if len(head) > 1 and head[0] == 0xFF and (head[1] & 0xE0) == 0xE0:
        # An MPEG audio frame's sync bits; layer bits of 00 are AAC in an ADTS stream.
        return "audio/aac" if (head[1] & 0x06) == 0 else "audio/mpeg"
    return None


def content_disposition(name: str, inline: bool) -> str:
    """`inline` or `attachment` with the file's name, readable by every browser.

    The quoted name is plain ASCII (accents dropped, other characters replaced); a name that
    needs more also goes as RFC 5987's `filename*`, in UTF-8, which browsers prefer.
    """
    kind = "inline" if inline else "attachment"
    fallback = _ascii_name(name)
    header = f'{kind}; filename="{fallback}"'
    if fallback != name:
        header += f"; filename*=UTF-8''{quote(name, safe='')}"
    return header


def _ascii_name(name: str) -> str:
    kept = []
    for char in unicodedata.normalize("NFKD", name):
        if unicodedata.combining(char):
            continue  # the accent of a decomposed letter: "ó" becomes "o"
        printable = " " <= char <= "~" and char not in '"\\'
        kept.append(char if printable else "_")
    return "".join(kept) or "file"


async def read_head(storage: Storage, key: str) -> bytes:
    """The first SNIFF_BYTES bytes of a stored file (fewer when it is shorter)."""
    head = b""
    async with contextlib.aclosing(storage.open(key, start=0, end=SNIFF_BYTES)) as chunks:
        async for chunk in chunks:
            head += chunk
            if len(head) >= SNIFF_BYTES:
                break
    return head[:SNIFF_BYTES]


async def how_to_serve(storage: Storage, stored: StoredObject) -> tuple[str, dict[str, str]]:
    """The Content-Type to serve `stored` with, and the headers that go with it."""
    media_type = sniff(await read_head(storage, stored.key))
    name = stored.key.rsplit("/", 1)[-1]
    headers = {
        **SAFETY_HEADERS,
        "Content-Disposition": content_disposition(name, inline=media_type is not None),
    }
    return media_type or DOWNLOAD, headers
