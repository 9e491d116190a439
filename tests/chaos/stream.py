"""A stream of jobs kept flowing through the cluster, and a live view of their records.

The feeder submits through the async SDK (REST) or on the bus (sdk/nats.py), with job ids it
chooses, so a submission whose answer
was lost (the gateway died, the broker restarted) is sent again under the same id: `duplicate_job`
then means the first one went through. It keeps `outstanding` jobs accepted and unfinished until
told to stop. The tracker follows the job records in KV as they change; faults are triggered by
what it observes (so many more jobs succeeded, a job running on that server), never by time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Callable

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

from gateway.bus.contract import ContractError, JobRecord, JobStatus, Subjects, decode
from plugins.simulator.samples import tiny_workflow
from sdk.aio import AsyncComfyUISDK
from sdk.errors import ApiError, GatewayUnreachable
from sdk.nats import NatsClient

log = logging.getLogger(__name__)

# Answers after which a submission is tried again under the same job id.
_TRANSIENT = frozenset({"no_balancer", "submit_timeout", "unavailable", "internal"})


class Tracker:
    """The latest record of every job, from the KV bucket's subjects (and full reads)."""

    def __init__(self, nc: Client, subjects: Subjects) -> None:
        self._nc = nc
        self._subjects = subjects
        self.records: dict[str, JobRecord] = {}
        self.succeeded_on: Counter[str] = Counter()
        self.changed = asyncio.Condition()
        self.version = 0  # counts records that changed
        self._hooks: list[Callable[[JobRecord], None]] = []

    @property
    def succeeded(self) -> int:
        return sum(self.succeeded_on.values())

    def finished(self, job_ids: set[str] | None = None) -> int:
        return sum(
            1
            for job_id, record in self.records.items()
            if record.status.terminal and (job_ids is None or job_id in job_ids)
        )

    def statuses(self) -> Counter[str]:
        return Counter(record.status.value for record in self.records.values())

    def on_change(self, hook: Callable[[JobRecord], None]) -> Callable[[], None]:
        """Call `hook` with every newer record (synchronously); returns a remover."""
        self._hooks.append(hook)
        return lambda: self._hooks.remove(hook)

    async def start(self) -> None:
        await self._nc.subscribe(f"$KV.{self._subjects.jobs_bucket}.>", cb=self._on_msg)

    async def _on_msg(self, msg: Msg) -> None:
        if not msg.data:
            return
        with contextlib.suppress(ContractError):
            await self._note(decode(msg.data, JobRecord))

    async def _note(self, record: JobRecord) -> None:
        old = self.records.get(record.job_id)
        if old is not None and (old.status.terminal or record.last_seq < old.last_seq):
            return
        if old == record:
            return
        self.records[record.job_id] = record
        self.version += 1
        if record.status is JobStatus.SUCCEEDED and record.server_id is not None:
            self.succeeded_on[record.server_id] += 1
        for hook in list(self._hooks):
            hook(record)
        async with self.changed:
            self.changed.notify_all()

    async def resync(self) -> None:
        """Read every record again (updates published while the broker was away were missed)."""
        kv = await self._nc.jetstream().key_value(self._subjects.jobs_bucket)
        watcher = await kv.watchall()
        try:
            async for entry in watcher:
                if entry is None:
                    break
                if entry.value:
                    with contextlib.suppress(ContractError):
                        await self._note(decode(entry.value, JobRecord))
        finally:
            await watcher.stop()  # type: ignore[no-untyped-call]

    async def wait_for(self, check: Callable[[], bool], what: str, within: float = 30.0) -> None:
        """Until `check()` holds after some record changed; AssertionError after `within` s."""
        try:
            async with asyncio.timeout(within), self.changed:
                await self.changed.wait_for(check)
        except TimeoutError:
            raise AssertionError(
                f"not within {within} s: {what} (records: {dict(self.statuses())})"
            ) from None


class Feeder:
    """Submits jobs so that `outstanding` stay accepted and unfinished, until `stop()`."""

    def __init__(
        self,
        url: str,
        tracker: Tracker,
        *,
        prefix: str,
        bus: NatsClient | None = None,
        outstanding: int = 200,
        concurrency: int = 8,
        max_attempts: int = 4,
    ) -> None:
        self._sdk = AsyncComfyUISDK(url, timeout=15)
        self._bus = bus
        self._tracker = tracker
        self._prefix = prefix
        self.outstanding = outstanding
        self._concurrency = concurrency
        self._max_attempts = max_attempts
        self._feeding = True
        self._next = 0
        self.accepted: list[str] = []
        self.duplicates = 0  # accepted on a retry: the first try had gone through
        self.retries = 0
        self.transient: Counter[str] = Counter()  # answers after which a submission was retried
        self.refused: list[tuple[str, str]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._room = asyncio.Event()
        self._remove_hook = tracker.on_change(self._on_record)

    @property
    def claimed(self) -> int:
        """Jobs submitted or being submitted so far (their indexes are 0 .. claimed - 1)."""
        return self._next

    def job_id(self, index: int) -> str:
        return f"{self._prefix}{index:05d}"

    def unfinished(self) -> int:
        """Accepted (or being submitted) and not yet terminal."""
        return self._next - self._tracker.finished()

    def _on_record(self, record: JobRecord) -> None:
        if record.status.terminal:
            self._room.set()

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._work()) for _ in range(self._concurrency)]

    async def stop(self) -> None:
        """Submit nothing new; return once submissions under way have been answered."""
        self._feeding = False
        self._room.set()
        await asyncio.gather(*self._tasks)

    async def close(self) -> None:
        self._remove_hook()
        self._feeding = False
        self._room.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._sdk.close()

    async def _work(self) -> None:
        while True:
            while self._feeding and self.unfinished() >= self.outstanding:
                self._room.clear()
                await self._room.wait()
            if not self._feeding:
                return
            index = self._next
            self._next += 1
            await self._submit(self.job_id(index), index)

    async def _submit(self, job_id: str, index: int) -> None:
        # The prefix names the job's output file, so the fakes' output folders tell how many
        # times each job really ran.
        workflow = tiny_workflow(seed=index + 1, prefix=job_id)
        first = True
        while True:
            try:
                if self._bus is not None:
                    await self._bus.submit(workflow, job_id=job_id, max_attempts=self._max_attempts)
                else:
                    await self._sdk.submit_workflow(
                        workflow, job_id=job_id, max_attempts=self._max_attempts
                    )
            except (GatewayUnreachable, nats.errors.Error) as exc:
                self.transient[type(exc).__name__] += 1
            except ApiError as exc:
                if exc.code == "duplicate_job" and not first:
                    self.duplicates += 1
                    break
                if exc.code not in _TRANSIENT:
                    self.refused.append((job_id, str(exc)))
                    return
                self.transient[exc.code] += 1
            else:
                break
            first = False
            self.retries += 1
            # The gateway or the broker is away: ask again shortly, as a client would.
            await asyncio.sleep(0.2)
        self.accepted.append(job_id)
