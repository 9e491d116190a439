"""A job's event stream resumes where its client was cut off: SSE by `Last-Event-ID`, the
event websocket by `from_seq`; every event is seen once, in order, and a client that saw
the end gets nothing more."""

from __future__ import annotations

import json
from typing import Any

import httpx
from websockets.asyncio.client import connect as ws_connect

from plugins.simulator import SimulatorConfig
from tests.e2e.conftest import System, sse_events, tiny

# Slow enough that the job usually still runs when the first client is cut off.
SLOW = SimulatorConfig(class_seconds={"EmptyImage": 0.5, "ImageInvert": 0.5})


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
    system: System,
) -> None:
    await system.add_server("gpu1", SLOW)
    async with httpx.AsyncClient(base_url=system.url, timeout=60) as client:
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


async def test_the_event_websocket_starts_from_a_seq(system: System) -> None:
    await system.add_server("gpu1")
    async with httpx.AsyncClient(base_url=system.url, timeout=60) as client:
        reply = await client.post("/workflow/execute", json={"workflow": tiny(4)})
        job_id = reply.json()["job_id"]
        whole = [e["seq"] for e in await sse_events(client, job_id)]
    url = system.url.replace("http", "ws", 1) + f"/workflow/events/{job_id}/ws?from_seq=3"
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
