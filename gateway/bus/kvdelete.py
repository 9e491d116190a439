"""Deleting a KV key and learning at which revision the delete was stored.

nats-py's `KeyValue.delete` answers only `True`; a reader that orders a key's changes by
revision (the server table, fed both by the gateway that made a change and by the registry's
watch) needs the delete's own revision.
"""

from __future__ import annotations

from nats.js import JetStreamContext
from nats.js.kv import KV_DEL, KV_OP


async def delete_key(js: JetStreamContext, bucket: str, key: str) -> int:
    """Store a delete marker for `key` in `bucket`, as `KeyValue.delete` does; its revision."""
    ack = await js.publish(f"$KV.{bucket}.{key}", headers={KV_OP: KV_DEL})
    return ack.seq
