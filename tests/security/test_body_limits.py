"""Big bodies: 10 MB gets a 413 naming the limit; 100 MB is refused without being read.

The gateway runs in this test's process, so this process's peak resident memory is the
gateway's (plus the test's, which sends from one reused buffer).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path

import httpx
import msgspec

from gateway.balancer.requestchecks import MAX_REQUEST_BYTES
from gateway.settings import Settings
from tests.conftest import running_gateway
from tests.security.conftest import footprint, jetstream
from tests.test_gateway_api import TINY

MB = 1024 * 1024
HUNDRED_MB = 100 * MB


def _status(line: bytes) -> int:
    """The status code of an HTTP/1.1 status line."""
    return int(line.split(b" ", 2)[1])


async def _head(url: str, headers: str) -> tuple[int, bytes]:
    """Send only a request's head (no body follows); the answer's status and body."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(headers.encode())
        await writer.drain()
        status = _status(await reader.readline())
        length = 0
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            if name.lower() == "content-length":
                length = int(value)
        return status, await reader.readexactly(length)
    finally:
        writer.close()


async def test_a_100_mb_body_is_refused_before_it_is_sent(settings: Settings) -> None:
    keyed = msgspec.structs.replace(settings, api_keys=["plain:k-4f1c9e"])
    async with running_gateway(keyed) as url:
        for path, key, status in (
            ("/workflow/submit", "k-4f1c9e", 413),
            ("/workflow/execute", "k-4f1c9e", 413),
            ("/logs/query", "k-4f1c9e", 413),
            # Without a key the refusal comes earlier still, from the guard.
            ("/workflow/submit", "wrong", 403),
        ):
            head = (
                f"POST {path} HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
                f"X-API-Key: {key}\r\nContent-Length: {HUNDRED_MB}\r\n\r\n"
            )
            # Not one byte of the body is sent, yet the answer comes: it was decided on the
            # announced length alone.
            answer, body = await _head(url, head)
            assert answer == status, (path, body)
            if status == 413:
                assert json.loads(body)["code"] == "too_large"


def _peak_rss_reset() -> None:
    # Writing 5 resets the process's peak resident set size (Linux 4.0 and later).
    Path("/proc/self/clear_refs").write_text("5")


def _peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/self/status")


async def test_a_100_mb_chunked_body_is_cut_off_with_flat_memory(settings: Settings) -> None:
    """Without a length to judge by, the gateway reads up to its limit, then refuses."""
    async with running_gateway(settings) as url:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        chunk = b"%x\r\n%s\r\n" % (MB, b" " * MB)  # one buffer, sent 100 times
        reader, writer = await asyncio.open_connection(host, int(port))
        sent = 0

        async def send() -> None:
            nonlocal sent
            writer.write(
                b"POST /workflow/submit HTTP/1.1\r\nHost: gateway\r\n"
                b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
            )
            for _ in range(HUNDRED_MB // MB):
                writer.write(chunk)
                await writer.drain()
                sent += MB
            writer.write(b"0\r\n\r\n")
            await writer.drain()

        _peak_rss_reset()
        before = _peak_rss()
        sender = asyncio.create_task(send())
        try:
            status = _status(await reader.readline())
        finally:
            # The gateway closes the connection after its answer; the sender then fails.
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await sender
            writer.close()
        growth = _peak_rss() - before
        assert status == 413
        assert sent < HUNDRED_MB
        # The limit is 10 MB; reading it all would have cost 100 MB or more.
        assert growth < 40 * MB, f"peak memory grew by {growth / MB:.0f} MB"


async def test_a_10_mb_workflow_gets_413_naming_the_bus_limit(settings: Settings) -> None:
    """Within max_body_bytes, but more than one job can carry on the bus."""
    big = {**TINY, "9": {"class_type": "Note", "inputs": {"text": "x" * (10 * 1000 * 1000)}}}
    async with (
        running_gateway(settings) as url,
        jetstream(settings) as js,
        httpx.AsyncClient(base_url=url, timeout=30) as client,
    ):
        before = await footprint(js, settings)
        for path in ("/workflow/submit", "/workflow/execute"):
            reply = await client.post(path, json={"workflow": big})
            assert reply.status_code == 413, reply.text
            assert reply.json()["code"] == "too_large"
            assert reply.json()["details"]["max_request_bytes"] == MAX_REQUEST_BYTES
        assert await footprint(js, settings) == before
