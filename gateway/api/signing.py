"""Signed, expiring output URLs: `/images/{key}?expires=...&sig=...` opens without an API key.

The signature is an HMAC-SHA256 over the storage key and the expiry (Unix seconds), under a key
derived from the caller secret (`auth.caller_secret`), so every gateway of a system signs and
checks alike, and rotating that secret revokes every URL handed out. A URL is a capability for
one stored output until it expires: whoever holds it may fetch that file, and nothing else.
A wrong, tampered or expired signature is refused with 403, compared in constant time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import time
from collections.abc import Callable
from typing import Any, Final
from urllib.parse import quote, urlencode

from litestar.connection import ASGIConnection

from gateway.api.errors import ApiError
from gateway.settings import Settings, SettingsError

# The route, and its template as the guard sees it (`path_template`, without the types).
IMAGES_TEMPLATE: Final = "/images/{key:path}"
_IMAGES_FORMAT: Final = "/images/{key}"
SIGNER_STATE: Final = "comfyautomate_url_signer"
_PURPOSE: Final = b"comfyautomate output urls v1"
# Longer than any sane expiry, short enough to stay an exact integer everywhere.
_MAX_EXPIRES: Final = 10**11


class UrlSigner:
    """Signs output URLs and checks signed ones; `ttl_s` 0 signs nothing."""

    def __init__(self, secret: bytes, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._key = hmac.new(secret, _PURPOSE, hashlib.sha256).digest()

    @classmethod
    def from_settings(cls, settings: Settings, secret: Callable[[Settings], bytes]) -> UrlSigner:
        """The signer of this system's gateways, under `secret(settings)` (the caller
        secret); a SettingsError for a ttl that is no time."""
        ttl = settings.output_url_ttl_s
        if not (math.isfinite(ttl) and 0 <= ttl <= 10 * 365 * 24 * 3600):
            raise SettingsError(
                f"output_url_ttl_s is {ttl!r}: give seconds from 0 (plain URLs) to ten years"
            )
        return cls(secret(settings) if ttl > 0 else b"", ttl)

    def url(self, base: str, key: str, *, now: float | None = None) -> str:
        """The URL of `key` under `base`: signed, unless signing is off."""
        return self.answer(base, now=now)(key)

    def answer(self, base: str, *, now: float | None = None) -> Callable[[str], str]:
        """What signs the URLs of one answer: its expiry is worked out here, once, so every
        URL the answer gives (an output's in `images` and in `outputs` alike) is the same."""
        if self.ttl_s <= 0:
            return lambda key: _plain(base, key)
        expires = math.ceil((time.time() if now is None else now) + self.ttl_s)
        return lambda key: self._signed(base, key, expires)

    def _signed(self, base: str, key: str, expires: int) -> str:
        query = urlencode({"expires": expires, "sig": self._signature(key, expires)})
        return f"{_plain(base, key)}?{query}"

    def check(
        self, key: str, expires: str | None, sig: str | None, *, now: float | None = None
    ) -> int:
        """The expiry of a valid signature of `key`; ApiError 403 for any other."""
        stamp = _expiry(expires)
        expected = self._signature(key, stamp) if stamp is not None else ""
        # Computed and compared whatever the expiry, so the answer's timing tells nothing.
        valid = hmac.compare_digest(expected.encode(), (sig or "").encode("utf-8", "replace"))
        if self.ttl_s <= 0 or stamp is None or not valid:
            raise ApiError(403, "invalid_signature", "the URL's signature is not valid")
        if stamp <= (time.time() if now is None else now):
            raise ApiError(
                403, "url_expired", "the URL has expired; ask for the job's result for a new one"
            )
        return stamp

    def _signature(self, key: str, expires: int) -> str:
        message = f"{expires}\n{key}".encode()
        mac = hmac.new(self._key, message, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()


def _plain(base: str, key: str) -> str:
    return f"{base}/images/{quote(key, safe='/')}"


def _expiry(raw: str | None) -> int | None:
    if raw is None or not raw.isascii() or not raw.isdigit() or len(raw) > 11:
        return None
    value = int(raw)
    return value if 0 < value < _MAX_EXPIRES else None


def is_signed(connection: ASGIConnection[Any, Any, Any, Any]) -> bool:
    """Whether the request is for an output by signed URL: its signature, not a key, decides."""
    template = str(connection.scope.get("path_template", ""))
    params = connection.query_params
    return template == _IMAGES_FORMAT and ("sig" in params or "expires" in params)


def signer_of(connection: ASGIConnection[Any, Any, Any, Any]) -> UrlSigner:
    """The app's signer (create_app puts it in the app's state)."""
    signer = connection.app.state[SIGNER_STATE]
    assert isinstance(signer, UrlSigner)
    return signer
