"""Idempotency keys: the same key and request from the same caller stand for one job.

A key is kept in KV `comfy_idempotency` under a digest of its caller and itself, so another
caller's same key is another key and names nothing of this one's. Its entry holds the job id and
the digest of the request; it is written (with `create`, the atomic step between two clients
racing) before the job is, so a submission cut in between leaves a key that a retry follows to
create the job under that very id. Entries expire after `idempotency_ttl_s`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from typing import Final

import msgspec
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from gateway.bus.contract import IdempotencyEntry, Subjects, decode, encode, now

log = logging.getLogger(__name__)

MAX_KEY_CHARS: Final = 255
# A key changes hands at most once per expiry; more tries than that means something is wrong.
_CLAIM_TRIES: Final = 4
_canonical: Final = msgspec.json.Encoder(order="sorted")


def key_problem(key: str) -> str | None:
    """Why `key` cannot be an idempotency key; None when it can."""
    if not key or len(key) > MAX_KEY_CHARS:
        return f"an idempotency key is 1-{MAX_KEY_CHARS} characters"
    if not key.isprintable() or not key.isascii():
        return "an idempotency key is printable ASCII"
    return None


def scoped_key(caller: str | None, key: str) -> str:
    """The KV key of `key` for `caller` (a bus client without a caller is a scope of its own)."""
    scope = _canonical.encode([caller, key])
    return hashlib.sha256(scope).hexdigest()


class Mismatch(Exception):
    """The key is taken by another request; carries the job it stands for."""

    def __init__(self, job_id: str) -> None:
        super().__init__(job_id)
        self.job_id = job_id


class IdempotencyKeys:
    """The keys of every caller, in one KV bucket with a time to live."""

    def __init__(self, kv: KeyValue, ttl_s: float) -> None:
        self._kv = kv
        self._ttl_s = ttl_s

    async def find(self, caller: str | None, key: str, digest: str) -> str | None:
        """The job `key` stands for, if it is kept; Mismatch if it was used for another request."""
        entry, _ = await self._read(scoped_key(caller, key))
        if entry is None:
            return None
        if entry.request_hash != digest:
            raise Mismatch(entry.job_id)
        return entry.job_id

    async def claim(self, caller: str | None, key: str, digest: str, job_id: str) -> str:
        """Make `key` stand for `job_id`, unless another request took it first: then its job.

        Mismatch when the one that took it first had another request.
        """
        name = scoped_key(caller, key)
        value = encode(IdempotencyEntry(job_id=job_id, request_hash=digest, created_at=now()))
        for _ in range(_CLAIM_TRIES):
            try:
                await self._kv.create(name, value)
                return job_id
            except KeyWrongLastSequenceError:
                pass
            found, revision = await self._read(name)
            if found is not None:
                if found.request_hash != digest:
                    raise Mismatch(found.job_id)
                return found.job_id
            # Expired but not yet dropped by the bucket: take it over from that revision, which
            # only one of several racing clients can do.
            try:
                await self._kv.update(name, value, last=revision)
                return job_id
            except KeyWrongLastSequenceError:
                continue  # another client took it over first: read whose it is now
        raise RuntimeError(f"idempotency key changed hands {_CLAIM_TRIES} times in a row")

    async def release(self, caller: str | None, key: str) -> None:
        """Forget a key whose job could not be made, so that it does not point at nothing."""
        try:
            await self._kv.delete(scoped_key(caller, key))
        except Exception:
            # The key then expires with its TTL; a retry meanwhile gets the same refusal.
            log.exception("could not forget an idempotency key whose job was refused")

    async def _read(self, name: str) -> tuple[IdempotencyEntry | None, int]:
        """The key's live entry (None when absent or expired) and its revision (0: none)."""
        try:
            got = await self._kv.get(name)
        except KeyNotFoundError:
            return None, 0
        revision = got.revision or 0
        if got.value is None:
            return None, revision
        entry = decode(got.value, IdempotencyEntry)
        # The bucket drops entries after its TTL; this holds the setting exactly meanwhile.
        if now() - entry.created_at > self._ttl_s:
            return None, revision
        return entry, revision


async def open_keys(js: JetStreamContext, subjects: Subjects, ttl_s: float) -> IdempotencyKeys:
    """The bucket of keys, its TTL set to `ttl_s` if it was made with another."""
    kv = await js.key_value(subjects.idempotency_bucket)
    info = await js.stream_info(f"KV_{subjects.idempotency_bucket}")
    if info.config.max_age is None or abs(info.config.max_age - ttl_s) > 1e-3:
        log.info("idempotency keys are now kept %g s", ttl_s)
        await js.update_stream(dataclasses.replace(info.config, max_age=ttl_s))
    return IdempotencyKeys(kv, ttl_s)
