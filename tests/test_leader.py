from __future__ import annotations

import asyncio

import httpx
import msgspec
import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, NotFoundError

from gateway.balancer.dispatcher import CONSUMER
from gateway.balancer.fleet import FleetView
from gateway.balancer.history import HistoryLesson, learn_from_history
from gateway.balancer.role import Balancer
from gateway.balancer.servers import ServerTable
from gateway.bus.connection import session
from gateway.bus.contract import (
    Dispatched,
    DispatchedData,
    JobRecord,
    JobRequest,
    JobStatus,
    Queued,
    QueuedData,
    Running,
    RunningData,
    Subjects,
    decode,
)
from gateway.bus.jobstate import apply_event
from gateway.bus.lease import hold_lease
from gateway.lifecycle import stop_tasks
from gateway.logsink.sink import run_logsink
from gateway.settings import Settings
from plugins.simulator import SimulatorConfig
from tests.e2e.conftest import running_system, tiny
from tests.helpers import poll_until


async def test_one_leader_at_a_time_and_a_clean_handover(js: JetStreamContext) -> None:
    kv = await js.key_value("comfy_balancer")
    leading: list[str] = []
    events: asyncio.Queue[tuple[str, str]] = asyncio.Queue()

    def work_of(name: str):  # type: ignore[no-untyped-def]
        async def work() -> None:
            leading.append(name)
            assert len(leading) == 1, leading
            await events.put(("lead", name))
            try:
                await asyncio.Event().wait()
            finally:
                leading.remove(name)

        return work

    stops = {name: asyncio.Event() for name in ("a", "b")}
    tasks = {
        name: asyncio.create_task(
            hold_lease(kv, name, work_of(name), stops[name], renew_every=0.05)
        )
        for name in stops
    }
    try:
        async with asyncio.timeout(10):
            _, first = await events.get()
            other = "b" if first == "a" else "a"
            stops[first].set()
            await tasks[first]
            assert await events.get() == ("lead", other)
    finally:
        for name in stops:
            stops[name].set()
        await asyncio.gather(*tasks.values())


async def test_a_failing_leader_gives_the_lease_up(js: JetStreamContext) -> None:
    kv = await js.key_value("comfy_balancer")
    runs: asyncio.Queue[str] = asyncio.Queue()

    async def broken() -> None:
        await runs.put("broken")
        raise RuntimeError("the leader's work broke")

    async def healthy() -> None:
        await runs.put("healthy")
        await asyncio.Event().wait()

    stop = asyncio.Event()
    first = asyncio.create_task(hold_lease(kv, "broken", broken, stop, renew_every=0.05))
    second = None
    try:
        async with asyncio.timeout(10):
            assert await runs.get() == "broken"
            second = asyncio.create_task(hold_lease(kv, "healthy", healthy, stop, renew_every=0.05))
            while await runs.get() != "healthy":
                pass
    finally:
        stop.set()
        await asyncio.gather(first, *([second] if second else []))


async def test_a_leader_replaying_every_event_does_not_revive_finished_jobs(
    settings: Settings,
) -> None:
    # A balancer consumer created afresh (deleted by an operator, say) delivers every stored
    # event again, each for the first time: finished jobs must stay finished.
    subjects = Subjects(settings.subject_prefix)
    async with running_system(settings) as system:
        await system.add_server("a", SimulatorConfig(node_seconds=0.0))
        async with httpx.AsyncClient(base_url=system.url, timeout=60) as client:
            reply = await client.post("/workflow/submit", json={"workflow": tiny(4242)})
            job_id = reply.json()["job_id"]
            result = await client.get(f"/workflow/result/{job_id}", params={"wait": 30})
            assert result.json()["status"] == "succeeded"
        await system.stop_all_gateways()
        async with session(settings.nats_url, "replay-check", subjects) as nc:
            js = nc.jetstream()
            await js.delete_consumer(subjects.events_stream, CONSUMER)
            kv = await js.key_value(subjects.jobs_bucket)
            revision = (await kv.get(job_id)).revision
            jobs_before = (await js.stream_info(subjects.jobs_stream)).state.last_seq
            last_event = (await js.stream_info(subjects.events_stream)).state.last_seq
            system.url = await system.start_gateway()

            async def replayed() -> bool:
                try:
                    info = await js.consumer_info(subjects.events_stream, CONSUMER)
                except NotFoundError:
                    return False
                return info.ack_floor.stream_seq >= last_event

            await poll_until(replayed, "the new leader has replayed every event")
            entry = await kv.get(job_id)
            # Not even for a moment: the record was never written again.
            assert entry.revision == revision
            assert decode(entry.value, JobRecord).status is JobStatus.SUCCEEDED
            assert (await js.stream_info(subjects.jobs_stream)).state.last_seq == jobs_before


def test_a_dispatched_event_landing_after_running_does_not_undo_it() -> None:
    # The dispatcher writes the record, then publishes the job and its `dispatched` event at
    # once; a quick adapter's `running` can reach the job's subject first.
    request = JobRequest(workflow={"1": {"class_type": "X", "inputs": {}}})
    queued = Queued(
        event_id="e1",
        job_id="j",
        seq=1,
        ts=1.0,
        data=QueuedData(request=request, log_file_path="p"),
    )
    record = apply_event(None, queued)
    assert record is not None
    bound = msgspec.structs.replace(record, status=JobStatus.DISPATCHED, server_id="s", attempt=1)
    running = apply_event(
        bound,
        Running(
            event_id="e2", job_id="j", seq=2, ts=2.0, data=RunningData(attempt=1, prompt_id="x")
        ),
    )
    assert running is not None and running.status is JobStatus.RUNNING
    late = Dispatched(
        event_id="e3", job_id="j", seq=3, ts=3.0, data=DispatchedData(server_id="s", attempt=1)
    )
    assert apply_event(running, late) is None


async def test_a_balancer_leads_only_once_it_has_read_the_server_registry(
    nc: Client, js: JetStreamContext, settings: Settings
) -> None:
    # Until then a server known from its heartbeat alone would look open for work, even one
    # the registry says is draining.
    subjects = Subjects(settings.subject_prefix)
    fleet = FleetView(nc, await js.key_value(subjects.servers_bucket), subjects)
    balancer = Balancer(nc, fleet, settings)
    leases = await js.key_value(subjects.balancer_bucket)
    stop = asyncio.Event()
    running = asyncio.create_task(balancer.run(stop))
    following: asyncio.Task[None] | None = None
    try:
        async with asyncio.timeout(10):
            await balancer.ready.wait()
        # A few round trips to the broker on the balancer's own connection: whatever it had
        # begun to send for the lease (it competes right after `ready` unless it waits for the
        # registry) has been handled by then.
        for _ in range(3):
            await nc.flush()
        with pytest.raises(KeyNotFoundError):
            await leases.get("leader")
        following = asyncio.create_task(fleet.run())
        await poll_until(lambda: _leads(balancer), "the balancer leading")
    finally:
        stop.set()
        async with asyncio.timeout(20):
            await running
        if following is not None:
            await stop_tasks(following)


async def _leads(balancer: Balancer) -> bool:
    return balancer.leads


async def test_a_new_leader_that_hears_no_history_goes_on_and_asks_again(
    nc: Client, settings: Settings
) -> None:
    subjects = Subjects()
    table = ServerTable()
    # One that never answers (hung, or busy with a long query): no longer than the bound.
    silent = await nc.subscribe(subjects.logs_query)
    try:
        async with asyncio.timeout(5):
            assert await learn_from_history(nc, subjects, table, within=0.2) is None
    finally:
        await silent.unsubscribe()
    # No log sink runs: at once; then asked again behind the dispatching until one answers.
    lesson = HistoryLesson(nc, subjects, table)
    async with asyncio.timeout(5):
        await lesson.first()
    assert lesson.learnt is None
    lesson.keep_asking()
    stop = asyncio.Event()
    sink = asyncio.create_task(run_logsink(settings, stop, nc=nc))
    try:
        async with asyncio.timeout(20):
            await asyncio.gather(*lesson.tasks)
    finally:
        stop.set()
        await sink
    assert lesson.learnt == 0  # an empty index: nothing to learn, and no more asking
