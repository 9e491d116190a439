"""Draining a server: taking it out of service without removing it, and telling when it is empty.

A draining server stays registered and heartbeating; the balancer binds nothing new to it, what
it holds runs to its end, and jobs pinned to it wait. The flag lives in the server's record in
KV `comfy_servers`, so every gateway and every future leader sees it.

What a server still holds is read from the JOBS stream: a job's message stays on its server's
subject from the moment it is bound until its adapter has stored the job's end (a work queue
drops a message once acknowledged), so the count takes in the jobs running there and those on
their way. It is read only for draining servers, once per listing.
"""

from __future__ import annotations

import logging
from typing import Final

import msgspec
from nats.errors import Error as NatsError
from nats.js.errors import InvalidKeyError, KeyNotFoundError, KeyWrongLastSequenceError

from gateway.api.errors import ApiError
from gateway.api.services import Services
from gateway.bus.contract import ServerRecord, decode, encode

log = logging.getLogger(__name__)

# Another writer of the same record between our read and our write (a registration on another
# gateway, another drain) makes us read again; this many times at most.
_WRITE_TRIES: Final = 5


async def set_draining(services: Services, server_id: str, draining: bool) -> ServerRecord:
    """Set or clear a registered server's `draining` flag; its record as now stored.

    Setting it to what it already is writes nothing. An unknown (or removed) server is a 404.
    """
    for _ in range(_WRITE_TRIES):
        try:
            entry = await services.servers_kv.get(server_id)
        except (KeyNotFoundError, InvalidKeyError, ValueError):
            raise ApiError(
                404, "unknown_server", f"no server {server_id!r} is registered"
            ) from None
        if entry.value is None or entry.revision is None:
            raise ApiError(404, "unknown_server", f"no server {server_id!r} is registered")
        record = decode(entry.value, ServerRecord)
        revision = entry.revision
        if record.draining != draining:
            record = msgspec.structs.replace(record, draining=draining)
            try:
                revision = await services.servers_kv.update(
                    server_id, encode(record), last=entry.revision
                )
            except KeyWrongLastSequenceError:
                continue  # changed meanwhile: decide again on what is there now
        # This gateway's view at once, so that a listing right after the answer shows it;
        # every other gateway and balancer follows the registry's watch.
        services.fleet.table.on_registered(record, revision=revision)
        return record
    raise ApiError(
        503,
        "unavailable",
        f"the record of server {server_id!r} kept changing meanwhile; try again",
        retry_after=1,
    )


async def jobs_held(services: Services, server_ids: list[str]) -> dict[str, int | None]:
    """Jobs bound to each of these servers and not ended there yet (None: could not be read)."""
    if not server_ids:
        return {}
    subjects = services.subjects
    try:
        info = await services.js.stream_info(
            subjects.jobs_stream, subjects_filter=subjects.all_jobs
        )
    except NatsError as exc:
        log.warning("could not count the jobs held by draining servers: %s", exc)
        return dict.fromkeys(server_ids)
    held = info.state.subjects or {}
    return {server_id: held.get(subjects.jobs(server_id), 0) for server_id in server_ids}
