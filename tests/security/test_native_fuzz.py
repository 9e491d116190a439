"""ComfyUI's routes on the gateway, fuzzed: random and malformed input never gets a 5xx or hangs.

Hypothesis draws JSON bodies (random values, prompt-like graphs with links, cycles and odd
fields, bytes that are not JSON, nesting thousands deep) for `/prompt`, `/queue`, `/history`,
`/interrupt` and `/free`; query strings for `/view`, `/history` and `/object_info`; multipart
uploads with odd names, types and folders for `/upload/image` and `/upload/mask`; and first
messages on `/ws`. After every example: no answer is a 5xx, each request ends within its deadline,
and a socket that was sent anything still carries its prompt's messages. After all of them:
`/health` answers and a small prompt still runs.

The run is derandomized (the same examples each time) and bounded to a few seconds;
`FUZZ_EXAMPLES=<n>` draws n examples per route family instead, and `FUZZ_SEED=<n>` draws
other ones (a failure prints the example that caused it).
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import httpx
import hypothesis
import pytest
from hypothesis import strategies as st
from websockets.sync.client import connect as ws_connect

from gateway.settings import Settings
from plugins.simulator import png
from plugins.simulator.samples import tiny_workflow
from tests.e2e.conftest import running_system
from tests.native.clients import Comfy, Target, socket

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "0"))
SEED = os.environ.get("FUZZ_SEED")
# Per family, unless FUZZ_EXAMPLES says otherwise: together about six seconds here.
DEFAULT_EXAMPLES = {"prompt": 150, "json": 100, "query": 80, "upload": 80, "socket": 12}
REQUEST_DEADLINE_S = 15.0
PROMPT_DEADLINE_S = 30.0
PNG = png.encode_solid(2, 2, (9, 9, 9))

# -- what is drawn ------------------------------------------------------------------------

leaves = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
values = st.recursive(
    leaves,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=16,
)
node_ids = st.sampled_from(["1", "2", "3", "4"]) | st.text(max_size=4)
classes = st.sampled_from(
    ["EmptyImage", "ImageInvert", "SaveImage", "LoadImage", "PreviewImage", "NoSuchNode"]
) | st.text(max_size=10)
input_names = st.sampled_from(
    ["image", "images", "width", "height", "batch_size", "color", "filename_prefix"]
) | st.text(max_size=8)
links = st.tuples(node_ids, st.integers(min_value=-1, max_value=3) | st.floats()).map(list)
nodes = st.fixed_dictionaries(
    {"class_type": classes, "inputs": st.dictionaries(input_names, links | values, max_size=5)},
    optional={"_meta": values},
)
graphs = st.dictionaries(node_ids, nodes | values, max_size=5)
prompt_bodies = st.fixed_dictionaries(
    {"prompt": graphs | values},
    optional={
        "client_id": values,
        "prompt_id": st.text(max_size=40) | values,
        "number": values,
        "front": values,
        "extra_data": values,
        "partial_execution_targets": st.lists(node_ids | values, max_size=3) | values,
    },
)


def _nested(levels: int, opener: bytes = b"[", closer: bytes = b"]") -> bytes:
    return opener * levels + closer * levels


def _encoded(value: Any) -> bytes:
    return json.dumps(value).encode()


malformed = st.one_of(
    st.binary(max_size=64),
    st.integers(min_value=1, max_value=3000).map(_nested),
    st.integers(min_value=1, max_value=3000).map(lambda n: _nested(n, b'{"a":', b"}")),
    st.integers(min_value=1, max_value=3000).map(lambda n: b'{"prompt": ' + _nested(n) + b"}"),
    st.tuples(prompt_bodies.map(_encoded), st.integers(min_value=0, max_value=200)).map(
        lambda pair: pair[0][: pair[1]]  # cut short
    ),
    st.just(b'{"prompt": {"1": "\xff\xfe"}}'),  # not UTF-8
)
prompt_requests = st.tuples(
    st.sampled_from(["/prompt", "/api/prompt"]),
    prompt_bodies.map(_encoded) | values.map(_encoded) | malformed,
)
json_requests = st.tuples(
    st.sampled_from(["/queue", "/history", "/interrupt", "/free", "/api/queue", "/api/interrupt"]),
    st.fixed_dictionaries(
        {}, optional={"delete": values, "clear": values, "prompt_id": values}
    ).map(_encoded)
    | values.map(_encoded)
    | malformed,
)
query_text = st.text(max_size=40) | st.sampled_from(
    ["", "..", "../x", "/etc/passwd", "a\x00b", "x" * 5000, "input", "output", "temp", "-1"]
)
query_requests = st.one_of(
    st.tuples(
        st.sampled_from(["/view", "/api/view"]),
        st.dictionaries(
            st.sampled_from(["filename", "subfolder", "type", "preview", "channel"]) | st.text(),
            query_text,
            max_size=4,
        ),
    ),
    st.tuples(
        st.just("/history"),
        st.dictionaries(st.sampled_from(["max_items", "offset"]), query_text, max_size=2),
    ),
    st.tuples(query_text.map(lambda t: "/history/" + quote(t, safe="")), st.just({})),
    st.tuples(query_text.map(lambda t: "/object_info/" + quote(t, safe="")), st.just({})),
)
file_names = st.text(max_size=40) | st.sampled_from(
    ["", " ", "/", "\\", "..", "../x.png", "a/b.png", ".png", "x" * 300, "x" * 5000, "é.png"]
)
raw_names = st.binary(max_size=40) | st.sampled_from([b"", b"\xff\xfe.png", b'a"b.png', b"a\r\n"])
upload_requests = st.tuples(
    st.sampled_from(["/upload/image", "/upload/mask", "/api/upload/image"]),
    st.one_of(
        st.tuples(st.just("form"), file_names, st.binary(max_size=32) | st.just(PNG)),
        st.tuples(st.just("raw"), raw_names, st.binary(max_size=32) | st.just(PNG)),
    ),
    st.fixed_dictionaries(
        {},
        optional={
            "subfolder": query_text,
            "type": query_text,
            "overwrite": st.sampled_from(["true", "1", "no", ""]) | query_text,
        },
    ),
)
socket_messages = st.one_of(
    st.text(max_size=60),
    values.map(json.dumps),
    st.fixed_dictionaries({"type": st.just("feature_flags"), "data": values}).map(json.dumps),
    st.integers(min_value=1, max_value=5000).map(lambda n: _nested(n).decode()),
    st.binary(max_size=60),
)

# -- running them ---------------------------------------------------------------------------


def _settings(family: str) -> hypothesis.settings:
    return hypothesis.settings(
        max_examples=EXAMPLES or DEFAULT_EXAMPLES[family],
        derandomize=SEED is None,
        database=None,  # nothing written to the working tree
        deadline=None,  # each request has its own deadline
        phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate, hypothesis.Phase.shrink],
        suppress_health_check=list(hypothesis.HealthCheck),
    )


def _answered(reply: httpx.Response, what: str) -> None:
    assert reply.status_code < 500, f"{what}: {reply.status_code} {reply.text[:300]}"


def _multipart(name: bytes, data: bytes, fields: dict[str, str]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = [
        f"--{boundary}\r\n".encode()
        + b'Content-Disposition: form-data; name="image"; filename="'
        + name
        + b'"\r\nContent-Type: image/png\r\n\r\n'
        + data
        + b"\r\n"
    ]
    for key, value in fields.items():
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n'.encode()
            + value.encode("utf-8", "surrogatepass")
            + b"\r\n"
        )
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), boundary


def _fuzz(url: str) -> None:
    """Every family of requests, from this thread, with a blocking client."""
    seed = hypothesis.seed(int(SEED)) if SEED is not None else (lambda f: f)
    with httpx.Client(base_url=url, timeout=REQUEST_DEADLINE_S) as http:

        @seed
        @_settings("prompt")
        @hypothesis.given(request=prompt_requests)
        def prompts(request: tuple[str, bytes]) -> None:
            path, body = request
            _answered(http.post(path, content=body), f"POST {path} {body[:200]!r}")

        @seed
        @_settings("json")
        @hypothesis.given(request=json_requests)
        def json_bodies(request: tuple[str, bytes]) -> None:
            path, body = request
            _answered(http.post(path, content=body), f"POST {path} {body[:200]!r}")

        @seed
        @_settings("query")
        @hypothesis.given(request=query_requests)
        def queries(request: tuple[str, dict[str, str]]) -> None:
            path, params = request
            for method in ("GET", "HEAD"):
                reply = http.request(method, path, params=params)
                _answered(reply, f"{method} {path} {params!r}"[:300])

        @seed
        @_settings("upload")
        @hypothesis.given(request=upload_requests)
        def uploads(request: tuple[str, tuple[str, Any, bytes], dict[str, str]]) -> None:
            path, (how, name, data), fields = request
            if how == "form":
                files = {"image": (name, data, "image/png")}
                reply = http.post(path, files=files, data=fields)
            else:
                body, boundary = _multipart(name, data, fields)
                content_type = f"multipart/form-data; boundary={boundary}"
                reply = http.post(path, content=body, headers={"content-type": content_type})
            _answered(reply, f"POST {path} {how} {name!r:.80} {fields!r:.200}")

        @seed
        @_settings("socket")
        @hypothesis.given(first=socket_messages)
        def sockets(first: str | bytes) -> None:
            _socket_still_works(http, url, first)

        for family in (prompts, json_bodies, queries, uploads, sockets):
            family()


def _socket_still_works(http: httpx.Client, url: str, first: str | bytes) -> None:
    """A socket sent `first` still gets its client's prompt messages, to the end."""
    client_id = f"fuzz-{uuid.uuid4().hex}"
    address = url.replace("http", "ws", 1) + f"/ws?clientId={client_id}"
    with ws_connect(address, open_timeout=REQUEST_DEADLINE_S, proxy=None) as ws:
        status = json.loads(ws.recv(timeout=REQUEST_DEADLINE_S))
        assert status["type"] == "status", status
        ws.send(first)
        # Cached after its first run: each of these takes a moment.
        prompt = {"prompt": tiny_workflow(0, "fuzz"), "client_id": client_id}
        reply = http.post("/prompt", json=prompt)
        assert reply.status_code == 200, reply.text
        prompt_id = reply.json()["prompt_id"]
        _until(ws.recv, lambda m: _done(m, prompt_id), f"{prompt_id} done after {first!r:.80}")


def _done(message: str | bytes, prompt_id: str) -> bool:
    if isinstance(message, bytes):
        return False
    data = json.loads(message).get("data", {})
    return bool(data.get("prompt_id") == prompt_id and data.get("node", "") is None)


def _until(recv: Callable[..., Any], done: Callable[[Any], bool], what: str) -> None:
    # Each receive has its own deadline; the prompt's messages are few.
    for _ in range(1000):
        if done(recv(timeout=PROMPT_DEADLINE_S)):
            return
    raise AssertionError(f"not done: {what}")


# The gateway runs in this process, and its event loop uses the global `random` module (backoff
# jitter, ids) while Hypothesis draws in another thread: Hypothesis takes the module's moved state
# for a strategy's use of it, in some runs and not others.
@pytest.mark.filterwarnings(
    "ignore:Do not use the `random` module inside strategies"
    ":hypothesis.errors.HypothesisDeprecationWarning"
)
async def test_fuzzed_comfyui_routes_never_fail_or_hang(settings: Settings) -> None:
    async with running_system(settings) as system:
        await system.add_server("gpu1")
        # Hypothesis runs blocking tests: from a thread, while the gateway runs here.
        await asyncio.to_thread(_fuzz, system.url)
        async with httpx.AsyncClient(base_url=system.url, timeout=30) as http:
            health = await http.get("/health")
            assert health.status_code == 200, health.text
            target = Target(kind="single", url=system.url, keys={})
            async with socket(target, "after-fuzz") as ws:
                comfy = Comfy(http)
                prompt_id = await comfy.submit(tiny_workflow(7, "after_fuzz"), "after-fuzz")
                await ws.done(prompt_id)
                entry = await comfy.wait_history(prompt_id)
            assert entry["status"]["status_str"] == "success", entry["status"]
