from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from pathlib import Path

from nats.aio.client import Client
from nats.js import JetStreamContext, api

from gateway.bus.connection import BusResources, connect, ensure_resources, shown_url
from gateway.bus.contract import Subjects
from gateway.bus.natsserver import NatsServer

_CREATE = textwrap.dedent(
    """
    import asyncio, sys
    from gateway.bus.connection import connect, ensure_resources
    from gateway.bus.contract import Subjects

    async def main():
        nc = await connect(sys.argv[1], "creator")
        # Both creators wait for the word "go" so their requests really overlap.
        sys.stdin.readline()
        await ensure_resources(nc.jetstream(), Subjects())
        await nc.close()
        print("created", flush=True)

    asyncio.run(main())
    """
)


def test_two_processes_create_the_resources_at_the_same_time(nats_server: NatsServer) -> None:
    root = Path(__file__).resolve().parent.parent
    creators = [
        subprocess.Popen(
            [sys.executable, "-c", _CREATE, nats_server.url],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=root,
        )
        for _ in range(2)
    ]
    try:
        for proc in creators:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        results = [proc.communicate(timeout=60) for proc in creators]
    finally:
        for proc in creators:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    for proc, (out, err) in zip(creators, results, strict=True):
        assert proc.returncode == 0, err
        assert out.strip() == "created"


async def test_resources_exist_with_the_contract_settings(js: JetStreamContext) -> None:
    jobs = await js.stream_info("JOBS")
    assert jobs.config.subjects == ["comfy.jobs.>"]
    assert jobs.config.retention == api.RetentionPolicy.WORK_QUEUE
    assert jobs.config.storage == api.StorageType.FILE
    events = await js.stream_info("EVENTS")
    assert events.config.subjects == ["comfy.events.>"]
    assert events.config.duplicate_window == 120
    await js.key_value("comfy_servers")
    await js.key_value("comfy_jobs")
    await js.object_store("comfy_outputs")


async def test_creating_again_is_harmless_and_applies_new_limits(js: JetStreamContext) -> None:
    subjects = Subjects()
    await ensure_resources(js, subjects)
    await ensure_resources(js, subjects, BusResources(events_max_age_s=3600))
    events = await js.stream_info("EVENTS")
    assert events.config.max_age == 3600


async def test_same_process_concurrent_creation(nats_server: NatsServer) -> None:
    clients = [await connect(nats_server.url, f"c{i}") for i in range(3)]
    try:
        await asyncio.gather(*(ensure_resources(c.jetstream(), Subjects()) for c in clients))
    finally:
        for client in clients:
            await client.close()


async def test_another_prefix_gets_its_own_resources(nc: Client) -> None:
    js = nc.jetstream()
    await ensure_resources(js, Subjects())
    await ensure_resources(js, Subjects(prefix="staging"))
    staging = await js.stream_info("STAGING_JOBS")
    assert staging.config.subjects == ["staging.jobs.>"]
    await js.key_value("staging_jobs")
    # A job published under one prefix is invisible to the other.
    await js.publish("staging.jobs.s1", b"{}")
    assert (await js.stream_info("JOBS")).state.messages == 0
    assert (await js.stream_info("STAGING_JOBS")).state.messages == 1


async def test_publish_with_msg_id_is_stored_once(js: JetStreamContext) -> None:
    first = await js.publish("comfy.jobs.s1", b"a", headers={"Nats-Msg-Id": "job-1"})
    again = await js.publish("comfy.jobs.s1", b"a", headers={"Nats-Msg-Id": "job-1"})
    assert again.duplicate and not first.duplicate
    assert (await js.stream_info("JOBS")).state.messages == 1


def test_urls_are_shown_without_their_password() -> None:
    shown = shown_url("nats://gateway:s3cret@10.0.0.1:4222,nats://gateway:s3cret@10.0.0.2:4222")
    assert "s3cret" not in shown and "gateway" not in shown
    assert shown == "nats://10.0.0.1:4222,nats://10.0.0.2:4222"
