"""Connecting to NATS and creating the JetStream resources of the contract.

Whichever process starts first creates the streams, buckets and object store; the others find
them. Creation is idempotent: JetStream accepts an identical definition again, and a definition
that changed between versions is updated in place.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from nats.aio.client import Client
from nats.js import JetStreamContext, api
from nats.js.errors import BadRequestError

from gateway.contract import Subjects

log = logging.getLogger(__name__)

# JetStream's error code for "stream name already in use with a different configuration".
_STREAM_NAME_IN_USE = 10058
# Publishes carrying the same Nats-Msg-Id within this window are stored once.
DUPLICATE_WINDOW_S = 120.0
_MAX_MESSAGE = 1024 * 1024
# A leader that stops renewing its lease is replaced after this long.
LEADER_LEASE_S = 5.0


class BusResources(msgspec.Struct, frozen=True, kw_only=True):
    """How the JetStream resources are sized; the defaults suit one machine."""

    replicas: int = 1
    events_max_age_s: float = 30 * 24 * 3600.0
    events_max_bytes: int = -1


async def connect(url: str, name: str, **options: Any) -> Client:
    """Connect to NATS for one role; reconnect forever instead of giving up after two minutes."""
    client = Client()

    async def on_error(exc: Exception) -> None:
        log.warning("NATS connection %s: %s", name, exc)

    async def on_disconnect() -> None:
        # nats-py reports its own close() as a disconnect too; only a loss is worth a warning.
        if not (client.is_closed or client.is_draining):
            log.warning("NATS connection %s lost; reconnecting", name)

    async def on_reconnect() -> None:
        log.info("NATS connection %s restored", name)

    servers = [part.strip() for part in url.split(",") if part.strip()]
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
    settings.update(options)
    await client.connect(servers, **settings)
    return client


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
    """Create (or find) the streams JOBS and EVENTS, the KV buckets and the object store."""
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
async def session(url: str, name: str, subjects: Subjects) -> AsyncIterator[Client]:
    """A connection for one role, with the contract's resources in place; closed on exit.

    Closing drains: subscriptions stop taking messages and what was published is flushed.
    """
    client = await connect(url, name)
    try:
        await ensure_resources(client.jetstream(), subjects)
        yield client
    finally:
        if not client.is_closed:
            await client.drain()
