from __future__ import annotations

import asyncio

import pytest
from nats.js import JetStreamContext

from gateway.bus.connection import connect
from gateway.bus.contract import (
    CancelledData,
    NodeCached,
    NodeCachedData,
    NodeProgress,
    NodeProgressData,
    Subjects,
    SucceededData,
    decode_event,
)
from gateway.bus.events import EventPublisher, JobEnded
from gateway.bus.natsserver import NatsServer

# Any event that does not end its job.
_STEP = NodeCachedData(node_ids=["2"])


async def _events_of(js: JetStreamContext, job_id: str) -> list[int]:
    sub = await js.subscribe(f"comfy.events.{job_id}", ordered_consumer=True)
    info = await js.stream_info("EVENTS", subjects_filter=f"comfy.events.{job_id}")
    count = (info.state.subjects or {}).get(f"comfy.events.{job_id}", 0)
    seqs = []
    async with asyncio.timeout(10):
        for _ in range(count):
            msg = await sub.next_msg(timeout=5)
            seqs.append(decode_event(msg.data).seq)
    await sub.unsubscribe()
    return seqs


async def test_events_are_numbered_from_one(js: JetStreamContext) -> None:
    publisher = EventPublisher(js, Subjects(), server_id="s1")
    first = await publisher.emit("job1", NodeCachedData(node_ids=["1"]))
    second = await publisher.emit("job1", _STEP)
    assert isinstance(first, NodeCached)
    assert (first.seq, second.seq) == (1, 2)
    assert first.server_id == "s1"
    assert first.event_id != second.event_id
    assert await _events_of(js, "job1") == [1, 2]


async def test_two_writers_on_one_job_keep_the_sequence_gap_free(
    nats_server: NatsServer, js: JetStreamContext
) -> None:
    # Two connections stand for two processes (a balancer and an adapter, say).
    other = await connect(nats_server.url, "other")
    try:
        a = EventPublisher(js, Subjects())
        b = EventPublisher(other.jetstream(), Subjects())

        async def write(publisher: EventPublisher, n: int) -> list[int]:
            return [
                (await publisher.emit("job2", NodeProgressData(node_id="1", value=i, max=n))).seq
                for i in range(n)
            ]

        got_a, got_b = await asyncio.gather(write(a, 40), write(b, 40))
    finally:
        await other.close()
    assert sorted(got_a + got_b) == list(range(1, 81))
    assert await _events_of(js, "job2") == list(range(1, 81))


async def test_a_publisher_that_forgot_a_job_continues_its_sequence(js: JetStreamContext) -> None:
    publisher = EventPublisher(js, Subjects(), remember=1)
    await publisher.emit("a", _STEP)
    await publisher.emit("b", _STEP)  # pushes "a" out of memory
    again = await publisher.emit("a", _STEP)
    assert again.seq == 2
    fresh = EventPublisher(js, Subjects())
    assert (await fresh.emit("a", _STEP)).seq == 3


async def test_many_jobs_at_once(js: JetStreamContext) -> None:
    publisher = EventPublisher(js, Subjects())

    async def job(i: int) -> None:
        for _ in range(3):
            await publisher.emit(f"j{i}", NodeCachedData(node_ids=[]))

    await asyncio.gather(*(job(i) for i in range(50)))
    assert (await js.stream_info("EVENTS")).state.messages == 150
    assert await _events_of(js, "j7") == [1, 2, 3]


async def test_a_job_wrongly_expected_new_continues_its_sequence(js: JetStreamContext) -> None:
    await EventPublisher(js, Subjects()).emit("old", _STEP)
    publisher = EventPublisher(js, Subjects())
    publisher.expect_new("old")
    again = await publisher.emit("old", _STEP)
    assert again.seq == 2
    assert await _events_of(js, "old") == [1, 2]


async def test_emits_started_together_are_stored_in_call_order(js: JetStreamContext) -> None:
    publisher = EventPublisher(js, Subjects())
    sends = [
        asyncio.create_task(publisher.emit("order", NodeProgressData(node_id="1", value=i, max=30)))
        for i in range(30)
    ]
    events = await asyncio.gather(*sends)
    # The i-th call carries value i; it must be the (i+1)-th event.
    assert [(e.seq, e.data.value) for e in events if isinstance(e, NodeProgress)] == [
        (i + 1, i) for i in range(30)
    ]


async def test_a_forgotten_job_continues_its_sequence(js: JetStreamContext) -> None:
    publisher = EventPublisher(js, Subjects())
    await publisher.emit("done", _STEP)
    publisher.forget("done")
    assert "done" not in publisher._jobs  # the memory is what forgetting is for
    assert (await publisher.emit("done", _STEP)).seq == 2


async def test_nothing_is_appended_after_a_job_ended_whoever_writes(
    nats_server: NatsServer, js: JetStreamContext
) -> None:
    other = await connect(nats_server.url, "other")
    try:
        gateway = EventPublisher(js, Subjects())
        adapter = EventPublisher(other.jetstream(), Subjects(), server_id="s1")
        await adapter.emit("ends", _STEP)  # the adapter knows where the subject ends
        end = await gateway.emit("ends", CancelledData(reason="by request"))
        # The adapter's next event races the end and loses, though it has not read it.
        with pytest.raises(JobEnded) as refused:
            await adapter.emit("ends", SucceededData(attempt=1))
        assert refused.value.end == end
        assert adapter.ended("ends") == end
        with pytest.raises(JobEnded):
            await gateway.emit("ends", CancelledData(reason="twice"))
        with pytest.raises(JobEnded):  # a publisher that never wrote to the job, too
            await EventPublisher(js, Subjects()).emit("ends", _STEP)
    finally:
        await other.close()
    assert await _events_of(js, "ends") == [1, 2]
