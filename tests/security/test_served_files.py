"""Files served back cannot attack the browser that opens them, on `/view` and `/images` alike.

An upload or an output is shown inline only when its bytes are an image, a video or a sound,
with the type its bytes say; anything else (HTML, SVG, text, HTML named `.png`) is a download.
Every file goes with `nosniff` and a sandboxing Content-Security-Policy, and any name reaches
the Content-Disposition header, in RFC 5987's form when it is not plain ASCII.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote

import httpx
import pytest

from gateway.api.served import sniff
from gateway.settings import Settings
from plugins.simulator import png
from tests.conftest import running_gateway

PNG = png.encode_solid(4, 4, (200, 10, 10))
HTML = b"<!doctype html><script>fetch('/queue').then(r => r.text()).then(alert)</script>"
SVG = (
    b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(document.domain)</script>'
    b"<rect width='8' height='8'/></svg>"
)
MP4 = b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2" + bytes(40)
WAV = b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(40)
DOWNLOAD = "application/octet-stream"

# (name, bytes, the type the client declares) -> (type served, shown inline)
FILES = {
    ("evil.html", HTML, "text/html"): (DOWNLOAD, False),
    ("evil.svg", SVG, "image/svg+xml"): (DOWNLOAD, False),
    ("evil.png", HTML, "image/png"): (DOWNLOAD, False),
    ("notes.txt", b"just text", "text/plain"): (DOWNLOAD, False),
    ("photo.html", PNG, "text/html"): ("image/png", True),
    ("clip.mp4", MP4, "video/mp4"): ("video/mp4", True),
    ("sound.bin", WAV, "application/octet-stream"): ("audio/wav", True),
}


def _check_safe(reply: httpx.Response, media_type: str, inline: bool, name: str) -> None:
    headers = reply.headers
    assert headers["content-type"] == media_type, (name, dict(headers))
    assert headers["x-content-type-options"] == "nosniff", name
    policy = headers["content-security-policy"]
    assert "sandbox" in policy and "default-src 'none'" in policy, policy
    disposition = headers["content-disposition"]
    assert disposition.startswith("inline;" if inline else "attachment;"), disposition
    assert f'filename="{name}"' in disposition, disposition


async def test_view_serves_uploads_by_their_content_with_safe_headers(settings: Settings) -> None:
    async with (
        running_gateway(settings) as url,
        httpx.AsyncClient(base_url=url, timeout=30) as http,
    ):
        for (name, data, declared), (media_type, inline) in FILES.items():
            upload = await http.post("/upload/image", files={"image": (name, data, declared)})
            assert upload.status_code == 200, upload.text
            query = {"filename": name, "type": "input"}
            reply = await http.get("/view", params=query)
            assert reply.status_code == 200, (name, reply.text)
            assert reply.content == data
            _check_safe(reply, media_type, inline, name)
            head = await http.head("/view", params=query)
            _check_safe(head, media_type, inline, name)
            part = await http.get("/view", params=query, headers={"Range": "bytes=0-3"})
            assert part.status_code == 206 and part.content == data[:4]
            _check_safe(part, media_type, inline, name)


async def test_images_serves_outputs_by_their_content_with_safe_headers(
    settings: Settings,
) -> None:
    outputs = Path(settings.data_dir) / "outputs" / "job1"
    async with (
        running_gateway(settings) as url,
        httpx.AsyncClient(base_url=url, timeout=30) as http,
    ):
        outputs.mkdir(parents=True, exist_ok=True)
        for (name, data, _), (media_type, inline) in FILES.items():
            (outputs / name).write_bytes(data)
            reply = await http.get(f"/images/job1/{name}")
            assert reply.status_code == 200, (name, reply.text)
            assert reply.content == data
            _check_safe(reply, media_type, inline, name)


async def test_names_beyond_ascii_reach_the_header(settings: Settings) -> None:
    """A name a latin-1 header cannot hold goes as RFC 5987 `filename*`, with an ASCII one."""
    async with (
        running_gateway(settings) as url,
        httpx.AsyncClient(base_url=url, timeout=30) as http,
    ):
        for name in ("fotó 漢字 🎨.png", 'say "hi".png', "ü.png"):
            upload = await http.post("/upload/image", files={"image": (name, PNG, "image/png")})
            assert upload.status_code == 200, upload.text
            stored = upload.json()["name"]
            reply = await http.get("/view", params={"filename": stored, "type": "input"})
            assert reply.status_code == 200, (name, reply.text)
            assert reply.content == PNG
            disposition = reply.headers["content-disposition"]
            assert disposition.isascii(), disposition
            fallback = disposition.split('filename="', 1)[1].split('"', 1)[0]
            assert fallback.isascii() and fallback.endswith(".png"), disposition
            encoded = disposition.split("filename*=UTF-8''", 1)[1]
            assert unquote(encoded) == stored, disposition


@pytest.mark.parametrize(
    ("head", "media_type"),
    [
        (PNG, "image/png"),
        (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00", "image/jpeg"),
        (b"GIF89a\x01\x00\x01\x00", "image/gif"),
        (b"RIFF\x00\x00\x00\x00WEBPVP8 ", "image/webp"),
        (b"BM" + bytes(12) + (40).to_bytes(4, "little"), "image/bmp"),
        (b"\x00\x00\x00\x1cftypavif", "image/avif"),
        (MP4, "video/mp4"),
        (b"\x00\x00\x00\x14ftypqt  ", "video/quicktime"),
        (b"\x1a\x45\xdf\xa3\x9f\x42\x86\x81\x01\x42\x82\x84webm", "video/webm"),
        (b"\x1a\x45\xdf\xa3\x9f\x42\x86\x81\x01\x42\x82\x88matroska", "video/x-matroska"),
        (b"OggS\x00\x02", "audio/ogg"),
        (WAV, "audio/wav"),
        (b"ID3\x04\x00", "audio/mpeg"),
        (b"\xff\xfb\x90\x00", "audio/mpeg"),
        (b"fLaC\x00\x00\x00\x22", "audio/flac"),
        (HTML, None),
        (SVG, None),
        (b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"/>', None),
        (b"%PDF-1.7", None),
        (b"BM but only text", None),
        (b"", None),
    ],
)
def test_the_type_comes_from_the_bytes(head: bytes, media_type: str | None) -> None:
    assert sniff(head[:64]) == media_type
