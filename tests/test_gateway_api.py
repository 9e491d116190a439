"""The REST API over real HTTP, with real NATS; checks that need no ComfyUI.

One gateway (with its balancer, without a log sink) for the module's tests: none registers a
server, and the one job queued is cancelled.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import httpx
import pytest
import pytest_asyncio

from tests.conftest import own_broker, running_gateway, settings_on

TINY = {
    "1": {
        "class_type": "EmptyImage",
        "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0},
    },
    "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "t"}},
}


@pytest_asyncio.fixture(scope="module")
async def shared_gateway(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    base = tmp_path_factory.mktemp("api")
    async with own_broker(base) as broker, running_gateway(settings_on(broker, base)) as url:
        yield url


async def test_health_schema_and_metrics(shared_gateway: str) -> None:
    async with httpx.AsyncClient(base_url=shared_gateway) as client:
        # A gateway with its balancer but no log sink cannot log a job: 503, naming the sink.
        health = await client.get("/health")
        assert health.status_code == 503
        report = health.json()
        assert report["nats"] is True and report["balancer"] is True
        assert report["log_sink"] is False
        assert [m for m in report["missing"] if "log sink" in m] == report["missing"]
        # One broker: every resource has its one copy, which leads and is current.
        replication = {r["resource"]: r for r in report["replication"]}
        assert set(replication) == {
            "JOBS",
            "EVENTS",
            "KV_comfy_servers",
            "KV_comfy_jobs",
            "KV_comfy_balancer",
            "KV_comfy_prompts",
            "KV_comfy_idempotency",
            "KV_comfy_batches",
            "OBJ_comfy_outputs",
            "WEBHOOKS",
        }
        assert all(r["replicas"] == 1 and r["current"] for r in replication.values())
        schema = await client.get("/schema/openapi.json")
        assert schema.status_code == 200
        paths = schema.json()["paths"]
        for path in (
            "/workflow/execute",
            "/workflow/submit",
            "/servers",
            "/servers/health",
            "/workflow/status/{job_id}",
            "/workflow/events/{job_id}",
        ):
            assert path in paths, path
        metrics = await client.get("/metrics")
        assert metrics.status_code == 200
        assert "comfyautomate_events_stored" in metrics.text
        # ... and the same replication, as gauges.
        for resource in replication:
            assert f'comfyautomate_nats_replicas{{resource="{resource}"}} 1.0' in metrics.text
            assert (
                f'comfyautomate_nats_replicas_current{{resource="{resource}"}} 1.0' in metrics.text
            )


async def test_the_openapi_document_describes_each_route_and_its_ui_loads_nothing_from_afar(
    shared_gateway: str,
) -> None:
    async with httpx.AsyncClient(base_url=shared_gateway) as client:
        document = (await client.get("/schema/openapi.json")).json()
        swagger = await client.get("/schema/swagger")
        assets = re.findall(r"(?:src|href)=[\"']([^\"']+)", swagger.text)
        # The docs UI's scripts, styles and icon are the gateway's own (nothing else is asked).
        assert assets and all(asset.startswith("/static/") for asset in assets), assets
        loaded = [(await client.get(asset)).status_code for asset in assets]
    paths = document["paths"]
    # Summaries and descriptions come from the handlers' docstrings, not their names.
    submit = paths["/workflow/submit"]["post"]
    assert submit["summary"] == "Queue a workflow and answer at once with the job id (202)"
    assert submit["description"].startswith(submit["summary"])
    # A stream is typed as one, a file as bytes.
    for path in ("/workflow/events/{job_id}", "/events"):
        events = paths[path]["get"]["responses"]["200"]["content"]
        assert list(events) == ["text/event-stream"], path
    for path in ("/images/{key}", "/view"):
        content = paths[path]["get"]["responses"]["200"]["content"]
        binary = {"type": "string", "format": "binary"}
        assert content == {"application/octet-stream": {"schema": binary}}, path
    # ComfyUI's own routes, in their own tag, each listed once (not again under /api).
    assert paths["/prompt"]["post"]["tags"] == ["comfyui"]
    assert "comfyui" in [tag["name"] for tag in document["tags"]]
    assert not [path for path in paths if path.startswith("/api/")]
    # The key schemes are described even on an open gateway; probes need none.
    assert set(document["components"]["securitySchemes"]) == {"bearer", "apiKey"}
    assert paths["/health"]["get"]["security"] == []
    assert set(loaded) == {200}


async def test_a_ui_format_workflow_is_refused_with_advice(shared_gateway: str) -> None:
    ui = {"nodes": [{"id": 1, "type": "SaveImage"}], "links": [], "version": 0.4}
    async with httpx.AsyncClient(base_url=shared_gateway) as client:
        reply = await client.post("/workflow/submit", json={"workflow": ui})
    assert reply.status_code == 400
    body = reply.json()
    assert body["code"] == "invalid_workflow"
    assert "UI format" in body["message"] and "API" in body["message"]


async def test_bad_requests_get_clear_errors(shared_gateway: str) -> None:
    async with httpx.AsyncClient(base_url=shared_gateway) as client:
        not_json = await client.post(
            "/workflow/submit", content=b"{not json", headers={"content-type": "application/json"}
        )
        assert not_json.status_code == 400
        assert not_json.json()["code"] == "invalid_request"
        wrong_type = await client.post("/workflow/submit", json={"workflow": "a string"})
        assert wrong_type.status_code == 400
        unknown_field = await client.post("/workflow/submit", json={"workflow": TINY, "x": 1})
        assert unknown_field.status_code == 400
        override = await client.post(
            "/workflow/submit", json={"workflow": TINY, "overrides": {"99.width": 5}}
        )
        assert override.status_code == 400
        assert override.json()["code"] == "invalid_overrides"
        assert "99" in override.json()["message"]
        unknown = await client.get("/workflow/status/nosuchjob")
        assert unknown.status_code == 404
        assert unknown.json()["code"] == "unknown_job"
        big = await client.post(
            "/workflow/submit",
            content=b'{"workflow": {"1": "' + b"x" * (11 * 1024 * 1024) + b'"}}',
            headers={"content-type": "application/json"},
        )
        assert big.status_code == 413
        pinned = await client.post("/workflow/submit", json={"workflow": TINY, "server": "ghost"})
        assert pinned.status_code == 404
        assert pinned.json()["code"] == "unknown_server"


async def test_server_registration_refuses_bad_addresses(shared_gateway: str) -> None:
    async with httpx.AsyncClient(base_url=shared_gateway) as client:
        malformed = await client.post("/servers", json={"name": "a", "address": "not an address"})
        assert malformed.status_code == 400
        assert malformed.json()["code"] == "invalid_address"
        # Nothing listens on port 9 of loopback.
        dead = await client.post("/servers", json={"name": "a", "address": "127.0.0.1:9"})
        assert dead.status_code == 422
        assert dead.json()["code"] == "unreachable"
        assert (await client.get("/servers")).json() == []
        missing = await client.delete("/servers/nope")
        assert missing.status_code == 404


async def test_a_job_waits_while_no_server_is_known(shared_gateway: str) -> None:
    async with httpx.AsyncClient(base_url=shared_gateway) as client:
        reply = await client.post("/workflow/submit", json={"workflow": TINY, "priority": 2})
        assert reply.status_code == 202, reply.text
        job = reply.json()
        assert job["log_file_path"].endswith(f"_{job['job_id']}.jsonl")
        status = await client.get(f"/workflow/status/{job['job_id']}")
        assert status.json()["status"] == "queued"
        cancel = await client.post(f"/workflow/cancel/{job['job_id']}")
        assert cancel.status_code == 200
        assert cancel.json()["status"] == "cancelled"
        again = await client.post(f"/workflow/cancel/{job['job_id']}")
        assert again.status_code == 409


async def test_a_timeout_that_is_not_a_positive_number_is_refused(shared_gateway: str) -> None:
    async with httpx.AsyncClient(base_url=shared_gateway) as client:
        for timeout in (-5, 0):
            reply = await client.post(
                "/workflow/submit", json={"workflow": TINY, "timeout": timeout}
            )
            assert reply.status_code == 400, reply.text
            assert "timeout must be" in reply.json()["message"]
