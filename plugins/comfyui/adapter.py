"""The adapter of one ComfyUI server: takes its jobs from JetStream and runs them there.

Wiring only: the JetStream consumer, one JobRun per job (runner.py), the websocket follower
(progress.py), the heartbeat (heartbeat.py) and control requests (control.py), started together
and stopped in order: stop taking jobs, let running ones finish within a grace period, hand back
what is left, say "unhealthy" one last time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Final

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api
from nats.js.errors import BadRequestError, KeyNotFoundError
from nats.js.kv import KeyValue

from gateway.bus.contract import (
    Capabilities,
    ContractError,
    Job,
    JobRecord,
    JobStatus,
    Subjects,
    SucceededData,
    check_token,
    decode,
    encode,
    event_type,
)
from gateway.bus.events import EventPublisher
from gateway.bus.jobstate import ends_attempt
from gateway.bus.retry import through_election
from gateway.settings import Settings
from gateway.storage import Storage
from plugins.comfyui.attempt import RunContext
from plugins.comfyui.breaker import Breaker
from plugins.comfyui.client import ComfyClient
from plugins.comfyui.conclusion import summary
from plugins.comfyui.control import ControlServer
from plugins.comfyui.heartbeat import Monitor
from plugins.comfyui.options import AdapterOptions, with_settings
from plugins.comfyui.progress import Follower
from plugins.comfyui.residency import Residency
from plugins.comfyui.runner import JobRun
from plugins.storage.registry import create_storage

log = logging.getLogger(__name__)

# Attempts this process has ended, remembered to drop a redelivery whose ack was lost.
_ENDED_REMEMBERED: Final = 4096

_SHUTDOWN = "the adapter is shutting down"


def _running(record: JobRecord | None) -> bool:
    return record is not None and record.status is JobStatus.RUNNING


def consumer_name(server_id: str) -> str:
    """The durable JetStream consumer of one server's jobs."""
    return f"adapter-{server_id}"


def superseded(record: JobRecord | None, job: Job, server_id: str) -> str | None:
    """Why `job` must not run here (its record moved on), or None when it is ours to run."""
    if record is None:
        return "the job has no record"
    if record.status.terminal:
        return f"the job is already {record.status.value}"
    if record.server_id != server_id:
        return f"the job is bound to {record.server_id or 'no server'}"
    if record.attempt != job.attempt:
        return f"the job is at attempt {record.attempt}, this is attempt {job.attempt}"
    if record.status not in (JobStatus.DISPATCHED, JobStatus.RUNNING):
        return f"the job is {record.status.value}"
    return None


class Adapter:
    """Runs the jobs bound to one server."""

    def __init__(
        self,
        nc: Client,
        settings: Settings,
        storage: Storage,
        *,
        server_id: str,
        address: str,
        capacity: int,
        weight: float,
        labels: dict[str, str],
        options: AdapterOptions,
    ) -> None:
        self._nc = nc
        self._js = nc.jetstream()
        self._subjects = Subjects(settings.subject_prefix)
        self.server_id = check_token(server_id, "server id")
        self.address = address
        self.capacity = max(1, capacity)
        self._options = options
        self._storage = storage
        self._client = ComfyClient(address)
        self._breaker = Breaker()
        self._residency = Residency()
        self._monitor = Monitor(
            self._client,
            server_id=server_id,
            address=address,
            capacity=self.capacity,
            weight=weight,
            labels=labels,
            interval_s=settings.heartbeat_interval_s,
            refresh_s=options.capabilities_refresh_s,
            resend_s=options.capabilities_resend_s,
            on_unhealthy=self._on_unhealthy,
            taken_out=self._breaker.reason,
            residency=self._residency,
        )
        self._follower = Follower(
            address,
            on_status=self._monitor.note_queue_remaining,
            on_preview=self._publish_preview,
        )
        self._runs: dict[str, JobRun] = {}
        self._ended: dict[tuple[str, int], None] = {}  # (job id, attempt), oldest first
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._slot = asyncio.Event()

    async def _publish_preview(self, frame: bytes) -> None:
        # Core NATS, not JetStream: a preview is worth showing live and nothing afterwards.
        await self._nc.publish(self._subjects.previews(self.server_id), frame)

    # -- what control and the heartbeat ask -----------------------------------------------------

    def in_flight(self) -> list[str]:
        return sorted(self._runs)

    def cancel(self, job_id: str, reason: str) -> bool:
        """Start cancelling a job held here; False if it is not here."""
        run = self._runs.get(job_id)
        if run is None:
            return False
        log.info("job %s: cancel requested (%s)", job_id, reason)
        run.cancel(reason)
        return True

    async def describe(self) -> Capabilities | None:
        if self._monitor.capabilities is not None:
            return self._monitor.capabilities
        return await self._monitor.refresh_capabilities()

    def _on_unhealthy(self, reason: str) -> None:
        self._residency.forget()  # a ComfyUI that restarted holds no models
        # Jobs not yet on ComfyUI go back at once; submitted ones find out for themselves
        # (their prompt comes back, or ComfyUI stays unreachable and they hand back).
        for run in list(self._runs.values()):
            if run.hand_back(
                f"ComfyUI at {self.address} is unhealthy: {reason}", only_unsubmitted=True
            ):
                log.warning("job %s: handing back, ComfyUI is unhealthy", run.job.job_id)

    # -- life -----------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Take and run jobs until `stop` is set; then shut down gracefully."""
        kv = await through_election(
            lambda: self._js.key_value(self._subjects.jobs_bucket), "finding the jobs bucket"
        )
        context = RunContext(
            server_id=self.server_id,
            address=self.address,
            client=self._client,
            follower=self._follower,
            publisher=EventPublisher(self._js, self._subjects, server_id=self.server_id),
            storage=self._storage,
            jobs_kv=kv,
            options=self._options,
            unhealthy=self._monitor.unhealthy,
            residency=self._residency,
        )
        control = ControlServer(self._nc, self._subjects.control(self.server_id), self)
        sub = await self._subscribe()
        heartbeat_subject = self._subjects.heartbeat(self.server_id)
        log.info("adapter for %s (%s) started", self.server_id, self.address)
        try:
            await control.start()
            # Know ComfyUI's health before the first job, so a job is not handed back merely
            # because no check had run yet.
            await self._monitor.check()
            async with asyncio.TaskGroup() as tasks:
                background = [
                    tasks.create_task(self._follower.run(), name=f"ws-{self.server_id}"),
                    tasks.create_task(
                        self._monitor.run(self._nc, heartbeat_subject, self.in_flight),
                        name=f"heartbeat-{self.server_id}",
                    ),
                ]
                await self._consume(sub, stop, context, kv, tasks)
                await self._drain()
                for task in background:
                    task.cancel()
            # The last word: this server takes nothing more.
            await self._nc.publish(heartbeat_subject, encode(self._monitor.beat([], stopping=True)))
            with contextlib.suppress(nats.errors.Error):
                await self._nc.flush(timeout=2)
        finally:
            await control.stop()
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()
            await self._follower.close()
            await self._client.aclose()
            log.info("adapter for %s stopped", self.server_id)

    async def _subscribe(self) -> JetStreamContext.PullSubscription:
        name = consumer_name(self.server_id)
        stream = self._subjects.jobs_stream
        config = api.ConsumerConfig(
            name=name,
            durable_name=name,
            # Only this server's subject: a work-queue stream refuses overlapping filters.
            filter_subject=self._subjects.jobs(self.server_id),
            ack_policy=api.AckPolicy.EXPLICIT,
            deliver_policy=api.DeliverPolicy.ALL,
            ack_wait=self._options.ack_wait_s,
            max_ack_pending=max(16, 4 * self.capacity),
        )
        try:
            # Creates the consumer, or updates it (a changed ack_wait, say).
            await through_election(
                lambda: self._js.add_consumer(stream, config), f"creating consumer {name}"
            )
        except BadRequestError as exc:
            log.warning("consumer %s exists with settings that cannot change: %s", name, exc)
        return await through_election(
            lambda: self._js.pull_subscribe_bind(durable=name, stream=stream),
            f"binding consumer {name}",
        )

    async def _consume(
        self,
        sub: JetStreamContext.PullSubscription,
        stop: asyncio.Event,
        context: RunContext,
        kv: KeyValue,
        tasks: asyncio.TaskGroup,
    ) -> None:
        while not stop.is_set():
            if len(self._runs) >= self.capacity:
                self._slot.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._options.fetch_wait_s):
                        await self._slot.wait()
                continue
            try:
                messages = await sub.fetch(1, timeout=self._options.fetch_wait_s)
            except nats.errors.TimeoutError:
                continue
            except nats.errors.Error as exc:
                log.warning("fetching jobs failed: %s", exc)
                await asyncio.sleep(0.5)
                continue
            for msg in messages:
                await self._accept(msg, context, kv, tasks)

    async def _accept(
        self, msg: Msg, context: RunContext, kv: KeyValue, tasks: asyncio.TaskGroup
    ) -> None:
        try:
            job = decode(msg.data, Job)
        except ContractError as exc:
            log.error("dropping a job message that does not decode: %s", exc)
            await msg.term()
            return
        held = self._runs.get(job.job_id)
        if held is not None:
            if held.job.attempt == job.attempt:
                # Redelivered while still running here (progress acks were late): keep
                # following it, and acknowledge the newest delivery when it ends.
                log.info("job %s: redelivered while running; continuing", job.job_id)
                held.msg = msg
            else:
                await msg.nak(delay=1)
            return
        if (job.job_id, job.attempt) in self._ended:
            # Its end is in the log, published from here: the ack was lost (a broker restart
            # can also forget that it delivered the job, so num_delivered says 1 again).
            log.info("job %s attempt %d: already ended here; dropping it", job.job_id, job.attempt)
            await msg.ack()
            return
        try:
            record = await _record(kv, job.job_id)
        except nats.errors.Error as exc:
            log.warning("job %s: cannot read its record (%s); retrying later", job.job_id, exc)
            await msg.nak(delay=1)
            return
        why = superseded(record, job, self.server_id)
        if why is None and (msg.metadata.num_delivered > 1 or _running(record)):
            # Delivered again: the end of this attempt may be in the log already (its ack was
            # lost with a broker restart) while the record, which follows the events, lags.
            try:
                why = await self._already_ended(job, context.publisher)
            except nats.errors.Error as exc:
                log.warning(
                    "job %s: cannot read its last event (%s); retrying later", job.job_id, exc
                )
                await msg.nak(delay=1)
                return
        if why is not None:
            log.info("job %s attempt %d superseded (%s); dropping it", job.job_id, job.attempt, why)
            await msg.ack()
            return
        assert record is not None
        run = JobRun(context, job, msg, record)
        self._runs[job.job_id] = run
        log.info("job %s attempt %d: taken", job.job_id, job.attempt)
        self._tasks[job.job_id] = tasks.create_task(self._run(run), name=f"job-{job.job_id}")

    async def _already_ended(self, job: Job, publisher: EventPublisher) -> str | None:
        """Why not to run `job`: its attempt's end is already in the event log; None if not."""
        last = await publisher.last_event(job.job_id)
        if last is not None and ends_attempt(last, job.attempt):
            return f"attempt {job.attempt} already ended ({event_type(last)})"
        return None

    async def _run(self, run: JobRun) -> None:
        try:
            await run.run()
        finally:
            self._runs.pop(run.job.job_id, None)
            self._tasks.pop(run.job.job_id, None)
            self._judge_server(run)
            if run.concluded:
                self._ended[run.job.job_id, run.job.attempt] = None
                if len(self._ended) > _ENDED_REMEMBERED:
                    del self._ended[next(iter(self._ended))]
                run.ctx.publisher.forget(run.job.job_id)
            self._slot.set()

    def _judge_server(self, run: JobRun) -> None:
        """What the job's end says of the server, for the circuit breaker."""
        result = run.result
        if result is None:
            return
        if isinstance(result.data, SucceededData):
            self._breaker.succeeded()
        elif result.server_fault:
            self._breaker.server_fault(summary(result.data))
            if self._breaker.reason() is not None:
                self._monitor.beat_now()  # no balancer should send it more work meanwhile

    async def _drain(self) -> None:
        if not self._tasks:
            return
        log.info("stopping: %d job(s) in flight", len(self._tasks))
        for run in list(self._runs.values()):
            run.hand_back(_SHUTDOWN, only_unsubmitted=True, counts=False)
        await asyncio.wait(list(self._tasks.values()), timeout=self._options.grace_s)
        for run in list(self._runs.values()):
            log.warning("job %s: grace period over; handing it back", run.job.job_id)
            run.hand_back(f"{_SHUTDOWN} (grace period over)", counts=False)
        if self._tasks:
            await asyncio.wait(list(self._tasks.values()), timeout=self._options.stop_wait_s + 5)
        for job_id, task in list(self._tasks.items()):
            # Not acked: JetStream gives it to the next adapter, which adopts the prompt.
            log.error("job %s did not stop in time; leaving it for redelivery", job_id)
            task.cancel()


async def _record(kv: KeyValue, job_id: str) -> JobRecord | None:
    try:
        entry = await through_election(lambda: kv.get(job_id), f"reading job {job_id}")
    except KeyNotFoundError:
        return None
    if entry.value is None:
        return None
    return decode(entry.value, JobRecord)


async def run_adapter(
    nc: Client,
    settings: Settings,
    stop: asyncio.Event,
    *,
    server_id: str,
    address: str,
    capacity: int = 2,
    weight: float = 1.0,
    labels: dict[str, str] | None = None,
    storage: Storage | None = None,
    options: AdapterOptions | None = None,
) -> None:
    """Run the adapter of `server_id` (ComfyUI at `address`) on `nc` until `stop` is set.

    `storage` defaults to the backend the settings name (closed again on exit); `up` passes
    the one it shares between roles.
    """
    own_storage = storage is None
    if storage is None:
        storage = create_storage(
            settings.storage,
            data_dir=settings.data_path,
            js=nc.jetstream(),
            base_url=settings.public_url or "",
        )
    adapter = Adapter(
        nc,
        settings,
        storage,
        server_id=server_id,
        address=address,
        capacity=capacity,
        weight=weight,
        labels=dict(labels or {}),
        options=with_settings(options or AdapterOptions(), settings),
    )
    try:
        await adapter.run(stop)
    finally:
        if own_storage:
            await storage.close()
