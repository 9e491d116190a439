"""API keys for the REST API: hashed at rest, checked by an app-wide guard.

`api_keys` holds SHA-256 hex digests of the keys (make one with
`uv run python -c "from gateway.api.auth import hash_key; print(hash_key('KEY'))"`); an entry
written `plain:KEY` is hashed when the app is built, for quick local setups. Clients send
`Authorization: Bearer KEY` or `X-API-Key: KEY`. With no keys configured the API is open, which
is allowed only while the gateway listens on loopback alone.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import logging
import re
from typing import Any, Final

from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException, PermissionDeniedException
from litestar.handlers import BaseRouteHandler
from litestar.openapi.spec import Components, SecurityRequirement, SecurityScheme

from gateway.settings import Settings, SettingsError

log = logging.getLogger(__name__)

PLAIN_PREFIX: Final = "plain:"
_DIGEST = re.compile(r"[0-9a-f]{64}")
# Liveness, Prometheus scraping and the API description answer without a key: probes and
# scrapers rarely carry credentials, and none of them reveals jobs, servers or outputs.
PUBLIC_PATHS: Final = frozenset({"/health", "/metrics"})
PUBLIC_PREFIX: Final = "/schema"
# Where the guard leaves who the caller is, for the rate limiter (the connection's state).
CLIENT_ID_STATE: Final = "comfyautomate_client_id"


def hash_key(key: str) -> str:
    """The form `api_keys` stores a key in: its SHA-256 digest, lowercase hex."""
    return hashlib.sha256(key.encode()).hexdigest()


def key_digests(settings: Settings) -> list[bytes]:
    """The configured keys as digests; a malformed entry is a SettingsError.

    The message gives the entry's position, never its text: it may be a key written wrongly.
    """
    digests = []
    for position, entry in enumerate(settings.api_keys, start=1):
        if entry.startswith(PLAIN_PREFIX) and len(entry) > len(PLAIN_PREFIX):
            digests.append(hash_key(entry[len(PLAIN_PREFIX) :]))
        elif _DIGEST.fullmatch(entry.lower()):
            digests.append(entry.lower())
        else:
            raise SettingsError(
                f"api_keys entry {position} is neither a SHA-256 hex digest (64 hex digits) "
                f"nor 'plain:<key>'"
            )
    return [digest.encode() for digest in digests]


def is_loopback(host: str) -> bool:
    """Whether `host` lets only this machine connect (127.0.0.0/8, ::1, localhost)."""
    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        # Any other name may resolve to an outside address; treat it as exposed.
        return False


def check_exposure(settings: Settings, digests: list[bytes]) -> None:
    """Refuse to serve an open API beyond loopback."""
    if not digests and not is_loopback(settings.host):
        raise SettingsError(
            f"the gateway would listen on {settings.host!r}, beyond loopback, with no API key: "
            "set api_keys (COMFYAUTOMATE_API_KEYS) or listen on 127.0.0.1"
        )


def check_settings(settings: Settings) -> list[bytes]:
    """The key digests, after refusing settings the API cannot be served on safely.

    `create_app` calls it; a launcher may call it first to fail before starting anything else.
    """
    digests = key_digests(settings)
    check_exposure(settings, digests)
    return digests


def presented_key(connection: ASGIConnection[Any, Any, Any, Any]) -> str | None:
    """The key the client sent: `Authorization: Bearer`, `X-API-Key`, or Basic's password.

    Basic is for ComfyUI clients that only know user and password: the key is the password,
    the user name is ignored.
    """
    header = connection.headers.get("x-api-key")
    if header and header.strip():
        return header.strip()
    scheme, _, credentials = connection.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    if scheme.lower() == "basic" and credentials.strip():
        try:
            decoded = base64.b64decode(credentials.strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return None
        password = decoded.partition(":")[2]
        return password or None
    return None


def _is_public(connection: ASGIConnection[Any, Any, Any, Any]) -> bool:
    # The matched route's template, not the raw path: `/schema/../workflow/submit` cannot pass.
    template = str(connection.scope.get("path_template", ""))
    return (
        template in PUBLIC_PATHS
        or template == PUBLIC_PREFIX
        or template.startswith(PUBLIC_PREFIX + "/")
    )


class ApiKeyGuard:
    """Litestar guard: 401 without a key, 403 with an unknown one; public paths pass."""

    def __init__(self, digests: list[bytes]) -> None:
        self._digests = digests

    # Async although it never waits: Litestar runs a sync guard in a worker thread, a thread
    # hop on every request.
    async def __call__(
        self, connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler
    ) -> None:
        if not self._digests:
            return
        if _is_public(connection):
            return
        key = presented_key(connection)
        if key is None:
            raise NotAuthorizedException(
                "an API key is required: send 'Authorization: Bearer <key>', 'X-API-Key: <key>', "
                "or the key as the Basic auth password",
                # Basic too: ComfyUI clients that only know user and password answer that one.
                headers={
                    "WWW-Authenticate": 'Bearer realm="comfyautomate", Basic realm="comfyautomate"'
                },
            )
        digest = hash_key(key).encode()
        # Compare against every key, without stopping early, so timing tells nothing.
        matches = [hmac.compare_digest(digest, known) for known in self._digests]
        if not any(matches):
            client = connection.client.host if connection.client else "?"
            log.warning("refused an unknown API key from %s", client)
            raise PermissionDeniedException("the API key is not valid")
        # The digest's head names the caller for per-key limits without holding the key.
        connection.state[CLIENT_ID_STATE] = "key:" + digest[:16].decode()


def openapi_security(digests: list[bytes]) -> tuple[Components, list[SecurityRequirement]]:
    """The key schemes for /schema, so the docs UI can send a key; none when the API is open."""
    if not digests:
        return Components(), []
    schemes: dict[str, SecurityScheme | Any] = {
        "bearer": SecurityScheme(type="http", scheme="bearer"),
        "apiKey": SecurityScheme(type="apiKey", name="X-API-Key", security_scheme_in="header"),
    }
    return Components(security_schemes=schemes), [{"bearer": []}, {"apiKey": []}]
