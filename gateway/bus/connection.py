"""Connecting to NATS and creating the JetStream resources of the contract.

Whichever process starts first creates the streams, buckets and object store; the others find
them. Creation is idempotent: JetStream accepts an identical definition again, and a definition
that changed between versions is updated in place.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import msgspec
from nats.aio.client import Client
from nats.js import JetStreamContext, api
from nats.js.errors import BadRequestError

from gateway.bus.contract import Subjects
from gateway.bus.retry import through_election

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


def cluster_size(client: Client) -> int:
    """How many brokers the connection knows of: those given and those the cluster announced."""
    return len({(server.hostname, server.port) for server in client.servers})


def resources_for(client: Client, replicas: int | str) -> BusResources:
    """The sizing of the resources for the `nats_replicas` setting; `auto` asks the cluster.

    `auto` means 3 replicas on a cluster of 3 brokers or more, else 1: two copies would stop
    when either node is down (a quorum of 2 needs both), so they are never chosen.
    """
    if replicas == "auto":
        return BusResources(replicas=3 if cluster_size(client) >= 3 else 1)
    return BusResources(replicas=int(replicas))


def _kept_replicas(name: str, current: int, wanted: int) -> int:
    """The replicas a stream keeps: raised to `wanted`, never lowered (a copy is not dropped)."""
    if current > wanted:
        log.warning(
            "%s has %d replicas and nats_replicas asks for %d: lowering is refused, it keeps %d "
            "(lower it on purpose with `nats stream edit %s --replicas %d`)",
            name,
            current,
            wanted,
            current,
            name,
            wanted,
        )
        return current
    if current < wanted:
        log.warning("%s has %d replicas; raising it to %d", name, current, wanted)
    return wanted


async def _ensure_stream(
    js: JetStreamContext,
    name: str,
    replicas: int,
    create: Callable[[], Awaitable[object]],
    wanted: api.StreamConfig | None = None,
) -> None:
    """Run `create`; if the stream exists with another definition, bring it to `wanted`.

    `wanted` is the whole definition (the contract's streams); None keeps the existing one
    (buckets and the object store, whose definitions nats-py derives) and changes only its
    replicas. Either way replicas are raised, never lowered.
    """
    try:
        await create()
        return
    except BadRequestError as exc:
        if exc.err_code != _STREAM_NAME_IN_USE:
            raise
    info = await js.stream_info(name)
    current = info.config.num_replicas or 1
    keep = _kept_replicas(name, current, replicas)
    if wanted is None:
        if keep == current:
            return  # nothing of ours differs
        wanted = info.config
    else:
        log.info("stream %s exists with another definition; updating it", name)
    await js.update_stream(dataclasses.replace(wanted, num_replicas=keep))


async def ensure_resources(
    js: JetStreamContext,
    subjects: Subjects,
    sizing: BusResources | None = None,
) -> None:
    """Create (or find) the streams JOBS, EVENTS and WEBHOOKS, the KV buckets and the object
    store.

    Each is made with `sizing.replicas` copies; one that exists with fewer is raised in place
    (JetStream copies its data to the new peers while it serves), one with more keeps them.
    """
    sizing = sizing or BusResources()
    replicas = sizing.replicas
    for config in _stream_configs(subjects, sizing):
        assert config.name is not None
        await _ensure_stream(
            js, config.name, replicas, functools.partial(js.add_stream, config), config
        )
    buckets = [
        api.KeyValueConfig(
            bucket=subjects.servers_bucket,
            description="Registered ComfyUI servers",
            history=1,
            storage=api.StorageType.FILE,
            replicas=replicas,
        ),
        api.KeyValueConfig(
            bucket=subjects.jobs_bucket,
            description="Current state of each job",
            history=1,
            storage=api.StorageType.FILE,
            replicas=replicas,
        ),
        api.KeyValueConfig(
            bucket=subjects.balancer_bucket,
            description="Balancer leadership lease (one dispatching balancer at a time)",
            history=1,
            ttl=LEADER_LEASE_S,
            storage=api.StorageType.FILE,
            replicas=replicas,
        ),
        api.KeyValueConfig(
            bucket=subjects.prompts_bucket,
            description="Prompts taken through the ComfyUI-compatible API",
            history=1,
            storage=api.StorageType.FILE,
            replicas=replicas,
        ),
        api.KeyValueConfig(
            bucket=subjects.idempotency_bucket,
            description="Idempotency keys of submissions",
            history=1,
            ttl=IDEMPOTENCY_TTL_S,
            storage=api.StorageType.FILE,
            replicas=replicas,
        ),
        api.KeyValueConfig(
            bucket=subjects.batches_bucket,
            description="Batches of jobs",
            history=1,
            storage=api.StorageType.FILE,
            replicas=replicas,
        ),
    ]
    for bucket in buckets:
        await _ensure_stream(
            js, f"KV_{bucket.bucket}", replicas, functools.partial(js.create_key_value, bucket)
        )
    outputs = api.ObjectStoreConfig(
        bucket=subjects.outputs_bucket,
        description="Job outputs, when the nats storage backend is chosen",
        storage=api.StorageType.FILE,
        replicas=replicas,
    )
    await _ensure_stream(
        js,
        f"OBJ_{subjects.outputs_bucket}",
        replicas,
        functools.partial(js.create_object_store, subjects.outputs_bucket, outputs),
    )


def resource_streams(subjects: Subjects) -> list[str]:
    """The names of the streams behind every resource of the contract (buckets included)."""
    return [
        subjects.jobs_stream,
        subjects.events_stream,
        f"KV_{subjects.servers_bucket}",
        f"KV_{subjects.jobs_bucket}",
        f"KV_{subjects.balancer_bucket}",
        f"KV_{subjects.prompts_bucket}",
        f"KV_{subjects.idempotency_bucket}",
        f"KV_{subjects.batches_bucket}",
        f"OBJ_{subjects.outputs_bucket}",
        subjects.webhooks_stream,
    ]


@contextlib.asynccontextmanager
async def session(
    url: str, name: str, subjects: Subjects, *, replicas: int | str = 1, **options: Any
) -> AsyncIterator[Client]:
    """A connection for one role, with the contract's resources in place; closed on exit.

    `replicas` is the `nats_replicas` setting. `options` go to `connect` (`user`,
    `password`, ...). Closing drains: subscriptions stop taking messages and what was
    published is flushed.
    """
    client = await connect(url, name, **options)
    try:
        sizing = resources_for(client, replicas)
        await through_election(
            lambda: ensure_resources(client.jetstream(), subjects, sizing),
            "creating the streams and buckets",
        )
        yield client
    finally:
        if not client.is_closed:
            await client.drain()
