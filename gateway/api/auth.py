"""API keys for the REST API: hashed at rest, each with a role and a caller id.

An `api_keys` entry is a SHA-256 hex digest of a key (make one with
`uv run python -c "from gateway.api.auth import hash_key; print(hash_key('KEY'))"`), or
`plain:KEY`, hashed when the app is built, for quick local setups. Either may be preceded by a
role and a name: `user/alice@plain:KEY`, `admin@<digest>`; in TOML an entry may also be a table
`{key = "...", role = "user", name = "alice"}`. Without a role an entry is an admin key.

- `admin` keys see and act on everything: the fleet, every job, every log row.
- `user` keys see only the jobs they submitted, on every surface; another's job is a 404.

Every key is a caller, named by an opaque id that tells nothing about the key: the entry's name,
or else an HMAC of the key's digest under the gateway's caller secret (`caller_secret`, else a
random one kept in `<data_dir>/caller-secret`). Clients send `Authorization: Bearer KEY`,
`X-API-Key: KEY` or Basic's password. With no keys configured the API is open, and everyone is
the one admin caller `anonymous`; that is allowed only while the gateway listens on loopback.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import logging
import os
import re
import secrets
from pathlib import Path
from typing import Any, Final, Literal

import msgspec
from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException, PermissionDeniedException
from litestar.handlers import BaseRouteHandler
from litestar.openapi.spec import Components, SecurityRequirement, SecurityScheme

from gateway.api.errors import ApiError
from gateway.api.signing import is_signed
from gateway.settings import ApiKey, Settings, SettingsError

log = logging.getLogger(__name__)

PLAIN_PREFIX: Final = "plain:"
ANONYMOUS: Final = "anonymous"
# The caller secret's file under the data folder when the settings give none.
SECRET_FILE: Final = "caller-secret"
_DIGEST = re.compile(r"[0-9a-f]{64}")
_ROLED = re.compile(r"(admin|user)(?:/([^@]*))?@(.+)", re.DOTALL)
# Names become caller ids, storage key parts and SQL literals: a closed, quote-free alphabet.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# Liveness, Prometheus scraping, the API description and the dashboard's files answer without
# a key: probes and scrapers rarely carry credentials, the dashboard asks for one itself, and
# none of them reveals jobs, servers or outputs.
PUBLIC_PATHS: Final = frozenset({"/health", "/metrics", "/"})
PUBLIC_PREFIXES: Final = ("/schema", "/static")
# Where the guard leaves who the caller is (the connection's state), for handlers and limits.
CALLER_STATE: Final = "comfyautomate_caller"


class Caller(msgspec.Struct, frozen=True):
    """Who is asking: an opaque caller id, and whether it may see everything."""

    id: str
    admin: bool

    def owns(self, caller: str | None) -> bool:
        """Whether this caller may see a job or file recorded with `caller`."""
        return self.admin or caller == self.id


OPEN: Final = Caller(ANONYMOUS, admin=True)


class KeyEntry(msgspec.Struct, frozen=True):
    """One configured key: its digest, its role and, when the settings give one, its name."""

    digest: bytes
    role: Literal["admin", "user"]
    name: str | None


class Keys(msgspec.Struct, frozen=True):
    """Every configured key, and the secret that turns an unnamed key into a caller id."""

    entries: list[KeyEntry]
    secret: bytes = b""

    def caller(self, entry: KeyEntry) -> Caller:
        """The caller a key stands for."""
        if entry.name is not None:
            ident = entry.name
        else:
            mac = hmac.new(self.secret, entry.digest, hashlib.sha256).hexdigest()
            ident = "key-" + mac[:20]
        return Caller(ident, admin=entry.role == "admin")


def hash_key(key: str) -> str:
    """The form `api_keys` stores a key in: its SHA-256 digest, lowercase hex."""
    return hashlib.sha256(key.encode()).hexdigest()


def _digest_of(secret: str, position: int) -> bytes:
    if secret.startswith(PLAIN_PREFIX) and len(secret) > len(PLAIN_PREFIX):
        return hash_key(secret[len(PLAIN_PREFIX) :]).encode()
    if _DIGEST.fullmatch(secret.lower()):
        return secret.lower().encode()
    # The message gives the entry's position, never its text: it may be a key written wrongly.
    raise SettingsError(
        f"api_keys entry {position} is neither a SHA-256 hex digest (64 hex digits) "
        f"nor 'plain:<key>' (optionally after 'admin@', 'user@' or 'user/<name>@')"
    )


def _entry(raw: str | ApiKey, position: int) -> KeyEntry:
    if isinstance(raw, ApiKey):
        role, name, secret = raw.role, raw.name, raw.key
    else:
        roled = _ROLED.fullmatch(raw)
        if roled is not None:
            role_text, name, secret = roled.groups()
            role = "admin" if role_text == "admin" else "user"
        else:
            role, name, secret = "admin", None, raw
    if name is not None and (
        not _NAME.fullmatch(name) or name.startswith("key-") or name == ANONYMOUS
    ):
        raise SettingsError(
            f"api_keys entry {position}: a name is 1-64 letters, digits, '_', '.', '-', "
            f"starting with a letter or digit, not 'anonymous' nor starting with 'key-'"
        )
    return KeyEntry(digest=_digest_of(secret, position), role=role, name=name)


def key_entries(settings: Settings) -> list[KeyEntry]:
    """The configured keys; a malformed entry, a repeated key or name is a SettingsError."""
    entries = [_entry(raw, position) for position, raw in enumerate(settings.api_keys, 1)]
    seen: set[bytes] = set()
    for position, entry in enumerate(entries, 1):
        if entry.digest in seen:
            raise SettingsError(f"api_keys entry {position} repeats the key of an earlier entry")
        seen.add(entry.digest)
    names = [entry.name for entry in entries if entry.name is not None]
    if len(set(names)) != len(names):
        raise SettingsError("api_keys: two entries have the same name; names are caller ids")
    return entries


def named_callers(settings: Settings) -> frozenset[str]:
    """The callers the settings name: keys' names, those given a weight or a cap, and
    `anonymous` (no keys): a bounded set, for metrics per caller."""
    names = {entry.name for entry in key_entries(settings) if entry.name is not None}
    names |= settings.caller_weights.keys() | settings.caller_max_running.keys()
    return frozenset(names | {ANONYMOUS})


def caller_secret(settings: Settings) -> bytes:
    """The secret behind unnamed keys' caller ids: the setting, else the data folder's file.

    Made at first use, readable by its owner alone. Gateways that share jobs must share it
    (or name every key): the same key must be the same caller on each.
    """
    if settings.caller_secret:
        return settings.caller_secret.encode()
    path = settings.data_path / SECRET_FILE
    try:
        return _read_or_make_secret(path)
    except OSError as exc:
        raise SettingsError(f"cannot read or make the caller secret {path}: {exc}") from exc


def _read_or_make_secret(path: Path) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    made = secrets.token_hex(32).encode()
    # Written whole under a name of its own, then linked into place: a gateway starting beside
    # this one, or after a crash here, finds the full secret or none, never a part of it.
    draft = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(made)
        out.flush()
        os.fsync(out.fileno())
    try:
        os.link(draft, path)
    except FileExistsError:
        secret = path.read_bytes().strip()
        if len(secret) < 32:
            raise OSError("the file holds fewer than 32 characters") from None
        return secret
    finally:
        draft.unlink()
    return made


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


def check_exposure(settings: Settings, keys: list[KeyEntry]) -> None:
    """Refuse to serve an open API beyond loopback."""
    if not keys and not is_loopback(settings.host):
        raise SettingsError(
            f"the gateway would listen on {settings.host!r}, beyond loopback, with no API key: "
            "set api_keys (COMFYAUTOMATE_API_KEYS) or listen on 127.0.0.1"
        )


def check_settings(settings: Settings) -> Keys:
    """The configured keys, after refusing settings the API cannot be served on safely.

    `create_app` calls it; a launcher may call it first to fail before starting anything else.
    """
    entries = key_entries(settings)
    check_exposure(settings, entries)
    secret = caller_secret(settings) if any(e.name is None for e in entries) else b""
    return Keys(entries=entries, secret=secret)


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
    return template in PUBLIC_PATHS or any(
        template == prefix or template.startswith(prefix + "/") for prefix in PUBLIC_PREFIXES
    )


class ApiKeyGuard:
    """Litestar guard: 401 without a key, 403 with an unknown one; public paths pass.

    It leaves the caller in the connection's state, for `caller_of`.
    """

    def __init__(self, keys: Keys) -> None:
        self._entries = keys.entries
        self._callers = [keys.caller(entry) for entry in keys.entries]

    # Async although it never waits: Litestar runs a sync guard in a worker thread, a thread
    # hop on every request.
    async def __call__(
        self, connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler
    ) -> None:
        if not self._entries:
            # No key names the client: limits go by its address (see limits.client_id).
            connection.state[CALLER_STATE] = OPEN
            return
        if _is_public(connection):
            return
        if is_signed(connection):
            return  # the URL's signature decides (api/images.py), whatever key comes with it
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
        matches = [hmac.compare_digest(digest, entry.digest) for entry in self._entries]
        if not any(matches):
            client = connection.client.host if connection.client else "?"
            log.warning("refused an unknown API key from %s", client)
            raise PermissionDeniedException("the API key is not valid")
        connection.state[CALLER_STATE] = self._callers[matches.index(True)]


def caller_of(connection: ASGIConnection[Any, Any, Any, Any]) -> Caller:
    """Who sent this request, as the guard found; a public route's caller owns nothing."""
    caller = connection.state.get(CALLER_STATE)
    return caller if isinstance(caller, Caller) else Caller("", admin=False)


async def admin_only(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    """Guard for the fleet's routes: a user key gets 403 (it knows those routes exist)."""
    if not caller_of(connection).admin:
        raise ApiError(403, "admin_only", "this needs an admin API key")


def openapi_security(keys: Keys) -> tuple[Components, list[SecurityRequirement]]:
    """The key schemes for /schema, so the docs UI can send a key; required only with keys."""
    schemes: dict[str, SecurityScheme | Any] = {
        "bearer": SecurityScheme(
            type="http",
            scheme="bearer",
            description="`Authorization: Bearer KEY`, needed when the gateway has api_keys",
        ),
        "apiKey": SecurityScheme(
            type="apiKey",
            name="X-API-Key",
            security_scheme_in="header",
            description="`X-API-Key: KEY`, the same keys as bearer",
        ),
    }
    security: list[SecurityRequirement] = [{"bearer": []}, {"apiKey": []}] if keys.entries else []
    return Components(security_schemes=schemes), security
