"""Submit rate, event stream and body size limits, over real HTTP with real NATS."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import Any

import httpx
import msgspec
import pytest
import websockets
from websockets.asyncio.client import connect as ws_connect

from gateway.api.errors import ApiError
from gateway.api.limits import RateLimited, StreamSlots, TokenBuckets, hold
from gateway.settings import Settings
from tests.conftest import running_gateway
from tests.test_gateway_api import TINY


def running(settings: Settings, **changes: Any) -> AbstractAsyncContextManager[str]:
    """A real gateway on `settings` with `changes`; yields its URL."""
    return running_gateway(msgspec.structs.replace(settings, **changes))


async def test_submissions_past_the_burst_get_429_with_retry_after(settings: Settings) -> None:
    # 0.01 per second: no token comes back while the test runs.
    async with (
        running(settings, submit_rate_per_s=0.01, submit_burst=2) as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        for _ in range(2):
            reply = await client.post("/workflow/submit", json={"workflow": TINY})
            assert reply.status_code == 202, reply.text
        for path in ("/workflow/submit", "/workflow/execute"):
            refused = await client.post(path, json={"workflow": TINY})
            assert refused.status_code == 429
            retry_after = int(refused.headers["retry-after"])
            assert 1 <= retry_after <= 100
            body = refused.json()
            assert body["code"] == "rate_limited"
            assert "submit_rate_per_s" in body["message"]
            assert body["details"]["retry_after_s"] == retry_after
        # Reading is not limited.
        assert (await client.get("/servers")).status_code == 200


async def test_each_key_has_its_own_bucket(settings: Settings) -> None:
    async with (
        running(
            settings,
            api_keys=["plain:key-one", "plain:key-two"],
            submit_rate_per_s=0.01,
            submit_burst=1,
        ) as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        one, two = {"X-API-Key": "key-one"}, {"Authorization": "Bearer key-two"}
        body = {"workflow": TINY}
        assert (await client.post("/workflow/submit", json=body, headers=one)).status_code == 202
        assert (await client.post("/workflow/submit", json=body, headers=one)).status_code == 429
        assert (await client.post("/workflow/submit", json=body, headers=two)).status_code == 202


async def test_streams_past_the_limit_get_503_across_sse_and_websocket(
    settings: Settings,
) -> None:
    async with (
        running(settings, max_event_streams=1) as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        job = (await client.post("/workflow/submit", json={"workflow": TINY})).json()["job_id"]
        events = f"/workflow/events/{job}"
        ws_url = url.replace("http://", "ws://") + events + "/ws"
        async with client.stream("GET", events) as first:
            # Headers received: the handler has run and holds the only slot.
            assert first.status_code == 200
            second = await client.get(events)
            assert second.status_code == 503
            assert second.json()["code"] == "too_many_streams"
            assert second.json()["details"] == {"max_event_streams": 1}
            async with ws_connect(ws_url) as ws:
                with pytest.raises(websockets.ConnectionClosed) as closed:
                    await ws.recv()
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 4503
            # Cancelling ends the job, so the stream ends and gives its slot back.
            assert (await client.post(f"/workflow/cancel/{job}")).status_code == 200
            async for _ in first.aiter_lines():
                pass
        again = await client.get(events)
        assert again.status_code == 200
        assert "event: cancelled" in again.text


async def test_a_body_over_the_limit_gets_413(settings: Settings) -> None:
    async with (
        running(settings, max_body_bytes=2000) as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        small = await client.post("/workflow/submit", json={"workflow": TINY})
        assert small.status_code == 202
        big = await client.post(
            "/workflow/submit",
            content=b'{"workflow": {"1": "' + b"x" * 3000 + b'"}}',
            headers={"content-type": "application/json"},
        )
        assert big.status_code == 413
        assert big.json()["code"] == "too_large"
        assert "max_body_bytes" in big.json()["message"]


def test_a_bucket_refills_at_its_rate() -> None:
    now = [0.0]
    buckets = TokenBuckets(rate=2.0, burst=3, clock=lambda: now[0])
    for _ in range(3):
        buckets.take("a")
    with pytest.raises(RateLimited) as refused:
        buckets.take("a")
    assert refused.value.retry_after == 1  # half a second to the next token, rounded up
    buckets.take("b")  # another client is untouched
    now[0] = 0.5
    buckets.take("a")
    with pytest.raises(RateLimited):
        buckets.take("a")
    now[0] = 100.0  # a long pause refills to the burst, not beyond
    for _ in range(3):
        buckets.take("a")
    with pytest.raises(RateLimited):
        buckets.take("a")


async def test_a_stream_slot_comes_back_however_the_stream_ends() -> None:
    slots = StreamSlots(limit=1, per_client=1)

    async def two() -> AsyncIterator[int]:
        yield 1
        yield 2

    assert [item async for item in hold(slots.acquire("c"), two())] == [1, 2]
    assert slots.in_use == 0
    # Dropped without ever being iterated, as when a client leaves before the body.
    never = hold(slots.acquire("c"), two())
    with pytest.raises(ApiError):
        slots.acquire("c")
    del never
    assert slots.in_use == 0
    with slots.acquire("c") as slot:
        slot.release()
    assert slots.in_use == 0


async def test_one_key_cannot_take_every_event_stream(settings: Settings) -> None:
    keyed = {"api_keys": ["plain:key-one", "plain:key-two"]}
    async with (
        running(settings, max_event_streams=3, max_event_streams_per_key=2, **keyed) as url,
        httpx.AsyncClient(base_url=url, headers={"X-API-Key": "key-one"}) as one,
    ):
        job = (await one.post("/workflow/submit", json={"workflow": TINY})).json()["job_id"]
        events = f"/workflow/events/{job}"
        async with one.stream("GET", events) as first, one.stream("GET", events) as second:
            assert first.status_code == second.status_code == 200
            third = await one.get(events)
            assert third.status_code == 503
            assert third.json()["details"] == {"max_event_streams_per_key": 2}
            # Another key still gets one: the gateway has a stream left.
            other = {"X-API-Key": "key-two"}
            ws_url = url.replace("http://", "ws://") + events + "/ws"
            async with ws_connect(ws_url, additional_headers=other) as ws:
                assert "queued" in await ws.recv()
            assert (await one.post(f"/workflow/cancel/{job}")).status_code == 200
