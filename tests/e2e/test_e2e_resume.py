"""A job's event stream resumes where its client was cut off: SSE by `Last-Event-ID`, the
event websocket by `from_seq`, and the SDK by itself when the network breaks under it; every
event is seen once, in order, and a client that saw the end gets nothing more.

One system for the module, with one slow server (gpu1): each test follows jobs of its own."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import pytest_asyncio
from websockets.asyncio.client import connect as ws_connect

from plugins.simulator import SimulatorConfig
from sdk import AsyncComfyUISDK, ComfyUISDK
from tests.e2e.conftest import System, sse_events, system_of_its_own, tiny

# Slow enough that the job usually still runs when the first client is cut off.
SLOW = SimulatorConfig(class_seconds={"EmptyImage": 0.5, "ImageInvert": 0.5})


@pytest_asyncio.fixture(scope="module")
async def shared(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[System]:
    async with system_of_its_own(tmp_path_factory.mktemp("resume")) as running:
        await running.add_server("gpu1", SLOW)
        yield running


async def _first(client: httpx.AsyncClient, job_id: str, count: int) -> list[dict[str, Any]]:
    """The first `count` events of the job's SSE stream; then the connection is dropped."""
    seen: list[dict[str, Any]] = []
    async with client.stream("GET", f"/workflow/events/{job_id}") as stream:
        event_id = None
        async for line in stream.aiter_lines():
            if line.startswith("id:"):
                event_id = int(line[3:])
            elif line.startswith("data:"):
                event = json.loads(line[5:])
                assert event["seq"] == event_id  # the SSE id is the event's seq
                seen.append(event)
                if len(seen) == count:
                    break
    return seen


async def test_an_sse_client_cut_mid_stream_resumes_and_sees_each_event_once(
    shared: System,
) -> None:
    async with httpx.AsyncClient(base_url=shared.url, timeout=60) as client:
        job_id = (await client.post("/workflow/submit", json={"workflow": tiny(3)})).json()[
            "job_id"
        ]
        # Most often cut while the job runs (its nodes take a second); resuming must not care.
        before = await _first(client, job_id, 3)
        last = str(before[-1]["seq"])
        after = await sse_events_with(client, job_id, {"Last-Event-ID": last})
        whole = await sse_events(client, job_id)
        seqs = [e["seq"] for e in before + after]
        assert seqs == [e["seq"] for e in whole] == sorted(set(seqs))
        assert after[-1]["type"] == "succeeded"
        # The same by the query string (for clients that cannot set headers), and after the end.
        tail = await sse_events_with(client, job_id, {}, f"?last_event_id={seqs[-2]}")
        assert [e["seq"] for e in tail] == [seqs[-1]]
        assert await sse_events_with(client, job_id, {"Last-Event-ID": str(seqs[-1])}) == []
        refused = await client.get(f"/workflow/events/{job_id}", headers={"Last-Event-ID": "x"})
        assert refused.status_code == 400


async def test_the_event_websocket_starts_from_a_seq(shared: System) -> None:
    async with httpx.AsyncClient(base_url=shared.url, timeout=60) as client:
        reply = await client.post("/workflow/execute", json={"workflow": tiny(4)})
        job_id = reply.json()["job_id"]
        whole = [e["seq"] for e in await sse_events(client, job_id)]
    url = shared.url.replace("http", "ws", 1) + f"/workflow/events/{job_id}/ws?from_seq=3"
    async with ws_connect(url) as socket:
        seqs = [json.loads(frame)["seq"] async for frame in socket]
    assert seqs == [seq for seq in whole if seq >= 3]


async def sse_events_with(
    client: httpx.AsyncClient, job_id: str, headers: dict[str, str], query: str = ""
) -> list[dict[str, Any]]:
    events = []
    async with client.stream("GET", f"/workflow/events/{job_id}{query}", headers=headers) as s:
        assert s.status_code == 200
        async for line in s.aiter_lines():
            if line.startswith("data:"):
                events.append(json.loads(line[5:]))  # noqa: PERF401 - reads clearer
    return events


class CuttingProxy:
    """A loopback TCP proxy to the gateway that drops its first `cuts` connections once each
    has carried two events: a network that breaks under a client, for real."""

    def __init__(self, target: str, cuts: int) -> None:
        host, port = target.removeprefix("http://").rsplit(":", 1)
        self._target = (host, int(port))
        self._cuts_left = cuts
        self.cut = 0
        self.url = ""
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> CuttingProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()
        # Connections still open (a client's idle keep-alive) end with the proxy.
        for handler in self._handlers:
            handler.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handler = asyncio.current_task()
        assert handler is not None
        self._handlers.add(handler)
        try:
            await self._forward(reader, writer)
        finally:
            self._handlers.discard(handler)

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except BaseException:
            writer.close()
            raise
        cut = self._cuts_left > 0
        self._cuts_left -= cut

        async def upstream() -> None:
            while data := await reader.read(65536):
                up_writer.write(data)
                await up_writer.drain()

        async def downstream() -> None:
            events = 0
            while data := await up_reader.read(65536):
                if cut:
                    # Only as far as the second event, however many the chunk holds (events
                    # already stored come in bursts).
                    data, events = _through_events(data, events, 2)
                writer.write(data)
                await writer.drain()
                if cut and events >= 2:
                    # A cut counts only if the end is still to come: a client that got it all
                    # has nothing to resume.
                    self.cut += b"event: succeeded" not in data
                    return

        sending = asyncio.create_task(upstream())
        try:
            await downstream()
        finally:
            sending.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await sending
            for stream in (writer, up_writer):
                stream.close()
                with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                    await stream.wait_closed()


def _through_events(data: bytes, seen: int, limit: int) -> tuple[bytes, int]:
    """`data` up to the end of the stream's `limit`-th event (`seen` came before it), and the
    events it then holds; an event that goes on in the next chunk counts as the last."""
    at = 0
    while seen < limit:
        start = data.find(b"data:", at)
        if start < 0:
            return data, seen
        end = data.find(b"\r\n\r\n", start)
        if end < 0:
            return data, seen + 1
        seen, at = seen + 1, end + 4
    return data[:at], seen


async def test_the_sdk_resumes_a_broken_event_stream_by_itself(shared: System) -> None:
    async with httpx.AsyncClient(base_url=shared.url, timeout=60) as client:
        first = (await client.post("/workflow/submit", json={"workflow": tiny(5)})).json()
        second = (await client.post("/workflow/submit", json={"workflow": tiny(6)})).json()
        async with CuttingProxy(shared.url, cuts=2) as proxy:
            async with AsyncComfyUISDK(gateway_url=proxy.url, timeout=60) as sdk:
                seen = [event async for event in sdk.stream_events(first["job_id"])]
            assert proxy.cut == 2  # the stream really broke, twice
        async with CuttingProxy(shared.url, cuts=1) as proxy:
            seen_sync = await asyncio.to_thread(_stream_sync, proxy.url, second["job_id"])
            assert proxy.cut == 1
        for job, events in ((first, seen), (second, seen_sync)):
            whole = await sse_events(client, job["job_id"])
            assert [e["seq"] for e in events] == [e["seq"] for e in whole]  # each once, in order
            assert events[-1]["type"] == "succeeded"


def _stream_sync(url: str, job_id: str) -> list[dict[str, Any]]:
    with ComfyUISDK(gateway_url=url, timeout=60) as sdk:
        return list(sdk.stream_events(job_id))
