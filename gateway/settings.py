"""One typed settings object for every role.

Values come from, lowest precedence first: the defaults below, a TOML file, environment
variables `COMFYAUTOMATE_<FIELD>` and command-line flags. A misspelt key in the TOML file is an
error rather than a silently ignored setting.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Final, Literal

import msgspec

ENV_PREFIX: Final = "COMFYAUTOMATE_"
DEFAULT_CONFIG_FILE: Final = "comfyautomate.toml"


class SettingsError(ValueError):
    """A setting has a value that cannot be used; the message names it."""


class ApiKey(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """An `api_keys` entry written as a table: the key (a digest or `plain:KEY`), its role, and
    a name that becomes its caller id (see gateway/api/auth.py)."""

    key: str
    role: Literal["admin", "user"] = "admin"
    name: str | None = None
    # Signs the webhooks of this key's jobs instead of `webhook_secret` (needs a `name`).
    webhook_secret: str | None = None


class Settings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Every setting, with the default a single machine runs on."""

    # Bus
    nats_url: str = "nats://127.0.0.1:4222"
    subject_prefix: str = "comfy"
    embedded_nats: bool = True
    nats_conf: str | None = None
    nats_user: str | None = None
    nats_password: str | None = None
    # Copies JetStream keeps of every stream, bucket and object store the system creates: 1 on
    # one broker, 3 on a cluster (a node can die without loss or pause), or "auto": 3 when the
    # broker is a cluster of 3 nodes or more, else 1. Existing resources are raised, never lowered.
    nats_replicas: Annotated[int, msgspec.Meta(ge=1, le=5)] | Literal["auto"] = 1
    # Files
    data_dir: str = "data"
    # Gateway
    host: str = "127.0.0.1"
    port: int = 8000
    public_url: str | None = None
    # The REST API keys: SHA-256 hex digests ("plain:KEY" is hashed at start), each optionally
    # with a role and a name ("user/alice@plain:KEY"), or tables (ApiKey); required when `host`
    # is beyond loopback. See gateway/api/auth.py.
    api_keys: list[str | ApiKey] = msgspec.field(default_factory=list)
    # Turns unnamed keys into caller ids (an HMAC under it); made in the data folder when unset.
    caller_secret: str | None = None
    # How long the signed output URLs of results open without an API key (signed under a key
    # derived from the caller secret); 0 hands out plain URLs, which need a key.
    output_url_ttl_s: float = 7 * 24 * 3600.0
    # Workflows are JSON graphs; 10 MB is far above any real one and far below harm.
    max_body_bytes: int = 10 * 1024 * 1024
    # Submissions (submit and execute) per API key, or per address without keys: a token
    # bucket of `submit_burst` refilled at `submit_rate_per_s`; a rate of 0 turns it off. Off by
    # default: one trusted client feeding a fleet is the common case, and it may submit 1000/s.
    submit_rate_per_s: float = 0.0
    submit_burst: int = 100
    # Server registrations per API key (or address): a burst, then a rate per minute. Always
    # on: each one makes the gateway resolve and probe an address.
    register_burst: int = 10
    register_rate_per_min: float = 10.0
    # Event streams (SSE and websocket together) open at once on one gateway.
    max_event_streams: int = 256
    # ... and per API key (per address without keys): one client cannot take them all.
    max_event_streams_per_key: int = 64
    # An event stream (SSE) quiet this long sends a keep-alive comment, so proxies keep it open.
    event_keepalive_s: float = 15.0
    # Networks (CIDR) or host names that servers may be registered at, and only those. Empty:
    # public addresses, and loopback and private ones only while `host` is loopback. Link-local,
    # cloud metadata, multicast and this system's own ports never (gateway/api/serveraddress.py).
    server_allowlist: list[str] = msgspec.field(default_factory=list)
    # Registering a server probes its address: each connect, read or write may take this long,
    # and the whole probe three times as long, so an address that drips bytes cannot hold it.
    server_probe_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 10.0
    # Balancing and adapters
    heartbeat_interval_s: float = 1.0
    # Networks (CIDR) or host names that URL inputs of jobs may be fetched from besides public
    # addresses; loopback, link-local, private and multicast ones are refused unless listed.
    url_input_allowlist: list[str] = msgspec.field(default_factory=list)
    default_capacity: int = 2
    default_max_attempts: int = 2
    # How long an Idempotency-Key stands for its job (the same on every balancer of a system).
    idempotency_ttl_s: float = 24 * 3600.0
    # Jobs in one POST /workflow/batch.
    max_batch_jobs: int = 1000
    # Sharing the fleet between callers (gateway/balancer/shares.py), the same on every
    # balancer of a system. Each caller's weight (1 unless named here): its share of the jobs
    # bound while several callers wait.
    caller_weights: dict[str, Annotated[float, msgspec.Meta(gt=0, le=1_000_000)]] = msgspec.field(
        default_factory=dict
    )
    # Jobs of one caller bound to servers (dispatched or running) at once: a default (0: no
    # cap) and per caller; a caller at its cap waits while others' jobs are bound.
    max_running_per_caller: Annotated[int, msgspec.Meta(ge=0)] = 0
    caller_max_running: dict[str, Annotated[int, msgspec.Meta(ge=1)]] = msgspec.field(
        default_factory=dict
    )
    # Jobs waiting to be bound, per caller and in all (0: no bound); a submission past either
    # is refused (429 `queue_full`, Retry-After from how fast the queue drains). On by default:
    # far above any one burst, far below what a runaway client would pile up.
    max_pending_per_caller: Annotated[int, msgspec.Meta(ge=0)] = 10_000
    max_pending: Annotated[int, msgspec.Meta(ge=0)] = 100_000
    # Storage
    storage: str = "local"
    # Webhooks (gateway/webhooks): a URL every job's events go to unless the job names its own,
    # which event types by default, and the Standard Webhooks secret (`whsec_<base64>`) that
    # signs them unless the job's API key has a `webhook_secret` of its own.
    webhook_url: str | None = None
    webhook_events: list[str] = msgspec.field(
        default_factory=lambda: ["succeeded", "failed", "cancelled"]
    )
    webhook_secret: str | None = None
    # Networks (CIDR) or host names webhooks may be sent to besides public addresses, as for
    # URL inputs; cloud metadata addresses never.
    webhook_allowlist: list[str] = msgspec.field(default_factory=list)
    # One attempt's time limit; retries back off from `base` doubling up to `max`, jittered,
    # for `window` seconds after the event, then the delivery is given up.
    webhook_timeout_s: float = 10.0
    webhook_retry_base_s: float = 5.0
    webhook_retry_max_s: float = 3600.0
    webhook_retry_window_s: float = 24 * 3600.0
    # Deliveries one gateway makes at once.
    webhook_concurrency: int = 16
    # Retention. An ended job's record leaves KV `comfy_jobs` this long after its end (whole
    # seconds, at least 1; 0 keeps every record); its status and result are read from its log
    # from then on. The default is the EVENTS stream's retention.
    job_records_retention_s: Annotated[float, msgspec.Meta(ge=0)] = 30 * 24 * 3600.0
    # The log sink deletes a job's log file and index rows once its last event is this old
    # (0: never, the default).
    logs_retention_s: Annotated[float, msgspec.Meta(ge=0)] = 0.0

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir)

    @property
    def logs_path(self) -> Path:
        return self.data_path / "logs"


_FIELD_TYPES: Final[dict[str, Any]] = {
    field.name: field.type for field in msgspec.structs.fields(Settings)
}


def _from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name, kind in _FIELD_TYPES.items():
        raw = environ.get(ENV_PREFIX + name.upper())
        if raw is None:
            continue
        # Lists and tables are written as JSON in the environment; scalars as plain text.
        is_container = "list" in str(kind) or "dict" in str(kind)
        if is_container and raw.strip().startswith(("[", "{")):
            try:
                values[name] = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise SettingsError(f"{ENV_PREFIX}{name.upper()} is not valid JSON: {exc}") from exc
        elif "dict" in str(kind):
            values[name] = _pairs(name, raw)
        elif is_container:
            values[name] = [item.strip() for item in raw.split(",") if item.strip()]
        else:
            values[name] = raw
    return values


def _pairs(name: str, raw: str) -> dict[str, str]:
    """A table written `key=value,key=value` in the environment (values converted later)."""
    pairs: dict[str, str] = {}
    for item in (part.strip() for part in raw.split(",")):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SettingsError(
                f"{ENV_PREFIX}{name.upper()}: {item!r} is not NAME=VALUE (or give JSON)"
            )
        pairs[key.strip()] = value.strip()
    return pairs


def _from_file(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            table = tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise SettingsError(f"cannot read settings file {path}: {exc}") from exc
    # Allow both a flat file and one with a [comfyautomate] table.
    section = table.get("comfyautomate", table)
    if not isinstance(section, dict):
        raise SettingsError(f"{path}: [comfyautomate] must be a table")
    return section


def load_settings(
    flags: Mapping[str, Any] | None = None,
    *,
    config_file: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Build Settings from a TOML file, the environment and flags (flags win).

    `flags` holds only the options given on the command line; None values are ignored so that an
    absent flag does not hide the environment. The file is `config_file`, else
    `$COMFYAUTOMATE_CONFIG`, else `./comfyautomate.toml` when it exists.
    """
    environ = os.environ if environ is None else environ
    merged: dict[str, Any] = {}
    file = config_file or environ.get(ENV_PREFIX + "CONFIG")
    if file is not None:
        merged.update(_from_file(Path(file)))
    elif Path(DEFAULT_CONFIG_FILE).is_file():
        merged.update(_from_file(Path(DEFAULT_CONFIG_FILE)))
    merged.update(_from_env(environ))
    merged.update({key: value for key, value in (flags or {}).items() if value is not None})
    try:
        return msgspec.convert(merged, Settings, strict=False)
    except msgspec.ValidationError as exc:
        raise SettingsError(f"invalid setting: {exc}") from exc
