"""What the REST handlers work with: the bus, the fleet view, job records, storage.

Handlers receive one `Services` through dependency injection, so they hold no globals and a
test can build the whole app around a real NATS connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging

from litestar.di import NamedDependency
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.errors import InvalidKeyError, KeyNotFoundError
from nats.js.kv import KeyValue

from gateway.api.auth import Caller, named_callers
from gateway.api.errors import ApiError
from gateway.api.jobdirectory import JobDirectory
from gateway.api.metrics.counting import JobCounter
from gateway.api.metrics.gauges import (
    fleet_gauges,
    queue_gauges,
    replication_gauges,
    stream_gauges,
)
from gateway.api.metrics.instruments import Metrics
from gateway.api.native.service import NativeService
from gateway.balancer.admission import QueueFull, check_room
from gateway.balancer.backlogview import BacklogView
from gateway.balancer.fleet import FleetView
from gateway.balancer.role import Balancer
from gateway.balancer.shares import caller_key, shares_of
from gateway.bus.contract import Cancel as CancelRequest
from gateway.bus.contract import (
    Cancelled,
    CancelledData,
    ContractError,
    ControlReply,
    Error,
    Event,
    JobAccepted,
    JobRecord,
    JobRequest,
    JobStatus,
    Subjects,
    decode,
    decode_event,
    encode,
    event_type,
)
from gateway.bus.events import EventPublisher, JobEnded
from gateway.bus.jobstate import BOUND, record_from_log
from gateway.bus.lease import lease_held
from gateway.logsink.client import LogQueryError, job_log_raw, logged_upto
from gateway.settings import Settings
from gateway.storage import Storage

log = logging.getLogger(__name__)

# How long an adapter that took a cancel has to end the job (it waits up to its stop_wait_s,
# 10 s by default, for ComfyUI to confirm an interrupt) before the gateway ends it itself.
ADAPTER_CANCEL_WAIT_S = 15.0
# How long a finished job's result waits for its end to be in its log.
LOGGED_WAIT_S = 5.0
# HTTP status for each refusal code of the submit path.
SUBMIT_STATUS = {
    "invalid_request": 400,
    "invalid_workflow": 400,
    "invalid_overrides": 400,
    "invalid_webhook": 400,
    "duplicate_job": 409,
    "unknown_server": 404,
    "unschedulable": 422,
    "idempotency_mismatch": 422,
    "too_large": 413,
    "unavailable": 503,
    "queue_full": 429,
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
        self.native: NativeService | None = None
        self._native_task: asyncio.Task[None] | None = None
        self._waiters: dict[str, list[asyncio.Future[JobRecord]]] = {}
        self._records_sub: Subscription | None = None
        self._records_prefix = ""
        self.system_id = ""  # set by start(); the same for every gateway of this system
        self.registering = asyncio.Lock()  # one server registration at a time (api/servers.py)
        self.metrics = Metrics()
        self.metrics.add_gauges("fleet", fleet_gauges(fleet, self.open_jobs, self.bound_jobs))
        self.metrics.add_gauges("events", stream_gauges(self.js, self.subjects))
        self.metrics.add_gauges("replication", replication_gauges(self.js, self.subjects))
        self.job_counter = JobCounter(self.js, self.subjects, self.metrics)
        self.directory = JobDirectory(self.js, self.subjects, jobs_kv)  # for fleet event streams
        self.shares = shares_of(settings)
        self.backlog = BacklogView(nc, self.subjects)  # the leader's queue by caller
        self.metrics.add_gauges("queue", queue_gauges(self.backlog, named_callers(settings)))

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

    def bound_jobs(self) -> dict[str, int] | None:
        """How many jobs are bound to each server, when this process leads; None elsewhere."""
        if self.balancer is None or self.balancer.dispatcher is None or not self.leads:
            return None
        return self.balancer.dispatcher.bound_counts()

    async def someone_leads(self) -> bool:
        """Whether a balancer holds the dispatching lease (this one, or any on the bus)."""
        return self.leads or await lease_held(self.js, self.subjects.balancer_bucket)

    async def log_sink_answers(self) -> bool:
        """Whether a log sink answers requests now."""
        try:
            await logged_upto(self.nc, self.subjects, "-health-", 0, wait_s=0, margin_s=2.0)
        except LogQueryError:
            return False
        return True

    async def submit(self, request: JobRequest) -> JobAccepted:
        """Submit through `comfy.submit`: the same path as any NATS client's."""
        try:
            reply = await self.nc.request(self.subjects.submit, encode(request), timeout=10.0)
        except NoRespondersError:
            raise ApiError(
                503, "no_balancer", "no balancer is running to accept jobs", retry_after=1
            ) from None
        except NatsTimeoutError:
            raise ApiError(504, "submit_timeout", "the balancer did not answer in time") from None
        try:
            return decode(reply.data, JobAccepted)
        except ContractError:
            error = decode(reply.data, Error)
            status = SUBMIT_STATUS.get(error.code, 500)
            if error.code == "queue_full":
                self.metrics.refused(error.details)
            raise ApiError(
                status,
                error.code,
                error.message,
                error.details,
                retry_after=_retry_after(error),
            ) from None

    def check_room(self, caller: str | None, jobs: int) -> None:
        """A 429 `queue_full` unless `jobs` more of the caller's may wait, as far as the last
        backlog tells (a batch, before any of its jobs is made; each is checked again)."""
        try:
            check_room(self.shares, self.backlog.latest, caller_key(caller), jobs)
        except QueueFull as exc:
            error = exc.error
            self.metrics.refused(error.details)
            raise ApiError(
                429, error.code, error.message, error.details, retry_after=exc.retry_after
            ) from None

    async def record(self, job_id: str, caller: Caller | None = None) -> JobRecord:
        """The job's current record, or a 404; also a 404 when `caller` may not see it.

        The same 404 either way: a user key cannot tell another's job from no job.
        """
        try:
            entry = await self.jobs_kv.get(job_id)
        except KeyNotFoundError:
            record = await self.record_from_log(job_id)
        except (InvalidKeyError, ValueError):  # a key no job id can be
            raise _unknown_job(job_id) from None
        else:
            assert entry.value is not None
            record = decode(entry.value, JobRecord)
        if caller is not None and not caller.owns(record.caller):
            raise _unknown_job(job_id)
        return record

    async def record_from_log(self, job_id: str) -> JobRecord:
        """The record of a job that KV no longer holds (it ended longer ago than the records'
        retention), made again from the job's log; a 404 when the log has no such job."""
        try:
            events = await self.logged_events(job_id)
        except LogQueryError as exc:
            if exc.code != "not_found":
                # Unknown as far as can be told now: only a job ended longer ago than the
                # retention could be answered for, once a log sink answers again.
                log.warning("job %s: not in KV, and its log cannot be read: %s", job_id, exc)
            raise _unknown_job(job_id) from None
        record = record_from_log(events)
        if record is None:
            raise _unknown_job(job_id)
        return record

    async def logged_events(self, job_id: str) -> list[Event]:
        """The job's events as its log holds them; LogQueryError when the log sink has no log
        of the job (code `not_found`) or does not answer."""
        page = await job_log_raw(self.nc, self.subjects, job_id)
        events = []
        for raw in page.entries:
            try:
                events.append(decode_event(raw))
            except ValueError as exc:
                log.warning("job %s: an event of its log does not decode: %s", job_id, exc)
        return events

    async def start(self) -> None:
        """Follow job records as they change, for the requests that wait on them.

        One plain subscription to the bucket's subjects for the whole process: a watcher per
        waiting request would be a JetStream consumer each, and a few thousand waiting clients
        hit the server's consumer limit.
        """
        self.system_id = await system_id(self.js, self.subjects)
        await self.backlog.start()
        await self.job_counter.start()
        prefix = f"$KV.{self.subjects.jobs_bucket}."
        self._records_sub = await self.nc.subscribe(prefix + ">", cb=self._on_record)
        self._records_prefix = prefix
        self.native = NativeService(self, await self.js.key_value(self.subjects.prompts_bucket))
        self._native_task = asyncio.create_task(self.native.index.run())
        self._native_task.add_done_callback(_report_end)

    async def close(self) -> None:
        await self.backlog.stop()
        await self.job_counter.close()
        if self.native is not None:
            await self.native.close()
        if self._native_task is not None:
            self._native_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._native_task
            self._native_task = None
        if self._records_sub is not None:
            await self._records_sub.unsubscribe()
            self._records_sub = None

    async def cancel(self, job_id: str, caller: Caller | None = None) -> JobRecord:
        """Cancel a job: dequeued if waiting, interrupted if running; its record after.

        A job on an adapter is stopped by it: it dequeues or interrupts the prompt and ends
        the job with ComfyUI's own account of the stop. Otherwise (waiting, on its way to an
        adapter, or an adapter that does not end it in time) the `cancelled` event is
        appended here. Either way the end is the log's: nothing is appended after it, so a
        cancelled job never runs on. ApiError 404 for an unknown job, 409 (with its status)
        for one that ended, or that ended otherwise before the cancel took.
        """
        record = await self.record(job_id, caller)
        if record.status.terminal:
            raise _already_ended(job_id, record.status.value)
        if record.status in BOUND and await self._ask_adapter_to_cancel(record):
            ended = await self.wait_for_end(job_id, ADAPTER_CANCEL_WAIT_S)
            if ended.status is JobStatus.CANCELLED:
                return ended
            if ended.status.terminal:
                raise _already_ended(job_id, ended.status.value)
            log.warning("job %s: its adapter did not end it in time; cancelling here", job_id)
        try:
            # Attempt 0: the job is cancelled, whichever attempt the record shows by then.
            await self.publisher.emit(job_id, CancelledData(reason="cancelled by request"))
        except JobEnded as ended_meanwhile:
            if not isinstance(ended_meanwhile.end, Cancelled):
                raise _already_ended(job_id, event_type(ended_meanwhile.end)) from None
        self.publisher.forget(job_id)  # a cancel is this publisher's last word on the job
        return await self.wait_for_end(job_id, 10.0)

    async def _ask_adapter_to_cancel(self, record: JobRecord) -> bool:
        """Ask the adapter holding the job to stop it; whether it holds it and will."""
        if record.server_id is None:
            return False
        try:
            reply = await self.nc.request(
                self.subjects.control(record.server_id),
                encode(CancelRequest(job_id=record.job_id)),
                timeout=5.0,
            )
        except (NoRespondersError, NatsTimeoutError):
            log.warning("adapter %s did not answer a cancel", record.server_id)
            return False
        return decode(reply.data, ControlReply).ok

    async def _on_record(self, msg: Msg) -> None:
        job_id = msg.subject[len(self._records_prefix) :]
        native = (
            self.native if self.native is not None and self.native.index.knows(job_id) else None
        )
        if (job_id not in self._waiters and native is None) or not msg.data:
            return
        try:
            record = decode(msg.data, JobRecord)
        except ContractError:
            return
        if native is not None:
            native.index.on_record(record)
        if record.status.terminal:
            for waiter in self._waiters.pop(job_id, []):
                if not waiter.done():
                    waiter.set_result(record)

    async def wait_for_end(self, job_id: str, within: float) -> JobRecord:
        """The job's record once it is finished, or its latest record after `within` seconds.

        A finished job's record is handed back once its log holds the end too (see
        `wait_logged`), so a client that reads the log next finds it whole.
        """
        record = await self._record_at_end(job_id, within)
        if record.status.terminal:
            await self.wait_logged(record)
        return record

    async def wait_logged(self, record: JobRecord, within: float = LOGGED_WAIT_S) -> bool:
        """Wait until the job's log (its file and the index) holds the record's last event.

        Whether it does; False after `within` seconds, or when no log sink answers.
        """
        try:
            reached = await logged_upto(
                self.nc, self.subjects, record.job_id, record.last_seq, wait_s=within
            )
        except LogQueryError as exc:
            log.warning("job %s: no word from the log sink on its log: %s", record.job_id, exc)
            return False
        return reached >= record.last_seq

    async def _record_at_end(self, job_id: str, within: float) -> JobRecord:
        waiter: asyncio.Future[JobRecord] = asyncio.get_running_loop().create_future()
        # Registered before the record is read, so an end that lands in between is not missed.
        self._waiters.setdefault(job_id, []).append(waiter)
        try:
            latest = await self.record(job_id)
            if latest.status.terminal or within <= 0:
                return latest
            try:
                async with asyncio.timeout(within):
                    return await waiter
            except TimeoutError:
                return await self.record(job_id)
        finally:
            waiting = self._waiters.get(job_id, [])
            if waiter in waiting:
                waiting.remove(waiter)
            if not waiting:
                self._waiters.pop(job_id, None)


async def system_id(js: JetStreamContext, subjects: Subjects) -> str:
    """What tells this system from another on any broker: its prefix and when its EVENTS
    stream was made. Gateways mark their answers with it, so that no gateway of the system
    is taken for a ComfyUI server of it."""
    info = await js.stream_info(subjects.events_stream)
    made = info.created.isoformat() if info.created is not None else ""
    return hashlib.sha256(f"{subjects.prefix}|{made}".encode()).hexdigest()[:16]


def _retry_after(error: Error) -> int | None:
    """When a refusal says to come back: NATS was electing a leader for longer than the
    balancer waited (soon it will not), or the queue is full (as long as it says)."""
    if error.code == "unavailable":
        return 1
    if error.code == "queue_full" and isinstance(error.details, dict):
        wait = error.details.get("retry_after_s")
        if isinstance(wait, int) and wait > 0:
            return wait
    return None


def _unknown_job(job_id: str) -> ApiError:
    return ApiError(404, "unknown_job", f"no job {job_id!r}")


def _already_ended(job_id: str, status: str) -> ApiError:
    return ApiError(409, "already_finished", f"job {job_id} already {status}", {"status": status})


def _report_end(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("following ComfyUI-compatible prompts stopped", exc_info=task.exception())


# How handlers ask for the Services (Litestar injects it by this parameter name).
ServicesDep = NamedDependency[Services]
