"""Bad input over REST: each gets a clear 4xx and leaves the system as it was.

One running system (gateway, balancer, log sink, adapter host, one fake ComfyUI) serves the
whole catalogue; after it, no job record, stream message, file or index row has appeared.
"""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path
from typing import Any

import httpx
import msgspec

from gateway.settings import Settings
from plugins.simulator import png
from tests.conftest import running_gateway
from tests.e2e.conftest import running_system, tiny
from tests.security.conftest import footprint, jetstream
from tests.simulator.test_graph_limits import chain

JSON = {"content-type": "application/json"}


class Bad(msgspec.Struct, frozen=True):
    """One bad request body, and the answer it must get."""

    name: str
    body: bytes
    status: int
    code: str
    says: str = ""  # a phrase the message must contain


def bad(name: str, body: Any, status: int, code: str, says: str = "") -> Bad:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return Bad(name, raw, status, code, says)


def with_node(node_id: str, node: Any) -> dict[str, Any]:
    return {**tiny(), node_id: node}


def nest(levels: int) -> Any:
    """A value of `levels` lists inside each other."""
    value: Any = 1
    for _ in range(levels):
        value = [value]
    return value


UI_FORMAT = {
    "last_node_id": 3,
    "last_link_id": 2,
    "nodes": [{"id": 1, "type": "EmptyImage"}, {"id": 3, "type": "SaveImage"}],
    "links": [[1, 1, 0, 3, 0, "IMAGE"]],
    "version": 0.4,
}
INVERT = "ImageInvert"


def catalogue() -> list[Bad]:
    """Every kind of bad submission, with the status and error code it must get."""
    wf = tiny()
    cases = [
        # Not JSON, or not the JSON of a submission.
        bad("truncated json", b'{"workflow": {', 400, "invalid_request"),
        bad("not json at all", b"{not json", 400, "invalid_request"),
        bad("empty body", b"", 400, "invalid_request"),
        bad("not utf-8", b'{"workflow": "\xff\xfe"}', 400, "invalid_request"),
        bad(
            "not utf-8 inside the workflow",
            b'{"workflow": {"1": {"class_type": "\xff"}}}',
            400,
            "invalid_request",
        ),
        bad(
            "deep nesting inside the workflow",
            b'{"workflow": {"1": ' + b"[" * 100_000 + b"]" * 100_000 + b"}}",
            400,
            "invalid_request",
        ),
        bad("a json array", b"[]", 400, "invalid_request"),
        bad("json null", b"null", 400, "invalid_request"),
        bad("NaN", b'{"workflow": NaN}', 400, "invalid_request"),
        bad(
            "deep nesting",
            b'{"workflow": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
            400,
            "invalid_request",
        ),
        bad(
            "an input nested 700 levels",
            {"workflow": with_node("4", {"class_type": INVERT, "inputs": {"x": nest(700)}})},
            400,
            "invalid_request",
            "levels",
        ),
        bad(
            "an input nested 80 levels",
            {"workflow": with_node("4", {"class_type": INVERT, "inputs": {"x": nest(80)}})},
            400,
            "invalid_workflow",
            "64 levels",
        ),
        bad("unknown field", {"workflow": wf, "colour": "red"}, 400, "invalid_request"),
        bad("later schema version", {"workflow": wf, "v": 99}, 400, "invalid_request"),
        # Wrong types.
        bad("workflow is a string", {"workflow": "run it"}, 400, "invalid_request"),
        bad("workflow is a list", {"workflow": [wf]}, 400, "invalid_request"),
        bad("no workflow", {"priority": 1}, 400, "invalid_request"),
        bad("priority is text", {"workflow": wf, "priority": "high"}, 400, "invalid_request"),
        bad("priority is a fraction", {"workflow": wf, "priority": 1.5}, 400, "invalid_request"),
        bad(
            "max_attempts is text", {"workflow": wf, "max_attempts": "two"}, 400, "invalid_request"
        ),
        bad("max_attempts 0", {"workflow": wf, "max_attempts": 0}, 400, "invalid_request"),
        bad("max_attempts 1000", {"workflow": wf, "max_attempts": 1000}, 400, "invalid_request"),
        bad("label value a number", {"workflow": wf, "labels": {"gpu": 1}}, 400, "invalid_request"),
        bad(
            "metadata value an object",
            {"workflow": wf, "metadata": {"k": {}}},
            400,
            "invalid_request",
        ),
        bad("inputs an object", {"workflow": wf, "inputs": {"a": "b"}}, 400, "invalid_request"),
        bad(
            "input without value",
            {"workflow": wf, "inputs": [{"name": "a", "source": "url"}]},
            400,
            "invalid_request",
        ),
        bad(
            "input from ftp",
            {
                "workflow": wf,
                "inputs": [{"name": "a.png", "source": "ftp", "value": "ftp://x/a.png"}],
            },
            400,
            "invalid_request",
        ),
        bad(
            "an input name ComfyUI cannot store",
            {
                "workflow": wf,
                "inputs": [{"name": "y" * 300 + ".png", "source": "base64", "value": "AA=="}],
            },
            400,
            "invalid_request",
            "at most 255 bytes",
        ),
        bad("job id a number", {"workflow": wf, "job_id": 5}, 400, "invalid_request"),
        bad("overrides a list", {"workflow": wf, "overrides": ["1.width"]}, 400, "invalid_request"),
        bad("timeout is text", {"workflow": wf, "timeout": "soon"}, 400, "invalid_request"),
        # Numbers out of range, named in the message.
        *(
            bad(f"{field} {value}", {"workflow": wf, field: value}, 400, "invalid_request", field)
            for field, value in [
                ("timeout", -5),
                ("timeout", 0),
                ("timeout", 1e9),
                ("priority", 2**31),
                ("priority", -(2**31) - 1),
                ("priority", 10**30),
            ]
        ),
        # Workflows that are not ComfyUI's API format.
        bad("ui format", {"workflow": UI_FORMAT}, 400, "invalid_workflow", "UI format"),
        bad("empty workflow", {"workflow": {}}, 400, "invalid_workflow", "no nodes"),
        bad("node a string", {"workflow": with_node("4", "SaveImage")}, 400, "invalid_workflow"),
        bad(
            "node without class_type",
            {"workflow": with_node("4", {"inputs": {}})},
            400,
            "invalid_workflow",
            "class_type",
        ),
        bad(
            "class_type a number",
            {"workflow": with_node("4", {"class_type": 7})},
            400,
            "invalid_workflow",
            "class_type",
        ),
        bad(
            "inputs a list",
            {"workflow": with_node("4", {"class_type": INVERT, "inputs": []})},
            400,
            "invalid_workflow",
            "inputs",
        ),
        # Graphs that can never run.
        bad(
            "node linked to itself",
            {"workflow": with_node("4", {"class_type": INVERT, "inputs": {"image": ["4", 0]}})},
            400,
            "invalid_workflow",
            "cycle",
        ),
        bad(
            "two nodes in a loop",
            {
                "workflow": {
                    "1": {"class_type": INVERT, "inputs": {"image": ["2", 0]}},
                    "2": {"class_type": INVERT, "inputs": {"image": ["1", 0]}},
                    "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0]}},
                }
            },
            400,
            "invalid_workflow",
            "cycle",
        ),
        bad(
            "a loop made by an override",
            {"workflow": wf, "overrides": {"1.width": ["3", 0]}},
            400,
            "invalid_workflow",
            "cycle",
        ),
        bad(
            "a chain of 3000 nodes",
            {"workflow": chain(3000)},
            400,
            "invalid_workflow",
            "chain of 3000 linked nodes",
        ),
        bad(
            "link to a missing node",
            {"workflow": with_node("4", {"class_type": INVERT, "inputs": {"image": ["99", 0]}})},
            400,
            "invalid_workflow",
            "'99'",
        ),
        bad(
            "missing node by override",
            {"workflow": wf, "overrides": {"2.image": ["99", 0]}},
            400,
            "invalid_workflow",
            "'99'",
        ),
        bad(
            "override of a missing node",
            {"workflow": wf, "overrides": {"99.width": 5}},
            400,
            "invalid_overrides",
            "99",
        ),
        bad(
            "override by title beside a node whose _meta is text",
            {
                "workflow": with_node(
                    "4", {"class_type": INVERT, "_meta": "x", "inputs": {"image": ["1", 0]}}
                ),
                "overrides": {"Nobody.width": 5},
            },
            400,
            "invalid_overrides",
            "Nobody",
        ),
        # Names the bus, the KV store, file names or URLs cannot hold.
        *(
            bad(
                f"job id {job_id!r}",
                {"workflow": wf, "job_id": job_id},
                400,
                "invalid_request",
                "job id",
            )
            for job_id in [
                "x';DROP TABLE jobs;--",
                "jöb",
                "a\x00b",
                "a\nb",
                "a b",
                "a.b",
                "a*",
                "a>",
                "a/b",
                "../x",
                "",
                "x" * 129,
                "\u202eevil",
            ]
        ),
        bad(
            "pinned to a server with a NUL",
            {"workflow": wf, "server": "gpu\x00"},
            404,
            "unknown_server",
        ),
        bad("pinned to a unicode server", {"workflow": wf, "server": "gpü"}, 404, "unknown_server"),
        bad(
            "labels with control characters",
            {"workflow": wf, "labels": {"gpu\x00": "\x1b[31m"}},
            422,
            "unschedulable",
        ),
        # Input file names that try to leave ComfyUI's input folder, and storage keys that
        # try to leave the storage backend.
        *(
            bad(
                f"input named {name!r}",
                {"workflow": wf, "inputs": [{"name": name, "source": "base64", "value": "aGk="}]},
                400,
                "invalid_request",
                "input",
            )
            for name in [
                "../../etc/passwd",
                "/etc/passwd",
                "..\\..\\x.png",
                "a/../../x.png",
                "a\x00.png",
                "a\x1b.png",
                "",
            ]
        ),
        *(
            bad(
                f"input from key {key!r}",
                {"workflow": wf, "inputs": [{"name": "x.png", "source": "key", "value": key}]},
                400,
                "invalid_request",
                "key",
            )
            for key in ["../secret", "/etc/passwd", "a/../../b", "a\\..\\b", ".hidden/x"]
        ),
    ]
    return cases


async def test_bad_submissions_get_a_4xx_and_change_nothing(settings: Settings) -> None:
    async with running_system(settings) as system:
        await system.add_server("gpu1")
        async with (
            jetstream(settings) as nc_js,
            httpx.AsyncClient(base_url=system.url, timeout=30) as client,
        ):
            before = await footprint(nc_js, settings, client)
            wrong = []
            for case in catalogue():
                for path in ("/workflow/submit", "/workflow/execute"):
                    reply = await client.post(path, content=case.body, headers=JSON)
                    body = reply.json()
                    if (
                        reply.status_code != case.status
                        or body.get("code") != case.code
                        or case.says not in body.get("message", "")
                    ):
                        wrong.append(f"{case.name} on {path}: {reply.status_code} {reply.text}")
            assert not wrong, "\n".join(wrong)
            assert await footprint(nc_js, settings, client) == before


SECRET = b"the gateway must never serve this file"


async def _get_raw(url: str, target: str) -> tuple[int, bytes]:
    """GET `target` exactly as written: no client normalises its dots or escapes."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(
            f"GET {target} HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n\r\n".encode()
        )
        await writer.drain()
        answer = await reader.read()
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


async def test_image_keys_cannot_leave_the_storage(settings: Settings) -> None:
    data = Path(settings.data_dir)
    async with running_gateway(settings) as url:
        (data / "secret.txt").write_bytes(SECRET)
        outputs = data / "outputs"
        (outputs / "job1").mkdir(parents=True)
        (outputs / "job1" / "a.png").write_bytes(b"png")
        (outputs / "job1" / "link.png").symlink_to(data / "secret.txt")
        assert (await _get_raw(url, "/images/job1/a.png")) == (200, b"png")
        for target in (
            "/images/../secret.txt",
            "/images/job1/../../secret.txt",
            "/images/%2e%2e/secret.txt",
            "/images/..%2fsecret.txt",
            "/images/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
            "/images/..%5csecret.txt",
            "/images/job1%2f..%2f..%2fsecret.txt",
            "/images/%2fetc%2fpasswd",
            "//images/../../secret.txt",
            "/images/" + str(data / "secret.txt"),
            "/images/job1/a.png%00.txt",
            "/images/.%2e/secret.txt",
            "/images/job1/link.png",
        ):
            status, body = await _get_raw(url, target)
            assert 400 <= status < 500, (target, status, body)
            assert SECRET not in body, target


async def test_unicode_names_are_kept_and_work(settings: Settings) -> None:
    """Unicode is not bad input: a job with unicode input names, labels and metadata runs."""
    name = "fotó 漢字 🎨.png"
    labels = {"región": "café", "ü": "漢字"}
    metadata = {"título": "ö\u202e漢字 🎨", "tab": "a\tb\r\nc"}
    image = base64.b64encode(png.encode_solid(8, 8, (10, 20, 30))).decode()
    workflow = {
        "1": {"class_type": "LoadImage", "inputs": {"image": name}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "ü"}},
    }
    async with running_system(settings) as system:
        await system.add_server("gpu1", labels=labels)
        async with httpx.AsyncClient(base_url=system.url, timeout=60) as client:
            reply = await client.post(
                "/workflow/execute",
                json={
                    "workflow": workflow,
                    "inputs": [{"name": name, "source": "base64", "value": image}],
                    "labels": labels,
                    "metadata": metadata,
                },
            )
            assert reply.status_code == 200, reply.text
            result = reply.json()
            assert result["status"] == "succeeded", result["error"]
            assert (await client.get(result["images"][0])).status_code == 200
            status = await client.get(f"/workflow/status/{result['job_id']}")
            assert status.json()["status"] == "succeeded"
            servers = (await client.get("/servers")).json()
            assert servers[0]["labels"] == labels


async def test_server_names_unicode_kept_apart_control_characters_refused(
    settings: Settings,
) -> None:
    async with running_system(settings) as system:
        first = await system.add_server("gpu1")
        second = await system.add_server("gpu2")
        async with httpx.AsyncClient(base_url=system.url, timeout=30) as client:
            before = await _registered(client)
            for name in ("evil\x1b]0;owned\x07", "a\x00b", "line\nbreak", " "):
                reply = await client.post("/servers", json={"name": name, "address": first.address})
                assert reply.status_code == 400, (name, reply.text)
            for server_id in ("a'b", "ö", "a\x00b", "a.b"):
                reply = await client.post(
                    "/servers",
                    json={"name": "x", "server_id": server_id, "address": first.address},
                )
                assert reply.status_code == 400, (server_id, reply.text)
                assert reply.json()["code"] == "invalid_server_id"
            for server_id in ("a%00b", "%C3%B6", "a%27b"):
                assert (await client.delete(f"/servers/{server_id}")).status_code == 404
            assert await _registered(client) == before

            # Two servers named only in letters outside a-z are two servers: both are
            # registered, or the second is refused and says why; never one silently replaced.
            # (One ComfyUI is one server: the simulators' addresses are freed first.)
            for server_id in ("gpu1", "gpu2"):
                assert (await client.delete(f"/servers/{server_id}")).status_code == 204
            for name, sim in (("東京", first), ("大阪", second)):
                reply = await client.post("/servers", json={"name": name, "address": sim.address})
                assert reply.status_code in (201, 409), reply.text
            names = {name for _, name, _ in await _registered(client)}
            assert "東京" in names
            if reply.status_code == 201:
                assert "大阪" in names
            else:
                assert reply.json()["code"] == "server_id_taken"


async def _registered(client: httpx.AsyncClient) -> set[tuple[str, str, str]]:
    servers = (await client.get("/servers")).json()
    return {(s["server_id"], s["name"], s["address"]) for s in servers}


async def test_odd_query_values_get_4xx(settings: Settings) -> None:
    async with running_gateway(settings) as url, httpx.AsyncClient(base_url=url) as client:
        job = (await client.post("/workflow/submit", json={"workflow": tiny()})).json()["job_id"]
        assert (await client.get(f"/workflow/result/{job}?wait=nan")).status_code == 400
        assert (await client.get(f"/workflow/result/{job}?wait=soon")).status_code == 400
        # A deadline already past answers at once with the job as it is.
        now = await client.get(f"/workflow/result/{job}?wait=-inf")
        assert now.status_code == 200 and now.json()["status"] == "queued"
        for query in ("status=nope", "limit=ten", "server=a'b", "server=a.b"):
            reply = await client.get(f"/workflow/jobs?{query}")
            assert reply.status_code == 400, (query, reply.text)
