"""Reading a whole KV bucket once (gateway/bus/kvsnapshot.py), on a real broker."""

from __future__ import annotations

from nats.js import JetStreamContext

from gateway.bus.kvsnapshot import kv_snapshot


async def test_every_live_key_once_with_its_latest_value(js: JetStreamContext) -> None:
    kv = await js.create_key_value(bucket="snap", history=5)
    assert await kv_snapshot(js, "snap") == {}
    for i in range(700):  # more than one fetch
        await kv.put(f"k{i}", b"first")
    for i in range(0, 700, 7):
        await kv.put(f"k{i}", b"second")
    for i in range(0, 700, 10):
        await kv.delete(f"k{i}")
    await kv.purge("k1")
    expected = {
        f"k{i}": b"second" if i % 7 == 0 else b"first" for i in range(700) if i % 10 and i != 1
    }
    assert await kv_snapshot(js, "snap") == expected
    # It leaves no consumer behind.
    assert (await js.stream_info("KV_snap")).state.consumer_count == 0
