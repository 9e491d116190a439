"""Cancels, dropped websockets, a dying ComfyUI, heartbeats, graceful shutdown."""

from __future__ import annotations

import asyncio

import msgspec

from gateway.bus.contract import (
    Cancelled,
    ControlReply,
    Describe,
    NodeStarted,
    Retried,
    Running,
    Succeeded,
    decode,
    encode,
)
from gateway.settings import Settings
from tests.adapter.kit import SERVER, Bus, tiny

SLOW = {"class_seconds": {"ImageInvert": 1.5}}


def _ran(bus: Bus, job_id: str) -> bool:
    return any(isinstance(e, Running) for e in bus.events[job_id])


def _started(bus: Bus, job_id: str, node: str) -> bool:
    return any(isinstance(e, NodeStarted) and e.data.node_id == node for e in bus.events[job_id])


async def test_cancel_running_job_interrupts_it(bus: Bus, make_sim, start_adapter):
    async with make_sim(**SLOW) as sim:
        await start_adapter(sim.address)
        job = await bus.dispatch(tiny())
        await bus.wait(lambda: _started(bus, job.job_id, "2"), what="ImageInvert to start")
        reply = await bus.cancel(job.job_id)
        assert reply.ok, reply
        end = await bus.wait_event(job.job_id)
        assert isinstance(end, Cancelled), end
        assert end.data.attempt == 1
        entry = sim.engine.history.get(job.prompt_id)[job.prompt_id]
        messages = [m[0] for m in entry["status"]["messages"]]
        assert "execution_interrupted" in messages
        unknown = await bus.cancel("no-such-job")
        assert not unknown.ok and "not on this server" in unknown.message


async def test_cancel_pending_job_dequeues_it_only(bus: Bus, make_sim, start_adapter):
    async with make_sim(**SLOW) as sim:
        await start_adapter(sim.address)
        first = await bus.dispatch(tiny("first"))
        await bus.wait(lambda: _started(bus, first.job_id, "2"), what="the first job to run")
        second = await bus.dispatch(tiny("second"))
        await bus.wait_pending(sim, second)
        assert bus.types(second.job_id) == []  # waiting on ComfyUI is not running
        assert (await bus.cancel(second.job_id)).ok
        end = await bus.wait_event(second.job_id)
        assert isinstance(end, Cancelled), end
        # The running job was not interrupted: it finishes normally.
        assert isinstance(await bus.wait_event(first.job_id), Succeeded)
        assert sim.engine.history.get(second.prompt_id) == {}  # never ran


async def test_websocket_dropped_mid_job_is_recovered(bus: Bus, make_sim, start_adapter):
    async with make_sim(**SLOW) as sim:
        await start_adapter(sim.address)
        job = await bus.dispatch(tiny())
        await bus.wait(lambda: _started(bus, job.job_id, "2"), what="ImageInvert to start")
        before = set(sim.hub.sockets)
        assert sim.drop_websockets() == 1
        end = await bus.wait_event(job.job_id)
        assert isinstance(end, Succeeded), end
        assert len(end.data.outputs) == 1
        # Trap: the adapter reconnects under a fresh client id, never the old one.
        await bus.wait(lambda: set(sim.hub.sockets) - before, what="a new websocket")
        assert not set(sim.hub.sockets) & before
        # ... and the new socket hears the next job's messages.
        after = await bus.dispatch(tiny("after", width=32))
        assert isinstance(await bus.wait_event(after.job_id), Succeeded)
        assert _started(bus, after.job_id, "2")


async def test_socket_cut_instead_of_the_end_message(bus: Bus, make_sim, start_adapter):
    # The socket dies exactly when execution_success would arrive: the end comes from /history.
    async with make_sim(drop_ws_on_message="execution_success") as sim:
        await start_adapter(sim.address)
        job = await bus.dispatch(tiny())
        end = await bus.wait_event(job.job_id)
        assert isinstance(end, Succeeded), end
        assert end.data.outputs


async def test_silent_socket_is_cross_checked(bus: Bus, make_sim, start_adapter):
    # Open but deaf: the hub forgets our socket (the reconnect trap's effect); the watchdog
    # finds the end in /history and the adapter reconnects.
    async with make_sim(**SLOW) as sim:
        await start_adapter(sim.address)
        job = await bus.dispatch(tiny())
        await bus.wait(lambda: _started(bus, job.job_id, "2"), what="ImageInvert to start")
        deaf = set(sim.hub.sockets)
        for sid in deaf:
            sim.hub.unregister(sid)
        end = await bus.wait_event(job.job_id)
        assert isinstance(end, Succeeded), end
        await bus.wait(lambda: set(sim.hub.sockets) - deaf, what="a reconnection")


async def test_comfyui_killed_mid_job_hands_it_back(
    bus: Bus, make_sim, start_adapter, adapter_settings: Settings
):
    settings = _with(adapter_settings, heartbeat_interval_s=1.0)
    async with make_sim(class_seconds={"ImageInvert": 30}) as sim:
        await start_adapter(sim.address, settings=settings)
        await bus.wait(lambda: _last_beat(bus, healthy=True), what="a healthy heartbeat")
        job = await bus.dispatch(tiny())
        await bus.wait(lambda: _started(bus, job.job_id, "2"), what="ImageInvert to start")
        loop = asyncio.get_running_loop()
        sim.crash()
        crashed_at = loop.time()
        unhealthy = await bus.wait(
            lambda: _first_beat_after(bus, crashed_at, healthy=False), what="unhealthy beat"
        )
        assert unhealthy[0] - crashed_at < 3.0
        assert unhealthy[1].reason
        end = await bus.wait_event(job.job_id)
        assert isinstance(end, Retried), end
        assert end.data.started and end.data.previous_server_id == SERVER
        assert end.data.attempt == 1
        # A job bound while ComfyUI is down goes back at once, not started.
        later = await bus.dispatch(tiny("later"))
        end = await bus.wait_event(later.job_id)
        assert isinstance(end, Retried) and not end.data.started, end


async def test_heartbeat_carries_health_load_and_capabilities(bus: Bus, make_sim, start_adapter):
    async with make_sim(**SLOW) as sim:
        await start_adapter(sim.address)
        first = await bus.wait(lambda: _last_beat(bus, healthy=True), what="a healthy beat")
        assert first.server_id == SERVER and first.address == sim.address
        assert first.capacity == 2 and first.labels == {"zone": "test"}
        assert first.capabilities is not None and first.capabilities_hash
        assert "SaveImage" in first.capabilities.node_types
        assert "sd15.safetensors" in first.capabilities.models["checkpoints"]
        assert first.capabilities.device == "cpu"
        job = await bus.dispatch(tiny())
        busy = await bus.wait(
            lambda: _beat_where(bus, lambda b: job.job_id in b.in_flight and b.queue_running),
            what="a beat showing the job",
        )
        assert busy.queue_running == 1
        # Capabilities are not repeated in every beat, but the hash is.
        assert busy.capabilities is None and busy.capabilities_hash == first.capabilities_hash
        assert isinstance(await bus.wait_event(job.job_id), Succeeded)
        # A balancer that missed them asks: Describe on the control subject.
        reply = await bus.nc.request(bus.subjects.control(SERVER), encode(Describe()), timeout=2.0)
        described = decode(reply.data, ControlReply)
        assert described.ok and described.capabilities == first.capabilities


async def test_graceful_shutdown_hands_back_what_it_holds(bus: Bus, make_sim, start_adapter):
    async with make_sim(**SLOW) as sim:
        stop = await start_adapter(sim.address)
        # The running prompt is held after its start until the adapter has told it to stop:
        # left to run, it could end before a slow machine got that far.
        sim.hold_setup()
        running = await bus.dispatch(tiny("running"))
        await bus.wait(lambda: _ran(bus, running.job_id), what="the job to run")
        pending = await bus.dispatch(tiny("pending"))
        await bus.wait_pending(sim, pending)
        stop.set()
        end = await bus.wait_event(pending.job_id)
        assert isinstance(end, Retried) and not end.data.started, end
        assert "shutting down" in end.data.reason
        await bus.wait(lambda: sim.engine.interrupt_requested, what="the running prompt stopped")
        sim.hold_setup(False)
        end = await bus.wait_event(running.job_id)
        assert isinstance(end, Retried) and end.data.started, end
        await bus.wait(lambda: _last_beat(bus, healthy=False), what="a last unhealthy beat")
        assert sim.engine.queue_remaining() == 0


def _with(settings: Settings, **changes: object) -> Settings:
    return msgspec.structs.replace(settings, **changes)


def _beat_where(bus: Bus, predicate):
    return next((b for _, b in reversed(bus.heartbeats) if predicate(b)), None)


def _last_beat(bus: Bus, *, healthy: bool):
    if not bus.heartbeats:
        return None
    beat = bus.heartbeats[-1][1]
    return beat if beat.healthy == healthy else None


def _first_beat_after(bus: Bus, at: float, *, healthy: bool):
    return next(((t, b) for t, b in bus.heartbeats if t >= at and b.healthy == healthy), None)
