"""One dispatching balancer at a time: a lease on a KV key that expires unless renewed.

Every gateway replica answers submissions, but only the holder of the lease binds jobs to
servers and keeps job records, so capacity is never overcommitted by two replicas deciding at
once. The bucket's TTL ends the lease of a leader that died; a leader that stops cleanly gives
it up at once so a standby takes over without waiting.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from nats.js.errors import KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from gateway.bus.connection import LEADER_LEASE_S
from gateway.lifecycle import stop_tasks, wait_event

log = logging.getLogger(__name__)

_KEY = "leader"


async def hold_leadership(
    kv: KeyValue,
    holder: str,
    work: Callable[[], Coroutine[Any, Any, None]],
    stop: asyncio.Event,
    *,
    renew_every: float = LEADER_LEASE_S / 5,
) -> None:
    """Run `work` whenever this process holds the lease, until `stop` is set.

    `work` is cancelled if the lease is lost (say, the broker was unreachable for longer than the
    lease); it is started again if the lease is won back.
    """
    while not stop.is_set():
        revision = await _try_acquire(kv, holder)
        if revision is None:
            await wait_event(stop, renew_every)
            continue
        log.info("%s holds the balancer lease", holder)
        try:
            await _lead(kv, holder, revision, work, stop, renew_every)
        except Exception:
            # The lead's work failed: give the lease up (another replica, or this one after a
            # pause, takes over from the durable state) rather than take the process down.
            log.exception("%s: the balancer's work failed; giving up the lease", holder)
            await wait_event(stop, renew_every)
        finally:
            await _release(kv, holder)


async def _try_acquire(kv: KeyValue, holder: str) -> int | None:
    try:
        return await kv.create(_KEY, holder.encode())
    except KeyWrongLastSequenceError:
        return None


async def _lead(
    kv: KeyValue,
    holder: str,
    revision: int,
    work: Callable[[], Coroutine[Any, Any, None]],
    stop: asyncio.Event,
    renew_every: float,
) -> None:
    worker = asyncio.create_task(work(), name="balancer-leader")
    stopped = asyncio.create_task(stop.wait())
    try:
        while True:
            done, _ = await asyncio.wait(
                {worker, stopped}, timeout=renew_every, return_when=asyncio.FIRST_COMPLETED
            )
            if done:
                break
            try:
                revision = await kv.update(_KEY, holder.encode(), last=revision)
            except KeyWrongLastSequenceError:
                log.warning("%s lost the balancer lease; standing by", holder)
                break
    finally:
        stopped.cancel()
        await stop_tasks(worker)
        failure = None if worker.cancelled() else worker.exception()
        if failure is not None:
            raise failure


async def _release(kv: KeyValue, holder: str) -> None:
    try:
        entry = await kv.get(_KEY)
        if entry.value == holder.encode():
            await kv.delete(_KEY, last=entry.revision)
    except Exception:  # the lease will expire on its own; releasing early is a courtesy
        log.warning("could not release the balancer lease; it will expire", exc_info=True)
