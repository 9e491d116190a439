"""The edges of the limits that tests/test_limits.py does not reach.

The largest job the bus can carry runs, one byte more is refused; a rate-limited client is
refused before its body is read and leaves nothing behind; event streams that never start or
that their client drops do not keep a slot.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import httpx
import msgspec

from gateway.api.auth import ANONYMOUS
from gateway.balancer.requestchecks import MAX_REQUEST_BYTES
from gateway.settings import Settings
from tests.conftest import running_gateway
from tests.e2e.conftest import running_system
from tests.helpers import poll_until
from tests.security.conftest import footprint, jetstream, padded
from tests.test_gateway_api import TINY


async def test_the_largest_job_runs_and_one_byte_more_is_refused(settings: Settings) -> None:
    async with running_system(settings) as system:
        await system.add_server("gpu1")
        async with httpx.AsyncClient(base_url=system.url, timeout=60) as client:
            largest = await client.post(
                "/workflow/execute", json={"workflow": padded(MAX_REQUEST_BYTES, ANONYMOUS)}
            )
            assert largest.status_code == 200, largest.text[:500]
            assert largest.json()["status"] == "succeeded"
            job_id = largest.json()["job_id"]
            over = await client.post(
                "/workflow/execute", json={"workflow": padded(MAX_REQUEST_BYTES + 1, ANONYMOUS)}
            )
            assert over.status_code == 413
            assert over.json()["code"] == "too_large"

            # The log sink took the largest job's events too.
            async def logged() -> bool:
                reply = await client.get(f"/workflow/logs/{job_id}")
                return reply.status_code == 200 and any(
                    entry["type"] == "succeeded" for entry in reply.json()["entries"]
                )

            await poll_until(logged, "the largest job's log is complete")


def _head(path: str, length: int) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


async def test_a_rate_limited_client_is_refused_before_its_body_is_read(
    settings: Settings,
) -> None:
    limited = msgspec.structs.replace(settings, submit_rate_per_s=0.01, submit_burst=1)
    async with (
        running_gateway(limited) as url,
        jetstream(settings) as js,
        httpx.AsyncClient(base_url=url) as client,
    ):
        assert (await client.post("/workflow/submit", json={"workflow": TINY})).status_code == 202
        before = await footprint(js, settings)
        host, port = url.removeprefix("http://").rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            # A 100 MB body is announced and never sent: the answer comes all the same.
            writer.write(_head("/workflow/submit", 100 * 1024 * 1024))
            await writer.drain()
            status_line = await reader.readline()
        finally:
            writer.close()
        assert status_line.split(b" ")[1] == b"429"
        refused = await client.post("/workflow/execute", json={"workflow": TINY})
        assert refused.status_code == 429
        assert await footprint(js, settings) == before


async def test_streams_that_never_start_or_are_dropped_give_their_slot_back(
    settings: Settings,
) -> None:
    async with (
        running_gateway(msgspec.structs.replace(settings, max_event_streams=1)) as url,
        httpx.AsyncClient(base_url=url, timeout=30) as client,
    ):
        job = (await client.post("/workflow/submit", json={"workflow": TINY})).json()["job_id"]
        # Unknown jobs are answered 404 before a slot is taken, however many ask.
        for _ in range(20):
            assert (await client.get("/workflow/events/no-such-job")).status_code == 404
        events = f"/workflow/events/{job}"

        for _ in range(3):
            # A client opens the only stream, reads its first event, and goes away.
            async with (
                httpx.AsyncClient(base_url=url, timeout=30) as leaving,
                _once_free(leaving, events) as stream,
            ):
                # Kept in a name: an abandoned line iterator would be closed when collected,
                # and closing it closes the connection, so the client would leave too early.
                lines = stream.aiter_lines()
                async for line in lines:
                    if line.startswith("data:"):
                        break
                async with client.stream("GET", events) as second:
                    assert second.status_code == 503  # read no further: a 200 would never end
                await lines.aclose()  # the client goes away without a word

            async def slot_free() -> bool:
                async with client.stream("GET", events) as again:
                    return again.status_code == 200

            await poll_until(slot_free, "the dropped stream's slot is free again", within=10)


@contextlib.asynccontextmanager
async def _once_free(client: httpx.AsyncClient, path: str) -> AsyncIterator[httpx.Response]:
    """The stream at `path`, opened once the only slot is free: the last check of it held the
    slot itself, and gives it back when the gateway sees that client go."""
    deadline = asyncio.get_running_loop().time() + 10
    while True:
        response = await client.send(client.build_request("GET", path), stream=True)
        if response.status_code == 200:
            break
        await response.aclose()
        assert response.status_code == 503, response.status_code
        assert asyncio.get_running_loop().time() < deadline, "the only slot never came free"
    try:
        yield response
    finally:
        await response.aclose()
