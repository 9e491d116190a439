"""Helpers of the adapter tests: workflows, `Bus` and the adapter as a process.

`Bus` plays the balancer's part exactly as gateway/balancer/dispatcher.py does: it writes the
job's KV record (`dispatched`, server, attempt) BEFORE publishing the Job on
comfy.jobs.<server> with `Nats-Msg-Id: <job_id>.<attempt>`, and it keeps the record following
the events (jobstate). It also records every event, so tests wait on events with deadlines
instead of sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from gateway.bus.contract import (
    Cancel,
    ControlReply,
    Event,
    Heartbeat,
    Job,
    JobInput,
    JobRecord,
    JobRequest,
    JobStatus,
    Subjects,
    decode,
    decode_event,
    encode,
    event_type,
    new_id,
    now,
)
from gateway.bus.jobstate import apply_event
from gateway.storage import NotFound, Storage
from plugins.comfyui import AdapterOptions
from plugins.simulator import Simulator

SERVER = "sim-a"
TERMINAL = frozenset({"succeeded", "failed", "cancelled", "retried"})

# Short timings so faults resolve in about a second; the logic is the production one.
FAST = AdapterOptions(
    silence_s=1.0,
    poll_s=0.2,
    unreachable_grace_s=1.5,
    stop_wait_s=8.0,
    grace_s=0.5,
    ack_wait_s=3.0,
    fetch_wait_s=0.2,
)


def tiny(prefix: str = "gw_tiny", width: int = 64) -> dict[str, Any]:
    """EmptyImage → ImageInvert → SaveImage, as in the recordings."""
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": width, "height": 64, "batch_size": 1, "color": 0},
        },
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {
            "class_type": "SaveImage",
            "inputs": {"images": ["2", 0], "filename_prefix": prefix},
            "_meta": {"title": "Save"},
        },
    }


def two_outputs() -> dict[str, Any]:
    workflow = tiny("gw_two_b")
    workflow["1"]["inputs"]["color"] = 16711680
    workflow["4"] = {
        "class_type": "SaveImage",
        "inputs": {"images": ["1", 0], "filename_prefix": "gw_two_a"},
    }
    return workflow


class Bus:
    """The balancer's side of the bus, for tests: bind jobs, follow events, send controls."""

    def __init__(self, nc: Client, js: JetStreamContext, kv: KeyValue, subjects: Subjects):
        self.nc = nc
        self.js = js
        self.kv = kv
        self.subjects = subjects
        self.events: dict[str, list[Event]] = defaultdict(list)
        self.heartbeats: list[tuple[float, Heartbeat]] = []
        self._changed = asyncio.Condition()

    async def start(self) -> None:
        await self.nc.subscribe(self.subjects.all_events, cb=self._on_event)
        await self.nc.subscribe(self.subjects.all_heartbeats, cb=self._on_heartbeat)

    async def _on_event(self, msg: Msg) -> None:
        event = decode_event(msg.data)
        with contextlib.suppress(Exception):
            entry = await self.kv.get(event.job_id)
            assert entry.value is not None
            updated = apply_event(decode(entry.value, JobRecord), event)
            if updated is not None:
                await self.kv.put(event.job_id, encode(updated))
        async with self._changed:
            self.events[event.job_id].append(event)
            self._changed.notify_all()

    async def _on_heartbeat(self, msg: Msg) -> None:
        beat = decode(msg.data, Heartbeat)
        async with self._changed:
            self.heartbeats.append((asyncio.get_running_loop().time(), beat))
            self._changed.notify_all()

    async def dispatch(
        self,
        workflow: dict[str, Any],
        *,
        server_id: str = SERVER,
        attempt: int = 1,
        bound_to: str | None = None,
        record_attempt: int | None = None,
        overrides: dict[str, Any] | None = None,
        inputs: list[JobInput] | None = None,
        timeout_s: float | None = None,
        job_id: str | None = None,
        started_at: float | None = None,
    ) -> Job:
        """Bind a new job to `server_id` as the dispatcher does: record first, then the Job.

        `bound_to` and `record_attempt` make the record disagree with the Job, as when the
        balancer has moved the job on by the time the adapter reads it. `started_at` makes
        the record say the attempt runs since then, as after an adapter died mid-job.
        """
        job_id = job_id or new_id()
        request = JobRequest(
            workflow=workflow,
            overrides=overrides or {},
            inputs=inputs or [],
            job_id=job_id,
            timeout_s=timeout_s,
        )
        at = now()
        record = JobRecord(
            job_id=job_id,
            status=JobStatus.DISPATCHED if started_at is None else JobStatus.RUNNING,
            submitted_at=at,
            updated_at=at,
            log_file_path="",
            server_id=bound_to or server_id,
            attempt=attempt if record_attempt is None else record_attempt,
            started_at=started_at,
        )
        await self.kv.put(job_id, encode(record))
        job = Job(
            job_id=job_id,
            attempt=attempt,
            server_id=server_id,
            request=request,
            submitted_at=at,
            dispatched_at=at,
        )
        await self.js.publish(
            self.subjects.jobs(server_id),
            encode(job),
            headers={"Nats-Msg-Id": f"{job_id}.{attempt}"},
        )
        return job

    async def wait(
        self, predicate: Callable[[], Any], within: float = 15.0, what: str = "a condition"
    ) -> Any:
        """Wait until `predicate()` is truthy (checked on every event or heartbeat)."""
        try:
            async with asyncio.timeout(within), self._changed:
                while not (result := predicate()):
                    await self._changed.wait()
                return result
        except TimeoutError:
            raise AssertionError(f"timed out after {within} s waiting for {what}") from None

    async def wait_event(self, job_id: str, *types: str, within: float = 15.0) -> Event:
        """The first event of `job_id` of one of `types` (terminal ones by default)."""
        wanted = set(types) or TERMINAL

        def find() -> Event | None:
            return next((e for e in self.events[job_id] if event_type(e) in wanted), None)

        event: Event = await self.wait(find, within, f"{sorted(wanted)} of job {job_id}")
        return event

    async def wait_pending(self, sim: Simulator, job: Job) -> None:
        """Until `job`'s prompt waits in the fake's queue (checked at each event or beat)."""

        def pending() -> bool:
            return any(item.prompt_id == job.prompt_id for item in sim.engine.pending())

        await self.wait(pending, what=f"job {job.job_id} to wait in ComfyUI's queue")

    def types(self, job_id: str) -> list[str]:
        return [event_type(e) for e in self.events[job_id]]

    async def cancel(self, job_id: str, server_id: str = SERVER) -> ControlReply:
        reply = await self.nc.request(
            self.subjects.control(server_id), encode(Cancel(job_id=job_id)), timeout=2.0
        )
        return decode(reply.data, ControlReply)

    async def record(self, job_id: str) -> JobRecord:
        entry = await self.kv.get(job_id)
        assert entry.value is not None
        return decode(entry.value, JobRecord)


@contextlib.contextmanager
def adapter_process(
    address: str, nats_url: str, data_dir: Path, log_file: Path, *extra: str
) -> Iterator[subprocess.Popen[bytes]]:
    """The adapter as a process, through its CLI entry; killed at the end whatever happens."""
    command = [
        sys.executable,
        "-m",
        "plugins.comfyui",
        "--server-id",
        SERVER,
        "--address",
        address,
        "--nats-url",
        nats_url,
        "--data-dir",
        str(data_dir),
        "--ack-wait",
        "2",
        "--grace",
        "1",
        *extra,
    ]
    env = {**os.environ, "COMFYAUTOMATE_HEARTBEAT_INTERVAL_S": "0.5"}
    with log_file.open("ab") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=Path.cwd()
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)


async def is_stored(storage: Storage, key: str) -> bool:
    """Whether the storage holds `key` now."""
    try:
        await storage.stat(key)
    except NotFound:
        return False
    return True
