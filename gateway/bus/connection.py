"""Connecting to NATS and creating the JetStream resources of the contract.

Whichever process starts first creates the streams, buckets and object store; the others find
them. Creation is idempotent: JetStream accepts an identical definition again, and a definition
that changed between versions is updated in place.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import msgspec
from nats.aio.client import Client
from nats.js import JetStreamContext, api
from nats.js.errors import BadRequestError

from gateway.bus.contract import Subjects

log = logging.getLogger(__name__)

# JetStream's error code for "stream name already in use with a different configuration".
_STREAM_NAME_IN_USE = 10058
# Publishes carrying the same Nats-Msg-Id within this window are stored once.
DUPLICATE_WINDOW_S = 120.0
_MAX_MESSAGE = 1024 * 1024
# A leader that stops renewing its lease is replaced after this long.
LEADER_LEASE_S = 5.0
# How long an idempotency key is kept; the balancer applies `idempotency_ttl_s` when it differs.
IDEMPOTENCY_TTL_S = 24 * 3600.0


class BusResources(msgspec.Struct, frozen=True, kw_only=True):
    """How the JetStream resources are sized; the defaults suit one machine."""

    replicas: int = 1
    events_max_age_s: float = 30 * 24 * 3600.0
    events_max_bytes: int = -1


async def connect(url: str, name: str, **options: Any) -> Client:
    """Connect to NATS for one role; reconnect forever instead of giving up after two minutes.

    Credentials come as `user`/`password` options or inside the URL (`nats://user:pw@host`);
    either way they are used for every server of the pool, including those a cluster announces.
    A connection with a user receives its replies under `_INBOX.<user>.` (unless
    `inbox_prefix` is given), so that a user can be allowed its own replies and no one else's.
    """
    client = Client()

    async def on_error(exc: Exception) -> None:
        log.warning("NATS connection %s: %s", name, exc)

    async def on_disconnect() -> None:
        # nats-py reports its own close() as a disconnect too; only a loss is worth a warning.
        if not (client.is_closed or client.is_draining):
            log.warning("NATS connection %s lost; reconnecting", name)

    async def on_reconnect() -> None:
        log.info("NATS connection %s restored", name)

    servers, credentials = _split_credentials(url)
    settings: dict[str, Any] = {
        "name": name,
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": 0.5,
        # Draining waits for subscription callbacks; a stuck one must not hold a shutdown for
        # nats-py's default 30 s.
        "drain_timeout": 5,
        "error_cb": on_error,
        "disconnected_cb": on_disconnect,
        "reconnected_cb": on_reconnect,
    }
    settings.update(credentials)
    settings.update({key: value for key, value in options.items() if value is not None})
    user = settings.get("user")
    if "inbox_prefix" not in settings and isinstance(user, str) and _INBOX_USER.match(user):
        settings["inbox_prefix"] = f"_INBOX.{user}"
    try:
        await client.connect(servers, **settings)
    except BaseException:
        # A refused connection (bad credentials, say) must not leave its socket behind.
        with contextlib.suppress(Exception):
            await client.close()
        raise
    return client


# A user name that can stand as one subject token, and so name its own reply subjects.
_INBOX_USER = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def shown_url(url: str) -> str:
    """The NATS URL fit for logs and screens: servers without their credentials."""
    return ",".join(_split_credentials(url)[0])


def _split_credentials(url: str) -> tuple[list[str], dict[str, str]]:
    """The servers of a comma-separated URL without `user:password@`, and those credentials.

    nats-py would use credentials found in a URL for that server only, and not for the
    servers a cluster announces later; lifted out, they serve the whole pool.
    """
    servers: list[str] = []
    found: dict[str, str] = {}
    for part in (piece.strip() for piece in url.split(",")):
        if not part:
            continue
        parts = urlsplit(part if "://" in part else "nats://" + part)
        if parts.username is None or parts.password is None:
            servers.append(part)  # no credentials, or a token: nats-py handles it as it is
            continue
        credentials = {"user": unquote(parts.username), "password": unquote(parts.password)}
        if found and credentials != found:
            raise ValueError("the NATS URL names different credentials for different servers")
        found = credentials
        host = parts.hostname or ""
        netloc = f"[{host}]" if ":" in host else host
        if parts.port is not None:
            netloc += f":{parts.port}"
        servers.append(urlunsplit(parts._replace(netloc=netloc)))
    return servers, found


def _stream_configs(subjects: Subjects, sizing: BusResources) -> list[api.StreamConfig]:
    return [
        api.StreamConfig(
            name=subjects.jobs_stream,
            description="Jobs bound to a server, one subject per server (work queue)",
            subjects=[subjects.all_jobs],
            retention=api.RetentionPolicy.WORK_QUEUE,
            storage=api.StorageType.FILE,
            num_replicas=sizing.replicas,
            duplicate_window=DUPLICATE_WINDOW_S,
            max_msg_size=_MAX_MESSAGE,
        ),
        api.StreamConfig(
            name=subjects.events_stream,
            description="Every event of every job, one subject per job",
            subjects=[subjects.all_events],
            retention=api.RetentionPolicy.LIMITS,
            storage=api.StorageType.FILE,
            num_replicas=sizing.replicas,
            duplicate_window=DUPLICATE_WINDOW_S,
            max_age=sizing.events_max_age_s,
            max_bytes=sizing.events_max_bytes,
            max_msg_size=_MAX_MESSAGE,
            # Lets a publisher read the last event of a job cheaply (direct get).
            allow_direct=True,
        ),
        api.StreamConfig(
            name=subjects.webhooks_stream,
            description="Webhook deliveries to make, and what each attempt came to (work queue)",
            subjects=[subjects.all_webhook_sends, subjects.all_webhook_attempts],
            retention=api.RetentionPolicy.WORK_QUEUE,
            storage=api.StorageType.FILE,
            num_replicas=sizing.replicas,
            duplicate_window=DUPLICATE_WINDOW_S,
            # Longer than any retry window: a delivery waiting out its backoff stays here.
            max_age=sizing.events_max_age_s,
            max_msg_size=_MAX_MESSAGE,
        ),
    ]


async def _ensure_stream(js: JetStreamContext, config: api.StreamConfig) -> None:
    try:
        await js.add_stream(config)
    except BadRequestError as exc:
        if exc.err_code != _STREAM_NAME_IN_USE:
            raise
        log.info("stream %s exists with another definition; updating it", config.name)
        await js.update_stream(config)


async def ensure_resources(
    js: JetStreamContext,
    subjects: Subjects,
    sizing: BusResources | None = None,
) -> None:
    """Create (or find) the streams JOBS, EVENTS and WEBHOOKS, the buckets and the object store."""
    sizing = sizing or BusResources()
    for config in _stream_configs(subjects, sizing):
        await _ensure_stream(js, config)
    await js.create_key_value(
        api.KeyValueConfig(
            bucket=subjects.servers_bucket,
            description="Registered ComfyUI servers",
            history=1,
            storage=api.StorageType.FILE,
            replicas=sizing.replicas,
        )
    )
    await js.create_key_value(
        api.KeyValueConfig(
            bucket=subjects.jobs_bucket,
            description="Current state of each job",
            history=1,
            storage=api.StorageType.FILE,
            replicas=sizing.replicas,
        )
    )
    await js.create_key_value(
        api.KeyValueConfig(
            bucket=subjects.balancer_bucket,
            description="Balancer leadership lease (one dispatching balancer at a time)",
            history=1,
            ttl=LEADER_LEASE_S,
            storage=api.StorageType.FILE,
            replicas=sizing.replicas,
        )
    )
    await js.create_key_value(
        api.KeyValueConfig(
            bucket=subjects.prompts_bucket,
            description="Prompts taken through the ComfyUI-compatible API",
            history=1,
            storage=api.StorageType.FILE,
            replicas=sizing.replicas,
        )
    )
    for bucket, description, ttl in (
        (subjects.idempotency_bucket, "Idempotency keys of submissions", IDEMPOTENCY_TTL_S),
        (subjects.batches_bucket, "Batches of jobs", 0.0),
    ):
        await js.create_key_value(
            api.KeyValueConfig(
                bucket=bucket,
                description=description,
                history=1,
                ttl=ttl or None,
                storage=api.StorageType.FILE,
                replicas=sizing.replicas,
            )
        )
    await js.create_object_store(
        subjects.outputs_bucket,
        api.ObjectStoreConfig(
            bucket=subjects.outputs_bucket,
            description="Job outputs, when the nats storage backend is chosen",
            storage=api.StorageType.FILE,
            replicas=sizing.replicas,
        ),
    )


@contextlib.asynccontextmanager
async def session(url: str, name: str, subjects: Subjects, **options: Any) -> AsyncIterator[Client]:
    """A connection for one role, with the contract's resources in place; closed on exit.

    `options` go to `connect` (`user`, `password`, ...). Closing drains: subscriptions stop
    taking messages and what was published is flushed.
    """
    client = await connect(url, name, **options)
    try:
        await ensure_resources(client.jetstream(), subjects)
        yield client
    finally:
        if not client.is_closed:
            await client.drain()
