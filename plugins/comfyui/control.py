"""Requests to one adapter on `comfy.control.<server_id>`: Cancel and Describe.

A subscription's callbacks run one at a time, so each request is answered at once and any
slow work (stopping a prompt on ComfyUI, reading capabilities) happens in a task.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from gateway.bus.contract import (
    Cancel,
    Capabilities,
    ContractError,
    ControlReply,
    Describe,
    decode_control,
    encode,
)

log = logging.getLogger(__name__)


class ControlTarget(Protocol):
    """What control requests act on: the adapter."""

    def cancel(self, job_id: str, reason: str) -> bool:
        """Start cancelling `job_id`; False when this adapter does not hold it."""

    async def describe(self) -> Capabilities | None:
        """The server's capabilities (read now if never read)."""


class ControlServer:
    """Answers control requests for one server."""

    def __init__(self, nc: Client, subject: str, target: ControlTarget) -> None:
        self._nc = nc
        self._subject = subject
        self._target = target
        self._sub: Subscription | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._sub = await self._nc.subscribe(self._subject, cb=self._on_request)

    async def stop(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()
            self._sub = None
        for task in list(self._tasks):
            task.cancel()

    async def _reply(self, msg: Msg, reply: ControlReply) -> None:
        if msg.reply:
            await msg.respond(encode(reply))

    async def _on_request(self, msg: Msg) -> None:
        try:
            request = decode_control(msg.data)
        except ContractError as exc:
            log.warning("refusing a control request: %s", exc)
            await self._reply(msg, ControlReply(ok=False, message=str(exc)))
            return
        match request:
            case Cancel(job_id=job_id, reason=reason):
                if self._target.cancel(job_id, reason):
                    await self._reply(msg, ControlReply(ok=True, message="cancelling"))
                else:
                    text = f"job {job_id} is not on this server"
                    await self._reply(msg, ControlReply(ok=False, message=text))
            case Describe():
                task = asyncio.create_task(self._describe(msg))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _describe(self, msg: Msg) -> None:
        capabilities = await self._target.describe()
        if capabilities is None:
            reply = ControlReply(ok=False, message="ComfyUI has not described itself yet")
        else:
            reply = ControlReply(ok=True, capabilities=capabilities)
        try:
            await self._reply(msg, reply)
        except nats.errors.Error as exc:
            log.warning("could not answer a describe request: %s", exc)
