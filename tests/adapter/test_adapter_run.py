"""Jobs that run to an end on the fake ComfyUI: success, cache, validation and runtime errors,
inputs, overrides, timeouts, superseded jobs."""

from __future__ import annotations

import base64

import msgspec

from gateway.bus.contract import (
    Failed,
    FailedData,
    History,
    Job,
    JobInput,
    JobRecord,
    JobRequest,
    JobStatus,
    NodeCached,
    NodeProgress,
    NodeStarted,
    Retried,
    Running,
    Succeeded,
    SucceededData,
    encode,
    new_id,
    now,
)
from gateway.bus.events import EventPublisher
from gateway.storage import Storage
from plugins.simulator import Simulator, png
from tests.adapter.kit import FAST, SERVER, Bus, is_stored, tiny, two_outputs
from tests.helpers import poll_until

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


async def _read(storage: Storage, key: str) -> bytes:
    return b"".join([chunk async for chunk in storage.open(key)])


async def test_success_with_two_outputs(bus: Bus, make_sim, start_adapter, storage: Storage):
    async with make_sim() as sim:
        await start_adapter(sim.address)
        job = await bus.dispatch(two_outputs())
        end = await bus.wait_event(job.job_id)
        assert isinstance(end, Succeeded), end
        types = bus.types(job.job_id)
        assert types[0] == "running"
        assert types.index("history") == len(types) - 2, types  # history just before the end
        assert [e.seq for e in bus.events[job.job_id]] == list(range(1, len(types) + 1))  # gap-free
        running = bus.events[job.job_id][0]
        assert isinstance(running, Running)
        assert running.data.prompt_id == job.prompt_id and running.data.attempt == 1
        assert running.server_id == SERVER
        started = [e.data.node_id for e in bus.events[job.job_id] if isinstance(e, NodeStarted)]
        assert set(started) == {"1", "2", "3", "4"}
        assert end.data.attempt == 1
        outputs = sorted(end.data.outputs, key=lambda o: o.filename)
        assert [o.filename for o in outputs] == ["gw_two_a_00001_.png", "gw_two_b_00001_.png"]
        assert [o.node_id for o in outputs] == ["4", "3"]
        for output in outputs:
            assert output.key == f"{job.job_id}/{output.filename}"
            assert output.kind == "images"
            assert output.content_type == "image/png"
            assert output.url == storage.url(output.key)
            data = await _read(storage, output.key)
            assert data.startswith(PNG_SIGNATURE)
            assert output.size == len(data) == (await storage.stat(output.key)).size
            info = png.read_info(data)
            assert (info.width, info.height) == (64, 64)
        # Trap: the prompt carried our client id (else a cached run would lose its outputs).
        entry = sim.engine.history.get(job.prompt_id)[job.prompt_id]
        assert entry["prompt"][3].get("client_id")
        history = next(e for e in bus.events[job.job_id] if isinstance(e, History))
        assert history.data.prompt_id == job.prompt_id
        assert set(history.data.history["outputs"]) == {"3", "4"}


def _early_and_late() -> dict[str, object]:
    """An output node right after the first node, and a slower branch after it.

    ComfyUI runs a ready output node first, so node 4 is saved before node 2 starts.
    """
    workflow = tiny("gw_late")
    workflow["4"] = {
        "class_type": "SaveImage",
        "inputs": {"images": ["1", 0], "filename_prefix": "gw_early"},
    }
    return workflow


# Node 4's file is saved, then the slow branch fails three seconds later.
_FAILS_AFTER_EARLY_COPY = {"fail_nodes": ["ImageInvert"]}


async def _early_copy(bus: Bus, start_adapter, sim: Simulator, storage: Storage) -> tuple[Job, str]:
    """Run `_early_and_late` on `sim`, its ImageInvert held; return once node 4's file is
    stored, the prompt still running (ImageInvert goes on once released)."""
    sim.hold_nodes("ImageInvert")
    await start_adapter(sim.address)
    job = await bus.dispatch(_early_and_late())
    key = f"{job.job_id}/gw_early_00001_.png"
    await poll_until(lambda: is_stored(storage, key), f"{key} to be stored", within=10)
    return job, key


async def test_an_output_is_stored_while_later_nodes_run(
    bus: Bus, make_sim, start_adapter, storage: Storage
):
    async with make_sim() as sim:
        job, key = await _early_copy(bus, start_adapter, sim, storage)
        assert not set(bus.types(job.job_id)) & {"history", "succeeded"}, bus.types(job.job_id)
        sim.hold_nodes("ImageInvert", False)
        end = await bus.wait_event(job.job_id)
        assert isinstance(end, Succeeded), end
        assert sorted((o.node_id, o.key) for o in end.data.outputs) == [
            ("3", f"{job.job_id}/gw_late_00001_.png"),
            ("4", key),
        ]


async def test_an_output_stored_early_is_deleted_when_the_prompt_fails(
    bus: Bus, make_sim, start_adapter, storage: Storage
):
    async with make_sim(**_FAILS_AFTER_EARLY_COPY) as sim:
        job, key = await _early_copy(bus, start_adapter, sim, storage)
        sim.hold_nodes("ImageInvert", False)
        end = await bus.wait_event(job.job_id)
        assert isinstance(end, Failed) and end.data.code == "execution_error", end
        # A failed job has no outputs; the file saved on the way is not one.
        assert not await is_stored(storage, key)


async def test_an_attempt_taken_over_leaves_the_outputs_to_the_next_one(
    bus: Bus, make_sim, start_adapter, storage: Storage
):
    async with make_sim(**_FAILS_AFTER_EARLY_COPY) as sim:
        job, key = await _early_copy(bus, start_adapter, sim, storage)
        # Meanwhile the balancer handed the job to another server (attempt 2), which may
        # store its own outputs under the same keys.
        record = await bus.record(job.job_id)
        moved = msgspec.structs.replace(record, attempt=2, server_id="elsewhere")
        await bus.kv.put(job.job_id, encode(moved))
        sim.hold_nodes("ImageInvert", False)
        end = await bus.wait_event(job.job_id)
        assert isinstance(end, Failed) and end.data.attempt == 1, end
        assert await is_stored(storage, key)


async def test_cached_run_still_reports_outputs(bus: Bus, make_sim, start_adapter):
    async with make_sim() as sim:
        await start_adapter(sim.address)
        first = await bus.dispatch(tiny())
        assert isinstance(await bus.wait_event(first.job_id), Succeeded)
        again = await bus.dispatch(tiny())
        end = await bus.wait_event(again.job_id)
        assert isinstance(end, Succeeded), end
        cached = [e for e in bus.events[again.job_id] if isinstance(e, NodeCached)]
        assert cached and set(cached[0].data.node_ids) == {"1", "2", "3"}
        assert not any(isinstance(e, NodeStarted) for e in bus.events[again.job_id])
        assert [o.filename for o in end.data.outputs] == ["gw_tiny_00001_.png"]
        assert end.data.outputs[0].key == f"{again.job_id}/gw_tiny_00001_.png"


async def test_validation_error_names_nodes_and_inputs(bus: Bus, make_sim, start_adapter):
    workflow = tiny(width=0)
    del workflow["1"]["inputs"]["height"]
    async with make_sim() as sim:
        await start_adapter(sim.address)
        job = await bus.dispatch(workflow)
        end = await bus.wait_event(job.job_id)
        assert isinstance(end, Failed), end
        data: FailedData = end.data
        assert data.code == "validation_error"
        assert not data.retryable
        assert "node 1 (EmptyImage)" in data.message
        assert "height" in data.message and "width" in data.message, data.message
        assert data.node_id == "1" and data.node_type == "EmptyImage"
        assert "1" in data.node_errors
        assert bus.types(job.job_id) == ["failed"]  # never ran, never retried
        unknown = tiny()
        unknown["2"]["class_type"] = "NoSuchNode"
        job = await bus.dispatch(unknown)
        end = await bus.wait_event(job.job_id)
        assert isinstance(end, Failed) and end.data.code == "validation_error"
        assert "NoSuchNode" in end.data.message and end.data.node_id == "2"


async def test_runtime_error_reports_exception(bus: Bus, make_sim, start_adapter):
    config = {
        "fail_nodes": ["ImageInvert"],
        "fail_exception_type": "ValueError",
        "fail_exception_message": "the pixels are upside down",
    }
    async with make_sim(**config) as sim:
        await start_adapter(sim.address)
        job = await bus.dispatch(tiny())
        end = await bus.wait_event(job.job_id)
        assert isinstance(end, Failed), end
        data = end.data
        assert data.code == "execution_error" and not data.retryable
        assert data.exception_type == "ValueError"
        assert "the pixels are upside down" in data.message
        assert "node 2 (ImageInvert)" in data.message
        assert data.node_id == "2" and data.node_type == "ImageInvert"
        assert data.traceback
        assert bus.types(job.job_id)[-2] == "history"


async def test_out_of_memory_frees_and_hands_back(bus: Bus, make_sim, start_adapter):
    config = {
        "fail_nodes": ["ImageInvert"],
        "fail_exception_type": "torch.OutOfMemoryError",
        "fail_exception_message": "Allocation on device 0 would exceed allowed memory.",
    }
    async with make_sim(**config) as sim:
        freed = []
        routes = sim.app._routes
        original = routes[("POST", "/free")]

        async def free(request, param):
            freed.append(request.json())
            return await original(request, param)

        routes[("POST", "/free")] = free
        await start_adapter(sim.address)
        job = await bus.dispatch(tiny())
        end = await bus.wait_event(job.job_id)
        assert isinstance(end, Retried), end
        assert end.data.started and end.data.previous_server_id == SERVER
        assert "memory" in end.data.reason
        assert freed == [{"unload_models": True, "free_memory": True}]


async def test_input_image_uploaded_from_base64(
    bus: Bus, make_sim, start_adapter, storage: Storage
):
    image = png.encode_solid(16, 8, (10, 20, 30))
    workflow = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "gw_upload.png"}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "l"}},
    }
    item = JobInput(name="gw_upload.png", source="base64", value=base64.b64encode(image).decode())
    async with make_sim() as sim:
        await start_adapter(sim.address)
        job = await bus.dispatch(workflow, inputs=[item])
        end = await bus.wait_event(job.job_id)
        assert isinstance(end, Succeeded), end
        output = await _read(storage, end.data.outputs[0].key)
        assert png.read_info(output).first_pixel[:3] == (245, 235, 225)  # inverted
        bad = JobInput(name="x.png", source="base64", value="not base64!")
        job = await bus.dispatch(workflow, inputs=[bad])
        end = await bus.wait_event(job.job_id)
        assert isinstance(end, Failed) and end.data.code == "input_error", end


async def test_overrides_by_id_and_by_title(bus: Bus, make_sim, start_adapter):
    async with make_sim() as sim:
        await start_adapter(sim.address)
        overrides = {"1.width": 32, "Save.filename_prefix": "overridden"}
        job = await bus.dispatch(tiny(), overrides=overrides)
        end = await bus.wait_event(job.job_id)
        assert isinstance(end, Succeeded), end
        assert end.data.outputs[0].filename == "overridden_00001_.png"
        prompt = sim.engine.history.get(job.prompt_id)[job.prompt_id]["prompt"][2]
        assert prompt["1"]["inputs"]["width"] == 32
        bad = await bus.dispatch(tiny(), overrides={"Nope.width": 1})
        end = await bus.wait_event(bad.job_id)
        assert isinstance(end, Failed) and end.data.code == "validation_error"
        assert "Nope" in end.data.message


async def test_timeout_interrupts_and_fails(bus: Bus, make_sim, start_adapter):
    async with make_sim(class_seconds={"ImageInvert": 1.5}) as sim:
        await start_adapter(sim.address)
        job = await bus.dispatch(tiny(), timeout_s=0.5)
        end = await bus.wait_event(job.job_id)
        assert isinstance(end, Failed), end
        assert end.data.code == "timeout"
        entry = sim.engine.history.get(job.prompt_id)[job.prompt_id]
        assert entry["status"]["status_str"] == "error"  # interrupted on ComfyUI
        assert "history" in bus.types(job.job_id)


async def test_superseded_job_is_dropped(bus: Bus, make_sim, start_adapter, js, subjects):
    async with make_sim() as sim:
        await start_adapter(sim.address, capacity=1)
        elsewhere = await bus.dispatch(tiny("elsewhere"), bound_to="sim-other")
        # The balancer moved on to attempt 2 (the job came back to it) after publishing this.
        # The record says so before the Job is sent: written after, an adapter that is quick
        # (or a test that is slow, on a loaded machine) would read it first and run the job.
        stale = await bus.dispatch(tiny("stale"), attempt=1, record_attempt=2)
        ours = await bus.dispatch(tiny("ours"))
        assert isinstance(await bus.wait_event(ours.job_id), Succeeded)
        # Consumed in order, one at a time: both earlier jobs were looked at and dropped.
        assert bus.events[elsewhere.job_id] == [] and bus.events[stale.job_id] == []
        info = await js.stream_info(subjects.jobs_stream)
        assert info.state.messages == 0  # acked, so gone from the work queue
        assert sim.engine.history.get(elsewhere.prompt_id) == {}
        assert sim.engine.history.get(stale.prompt_id) == {}


async def test_a_job_delivered_again_after_it_ended_here_is_not_run_again(
    bus: Bus, make_sim, start_adapter, js, subjects
):
    # A broker killed and restarted can forget both the ack and that it delivered the job: the
    # same attempt comes back as a first delivery while the record still says dispatched.
    async with make_sim() as sim:
        await start_adapter(sim.address, capacity=1)
        job = await bus.dispatch(tiny("once"))
        assert isinstance(await bus.wait_event(job.job_id), Succeeded)
        # ... and the record, which trails the events, has not caught up yet.
        record = await bus.record(job.job_id)
        lagging = msgspec.structs.replace(record, status=JobStatus.DISPATCHED, outputs=[])
        await bus.kv.put(job.job_id, encode(lagging))
        await js.publish(
            subjects.jobs(SERVER),
            encode(job),
            headers={"Nats-Msg-Id": f"{job.job_id}.{job.attempt}.again"},
        )
        after = await bus.dispatch(tiny("after"))
        # One at a time, in order: by the time `after` ends, the copy was handled.
        assert isinstance(await bus.wait_event(after.job_id), Succeeded)
        ends = [e for e in bus.events[job.job_id] if isinstance(e, Succeeded)]
        assert len(ends) == 1, ends
        info = await js.stream_info(subjects.jobs_stream)
        assert info.state.messages == 0  # the copy was acked, not left to come back


async def test_inputs_from_a_storage_key_and_a_url(
    bus: Bus, make_sim, start_adapter, storage: Storage
):
    image = png.encode_solid(4, 4, (200, 100, 50))

    async def chunks():
        yield image

    await storage.put("uploads/source.png", chunks())
    workflow = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "a.png"}},
        "2": {"class_type": "LoadImage", "inputs": {"image": "b.png"}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "a"}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "b"}},
    }
    async with make_sim() as sim:
        # The fake ComfyUI serves the URL input from loopback: allowed here explicitly.
        allow = msgspec.structs.replace(FAST, url_allowlist=("127.0.0.1",))
        await start_adapter(sim.address, options=allow)
        first = await bus.dispatch(tiny())
        assert isinstance(await bus.wait_event(first.job_id), Succeeded)
        url = f"{sim.url}/view?filename=gw_tiny_00001_.png&type=output"
        inputs = [
            JobInput(name="a.png", source="key", value="uploads/source.png"),
            JobInput(name="b.png", source="url", value=url),
        ]
        job = await bus.dispatch(workflow, inputs=inputs)
        end = await bus.wait_event(job.job_id)
        assert isinstance(end, Succeeded), end
        by_node = {o.node_id: await _read(storage, o.key) for o in end.data.outputs}
        assert png.read_info(by_node["3"]).first_pixel[:3] == (200, 100, 50)
        assert png.read_info(by_node["4"]).first_pixel[:3] == (255, 255, 255)  # gw_tiny's
        missing = JobInput(name="a.png", source="key", value="uploads/nothing.png")
        job = await bus.dispatch(workflow, inputs=[missing])
        end = await bus.wait_event(job.job_id)
        assert isinstance(end, Failed) and end.data.code == "input_error", end
        assert "uploads/nothing.png" in end.data.message


async def test_progress_of_a_node_is_published(bus: Bus, make_sim, start_adapter):
    workflow = tiny()
    workflow["1"]["inputs"]["batch_size"] = 3
    workflow["4"] = {"class_type": "SaveImageWebsocket", "inputs": {"images": ["1", 0]}}
    async with make_sim() as sim:
        await start_adapter(sim.address)
        job = await bus.dispatch(workflow)
        end = await bus.wait_event(job.job_id)
        assert isinstance(end, Succeeded), end
        progress = [
            (e.data.node_id, e.data.value, e.data.max)
            for e in bus.events[job.job_id]
            if isinstance(e, NodeProgress)
        ]
        assert progress == [("4", 0, 3), ("4", 1, 3), ("4", 2, 3)]
        files = [o for o in end.data.outputs if o.source == "file"]
        assert len(files) == 3  # SaveImage of a batch of 3


async def test_a_job_whose_end_is_logged_already_is_not_run_again(
    bus: Bus, make_sim, start_adapter, js, subjects
):
    """Its ack was lost with a broker restart: the job comes back while the record, which
    follows the events, still says running. The end in the log decides."""
    async with make_sim() as sim:
        await start_adapter(sim.address, capacity=1)
        job_id = new_id()
        publisher = EventPublisher(js, subjects)
        await publisher.emit(job_id, SucceededData(attempt=1), server_id=SERVER)
        at = now()
        record = JobRecord(
            job_id=job_id,
            status=JobStatus.RUNNING,
            submitted_at=at,
            updated_at=at,
            log_file_path="",
            server_id=SERVER,
            attempt=1,
        )
        await bus.kv.put(job_id, encode(record))
        job = Job(
            job_id=job_id,
            attempt=1,
            server_id=SERVER,
            request=JobRequest(workflow=tiny("again"), job_id=job_id),
            submitted_at=at,
            dispatched_at=at,
        )
        await js.publish(subjects.jobs(SERVER), encode(job))
        ours = await bus.dispatch(tiny("ours"))
        assert isinstance(await bus.wait_event(ours.job_id), Succeeded)
        # Taken in order, one at a time: the first was looked at and dropped.
        assert bus.types(job_id) == ["succeeded"]  # only the one written above
        assert sim.engine.history.get(job.prompt_id) == {}
        info = await js.stream_info(subjects.jobs_stream)
        assert info.state.messages == 0
