"""URL inputs come from public addresses only, unless the allowlist names the host or network.

A file server on loopback stands for an internal service: refused by default (before any
connection is made to it), fetched once its address or name is allowed. Redirects are checked
hop by hop.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from gateway.bus.contract import Failed, JobInput
from gateway.settings import Settings, load_settings
from gateway.storage import Storage
from plugins.comfyui.client import ComfyClient
from plugins.comfyui.inputfiles import JobFiles
from plugins.comfyui.inputs import InputProblem, upload_inputs
from plugins.comfyui.options import AdapterOptions, with_settings
from plugins.simulator import Simulator, png
from tests.adapter.kit import Bus

IMAGE = png.encode_solid(4, 4, (10, 200, 30))


@dataclass
class FileServer:
    """Serves IMAGE at /image.png and redirects /to?<url> there; remembers each request."""

    port: int = 0
    requests: list[tuple[str, str]] = field(default_factory=list)  # (path, Host header)

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            path = head[0].split(" ")[1]
            host = next(
                (h.split(":", 1)[1].strip() for h in head if h.lower().startswith("host:")), ""
            )
            self.requests.append((path, host))
            if path.startswith("/to?"):
                status, extra, body = "302 Found", f"Location: {path[4:]}\r\n", b""
            elif path == "/image.png":
                status, extra, body = "200 OK", "Content-Type: image/png\r\n", IMAGE
            else:
                status, extra, body = "404 Not Found", "", b""
            writer.write(
                f"HTTP/1.1 {status}\r\n{extra}Content-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        finally:
            writer.close()


@pytest.fixture
async def files() -> AsyncIterator[FileServer]:
    server = FileServer()
    listener = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    server.port = listener.sockets[0].getsockname()[1]
    try:
        yield server
    finally:
        listener.close()
        await listener.wait_closed()


@pytest.fixture
async def comfy(make_sim) -> AsyncIterator[tuple[Simulator, ComfyClient]]:
    async with make_sim() as sim:
        client = ComfyClient(sim.address)
        try:
            yield sim, client
        finally:
            await client.aclose()


@pytest.fixture
async def unreached() -> AsyncIterator[tuple[None, ComfyClient]]:
    """A ComfyUI nobody answers for: refusals happen before anything would reach it."""
    client = ComfyClient("127.0.0.1:9")
    try:
        yield None, client
    finally:
        await client.aclose()


async def fetch(
    comfy: tuple[Simulator | None, ComfyClient],
    storage: Storage,
    url: str,
    allow: list[str] | None = None,
) -> bytes:
    """Upload the URL's file as `in.png` the way a job does; the bytes ComfyUI received."""
    sim, client = comfy
    renames = await upload_inputs(
        client,
        storage,
        [JobInput(name="in.png", source="url", value=url)],
        files=JobFiles(client, "job", 1),
        max_bytes=1024 * 1024,
        url_timeout=5.0,
        url_allowlist=allow or [],
    )
    assert sim is not None
    return (sim.folders.input / renames["in.png"]).read_bytes()


async def test_a_loopback_url_is_refused_by_default_before_any_connection(
    files: FileServer, unreached, storage: Storage
) -> None:
    with pytest.raises(InputProblem) as refused:
        await fetch(unreached, storage, files.url("/image.png"))
    message = str(refused.value)
    assert "host 127.0.0.1 is refused (loopback address)" in message
    assert "url_input_allowlist" in message
    assert files.requests == []


async def test_a_host_name_is_judged_by_the_addresses_it_resolves_to(
    files: FileServer, unreached, storage: Storage
) -> None:
    with pytest.raises(InputProblem, match=r"host localhost \((127\.0\.0\.1|::1)\) is refused"):
        await fetch(unreached, storage, files.url("/image.png", host="localhost"))
    assert files.requests == []


@pytest.mark.parametrize(
    ("host", "kind"),
    [
        ("10.1.2.3", "private"),
        ("192.168.0.10", "private"),
        ("172.16.5.4", "private"),
        ("169.254.169.254", "link-local"),  # cloud metadata services
        ("224.0.0.251", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("100.64.0.1", "non-public"),
        ("[::1]", "loopback"),
        ("[fe80::1]", "link-local"),
        ("[fd00::1]", "private"),
        ("[::ffff:127.0.0.1]", "loopback"),
    ],
)
async def test_internal_addresses_are_refused_by_default(
    host: str, kind: str, unreached, storage: Storage
) -> None:
    with pytest.raises(InputProblem, match=rf"is refused \({kind} address\)"):
        await fetch(unreached, storage, f"http://{host}:9/image.png")


async def test_an_allowed_network_or_host_name_is_fetched(
    files: FileServer, comfy, storage: Storage
) -> None:
    assert await fetch(comfy, storage, files.url("/image.png"), ["127.0.0.0/8"]) == IMAGE
    by_name = files.url("/image.png", host="localhost")
    assert await fetch(comfy, storage, by_name, ["LocalHost"]) == IMAGE
    # The connection goes to the checked address, still telling the server which host it asked.
    assert files.requests == [
        ("/image.png", f"127.0.0.1:{files.port}"),
        ("/image.png", f"localhost:{files.port}"),
    ]


async def test_each_redirect_is_checked_like_the_first_url(
    files: FileServer, comfy, storage: Storage
) -> None:
    allow = ["127.0.0.1"]
    assert await fetch(comfy, storage, files.url("/to?/image.png"), allow) == IMAGE
    assert [path for path, _ in files.requests] == ["/to?/image.png", "/image.png"]
    files.requests.clear()
    elsewhere = files.url("/image.png", host="127.0.0.2")
    with pytest.raises(InputProblem, match=r"host 127\.0\.0\.2 is refused \(loopback address\)"):
        await fetch(comfy, storage, files.url(f"/to?{elsewhere}"), allow)
    assert [path for path, _ in files.requests] == [f"/to?{elsewhere}"]


async def test_only_http_and_https_urls_are_fetched(unreached, storage: Storage, tmp_path: Path):
    secret = tmp_path / "secret.txt"
    secret.write_text("no")
    for url in (f"file://{secret}", "ftp://127.0.0.1/x", "no url at all"):
        with pytest.raises(InputProblem, match="only http and https"):
            await fetch(unreached, storage, url, ["127.0.0.0/8"])


def test_the_allowlist_is_a_setting_that_reaches_the_adapter_options() -> None:
    settings = load_settings(
        environ={"COMFYAUTOMATE_URL_INPUT_ALLOWLIST": "10.0.0.0/8, files.lan"}, config_file=None
    )
    assert settings.url_input_allowlist == ["10.0.0.0/8", "files.lan"]
    options = with_settings(AdapterOptions(url_allowlist=("files.lan",)), settings)
    assert options.url_allowlist == ("files.lan", "10.0.0.0/8")
    assert with_settings(AdapterOptions(), Settings()) == AdapterOptions()


async def test_a_job_with_a_loopback_url_fails_naming_the_host(
    bus: Bus, make_sim, start_adapter, files: FileServer
) -> None:
    workflow = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "in.png"}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "u"}},
    }
    async with make_sim() as sim:
        await start_adapter(sim.address)
        inputs = [JobInput(name="in.png", source="url", value=files.url("/image.png"))]
        job = await bus.dispatch(workflow, inputs=inputs)
        end = await bus.wait_event(job.job_id)
    assert isinstance(end, Failed) and end.data.code == "input_error", end
    assert "host 127.0.0.1 is refused (loopback address)" in end.data.message
    assert files.requests == []
    assert [p for p in sim.folders.input.rglob("*") if p.is_file()] == []
