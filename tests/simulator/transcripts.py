"""Replaying the recorded ComfyUI transcripts against the simulator, and comparing.

A transcript is replayed action by action (HTTP requests, websocket connects, sends, closes) in
the order of their recorded send time. Before each action the replayer waits, with a deadline,
until every open socket has received as many frames as the recording shows before that moment,
so timing-dependent scenarios (interrupts, late joins) line up without sleeping.

Comparison is strict: status codes, header sets and content types, JSON bodies, and for each
socket the whole frame sequence, type by type and field by field. Only volatile values are
normalised first: ids (mapped back to the recorded ones), timestamps, paths, set orders, and
(after the recording's gaps) file counters.
"""

from __future__ import annotations

import asyncio
import json
import re
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import websockets
from websockets.asyncio.client import ClientConnection

from plugins.simulator import SimulatorConfig

DATA = Path(__file__).resolve().parent.parent / "data" / "comfyui-protocol"
TIMESTAMP_KEYS = {"timestamp", "create_time", "execution_start_time", "execution_end_time"}
SET_KEYS = {"executed", "current_outputs"}  # Python sets upstream: their order is arbitrary
VOLATILE_KEYS = {
    "ram_total",
    "ram_free",
    "vram_total",
    "vram_free",
    "torch_vram_total",
    "torch_vram_free",
    "python_version",
    "argv",
}
# Endpoints whose bodies depend on the machine or on files the simulator does not ship.
LOOSE_PATHS = {"/", "/internal/logs", "/extensions", "/internal/folder_paths"}
COMPARED_HEADERS = {"content-type", "content-disposition", "accept-ranges", "transfer-encoding"}
IGNORED_HEADERS = {"date", "server", "content-length", "etag", "last-modified"}

# Scenarios in the order they were recorded on one server, and what each one needs.
SESSION = [
    "http_basic",
    "ws_tiny",
    "ws_tiny_cached",
    "ws_tiny_partially_cached",
    "ws_cache_eviction",
    "ws_heavy",
    "ws_heavy_feature_flags",
    "ws_two_outputs",
    "ws_runtime_error",
    "ws_runtime_error_repeat",
    "ws_interrupt",
    "ws_two_clients",
    "ws_late_join",
    "queue_multi",
    "upload_image",
    "prompt_options",
    "validation_errors",
    "http_only_polling",
    "history_admin",
    "ws_no_clientid_query",
    "ws_no_client_id_broadcast",
    "ws_two_clients_heavy",
]
# Other prompts ran on the recorded server before these (timing runs): file counters differ.
AFTER_GAP = {"ws_no_clientid_query", "ws_no_client_id_broadcast", "ws_two_clients_heavy"}
# Requests whose effect on the real server came only after earlier messages had all gone out
# (the recorder sent them while the previous prompt was finishing): sync on the response time.
SYNC_ON_RESPONSE = {("prompt_options", 0.3202)}
# Bursts of requests the recorded server answered before its first prompt ran its nodes (it
# took ~35 ms to start): the replay holds the simulator's setup from the first request to the
# last, which a loaded machine may take longer than the simulator's setup time to send.
HOLD_SETUP = {"queue_multi": (0.0037, 0.0241)}
BOUNDARY = "replayboundary"
# The recorded client polled these until they were not empty; the replay does the same.
POLLED = {("http_only_polling", "/history/")}
POLL_INTERVAL = 0.01
TEMP_NAME = re.compile(r"ComfyUI_temp_[a-z]{5}_(\d{5})_\.png")


def replay_config(base_dir: Path) -> SimulatorConfig:
    """Timings that let the recorded interrupts and late joins land inside the same node."""
    return SimulatorConfig(
        base_dir=str(base_dir),
        models={},
        setup_seconds=0.03,
        class_seconds={"ImageAddNoise": 0.15, "ImageBlur": 0.3, "ImageSharpen": 0.15},
    )


def load(name: str) -> list[dict[str, Any]]:
    with (DATA / f"{name}.jsonl").open() as file:
        return [json.loads(line) for line in file]


def png_size(data: bytes) -> dict[str, Any]:
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return {"format": "not-png"}
    width, height, _, color_type = struct.unpack(">IIBB", data[16:26])
    return {"format": "PNG", "size": [width, height], "mode": {2: "RGB", 6: "RGBA"}[color_type]}


def decode_binary(frame: bytes) -> dict[str, Any]:
    (event,) = struct.unpack(">I", frame[:4])
    if event == 1:
        (fmt,) = struct.unpack(">I", frame[4:8])
        return {"event_type": 1, "image_format_code": fmt, "image": png_size(frame[8:])}
    if event == 3:
        (size,) = struct.unpack(">I", frame[4:8])
        node = frame[8 : 8 + size].decode()
        return {"event_type": 3, "node_id": node, "text": frame[8 + size :].decode()}
    if event == 4:
        (size,) = struct.unpack(">I", frame[4:8])
        metadata = json.loads(frame[8 : 8 + size])
        return {"event_type": 4, "metadata": metadata, "image": png_size(frame[8 + size :])}
    return {"event_type": event}


def recorded_binary(info: dict[str, Any]) -> dict[str, Any]:
    """The same fields as decode_binary, from the recording's decoded frame."""
    event = info["event_type"]
    if event == 1:
        image = info["image"]
        return {"event_type": 1, "image_format_code": info["image_format_code"], "image": image}
    if event == 3:
        return {"event_type": 3, "node_id": info["node_id"], "text": info["text"]}
    if event == 4:
        return {"event_type": 4, "metadata": info["metadata"], "image": info["image"]}
    return {"event_type": event}


def upload_content(size: int) -> bytes:
    """A distinct small PNG per recorded file size (the recording kept sizes, not bytes)."""
    color = bytes(((size * 37) % 256, (size * 91) % 256, (size * 53) % 256))
    raw = (b"\x00" + color * 32) * 24
    ihdr = struct.pack(">IIBBBBB", 32, 24, 8, 2, 0, 0, 0)

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


@dataclass
class Normaliser:
    """Turns volatile values into placeholders so the rest can be compared strictly."""

    ids: dict[str, str] = field(default_factory=dict)
    """actual id -> recorded id (prompt ids and server-assigned sids)."""
    paths: dict[str, str] = field(default_factory=dict)
    counters: bool = False

    def text(self, value: str) -> str:
        value = self.ids.get(value, value)
        for actual, recorded in self.paths.items():
            value = value.replace(actual, recorded)
        value = re.sub(r"ComfyUI_temp_[a-z]{5}_", "ComfyUI_temp_<rand>_", value)
        if self.counters:
            value = re.sub(r"_\d{5}_\.png", "_<n>_.png", value)
        return value

    def __call__(self, value: Any, key: str | None = None) -> Any:
        if key in TIMESTAMP_KEYS and isinstance(value, int):
            return "<timestamp>"
        if key in VOLATILE_KEYS:
            return f"<{type(value).__name__}>"
        if isinstance(value, dict):
            return {self.text(k): self(v, k) for k, v in value.items()}
        if isinstance(value, list):
            items = [self(v) for v in value]
            if key in SET_KEYS:
                items = sorted(items, key=json.dumps)
            return items
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, float):
            return ("float", value)  # 1 and 1.0 differ on the wire; keep them apart
        return value


def first_difference(expected: Any, actual: Any, where: str = "") -> str | None:
    """Where two normalised values differ first, or None."""
    if type(expected) is not type(actual):
        return f"{where}: type {type(expected).__name__} != {type(actual).__name__}"
    if isinstance(expected, dict):
        if list(expected) != list(actual):
            return f"{where}: keys {list(expected)} != {list(actual)}"
        for k in expected:
            diff = first_difference(expected[k], actual[k], f"{where}.{k}")
            if diff:
                return diff
        return None
    if isinstance(expected, list):
        for i, (e, a) in enumerate(zip(expected, actual, strict=False)):
            diff = first_difference(e, a, f"{where}[{i}]")
            if diff:
                return diff
        if len(expected) != len(actual):
            return f"{where}: {len(expected)} items != {len(actual)}"
        return None
    return None if expected == actual else f"{where}: {expected!r} != {actual!r}"


def _summary(frame: Any) -> str:
    if isinstance(frame, dict) and "type" in frame:
        data = frame.get("data")
        node = data.get("node") if isinstance(data, dict) else None
        return f"{frame['type']}({node})" if node is not None else str(frame["type"])
    return f"binary{frame}"


def compare_frames(expected: list[Any], actual: list[Any]) -> str | None:
    """Compare two normalised frame sequences; a readable report of the first difference."""
    for index, (e, a) in enumerate(zip(expected, actual, strict=False)):
        diff = first_difference(e, a, f"frame[{index}]")
        if diff:
            context = ", ".join(_summary(f) for f in expected[max(0, index - 2) : index + 3])
            got = ", ".join(_summary(f) for f in actual[max(0, index - 2) : index + 3])
            return f"{diff}\n  expected around: {context}\n  actual around:   {got}"
    if len(expected) != len(actual):
        extra = expected[len(actual) :] or actual[len(expected) :]
        which = "missing" if len(expected) > len(actual) else "unexpected"
        return f"{which} frames: {[_summary(f) for f in extra]}"
    return None


@dataclass
class Client:
    ws: ClientConnection
    frames: list[Any] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    reader: asyncio.Task[None] | None = None

    async def read(self) -> None:
        try:
            async for frame in self.ws:
                if isinstance(frame, bytes):
                    self.frames.append(decode_binary(frame))
                else:
                    self.frames.append(json.loads(frame))
                self.changed.set()
        except websockets.ConnectionClosed:
            pass  # the replay closed it, or the server dropped it: frames so far count
        finally:
            self.changed.set()


class Replay:
    """Replays transcripts against one simulator; collects differences instead of raising."""

    def __init__(
        self,
        url: str,
        base_dir: Path,
        next_number: Callable[[], int],
        deadline: float = 5.0,
        hold_setup: Callable[[bool], None] = lambda _: None,
    ) -> None:
        self.url = url
        self.hold_setup = hold_setup
        self.ws_url = url.replace("http://", "ws://")
        self.base_dir = str(base_dir)
        self.next_number = next_number
        self.deadline = deadline
        self.problems: list[str] = []
        self.seen: dict[str, str] = {}  # recorded id -> actual id
        self._first_frames: dict[str, Any] = {}
        self._scenario = ""

    def _actual(self, value: Any) -> Any:
        """Recorded ids in a request replaced by the actual ones."""
        if isinstance(value, str):
            return self.seen.get(value, value)
        if isinstance(value, dict):
            return {self._actual(k): self._actual(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self._actual(v) for v in value]
        return value

    def _path(self, path: str) -> str:
        for recorded, actual in self.seen.items():
            path = path.replace(recorded, actual)
        return TEMP_NAME.sub(self._temp_name, path)

    def _temp_name(self, match: re.Match[str]) -> str:
        # PreviewImage names carry 5 random letters: use the file the simulator wrote.
        folder = Path(self.base_dir) / "comfy-temp"
        found = sorted(folder.glob(f"ComfyUI_temp_?????_{match.group(1)}_.png"))
        return found[-1].name if found else match.group(0)

    def normaliser(self, counters: bool) -> Normaliser:
        ids = {actual: recorded for recorded, actual in self.seen.items()}
        return Normaliser(ids, {self.base_dir: "/srv"}, counters)

    async def play(self, name: str, check: bool = True) -> list[str]:
        """Replay one scenario; returns the differences found (empty when it conforms)."""
        self.problems = []
        self._scenario = name
        events = load(name)
        await self._advance_counter(events)
        expected: dict[str, list[tuple[float, Any]]] = {}
        for event in events:
            if event["kind"] == "ws":
                frame = event.get("msg") or recorded_binary(event.get("binary", {}))
                expected.setdefault(event["client"], []).append((event["t"], frame))
        actions = sorted(
            (e for e in events if e["kind"] in ("http", "ws_connect", "ws_sent", "ws_closed")),
            key=lambda e: e["t"],
        )
        self._first_frames = {name: frames[0][1] for name, frames in expected.items() if frames}
        clients: dict[str, Client] = {}
        closed: dict[str, Client] = {}
        async with httpx.AsyncClient(base_url=self.url, timeout=self.deadline) as http:
            try:
                held = HOLD_SETUP.get(name)
                for action in actions:
                    sync = action["t"]
                    if (name, action["t"]) in SYNC_ON_RESPONSE:
                        sync = action["t_response"]
                    await self._sync(name, clients, expected, sync)
                    if held is not None and action["t"] == held[0]:
                        self.hold_setup(True)
                    await self._act(action, http, clients, closed, check)
                    if held is not None and action["t"] == held[1]:
                        self.hold_setup(False)
                await self._sync(name, clients, expected, float("inf"))
            finally:
                self.hold_setup(False)
                for client_name, client in list(clients.items()):
                    await client.ws.close()
                    if client.reader is not None:
                        await client.reader
                    closed[client_name] = client
        if check:
            normalise = self.normaliser(name in AFTER_GAP)
            for client_name, frames in expected.items():
                got = closed[client_name].frames if client_name in closed else []
                diff = compare_frames(
                    [normalise(f) for _, f in frames], [normalise(f) for f in got]
                )
                if diff:
                    self.problems.append(f"{name} client {client_name}: {diff}")
        return self.problems

    async def _advance_counter(self, events: list[dict[str, Any]]) -> None:
        # The recording skipped prompts run by other tools; rejected prompts advance the
        # counter too, so sending a few empty ones lines the numbers up without side effects.
        for event in events:
            body = event.get("body_json")
            if event["kind"] == "http" and event["path"].endswith("/prompt") and body:
                number = body.get("number") if isinstance(body, dict) else None
                if isinstance(number, int) and number > self.next_number():
                    async with httpx.AsyncClient(base_url=self.url) as http:
                        while self.next_number() < number:
                            await http.post("/prompt", json={"prompt": {}})
                return

    async def _sync(
        self,
        name: str,
        clients: dict[str, Client],
        expected: dict[str, list[tuple[float, Any]]],
        until: float,
    ) -> None:
        for client_name, client in clients.items():
            want = sum(1 for t, _ in expected.get(client_name, []) if t < until)
            try:
                async with asyncio.timeout(self.deadline):
                    while len(client.frames) < want and not client.ws.close_code:
                        client.changed.clear()
                        await client.changed.wait()
            except TimeoutError:
                self.problems.append(
                    f"{name} client {client_name}: waited for {want} frames, got "
                    f"{len(client.frames)}: {[_summary(f) for f in client.frames[-5:]]}"
                )

    async def _act(
        self,
        action: dict[str, Any],
        http: httpx.AsyncClient,
        clients: dict[str, Client],
        closed: dict[str, Client],
        check: bool,
    ) -> None:
        kind = action["kind"]
        if kind == "ws_connect":
            ws = await websockets.connect(self.ws_url + self._path(action["url"]), max_size=None)
            client = Client(ws)
            client.reader = asyncio.create_task(client.read())
            clients[action["client"]] = client
            if "clientId" not in action["url"]:
                await self._learn_sid(client, self._first_frames.get(action["client"]))
        elif kind == "ws_sent":
            await clients[action["client"]].ws.send(json.dumps(self._actual(action["msg"])))
        elif kind == "ws_closed":
            client = clients.pop(action["client"])
            await client.ws.close()
            if client.reader is not None:
                await client.reader
            closed[action["client"]] = client
        else:
            await self._http(action, http, check)

    async def _learn_sid(self, client: Client, recorded: Any) -> None:
        """Map the sid the recorded server assigned to the one the simulator assigned."""
        async with asyncio.timeout(self.deadline):
            while not client.frames:
                client.changed.clear()
                await client.changed.wait()
        if isinstance(recorded, dict):
            self.seen[recorded["data"]["sid"]] = client.frames[0]["data"]["sid"]

    async def _http(self, action: dict[str, Any], http: httpx.AsyncClient, check: bool) -> None:
        method, path = action["method"], self._path(action["path"])
        kwargs: dict[str, Any] = {}
        if "request_json" in action:
            kwargs["json"] = self._actual(action["request_json"])
        elif "request_raw" in action:
            kwargs["content"] = action["request_raw"].encode()
        elif "request_desc" in action:
            files, data = {}, {}
            for text in action["request_desc"]["multipart_fields"]:
                match = re.match(r"(\w+) \(file: (.+), (\d+) bytes, (.+)\)", text)
                if match:
                    content = upload_content(int(match.group(3)))
                    files[match.group(1)] = (match.group(2), content, match.group(4))
                else:
                    key, _, value = text.partition("=")
                    data[key] = value
            if files:
                kwargs["files"] = files
                kwargs["data"] = data
            else:  # httpx sends multipart only with a file: write the form by hand
                body = "".join(
                    f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'
                    for k, v in data.items()
                )
                kwargs["content"] = (body + f"--{BOUNDARY}--\r\n").encode()
                kwargs["headers"] = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
        response = await http.request(method, path, **kwargs)
        if any(name == self._scenario and marker in path for name, marker in POLLED):
            async with asyncio.timeout(self.deadline):
                while response.status_code == 200 and response.json() == {}:
                    await asyncio.sleep(POLL_INTERVAL)
                    response = await http.request(method, path, **kwargs)
        recorded = action.get("body_json")
        if (
            action["path"].endswith("/prompt")
            and method == "POST"
            and isinstance(recorded, dict)
            and "prompt_id" in recorded
            and response.status_code == 200
        ):
            self.seen[recorded["prompt_id"]] = response.json()["prompt_id"]
        if check:
            self._check_http(action, response)

    def _check_http(self, action: dict[str, Any], response: httpx.Response) -> None:
        where = f"{action['method']} {action['path']}"
        if response.status_code != action["status"]:
            self.problems.append(f"{where}: status {action['status']} != {response.status_code}")
            return
        want = {k.lower(): v for k, v in action["response_headers"].items()}
        got = {k.lower(): v for k, v in response.headers.items()}
        path = action["path"].split("?")[0].removeprefix("/api")
        if "preview=" in action["path"]:
            return  # WebP previews are not simulated (no image codec without Pillow)
        want_names = {k for k in want if k not in IGNORED_HEADERS}
        got_names = {k for k in got if k not in IGNORED_HEADERS}
        if path not in LOOSE_PATHS:
            if want_names - {"cache-control", "pragma", "expires"} != got_names:
                self.problems.append(
                    f"{where}: headers {sorted(want_names)} != {sorted(got_names)}"
                )
            texts = self.normaliser(False).text
            for name in COMPARED_HEADERS & want_names:
                if texts(want[name]) != texts(got.get(name, "")):
                    self.problems.append(f"{where}: {name} {want[name]!r} != {got.get(name)!r}")
            if "etag" in want and "etag" not in got:
                self.problems.append(f"{where}: no Etag")
        elif want.get("content-type") != got.get("content-type"):
            self.problems.append(f"{where}: content-type {want.get('content-type')!r}")
        normalise = self.normaliser(False)
        if "body_json" in action:
            if path in LOOSE_PATHS:
                same = type(action["body_json"]) is type(response.json())
                diff = None if same else "body type differs"
            else:
                diff = first_difference(normalise(action["body_json"]), normalise(response.json()))
            if diff:
                self.problems.append(f"{where}: body {diff}")
        elif "body_text" in action:
            if response.text != action["body_text"]:
                self.problems.append(f"{where}: body {action['body_text']!r} != {response.text!r}")
        elif "body_image" in action and action["method"] == "GET":
            image = png_size(response.content)
            if image != {k: action["body_image"][k] for k in ("format", "size", "mode")}:
                self.problems.append(f"{where}: image {action['body_image']} != {image}")
