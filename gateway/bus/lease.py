"""One dispatching balancer at a time: a lease on a KV key that expires unless renewed.

Every gateway replica answers submissions, but only the holder of the lease binds jobs to
servers and keeps job records, so capacity is never overcommitted by two replicas deciding at
once. The bucket's TTL ends the lease of a leader that died; a leader that stops cleanly gives
it up at once so a standby takes over without waiting. The log sink holds a lease of its own
(key `logsink`) the same way, so that two sinks never split a system's events.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

import nats.errors
from nats.js import JetStreamContext
from nats.js.errors import KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue

from gateway.bus.connection import LEADER_LEASE_S
from gateway.bus.retry import TRANSIENT, through_election
from gateway.lifecycle import stop_tasks, wait_event

log = logging.getLogger(__name__)

_KEY = "leader"


async def lease_held(js: JetStreamContext, bucket: str, key: str = _KEY) -> bool:
    """Whether some process holds the lease `key` in `bucket` now (read from the stream)."""
    try:
        raw = await js.get_last_msg(f"KV_{bucket}", f"$KV.{bucket}.{key}")
    except NotFoundError:
        return False
    return (raw.headers or {}).get("KV-Operation") not in ("DEL", "PURGE")


async def hold_lease(
    kv: KeyValue,
    holder: str,
    work: Callable[[], Coroutine[Any, Any, None]],
    stop: asyncio.Event,
    *,
    renew_every: float = LEADER_LEASE_S / 5,
    key: str = _KEY,
    drain_s: float = 0.0,
) -> None:
    """Run `work` whenever this process holds the lease `key`, until `stop` is set.

    `work` is cancelled if the lease is lost (say, the broker was unreachable for longer than the
    lease); it is started again if the lease is won back. On `stop`, a `work` that watches the
    same event has `drain_s` seconds to end by itself before it is cancelled.
    """
    while not stop.is_set():
        try:
            revision = await _try_acquire(kv, holder, key)
        except nats.errors.Error as exc:
            # The bucket has no leader for longer than an election takes, or answers oddly
            # while it has none (nats-py's create reads the key back after a refused write,
            # and a leader without its quorum refuses for a try no copy stored): an outage,
            # not a reason to end the process. Try again, as a standby would.
            log.warning("%s cannot take the %s lease now (%r); trying again", holder, key, exc)
            revision = None
        if revision is None:
            await wait_event(stop, renew_every)
            continue
        log.info("%s holds the %s lease", holder, key)
        try:
            await _lead(kv, holder, revision, work, stop, renew_every, key, drain_s)
        except Exception:
            # The lead's work failed: give the lease up (another replica, or this one after a
            # pause, takes over from the durable state) rather than take the process down.
            log.exception("%s: the %s's work failed; giving up the lease", holder, key)
            await wait_event(stop, renew_every)
        finally:
            await _release(kv, holder, key)


async def _try_acquire(kv: KeyValue, holder: str, key: str) -> int | None:
    try:
        return await through_election(
            lambda: kv.create(key, holder.encode()), f"taking the {key} lease"
        )
    except KeyWrongLastSequenceError:
        # Someone holds it; or a try of ours was stored though its answer was lost (an election
        # in between), and then the holder is us.
        return await _own_revision(kv, holder, key)


async def _own_revision(kv: KeyValue, holder: str, key: str) -> int | None:
    try:
        entry = await through_election(lambda: kv.get(key), f"reading the {key} lease")
    except NotFoundError:
        return None
    return entry.revision if entry.value == holder.encode() else None


async def _lead(
    kv: KeyValue,
    holder: str,
    revision: int,
    work: Callable[[], Coroutine[Any, Any, None]],
    stop: asyncio.Event,
    renew_every: float,
    key: str,
    drain_s: float,
) -> None:
    worker = asyncio.create_task(work(), name=f"{key}-lease-holder")
    stopped = asyncio.create_task(stop.wait())
    try:
        while True:
            done, _ = await asyncio.wait(
                {worker, stopped}, timeout=renew_every, return_when=asyncio.FIRST_COMPLETED
            )
            if done:
                break
            try:
                revision = await _renew(kv, holder, key, revision)
            except KeyWrongLastSequenceError:
                log.warning("%s lost the %s lease; standing by", holder, key)
                break
            except TRANSIENT as exc:
                # Unrenewed this long, the lease has expired: another may hold it by now.
                log.warning("%s could not renew the %s lease (%s); standing by", holder, key, exc)
                break
        if stop.is_set() and drain_s > 0 and not worker.done():
            await asyncio.wait({worker}, timeout=drain_s)
    finally:
        stopped.cancel()
        await stop_tasks(worker)
        failure = None if worker.cancelled() else worker.exception()
        if failure is not None:
            raise failure


async def _renew(kv: KeyValue, holder: str, key: str, revision: int) -> int:
    last = revision

    async def update() -> int:
        nonlocal last
        try:
            return await kv.update(key, holder.encode(), last=last)
        except KeyWrongLastSequenceError:
            # A try of ours that was stored though its answer was lost moved the revision on.
            own = await _own_revision(kv, holder, key)
            if own is None or own == last:
                raise
            last = own
            return await kv.update(key, holder.encode(), last=last)

    return await through_election(update, f"renewing the {key} lease", within=LEADER_LEASE_S)


async def _release(kv: KeyValue, holder: str, key: str) -> None:
    try:
        entry = await kv.get(key)
        if entry.value == holder.encode():
            await kv.delete(key, last=entry.revision)
    except Exception:  # the lease will expire on its own; releasing early is a courtesy
        log.warning("could not release the %s lease; it will expire", key, exc_info=True)
