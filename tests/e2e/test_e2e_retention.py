"""Bounded growth: an ended job's record leaves KV after its retention, and the job is still
answered for, from its log, as before; an open job's record never leaves."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import httpx
import msgspec
from nats.js.errors import KeyNotFoundError
from websockets.asyncio.client import connect as ws_connect

from gateway.bus.contract import JobRecord, Subjects, decode
from gateway.settings import Settings
from plugins.simulator import SimulatorConfig
from tests.e2e.conftest import running_system, sse_events, tiny
from tests.helpers import poll_until

KEYS = {"admin": "ops-7c1", "alice": "alice-3f9", "bob": "bob-88e"}


def _as(who: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[who]}"}


async def test_an_ended_jobs_record_expires_and_its_log_answers_for_it(settings: Settings) -> None:
    keyed = msgspec.structs.replace(
        settings,
        job_records_retention_s=1.0,
        api_keys=[
            f"admin@plain:{KEYS['admin']}",
            f"user/alice@plain:{KEYS['alice']}",
            f"user/bob@plain:{KEYS['bob']}",
        ],
    )
    async with running_system(keyed, headers=_as("admin")) as system:
        assert system.nc is not None
        kv = await system.nc.jetstream().key_value(Subjects().jobs_bucket)
        await system.add_server("gpu1")
        await system.add_server("stuck", SimulatorConfig(hang_queue=True))
        async with httpx.AsyncClient(base_url=system.url, timeout=60) as client:
            # An open job, its record written before the other's end: it must outlive it.
            open_reply = await client.post(
                "/workflow/submit",
                json={"workflow": tiny(1), "server": "stuck"},
                headers=_as("alice"),
            )
            assert open_reply.status_code == 202, open_reply.text
            open_id = open_reply.json()["job_id"]

            async def bound() -> bool:
                entry = await kv.get(open_id)
                assert entry.value is not None
                return decode(entry.value, JobRecord).status.value in ("dispatched", "running")

            await poll_until(bound, "the open job is bound")

            native = await client.post(
                "/prompt", json={"prompt": tiny(4), "client_id": "c1"}, headers=_as("alice")
            )
            assert native.status_code == 200, native.text
            prompt_id = native.json()["prompt_id"]
            done = await client.post(
                "/workflow/execute",
                json={"workflow": tiny(2), "job_id": "kept-for-a-second"},
                headers=_as("alice"),
            )
            assert done.status_code == 200, done.text
            job_id = done.json()["job_id"]
            before = await _answers(client, job_id)

            async def expired() -> bool:
                for gone in (job_id, prompt_id):
                    try:
                        await kv.get(gone)
                    except KeyNotFoundError:
                        continue
                    return False
                return True

            await poll_until(expired, "the ended jobs' records expire", within=15)
            # The prompt's entry leaves KV with its job's record: nothing grows per job.
            prompts = await system.nc.jetstream().key_value(Subjects().prompts_bucket)

            async def prompt_gone() -> bool:
                try:
                    await prompts.get(prompt_id)
                except KeyNotFoundError:
                    return True
                return False

            await poll_until(prompt_gone, "the ended prompt's entry expires", within=15)

            # Told from the log: the same answers, to its caller (and an admin) only.
            assert await _answers(client, job_id) == before
            # Its events gone from the EVENTS stream too (its retention, here at once): its
            # streams tell them from its log, and end.
            events = Subjects().events_stream
            await system.nc.jetstream().purge_stream(events, subject=Subjects().events(job_id))
            async with httpx.AsyncClient(base_url=system.url, headers=_as("alice")) as alice:
                async with asyncio.timeout(30):
                    told = await sse_events(alice, job_id)
            assert [e["seq"] for e in told] == list(range(1, before["logs"] + 1))
            assert told[-1]["type"] == "succeeded"
            url = system.url.replace("http", "ws", 1) + f"/workflow/events/{job_id}/ws?from_seq=2"
            async with ws_connect(url, additional_headers=_as("alice")) as socket:
                framed = [json.loads(frame) async for frame in socket]
            assert framed == told[1:]
            admin = await client.get(f"/workflow/status/{job_id}", headers=_as("admin"))
            assert _unsigned(admin) == before["status"]
            for path in ("status", "result", "logs"):
                other = await client.get(f"/workflow/{path}/{job_id}", headers=_as("bob"))
                assert other.status_code == 404, (path, other.text)
                assert other.json()["code"] == "unknown_job"
            never = await client.get("/workflow/status/never-was", headers=_as("alice"))
            assert never.status_code == 404
            # Its id stays taken.
            again = await client.post(
                "/workflow/submit",
                json={"workflow": tiny(3), "job_id": job_id},
                headers=_as("alice"),
            )
            assert again.status_code == 409, again.text
            assert again.json()["code"] == "duplicate_job"

            # A gateway started now neither queues the prompt nor keeps it in history (as a
            # ComfyUI keeps history only so long), and the job is still told from its log.
            async with httpx.AsyncClient(
                base_url=await system.start_gateway(), timeout=60, headers=_as("alice")
            ) as fresh:
                assert (await fresh.get("/queue")).json() == {
                    "queue_running": [],
                    "queue_pending": [],
                }
                assert (await fresh.get(f"/history/{prompt_id}")).json() == {}
                told = await fresh.get(f"/workflow/status/{prompt_id}")
                assert told.json()["status"] == "succeeded"

            # The open job's record is still there, and the job can still be cancelled.
            assert await bound()
            cancelled = await client.post(f"/workflow/cancel/{open_id}", headers=_as("alice"))
            assert cancelled.status_code == 200, cancelled.text


def _unsigned(reply: httpx.Response) -> Any:
    """The answer without its output URLs' signatures, whose expiry counts from each answer."""
    return json.loads(re.sub(r"\?expires=[^\"]*", "", reply.text))


async def _answers(client: httpx.AsyncClient, job_id: str) -> dict[str, Any]:
    answers: dict[str, Any] = {}
    for path in ("status", "result"):
        reply = await client.get(f"/workflow/{path}/{job_id}", headers=_as("alice"))
        assert reply.status_code == 200, (path, reply.text)
        answers[path] = _unsigned(reply)
    logs = await client.get(f"/workflow/logs/{job_id}", headers=_as("alice"))
    assert logs.status_code == 200, logs.text
    answers["logs"] = logs.json()["entry_count"]
    assert answers["status"]["status"] == "succeeded"
    return answers
