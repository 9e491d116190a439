"""Submitting straight on the bus, for programs that already live on NATS.

    async with await NatsClient.connect("nats://127.0.0.1:4222") as bus:
        accepted = await bus.submit(workflow)
        async for event in bus.events(accepted.job_id):
            print(event.seq, event_type(event))

The same path as REST (`comfy.submit`, answered by a balancer), without the gateway in between.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import msgspec
from nats.aio.client import Client
from nats.js import api

from gateway.bus.connection import connect
from gateway.bus.contract import (
    TERMINAL_EVENTS,
    ContractError,
    Error,
    Event,
    JobAccepted,
    JobRequest,
    Subjects,
    decode,
    decode_event,
    encode,
)
from sdk import _protocol as p
from sdk.errors import error_from


class NatsClient:
    """A NATS connection that submits jobs and follows their events."""

    def __init__(self, nc: Client, prefix: str = "comfy") -> None:
        self.nc = nc
        self.subjects = Subjects(prefix)

    @classmethod
    async def connect(cls, url: str, prefix: str = "comfy", **options: Any) -> NatsClient:
        """Connect to the broker(s) at `url` (comma-separated for a cluster)."""
        return cls(await connect(url, "sdk", **options), prefix)

    async def close(self) -> None:
        await self.nc.close()

    async def __aenter__(self) -> NatsClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def submit(
        self, workflow: Any, *, idempotency_key: str | None = None, **options: Any
    ) -> JobAccepted:
        """Submit a workflow (options as for ComfyUISDK.submit_workflow); the acceptance.

        With `idempotency_key`, the same workflow and options again return the same job
        (`replayed` set) instead of making another.
        """
        body = p.submission(workflow, **options)
        body["timeout_s"] = body.pop("timeout", None)
        body["idempotency_key"] = idempotency_key
        request = msgspec.convert(body, JobRequest)
        reply = await self.nc.request(self.subjects.submit, encode(request), timeout=10.0)
        try:
            return decode(reply.data, JobAccepted)
        except ContractError:
            error = decode(reply.data, Error)
            # A bus answer has no HTTP status; the code picks the exception.
            raise error_from(0, msgspec.to_builtins(error)) from None

    async def events(self, job_id: str) -> AsyncIterator[Event]:
        """Every event of the job from the first, live, until its terminal event."""
        sub = await self.nc.jetstream().subscribe(
            self.subjects.events(job_id),
            ordered_consumer=True,
            deliver_policy=api.DeliverPolicy.ALL,
        )
        try:
            while True:
                msg = await sub.next_msg(timeout=None)
                event = decode_event(msg.data)
                yield event
                if isinstance(event, TERMINAL_EVENTS):
                    return
        finally:
            await sub.unsubscribe()

    async def wait(self, job_id: str) -> Event:
        """The job's terminal event (succeeded, failed or cancelled)."""
        last: Event | None = None
        async for event in self.events(job_id):
            last = event
        assert last is not None
        return last
