"""The current values of a whole KV bucket, read once.

nats-py's `watchall()` marks "initial values delivered" by comparing the consumer's pending count
with what its callback has seen; when the server has pushed every value before that check, the
marker comes first and a reader that stops at it sees an empty bucket. A pull consumer delivers
nothing until asked, so its pending count at creation is exact, and each value carries how many
are left.
"""

from __future__ import annotations

import contextlib

from nats.js import JetStreamContext, api
from nats.js.errors import NotFoundError
from nats.js.kv import KV_DEL, KV_OP, KV_PURGE

from gateway.bus.retry import through_election

_BATCH = 512
_MARKER = "Nats-Marker-Reason"  # nats-server 2.11+: a key removed by its TTL or max age
_FETCH_TIMEOUT_S = 5.0


async def kv_snapshot(js: JetStreamContext, bucket: str) -> dict[str, bytes]:
    """Every key of `bucket` with its latest value; deleted and purged keys left out.

    Read again from the start if the bucket elects a leader meanwhile.
    """
    return await through_election(lambda: _snapshot(js, bucket), f"reading bucket {bucket}")


async def _snapshot(js: JetStreamContext, bucket: str) -> dict[str, bytes]:
    prefix = f"$KV.{bucket}."
    sub = await js.pull_subscribe(
        f"{prefix}>",
        stream=f"KV_{bucket}",
        config=api.ConsumerConfig(
            deliver_policy=api.DeliverPolicy.LAST_PER_SUBJECT,
            ack_policy=api.AckPolicy.NONE,
            inactive_threshold=60.0,
        ),
    )
    values: dict[str, bytes] = {}
    info = await sub.consumer_info()
    try:
        left = info.num_pending or 0
        while left > 0:
            for message in await sub.fetch(min(left, _BATCH), timeout=_FETCH_TIMEOUT_S):
                left = message.metadata.num_pending
                key = message.subject[len(prefix) :]
                headers = message.headers or {}
                if headers.get(KV_OP) in (KV_DEL, KV_PURGE) or _MARKER in headers:
                    values.pop(key, None)  # deleted, purged or expired
                else:
                    values[key] = message.data
    finally:
        await sub.unsubscribe()
        # Not left for its inactivity limit to remove: one less consumer on the broker now.
        with contextlib.suppress(NotFoundError):
            await js.delete_consumer(info.stream_name, info.name)
    return values
