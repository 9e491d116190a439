"""Webhooks end to end: signed, retried through a gateway restart, once per event, logged."""

from __future__ import annotations

import base64
from typing import Any

import httpx
import msgspec
from nats.aio.client import Client
from prometheus_client.parser import text_string_to_metric_families

from gateway.bus.connection import connect
from gateway.bus.contract import (
    Subjects,
    WebhookAttempt,
    WebhookSend,
    decode,
    encode,
    now,
)
from gateway.settings import ApiKey, Settings
from gateway.webhooks.worker import CONSUMER
from tests.conftest import running_gateway
from tests.e2e.conftest import running_system, tiny
from tests.e2e.receiver import Received, receiving
from tests.helpers import poll_until

GLOBAL_SECRET = "whsec_" + base64.b64encode(b"g" * 32).decode()
ALICE_SECRET = "whsec_" + base64.b64encode(b"a" * 32).decode()
ADMIN = {"X-API-Key": "admin-key"}
ALICE = {"X-API-Key": "alice-key"}
BOB = {"X-API-Key": "bob-key"}


def webhook_settings(settings: Settings) -> Settings:
    return msgspec.structs.replace(
        settings,
        api_keys=[
            "admin@plain:admin-key",
            ApiKey(key="plain:alice-key", role="user", name="alice", webhook_secret=ALICE_SECRET),
            "user/bob@plain:bob-key",
        ],
        webhook_secret=GLOBAL_SECRET,
        webhook_allowlist=["127.0.0.1"],
        webhook_retry_base_s=0.05,
        webhook_retry_max_s=0.2,
        webhook_timeout_s=2.0,
    )


async def _all_settled(nc: Client) -> bool:
    info = await nc.jetstream().consumer_info(Subjects().webhooks_stream, CONSUMER)
    return info.num_pending == 0 and info.num_ack_pending == 0


async def _sql(client: httpx.AsyncClient, sql: str) -> list[list[Any]]:
    reply = await client.post("/logs/query", json={"sql": sql})
    assert reply.status_code == 200, reply.text
    rows: list[list[Any]] = reply.json()["rows"]
    return rows


def _delivered(requests: list[Received]) -> list[str]:
    return [r.delivery_id for r in requests if r.status == 200]


async def test_webhooks_are_signed_retried_through_a_restart_sent_once_and_logged(
    settings: Settings,
) -> None:
    settings = webhook_settings(settings)
    async with receiving() as receiver, running_system(settings, headers=ADMIN) as system:
        await system.add_server("gpu1")
        receiver.failing = True
        async with httpx.AsyncClient(base_url=system.url, headers=ALICE, timeout=30) as alice:
            reply = await alice.post(
                "/workflow/submit",
                json={
                    "workflow": tiny(1),
                    "webhook_url": receiver.url,
                    "webhook_events": ["running", "succeeded"],
                },
            )
            assert reply.status_code == 202, reply.text
            job_id = reply.json()["job_id"]
            await receiver.wait_for(lambda got: len(got) >= 1)

        # The gateway (its sender and its balancer) goes away while the receiver fails; the one
        # that replaces it takes the deliveries over from the broker.
        await system.stop_gateway(0)
        before = len(receiver.requests)
        system.url = await system.start_gateway()
        await receiver.wait_for(lambda got: len(got) > before)
        receiver.failing = False
        await receiver.wait_for(lambda got: len(_delivered(got)) >= 2)
        nc = system.nc
        assert nc is not None
        await poll_until(lambda: _all_settled(nc), "every delivery settled")

        requests = list(receiver.requests)
        assert all(r.signed_by(ALICE_SECRET) for r in requests), "a signature did not verify"
        assert not any(r.signed_by(GLOBAL_SECRET) for r in requests), "the key's secret signs"
        delivered = _delivered(requests)
        assert len(delivered) == len(set(delivered)) == 2, delivered
        for r in requests:
            body = r.json
            assert body["data"]["job_id"] == job_id
            assert body["type"] == "job." + body["data"]["type"]
            assert r.delivery_id == "msg_" + body["data"]["event_id"]
        assert {r.json["type"] for r in requests if r.status == 200} == {
            "job.running",
            "job.succeeded",
        }
        ended = next(r for r in requests if r.json["type"] == "job.succeeded").delivery_id

        async with (
            httpx.AsyncClient(base_url=system.url, headers=ALICE, timeout=30) as alice,
            httpx.AsyncClient(base_url=system.url, headers=BOB, timeout=30) as bob,
        ):
            # Every attempt is in the index, and in the job's log, for its owner alone.
            query = (
                "SELECT delivery_id, attempt, outcome, status_code, job_id, redelivery "
                "FROM webhook_deliveries ORDER BY delivery_id, attempt"
            )

            async def all_logged() -> bool:
                return len(await _sql(alice, query)) == len(requests)

            await poll_until(all_logged, "every attempt in webhook_deliveries")
            rows = await _sql(alice, query)
            for delivery in set(delivered):
                mine = [row for row in rows if row[0] == delivery]
                sent = [r for r in requests if r.delivery_id == delivery]
                assert [row[1] for row in mine] == list(range(1, len(sent) + 1))
                assert [row[2] for row in mine] == ["retrying"] * (len(sent) - 1) + ["delivered"]
                assert [row[3] for row in mine] == [r.status for r in sent]
            assert {row[4] for row in rows} == {job_id}
            assert await _sql(bob, query) == []
            log = (await alice.get(f"/workflow/logs/{job_id}")).json()
            lines = [e for e in log["entries"] if e["type"] == "webhook_attempt"]
            assert len(lines) == len(requests)

            # Sent again on request: its owner may, another caller finds no such delivery.
            refused = await bob.post(f"/webhooks/{ended}/redeliver")
            assert refused.status_code == 404, refused.text
            assert (await alice.post("/webhooks/msg_nothing/redeliver")).status_code == 404
            again = await alice.post(f"/webhooks/{ended}/redeliver")
            assert again.status_code == 202, again.text
            token = again.json()["redelivery"]
            await receiver.wait_for(lambda got: len(got) > len(requests))
            resent = receiver.requests[len(requests)]
            assert resent.delivery_id == ended and resent.status == 200
            assert resent.signed_by(ALICE_SECRET)
            assert resent.body == next(r.body for r in requests if r.delivery_id == ended)

            async def redelivery_logged() -> bool:
                return any(row[5] == token for row in await _sql(alice, query))

            await poll_until(redelivery_logged, "the redelivery in webhook_deliveries")

            # The gateway that took over counted each of its attempts by what it came to.
            scraped = (await alice.get("/metrics", headers=ADMIN)).text
            counted = {
                sample.labels["outcome"]: sample.value
                for family in text_string_to_metric_families(scraped)
                if family.name == "comfyautomate_webhook_deliveries"
                for sample in family.samples
                if sample.name.endswith("_total")
            }
            ours = len(receiver.requests) - before
            assert counted == {"delivered": 3, "retrying": ours - 3, "failed": 0, "gave_up": 0}


async def test_a_target_is_checked_at_submission_and_again_when_sent(settings: Settings) -> None:
    settings = msgspec.structs.replace(settings, webhook_secret=GLOBAL_SECRET)
    subjects = Subjects()
    async with (
        receiving() as receiver,
        running_gateway(settings) as url,
        httpx.AsyncClient(base_url=url, timeout=30) as client,
    ):
        cases = {
            receiver.url: "webhook_allowlist",
            "http://10.1.2.3/hook": "private",
            "http://169.254.169.254/latest/meta-data": "never allowed",
            "ftp://example.com/hook": "http:// or https://",
        }
        for target, reason in cases.items():
            reply = await client.post(
                "/workflow/submit", json={"workflow": tiny(1), "webhook_url": target}
            )
            assert reply.status_code == 400, (target, reply.text)
            assert reply.json()["code"] == "invalid_webhook"
            assert reason in reply.json()["message"], reply.text
        reply = await client.post(
            "/workflow/submit",
            json={
                "workflow": tiny(1),
                "webhook_url": "http://93.184.215.14/hook",
                "webhook_events": ["queued"],
            },
        )
        assert reply.status_code == 400 and "'queued' cannot be sent" in reply.text

        # A delivery whose target is no longer allowed when its turn comes (its name resolves
        # elsewhere now, the allowlist changed) is not sent, and not tried again.
        job_id = (await client.post("/workflow/submit", json={"workflow": tiny(1)})).json()[
            "job_id"
        ]
        nc = await connect(settings.nats_url, "test")
        try:
            attempts = await nc.subscribe(subjects.all_webhook_attempts)
            js = nc.jetstream()
            queued = await js.get_last_msg(subjects.events_stream, subjects.events(job_id))
            assert queued.seq is not None
            # As the balancer queues one, for a target that was allowed when it was accepted.
            send = WebhookSend(
                delivery_id="msg_resolvedelsewhere",
                job_id=job_id,
                seq=1,
                event_type="succeeded",
                stream_seq=queued.seq,
                url=receiver.url,
                created_at=now(),
            )
            await js.publish(subjects.webhook_sends(job_id), encode(send))
            attempt = decode((await attempts.next_msg(timeout=20)).data, WebhookAttempt)
            assert (attempt.delivery_id, attempt.outcome) == (send.delivery_id, "failed")
            assert attempt.error is not None and "loopback" in attempt.error
            await poll_until(lambda: _all_settled(nc), "the delivery settled")
        finally:
            await nc.close()
        assert receiver.requests == []


async def test_a_batchs_webhooks_name_their_batch(settings: Settings) -> None:
    settings = msgspec.structs.replace(
        settings, webhook_secret=GLOBAL_SECRET, webhook_allowlist=["127.0.0.1"]
    )
    async with receiving() as receiver, running_system(settings) as system:
        await system.add_server("gpu1")
        async with httpx.AsyncClient(base_url=system.url, timeout=30) as client:
            body = {
                "batch_id": "hooked",
                "workflow": tiny(5),
                "overrides": [{"1.color": c} for c in (1, 2)],
                "webhook_url": receiver.url,
            }
            reply = await client.post("/workflow/batch", json=body)
            assert reply.status_code == 202, reply.text
        await receiver.wait_for(lambda got: len(_delivered(got)) >= 2)
        ends = [r.json for r in receiver.requests if r.status == 200]
        assert sorted(e["data"]["job_id"] for e in ends) == ["hooked-0", "hooked-1"]
        assert {e["batch_id"] for e in ends} == {"hooked"}
        assert all(r.signed_by(GLOBAL_SECRET) for r in receiver.requests)
