"""Small ComfyUI clients, written the way scripts drive ComfyUI (from the protocol recordings).

`Comfy` is the HTTP half and `Socket` the websocket half. Every reply and every frame is checked
against the recorded shapes (shapes.py) as it arrives, so a test that uses them checks the wire
format without saying so.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import struct
import zlib
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import websockets
from websockets.asyncio.client import ClientConnection

from plugins.simulator.samples import tiny_workflow
from tests.helpers import poll_until
from tests.native import shapes

CALLERS = ("main", "alice", "bob")
# Prompts that must stay running or pending until the test lets them go are chains of this
# class; only it is slow. On the fleet, only server "a" has it (see conftest.py).
HOLD_CLASS = "ImageBlur"
# The same for a second caller's prompts that must run beside the first one's: only on "b".
OTHER_HOLD_CLASS = "ImageSharpen"
WORKFLOWS = Path(__file__).resolve().parents[1] / "data" / "comfyui-protocol" / "workflows"
WAIT_S = 20.0

_HOLD_INPUTS = {
    HOLD_CLASS: {"blur_radius": 1, "sigma": 1.0},
    OTHER_HOLD_CLASS: {"sharpen_radius": 1, "sigma": 1.0, "alpha": 1.0},
}
_numbers = itertools.count(1)


@dataclass(frozen=True)
class Target:
    """Where a ComfyUI script points: one fake ComfyUI, or the gateway in front of three."""

    kind: str
    url: str
    keys: Mapping[str, str]

    @property
    def fleet(self) -> bool:
        return self.kind == "fleet"

    def headers(self, caller: str = "main") -> dict[str, str]:
        """The caller's credentials: its API key on the fleet, nothing on a plain ComfyUI."""
        key = self.keys.get(caller)
        return {"Authorization": f"Bearer {key}"} if key else {}

    def basic_headers(self, caller: str = "main") -> dict[str, str]:
        """The same key as HTTP Basic credentials (the password; the user name is free)."""
        token = base64.b64encode(f"script:{self.keys[caller]}".encode()).decode()
        return {"Authorization": f"Basic {token}"}

    def ws_url(self, client_id: str, prefix: str = "") -> str:
        base = "ws" + self.url.removeprefix("http")
        return f"{base}{prefix}/ws?clientId={quote(client_id)}"

    def http(self, caller: str = "main", **headers: str) -> httpx.AsyncClient:
        merged = {**self.headers(caller), **headers}
        return httpx.AsyncClient(base_url=self.url, headers=merged, timeout=30, trust_env=False)

    def callers(self) -> tuple[str, ...]:
        """Callers whose view of the queue differs: one on ComfyUI, each key on the fleet."""
        return CALLERS if self.fleet else ("main",)


# --- workflows ---------------------------------------------------------------------------------


def unique(label: str) -> tuple[int, str]:
    """A number and a file prefix no other prompt of this run uses (so nothing is cached)."""
    n = next(_numbers)
    return n, f"{label}_{n}"


def tiny(label: str) -> dict[str, Any]:
    """EmptyImage → ImageInvert → SaveImage, never run before in this process."""
    seed, prefix = unique(label)
    return tiny_workflow(seed, prefix)


def hold(label: str, nodes: int = 100, slow_class: str = HOLD_CLASS) -> dict[str, Any]:
    """EmptyImage → `nodes` slow nodes → SaveImage ("1", "2"…, the SaveImage last)."""
    seed, prefix = unique(label)
    graph: dict[str, Any] = {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": seed},
        }
    }
    for index in range(2, nodes + 2):
        inputs = {"image": [str(index - 1), 0], **_HOLD_INPUTS[slow_class]}
        graph[str(index)] = {"class_type": slow_class, "inputs": inputs}
    save = {"images": [str(nodes + 1), 0], "filename_prefix": prefix}
    graph[str(nodes + 2)] = {"class_type": "SaveImage", "inputs": save}
    return graph


def image_size(label: str, size: int) -> dict[str, Any]:
    """EmptyImage → GetImageSize → ImageCrop to that size → SaveImage.

    GetImageSize ("2") runs only because ImageCrop uses its outputs, and sends a TEXT frame.
    """
    seed, prefix = unique(label)
    empty = {"width": size, "height": size, "batch_size": 1, "color": seed}
    crop = {"image": ["1", 0], "width": ["2", 0], "height": ["2", 1], "x": 0, "y": 0}
    return {
        "1": {"class_type": "EmptyImage", "inputs": empty},
        "2": {"class_type": "GetImageSize", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "ImageCrop", "inputs": crop},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": prefix}},
    }


def size_text(node_id: str, size: int) -> bytes:
    """ComfyUI's TEXT frame from GetImageSize of a size x size image, batch of one."""
    node = node_id.encode()
    text = f"width: {size}, height: {size}\n batch size: 1".encode()
    return struct.pack(">II", 3, len(node)) + node + text


def load_image(image: str, label: str, through: str | None = None) -> dict[str, Any]:
    """The recorded LoadImage workflow, reading `image` and saving under a fresh prefix.

    `through` puts a node of that (hold) class before the SaveImage: on the fleet only one
    server has it, so the prompt must run there.
    """
    graph: dict[str, Any] = json.loads((WORKFLOWS / "load_image.json").read_text())
    graph["1"]["inputs"]["image"] = image
    graph["3"]["inputs"]["filename_prefix"] = unique(label)[1]
    if through is not None:
        graph["4"] = {
            "class_type": through,
            "inputs": {"image": ["2", 0], **_HOLD_INPUTS[through]},
        }
        graph["3"]["inputs"]["images"] = ["4", 0]
    return graph


# --- PNG ---------------------------------------------------------------------------------------


def png(width: int, height: int, rgb: tuple[int, int, int]) -> bytes:
    """A solid-colour RGB PNG."""

    def chunk(name: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(name + payload) & 0xFFFFFFFF
        return struct.pack(">I", len(payload)) + name + payload + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    rows = (b"\x00" + bytes(rgb) * width) * height
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def png_facts(data: bytes) -> tuple[int, int, tuple[int, ...]]:
    """Width, height and the first pixel's first three channels of an 8-bit RGB(A) PNG.

    The first pixel of the first row is stored as is whatever the row's filter, so reading
    it needs no unfiltering.
    """
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    width, height, depth, colour = struct.unpack(">IIBB", data[16:26])
    assert depth == 8 and colour in (2, 6), f"bit depth {depth}, colour type {colour}"
    idat = b""
    offset = 8
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        name = data[offset + 4 : offset + 8]
        if name == b"IDAT":
            idat += data[offset + 8 : offset + 8 + length]
        offset += 12 + length
    rows = zlib.decompress(idat)
    return width, height, tuple(rows[1:4])


def inverted(rgb: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(255 - channel for channel in rgb)


def same_colour(got: tuple[int, ...], want: tuple[int, ...]) -> bool:
    """Equal within one step: ComfyUI computes in floats and truncates when it saves."""
    return len(got) == len(want) and all(abs(a - b) <= 1 for a, b in zip(got, want, strict=True))


# --- HTTP ----------------------------------------------------------------------------------------


class Comfy:
    """ComfyUI's HTTP API as a script uses it; every answer is checked against its shape."""

    def __init__(self, http: httpx.AsyncClient, prefix: str = "") -> None:
        self.http = http
        self.prefix = prefix  # "" or "/api": ComfyUI serves every route under both

    async def post_prompt(self, body: Any) -> httpx.Response:
        return await self.http.post(f"{self.prefix}/prompt", json=body)

    async def submit(
        self, prompt: dict[str, Any], client_id: str | None = None, **fields: Any
    ) -> str:
        """POST /prompt; the prompt_id of the accepted prompt."""
        body: dict[str, Any] = {"prompt": prompt, **fields}
        if client_id is not None:
            body["client_id"] = client_id
        reply = await self.post_prompt(body)
        assert reply.status_code == 200, reply.text
        accepted = shapes.accepted(reply.json())
        assert accepted["node_errors"] == {}, accepted
        prompt_id: str = accepted["prompt_id"]
        return prompt_id

    async def history(self, prompt_id: str) -> dict[str, Any] | None:
        """GET /history/{id}: the entry, or None while ComfyUI answers `{}`."""
        reply = await self.http.get(f"{self.prefix}/history/{quote(prompt_id)}")
        assert reply.status_code == 200, reply.text
        body = shapes.history(reply.json())
        if not body:
            return None
        assert list(body) == [prompt_id], f"history/{prompt_id} answered for {list(body)}"
        entry: dict[str, Any] = body[prompt_id]
        return entry

    async def wait_history(self, prompt_id: str) -> dict[str, Any]:
        """Poll GET /history/{id} until the prompt is there, as clients without a socket do."""
        found: dict[str, Any] = {}

        async def present() -> bool:
            entry = await self.history(prompt_id)
            if entry is not None:
                found["entry"] = entry
            return entry is not None

        await poll_until(present, f"history of {prompt_id}", within=WAIT_S)
        return found["entry"]

    async def all_history(self, **params: int) -> dict[str, dict[str, Any]]:
        reply = await self.http.get(f"{self.prefix}/history", params=params)
        assert reply.status_code == 200, reply.text
        return shapes.history(reply.json())

    async def history_action(self, body: dict[str, Any]) -> None:
        """POST /history with {"delete": [ids]} or {"clear": true}: 200, empty body."""
        reply = await self.http.post(f"{self.prefix}/history", json=body)
        assert (reply.status_code, reply.content) == (200, b""), reply.text

    async def queue(self) -> tuple[list[list[Any]], list[list[Any]]]:
        """GET /queue: (running, pending) items."""
        reply = await self.http.get(f"{self.prefix}/queue")
        assert reply.status_code == 200, reply.text
        return shapes.queue(reply.json())

    async def queue_remaining(self) -> int:
        reply = await self.http.get(f"{self.prefix}/prompt")
        assert reply.status_code == 200, reply.text
        return shapes.queue_remaining(reply.json())

    async def view(self, ref: Mapping[str, str]) -> bytes:
        """GET /view of a file named by history, an `executed` message or an upload."""
        params = {"filename": ref["filename"], "subfolder": ref["subfolder"], "type": ref["type"]}
        reply = await self.http.get(f"{self.prefix}/view", params=params)
        assert reply.status_code == 200, f"/view {params}: {reply.status_code}"
        assert reply.headers["content-type"] == "image/png", reply.headers
        return reply.content

    async def view_headers(self, ref: Mapping[str, str]) -> httpx.Headers:
        """HEAD /view: the headers GET would send, without the body."""
        params = {"filename": ref["filename"], "subfolder": ref["subfolder"], "type": ref["type"]}
        reply = await self.http.head(f"{self.prefix}/view", params=params)
        assert reply.status_code == 200, f"HEAD /view {params}: {reply.status_code}"
        assert reply.content == b""
        return reply.headers

    async def upload(self, name: str, data: bytes, **form: str) -> dict[str, Any]:
        """POST /upload/image (multipart: the file as `image`, plus subfolder/overwrite/type)."""
        files = {"image": (name, data, "image/png")}
        reply = await self.http.post(f"{self.prefix}/upload/image", files=files, data=form)
        assert reply.status_code == 200, reply.text
        body = shapes.ordered(reply.json(), ("name", "subfolder", "type"), "upload reply")
        return body

    async def interrupt(self, prompt_id: str | None = None) -> None:
        """POST /interrupt: targeted with a prompt_id, else with an empty body."""
        if prompt_id is None:
            reply = await self.http.post(f"{self.prefix}/interrupt")
        else:
            reply = await self.http.post(f"{self.prefix}/interrupt", json={"prompt_id": prompt_id})
        assert reply.status_code == 200, reply.text

    async def queue_action(self, body: dict[str, Any]) -> None:
        """POST /queue with {"delete": [ids]} or {"clear": true}: 200, empty body."""
        reply = await self.http.post(f"{self.prefix}/queue", json=body)
        assert (reply.status_code, reply.content) == (200, b""), reply.text


async def settle(target: Target) -> None:
    """Leave nothing pending or running for the next test: clear, interrupt, wait until idle."""
    for caller in target.callers():
        async with target.http(caller) as http:
            comfy = Comfy(http)

            async def idle(comfy: Comfy = comfy) -> bool:
                running, pending = await comfy.queue()
                if not running and not pending:
                    return True
                await comfy.queue_action({"clear": True})
                await comfy.interrupt()
                return False

            await poll_until(idle, f"an idle queue for {caller}", within=WAIT_S, every=0.1)


# --- websocket -----------------------------------------------------------------------------------


def is_done(prompt_id: str) -> Callable[[dict[str, Any]], bool]:
    """The "done" signal: `executing` with node null for that prompt."""
    return lambda m: (
        m["type"] == "executing"
        and m["data"]["node"] is None
        and m["data"].get("prompt_id") == prompt_id
    )


def of_prompt(message: dict[str, Any], prompt_id: str) -> bool:
    return bool(message["data"].get("prompt_id") == prompt_id)


class Socket:
    """A /ws connection's received frames, validated and kept in order of arrival."""

    def __init__(self, conn: ClientConnection, client_id: str) -> None:
        self.conn = conn
        self.client_id = client_id
        self.messages: list[dict[str, Any]] = []
        self.binary: list[bytes] = []
        self.problems: list[str] = []
        self.closed = False
        self._changed = asyncio.Condition()

    async def read(self) -> None:
        try:
            async for frame in self.conn:
                if isinstance(frame, bytes):
                    self._binary(frame)
                else:
                    self._text(frame)
                async with self._changed:
                    self._changed.notify_all()
        except websockets.ConnectionClosed as exc:
            self.problems.append(f"the socket closed: {exc}")
        finally:
            self.closed = True
            async with self._changed:
                self._changed.notify_all()

    def _text(self, frame: str) -> None:
        try:
            message = shapes.ws_message(json.loads(frame), first=not self.messages)
        except (shapes.ShapeError, ValueError) as exc:
            self.problems.append(f"{exc} in {frame[:300]}")
            return
        self.messages.append(message)

    def _binary(self, frame: bytes) -> None:
        # 1 preview, 3 text, 4 preview with metadata: only the event type is checked here.
        event = struct.unpack(">I", frame[:4])[0] if len(frame) >= 4 else None
        if event not in (1, 3, 4):
            self.problems.append(f"binary frame of unknown event type {event}")
        self.binary.append(frame)

    def check(self) -> None:
        assert not self.problems, "\n".join(self.problems)

    async def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], what: str, within: float = WAIT_S
    ) -> dict[str, Any]:
        """The first message so far or from now on that satisfies `predicate`."""
        found: list[dict[str, Any]] = []

        def seen() -> bool:
            found.extend(m for m in self.messages if predicate(m))
            return bool(found)

        await self._until(seen, what, within)
        return found[0]

    async def wait_binary(self, wanted: bytes, what: str, within: float = WAIT_S) -> None:
        """Until this very binary frame has come."""
        await self._until(lambda: wanted in self.binary, what, within)

    async def _until(self, condition: Callable[[], bool], what: str, within: float) -> None:
        try:
            async with asyncio.timeout(within), self._changed:
                while True:
                    self.check()
                    if condition():
                        return
                    if self.closed:
                        raise AssertionError(f"{self.client_id}: closed before {what}")
                    await self._changed.wait()
        except TimeoutError:
            seen = [m["type"] for m in self.messages]
            message = f"{self.client_id}: not within {within} s: {what}; saw {seen}"
            raise AssertionError(message) from None

    async def done(self, prompt_id: str) -> list[dict[str, Any]]:
        """Wait for the prompt's `executing` null; its messages, status frames in between kept.

        The slice runs from its first message to the done signal, so `status` frames that
        came meanwhile are in it.
        """
        end = self.messages.index(await self.wait_for(is_done(prompt_id), f"{prompt_id} done"))
        start = next(i for i, m in enumerate(self.messages) if of_prompt(m, prompt_id))
        return [
            m
            for m in self.messages[start : end + 1]
            if of_prompt(m, prompt_id) or m["type"] == "status"
        ]

    def prompt_ids(self) -> set[str]:
        """Every prompt this socket has heard of."""
        return {m["data"]["prompt_id"] for m in self.messages if "prompt_id" in m["data"]}


@contextlib.asynccontextmanager
async def socket(
    target: Target,
    client_id: str,
    caller: str = "main",
    headers: Mapping[str, str] | None = None,
    prefix: str = "",
) -> AsyncIterator[Socket]:
    """A /ws?clientId= connection (under `prefix`) with the caller's credentials (or
    `headers`), read in the background.

    It yields once the first frame has come: `status` carrying `sid` == the clientId.
    """
    async with websockets.connect(
        target.ws_url(client_id, prefix),
        additional_headers=target.headers(caller) if headers is None else dict(headers),
        proxy=None,
        max_size=None,
    ) as conn:
        sock = Socket(conn, client_id)
        reader = asyncio.create_task(sock.read())
        try:
            first = await sock.wait_for(lambda m: True, "the first frame")
            assert first["type"] == "status", first
            assert first["data"].get("sid") == client_id, first
            yield sock
            sock.check()
        finally:
            await conn.close()
            await reader
