"""Bad input to ComfyUI's routes on the gateway: each is a 4xx that says why, never a 5xx.

JSON nested too deeply, bodies that are not UTF-8, graphs ComfyUI cannot check (a cycle, a
chain of 3000 nodes), uploads with odd names and folders; and what the REST side shares with
them: numbers out of range, the event sockets' answer to a missing key.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx
import msgspec
import websockets
from websockets.exceptions import InvalidStatus

from gateway.api.bodies import MAX_JSON_DEPTH
from gateway.settings import Settings
from plugins.simulator import png
from tests.conftest import running_gateway
from tests.e2e.conftest import running_system, tiny
from tests.simulator.test_graph_limits import LOOP, chain

PNG = png.encode_solid(4, 4, (1, 2, 3))
NATIVE_JSON_ROUTES = ("/prompt", "/queue", "/history", "/interrupt", "/api/prompt")
BOUNDARY = "fuzzboundary"


def nested(levels: int) -> bytes:
    return b"[" * levels + b"]" * levels


def _comfy_error(reply: httpx.Response) -> dict[str, Any]:
    """A ComfyUI-shaped 400: `error` {type, message, details, extra_info} and `node_errors`."""
    assert reply.status_code == 400, (reply.status_code, reply.text[:300])
    body: dict[str, Any] = reply.json()
    assert set(body) == {"error", "node_errors"}, body
    assert set(body["error"]) == {"type", "message", "details", "extra_info"}, body
    return body


async def test_deep_and_broken_json_is_a_400_in_each_routes_own_shape(
    settings: Settings,
) -> None:
    deep = nested(1000)
    async with (
        running_gateway(settings) as url,
        httpx.AsyncClient(base_url=url, timeout=30) as http,
    ):
        for path in NATIVE_JSON_ROUTES:
            for body in (
                deep,
                b'{"prompt": ' + deep + b"}",
                b'{"delete": ' + nested(MAX_JSON_DEPTH + 1) + b"}",
                b'{"prompt": {"1": "\xff"}}',  # not UTF-8
            ):
                error = _comfy_error(await http.post(path, content=body))
                assert error["error"]["type"] == "invalid_json", (path, error)
        # As deep as allowed is JSON like any other: ComfyUI's ordinary answers.
        shallow = b'{"delete": ' + nested(MAX_JSON_DEPTH - 1) + b"}"
        assert (await http.post("/queue", content=shallow)).status_code == 200
        for path in ("/workflow/submit", "/logs/query", "/servers"):
            reply = await http.post(path, content=deep)
            assert reply.status_code == 400, (path, reply.text)
            assert reply.json()["code"] == "invalid_request"
            assert f"{MAX_JSON_DEPTH} levels" in reply.json()["message"]
        assert (await http.get("/health")).status_code in (200, 503)


async def test_cycles_and_long_chains_get_comfyuis_400(settings: Settings) -> None:
    async with running_system(settings) as system:
        await system.add_server("gpu1")
        async with httpx.AsyncClient(base_url=system.url, timeout=60) as http:
            for graph in (LOOP, chain(3000)):
                body = _comfy_error(await http.post("/prompt", json={"prompt": graph}))
                assert body["error"]["type"] == "prompt_outputs_failed_validation"
                (errors,) = [entry["errors"] for entry in body["node_errors"].values()]
                assert errors[0]["type"] == "exception_during_inner_validation"
                assert errors[0]["extra_info"]["exception_type"] == "RecursionError"
            queue = (await http.get("/queue")).json()
            assert queue == {"queue_running": [], "queue_pending": []}
            # What the walk allows still runs, through the gateway and the fake.
            reply = await http.post("/prompt", json={"prompt": chain(200, "long")})
            assert reply.status_code == 200, reply.text[:300]


def _multipart(filename: bytes, *, subfolder: bytes | None = None, data: bytes = PNG) -> bytes:
    parts = [
        b"--" + BOUNDARY.encode() + b"\r\n"
        b'Content-Disposition: form-data; name="image"; filename="' + filename + b'"\r\n'
        b"Content-Type: image/png\r\n\r\n" + data + b"\r\n"
    ]
    if subfolder is not None:
        parts.append(
            b"--" + BOUNDARY.encode() + b"\r\n"
            b'Content-Disposition: form-data; name="subfolder"\r\n\r\n' + subfolder + b"\r\n"
        )
    return b"".join(parts) + b"--" + BOUNDARY.encode() + b"--\r\n"


async def _upload(http: httpx.AsyncClient, body: bytes) -> httpx.Response:
    content_type = f"multipart/form-data; boundary={BOUNDARY}"
    return await http.post("/upload/image", content=body, headers={"content-type": content_type})


BAD_SUBFOLDERS = {
    "/etc": "relative",
    "/": "relative",
    "../escape": "'..'",
    "a/../../b": "'..'",
    "a\\b": "relative",
    "a\x00b": "control",
    "a//b": "'//'",
    ".hidden": "'.'",
    "s" * 300: "too long (max 255",
    "Comfyautomate-Jobs/x": "jobs' own input files",
}


async def test_odd_upload_names_and_folders_are_refused_with_a_reason(
    settings: Settings,
) -> None:
    async with (
        running_gateway(settings) as url,
        httpx.AsyncClient(base_url=url, timeout=30) as http,
    ):
        names = {
            b"": "no file name",  # read as a text field: a PNG is not UTF-8 text
            b"a" * 300 + b".png": "file name too long (max 255",
            b"a" * 5000 + b".png": "file name too long (max 255",
            b".png": "'.'",
        }
        for filename, says in names.items():
            reply = await _upload(http, _multipart(filename))
            assert reply.status_code == 400, (filename[:20], reply.status_code, reply.text)
            assert says in reply.text, (filename[:20], reply.text)
        for subfolder, says in BAD_SUBFOLDERS.items():
            reply = await _upload(http, _multipart(b"a.png", subfolder=subfolder.encode()))
            assert reply.status_code == 400, (subfolder[:20], reply.status_code, reply.text)
            assert says in reply.text, (subfolder[:20], reply.text)
            query = {"filename": "a.png", "type": "input", "subfolder": subfolder}
            view = await http.get("/view", params=query)
            assert view.status_code == 400, (subfolder[:20], view.status_code, view.text)
            assert says in view.text, (subfolder[:20], view.text)
        for filename in ("a" * 300, "a\x00.png", "../a.png", "sub/a.png"):
            view = await http.get("/view", params={"filename": filename, "type": "input"})
            assert view.status_code == 400, (filename[:20], view.text)
            assert view.text, "a refusal says why"
        # A file where a folder is wanted, and a folder where a file is: said, not a 500.
        assert (await _upload(http, _multipart(b"clash"))).status_code == 200
        in_file = await _upload(http, _multipart(b"a.png", subfolder=b"clash"))
        assert (in_file.status_code, "share a name" in in_file.text) == (400, True), in_file.text
        assert (await _upload(http, _multipart(b"a.png", subfolder=b"dir"))).status_code == 200
        on_folder = await _upload(http, _multipart(b"dir"))
        assert (on_folder.status_code, "share a name" in on_folder.text) == (400, True)
        assert settings.data_dir not in on_folder.text
        # A name with a folder in it keeps its last part, as browsers' uploads need.
        reply = await _upload(http, _multipart(b"C:\\Users\\me\\pic.png", subfolder=b"ok/"))
        assert reply.status_code == 200, reply.text
        assert reply.json() == {"name": "pic.png", "subfolder": "ok/", "type": "input"}
        query = {"filename": "pic.png", "type": "input", "subfolder": "ok"}
        assert (await http.get("/view", params=query)).content == PNG


async def test_a_socket_without_a_key_is_told_401_and_a_wrong_key_403(
    settings: Settings,
) -> None:
    keyed = msgspec.structs.replace(settings, api_keys=["plain:the-key"])
    async with running_gateway(keyed) as url:
        base = url.replace("http", "ws", 1)
        for path in ("/ws?clientId=a", "/api/ws", "/workflow/events/some-job/ws"):
            for headers, status in (({}, 401), ({"X-API-Key": "wrong"}, 403)):
                try:
                    async with websockets.connect(base + path, additional_headers=headers):
                        raise AssertionError(f"{path} accepted {headers}")
                except InvalidStatus as refused:
                    response = refused.response
                assert response.status_code == status, (path, headers, response.status_code)
                body = json.loads(response.body or b"{}")
                assert body["code"] == ("unauthorized" if status == 401 else "forbidden"), body
                if status == 401:
                    assert "Bearer" in response.headers["WWW-Authenticate"]
        async with websockets.connect(
            base + "/ws?clientId=a", additional_headers={"X-API-Key": "the-key"}
        ) as socket:
            assert json.loads(await socket.recv())["type"] == "status"


async def test_numbers_out_of_range_are_a_400_naming_the_field(settings: Settings) -> None:
    async with (
        running_system(settings) as system,
        httpx.AsyncClient(base_url=system.url, timeout=30) as http,
    ):
        cases: list[tuple[str, dict[str, Any], str]] = [
            ("/workflow/submit", {"workflow": tiny(), "priority": 2**31}, "priority"),
            ("/workflow/submit", {"workflow": tiny(), "priority": -(2**40)}, "priority"),
            ("/workflow/submit", {"workflow": tiny(), "timeout": -5}, "timeout"),
            ("/workflow/execute", {"workflow": tiny(), "timeout": 1e9}, "timeout"),
            ("/workflow/execute", {"workflow": tiny(), "timeout": 0}, "timeout"),
            ("/logs/query", {"sql": "SELECT 1", "timeout_s": -5}, "timeout_s"),
            ("/logs/query", {"sql": "SELECT 1", "timeout_s": 0}, "timeout_s"),
            ("/logs/query", {"sql": "SELECT 1", "max_rows": -1}, "max_rows"),
        ]
        for path, body, field in cases:
            reply = await http.post(path, json=body)
            assert reply.status_code == 400, (path, body, reply.status_code, reply.text)
            assert field in reply.json()["message"], (path, reply.json())


def test_the_documented_submit_rate_default_is_the_setting() -> None:
    """docs/API.md's limits table and the README's settings table give the default rate."""
    rate = Settings().submit_rate_per_s
    root = Path(__file__).resolve().parents[2]
    api = (root / "docs" / "API.md").read_text()
    documented = re.search(r"then `submit_rate_per_s` \(([^)]*)\)", api)
    assert documented is not None
    said = documented.group(1)
    assert said == (f"{rate:g}" if rate else "0: off"), said
    readme = (root / "README.md").read_text()
    row = next(line for line in readme.splitlines() if line.startswith("| `submit_rate_per_s`"))
    assert f"`{rate:g}`" in row, row
