"""What of a ComfyAutomate system already runs on a broker, under one subject prefix.

`up` is the one-machine mode: started against a broker that already serves a system (a second
copy on the default NATS URL, say), its log sink and adapters would share the first system's
streams and take half of its events and jobs. It asks first, and refuses unless told to join.
"""

from __future__ import annotations

import asyncio
import contextlib

from nats.aio.client import Client
from nats.aio.msg import Msg

from gateway.bus.contract import ContractError, Heartbeat, Subjects, decode
from gateway.bus.lease import lease_held
from gateway.logsink.client import LogQueryError, logged_upto


async def roles_running(nc: Client, subjects: Subjects, *, listen_s: float = 2.5) -> list[str]:
    """The roles of a system that answer on this broker under `subjects`' prefix; empty if none.

    Heartbeats are listened for during `listen_s` (adapters beat about once a second).
    """
    found = []
    beating: set[str] = set()

    async def on_beat(msg: Msg) -> None:
        with contextlib.suppress(ContractError):
            beating.add(decode(msg.data, Heartbeat).server_id)

    sub = await nc.subscribe(subjects.all_heartbeats, cb=on_beat)
    try:
        if await lease_held(nc.jetstream(), subjects.balancer_bucket):
            found.append("a leading balancer")
        with contextlib.suppress(LogQueryError):
            await logged_upto(nc, subjects, "-up-", 0, wait_s=0, margin_s=2.0)
            found.append("a log sink")
        if not found:
            await asyncio.sleep(listen_s)  # the window in which an adapter must have beaten
    finally:
        await sub.unsubscribe()
    if beating:
        found.append(f"adapters of {', '.join(sorted(beating))}")
    return found
