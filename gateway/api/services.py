"""What the REST handlers work with: the bus, the fleet view, job records, storage.

Handlers receive one `Services` through dependency injection, so they hold no globals and a
test can build the whole app around a real NATS connection.
"""

from __future__ import annotations

import asyncio
import contextlib

from litestar.di import NamedDependency
from nats.aio.client import Client
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from gateway.api.errors import ApiError
from gateway.balancer import Balancer
from gateway.contract import (
    ContractError,
    Error,
    JobAccepted,
    JobRecord,
    JobRequest,
    Subjects,
    decode,
    encode,
)
from gateway.events import EventPublisher
from gateway.fleet import FleetView
from gateway.settings import Settings
from plugins.storage.base import Storage

# HTTP status for each refusal code of the submit path.
SUBMIT_STATUS = {
    "invalid_request": 400,
    "invalid_workflow": 400,
    "invalid_overrides": 400,
    "duplicate_job": 409,
    "unknown_server": 404,
    "unschedulable": 422,
}


class Services:
    """Long-lived objects shared by every request of one gateway process."""

    def __init__(
        self,
        nc: Client,
        fleet: FleetView,
        jobs_kv: KeyValue,
        servers_kv: KeyValue,
        settings: Settings,
        storage: Storage | None = None,
        balancer: Balancer | None = None,
    ) -> None:
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream()
        self.fleet = fleet
        self.jobs_kv = jobs_kv
        self.servers_kv = servers_kv
        self.settings = settings
        self.subjects = Subjects(settings.subject_prefix)
        self.publisher = EventPublisher(self.js, self.subjects)
        self.storage = storage
        self.balancer = balancer

    def log_path(self, relpath: str) -> str:
        """A job's log file as this gateway's users see it: under the data folder."""
        return str(self.settings.data_path / relpath)

    @property
    def leads(self) -> bool:
        """Whether the balancer in this process holds the dispatching lease."""
        return self.balancer is not None and self.balancer.leads

    def open_jobs(self) -> list[str] | None:
        """Statuses of the open jobs, when this process leads; None elsewhere."""
        if self.balancer is None or self.balancer.dispatcher is None or not self.leads:
            return None
        return self.balancer.dispatcher.open_statuses()

    async def submit(self, request: JobRequest) -> JobAccepted:
        """Submit through `comfy.submit`: the same path as any NATS client's."""
        try:
            reply = await self.nc.request(self.subjects.submit, encode(request), timeout=10.0)
        except NoRespondersError:
            raise ApiError(503, "no_balancer", "no balancer is running to accept jobs") from None
        except NatsTimeoutError:
            raise ApiError(504, "submit_timeout", "the balancer did not answer in time") from None
        try:
            return decode(reply.data, JobAccepted)
        except ContractError:
            error = decode(reply.data, Error)
            status = SUBMIT_STATUS.get(error.code, 500)
            raise ApiError(status, error.code, error.message, error.details) from None

    async def record(self, job_id: str) -> JobRecord:
        """The job's current record, or a 404."""
        try:
            entry = await self.jobs_kv.get(job_id)
        except KeyNotFoundError:
            raise ApiError(404, "unknown_job", f"no job {job_id!r}") from None
        except ValueError:  # nats-py refuses keys with characters a job id cannot have
            raise ApiError(404, "unknown_job", f"no job {job_id!r}") from None
        assert entry.value is not None
        return decode(entry.value, JobRecord)

    async def wait_for_end(self, job_id: str, within: float) -> JobRecord:
        """The job's record once it is finished, or its latest record after `within` seconds."""
        latest = await self.record(job_id)
        if latest.status.terminal or within <= 0:
            return latest
        watcher = await self.jobs_kv.watch(job_id)
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(within):
                    async for entry in watcher:
                        if entry is None or entry.value is None:
                            continue
                        latest = decode(entry.value, JobRecord)
                        if latest.status.terminal:
                            break
        finally:
            await watcher.stop()  # type: ignore[no-untyped-call]
        return latest


# How handlers ask for the Services (Litestar injects it by this parameter name).
ServicesDep = NamedDependency[Services]
