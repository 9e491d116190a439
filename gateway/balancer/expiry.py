"""Ended job records that leave KV `comfy_jobs` after a retention, so the bucket stays bounded
(and, by the same rule, the entries of the prompts of those jobs in KV `comfy_prompts`).

The leader writes a job's terminal record with a per-message TTL (nats-server 2.11+, on a
bucket whose stream allows it); the server removes it once the TTL is over, and the gateway
answers for the job from its log from then on (gateway/api/services.py). Open jobs' records
are written without one and never expire.
"""

from __future__ import annotations

import logging
import math
from typing import Final

from nats.js import JetStreamContext
from nats.js.errors import APIError

log = logging.getLogger(__name__)

# JetStream's error code for a TTL on a stream that does not allow per-message TTLs.
_TTL_DISABLED: Final = 10166
# JetStream's error code for a write whose expected last sequence of its subject is not the last.
WRONG_REVISION: Final = 10071
_EXPECTED_REVISION: Final = "Nats-Expected-Last-Subject-Sequence"


class EndedRecords:
    """Writes ended records of the bucket `bucket` so that they expire after `ttl_s`."""

    def __init__(self, js: JetStreamContext, bucket: str, ttl_s: float) -> None:
        self._js = js
        self._prefix = f"$KV.{bucket}."
        # The header takes whole seconds; less than one second is not a TTL the server takes.
        self._ttl = str(max(1, math.ceil(ttl_s)))
        self._warned = False

    async def put(self, key: str, value: bytes, *, revision: int | None = None) -> None:
        """Write `value` under `key`, to expire after the retention.

        With `revision`, only over that revision of the key (else JetStream's APIError
        `WRONG_REVISION`: the key changed, or was deleted, meanwhile).
        """
        subject = self._prefix + key
        expected = {} if revision is None else {_EXPECTED_REVISION: str(revision)}
        try:
            await self._js.publish(subject, value, headers={"Nats-TTL": self._ttl, **expected})
        except APIError as exc:
            if exc.err_code != _TTL_DISABLED:
                raise
            if not self._warned:
                self._warned = True
                log.warning(
                    "the bucket behind %s does not allow per-message TTLs (made by an older "
                    "build?): ended job records are kept for ever",
                    self._prefix,
                )
            await self._js.publish(subject, value, headers=expected or None)
