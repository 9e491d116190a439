"""Standard Webhooks signatures: `webhook-signature: v1,<base64 HMAC-SHA256>` of
`<webhook-id>.<webhook-timestamp>.<body>`, keyed by the bytes of a `whsec_<base64>` secret."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import time
from collections.abc import Mapping
from typing import Final

SECRET_PREFIX: Final = "whsec_"
# The specification asks for keys of 24 to 64 bytes.
MIN_KEY_BYTES: Final = 24
MAX_KEY_BYTES: Final = 64
# How far a receiver lets a timestamp stray from its clock (the specification's suggestion).
TOLERANCE_S: Final = 300


class SecretError(ValueError):
    """A webhook secret that is not `whsec_` followed by the base64 of 24-64 bytes."""


def secret_key(secret: str) -> bytes:
    """The HMAC key a `whsec_...` secret stands for."""
    if not secret.startswith(SECRET_PREFIX):
        raise SecretError(f"a webhook secret starts with {SECRET_PREFIX!r}")
    try:
        key = base64.b64decode(secret[len(SECRET_PREFIX) :], validate=True)
    except (binascii.Error, ValueError):
        raise SecretError("a webhook secret is 'whsec_' followed by base64") from None
    if not MIN_KEY_BYTES <= len(key) <= MAX_KEY_BYTES:
        raise SecretError(
            f"a webhook secret holds {MIN_KEY_BYTES} to {MAX_KEY_BYTES} bytes, not {len(key)}"
        )
    return key


def new_secret() -> str:
    """A fresh secret in the form the settings take."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def signature(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` value of one request."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signed_headers(
    key: bytes, msg_id: str, body: bytes, timestamp: int | None = None
) -> dict[str, str]:
    """The three Standard Webhooks headers for `body`, signed now (or at `timestamp`)."""
    stamp = int(time.time()) if timestamp is None else timestamp
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(stamp),
        "webhook-signature": signature(key, msg_id, stamp, body),
    }


def verify(
    secret: str, headers: Mapping[str, str], body: bytes, *, now: float | None = None
) -> bool:
    """Whether a request carries a valid signature of `body` under `secret`, sent recently.

    What a receiver does; here for tests and as the reference for the docs' snippet.
    """
    try:
        msg_id = headers["webhook-id"]
        stamp = int(headers["webhook-timestamp"])
        sent = headers["webhook-signature"]
    except (KeyError, ValueError):
        return False
    if abs((time.time() if now is None else now) - stamp) > TOLERANCE_S:
        return False
    expected = signature(secret_key(secret), msg_id, stamp, body)
    return any(hmac.compare_digest(expected, candidate) for candidate in sent.split(" "))
