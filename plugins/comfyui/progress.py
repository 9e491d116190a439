"""The one websocket an adapter keeps open to its ComfyUI server, and the routing of its messages.

ComfyUI sends a prompt's messages only to the socket registered under the prompt's client id.
Two traps decide how this follower reconnects (see the protocol notes): a second socket with the
same clientId steals the first one's messages, and when the older socket is finally closed the
server unregisters the newer one too, which then hears nothing at all. So every connection gets
a fresh client id; prompts submitted under an earlier id lose their messages, and their runners
are told (`Lost`) so they follow them by polling /history and /queue instead.

An image frame of a watched prompt goes first to the watch's `on_image`, which stores it if it
is an output (an image of a SaveImageWebsocket node); the read loop waits for that, so no more
than one frame is held, and the stored image takes its place among the prompt's messages.
Other binary frames go to `on_preview`, to be published for the gateways: previews with
metadata (type 4) as the server sent them, and TEXT frames (type 3), which name only a node,
wrapped with the prompt running at the time (`text_with_prompt`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Final

import msgspec
import websockets
from websockets.asyncio.client import ClientConnection, connect

from gateway.bus.contract import OutputFile
from gateway.comfyui.urls import ws_url
from plugins.comfyui.images import FrameImage, frame_image
from plugins.comfyui.messages import (
    Executing,
    ExecutionError,
    ExecutionInterrupted,
    ExecutionStart,
    ExecutionSuccess,
    Status,
    WsMessage,
    decode_ws,
    prompt_of,
)

log = logging.getLogger(__name__)


PREVIEW_FLAGS: Final = '{"type":"feature_flags","data":{"supports_preview_metadata":true}}'
PREVIEW_WITH_METADATA: Final = (4).to_bytes(4, "big")
TEXT: Final = (3).to_bytes(4, "big")


def text_with_prompt(prompt_id: str, frame: bytes) -> bytes:
    """ComfyUI's TEXT frame with the prompt it belongs to, laid out as a type 4 frame is.

    Event type 3, a 4-byte JSON length, `{"prompt_id": ...}`, then the frame as the server sent
    it (type 3, node id length, node id, text): a gateway can tell whose text it is, and pass
    the server's frame on unchanged.
    """
    metadata = msgspec.json.encode({"prompt_id": prompt_id})
    return TEXT + len(metadata).to_bytes(4, "big") + metadata + frame


class Lost:
    """Marker: the socket this prompt's messages would come on is gone; poll instead."""


class Nudge:
    """Marker: something asked the runner to look at its state again (cancel, hand back)."""


class StoredImage(msgspec.Struct, frozen=True):
    """An image the prompt sent over the websocket, stored as an output."""

    output: OutputFile


LOST = Lost()
NUDGE = Nudge()
Item = WsMessage | Lost | Nudge | StoredImage
# Stores an image frame if it is one of the prompt's outputs; None when it is not one (or
# could not be stored: the attempt then fails).
ImageTaker = Callable[[FrameImage, bytes], Awaitable[OutputFile | None]]


class Watch:
    """The messages of one prompt, in arrival order."""

    def __init__(self, prompt_id: str, live: bool) -> None:
        self.prompt_id = prompt_id
        self.on_image: ImageTaker | None = None
        self.missed = False
        """Whether some of the prompt's messages (and images) may have gone unheard."""
        self._live = False
        # False when no socket was open at registration: nothing will arrive, poll from the start.
        self.live = live
        self._queue: asyncio.Queue[Item] = asyncio.Queue()

    @property
    def live(self) -> bool:
        """Whether the prompt's messages arrive on the socket (else it is polled)."""
        return self._live

    @live.setter
    def live(self, live: bool) -> None:
        self._live = live
        self.missed = self.missed or not live

    def put(self, item: Item) -> None:
        if isinstance(item, Lost):
            self.live = False
        self._queue.put_nowait(item)

    async def get(self) -> Item:
        return await self._queue.get()


class Follower:
    """Keeps one websocket open (reconnecting with backoff) and routes messages by prompt id."""

    def __init__(
        self,
        address: str,
        *,
        on_status: Callable[[int], None] | None = None,
        on_preview: Callable[[bytes], Awaitable[None]] | None = None,
        backoff_max: float = 5.0,
        open_timeout: float = 5.0,
    ) -> None:
        self.address = address
        self.connected = asyncio.Event()
        self.connections = 0
        self._client_id = uuid.uuid4().hex
        self._on_status = on_status
        self._on_preview = on_preview
        self._backoff_max = backoff_max
        self._open_timeout = open_timeout
        self._watches: dict[str, Watch] = {}
        # The prompt ComfyUI is running for this client id, and its node executing: a TEXT
        # frame names no prompt, nor a type 1 image frame its node, and the server runs one
        # at a time.
        self._running: str | None = None
        self._executing: str | None = None
        self._socket: ClientConnection | None = None
        self._closing: set[asyncio.Task[None]] = set()

    @property
    def client_id(self) -> str:
        """The client id of the current (or next) connection: submit prompts with it."""
        return self._client_id

    def watch(self, prompt_id: str) -> Watch:
        """Start routing `prompt_id`'s messages; register BEFORE submitting the prompt.

        Messages can arrive before POST /prompt has answered, and the prompt id is known in
        advance (derived from the job), so nothing is missed.
        """
        watch = Watch(prompt_id, live=self.connected.is_set())
        self._watches[prompt_id] = watch
        return watch

    def unwatch(self, prompt_id: str) -> None:
        self._watches.pop(prompt_id, None)

    def reconnect(self, reason: str) -> None:
        """Drop the current socket and open a new one (it looks alive but delivers nothing)."""
        socket = self._socket
        if socket is not None:
            log.warning("websocket to %s: reconnecting (%s)", self.address, reason)
            task = asyncio.get_running_loop().create_task(socket.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def run(self) -> None:
        """Connect, follow, reconnect; until cancelled."""
        delay = 0.1
        while True:
            self._client_id = uuid.uuid4().hex
            url = ws_url(self.address, self._client_id)
            try:
                async with connect(
                    url,
                    open_timeout=self._open_timeout,
                    # ComfyUI never pings; our pings make a dead peer show up as an error
                    # instead of silence.
                    ping_interval=10,
                    ping_timeout=10,
                    close_timeout=1,
                    max_size=64 * 1024 * 1024,
                    # An image frame is stored before the next frame is taken; the library
                    # reads at most one more meanwhile, so a slow storage holds two at most.
                    max_queue=1,
                ) as socket:
                    delay = 0.1
                    await self._follow(socket)
            except (OSError, TimeoutError, websockets.WebSocketException) as exc:
                log.info("websocket to %s: %s: %s", self.address, type(exc).__name__, exc)
            finally:
                self._disconnected()
            await asyncio.sleep(delay)
            delay = min(self._backoff_max, delay * 2)

    async def _follow(self, socket: ClientConnection) -> None:
        self._socket = socket
        self.connections += 1
        self.connected.set()
        log.info("websocket to %s open (client id %s)", self.address, self._client_id)
        if self._on_preview is not None:
            # Previews then come with their prompt and node (binary type 4); only a first
            # message may ask for that.
            await socket.send(PREVIEW_FLAGS)
        async for frame in socket:
            if isinstance(frame, bytes):
                await self._binary(frame)
                continue
            message = decode_ws(frame)
            if message is None:
                continue
            self._note_running(message)
            if isinstance(message, Status):
                if self._on_status is not None:
                    self._on_status(message.data.status.exec_info.queue_remaining)
                continue
            prompt_id = prompt_of(message)
            watch = self._watches.get(prompt_id) if prompt_id is not None else None
            if watch is not None:
                watch.put(message)

    async def _binary(self, frame: bytes) -> None:
        if await self._output(frame):
            return
        if self._on_preview is None:
            return
        if frame[:4] == PREVIEW_WITH_METADATA:
            await self._on_preview(frame)
        elif frame[:4] == TEXT and self._running is not None:
            # ComfyUI sends TEXT to every socket; with none of our prompts running, it is
            # another client's.
            await self._on_preview(text_with_prompt(self._running, frame))

    async def _output(self, frame: bytes) -> bool:
        """Store the frame's image if it is an output of a watched prompt; whether it was."""
        image = frame_image(frame, self._running, self._executing)
        watch = self._watches.get(image.prompt_id) if image is not None else None
        if image is None or watch is None or watch.on_image is None:
            return False
        output = await watch.on_image(image, frame)
        if output is None:
            return False
        watch.put(StoredImage(output))
        return True

    def _note_running(self, message: WsMessage) -> None:
        """Follow which of our prompts runs (execution_start ... executing null or an end),
        and which of its nodes executes."""
        match message:
            case ExecutionStart(data=data):
                self._running = data.prompt_id
                self._executing = None
            case Executing(data=data) if data.prompt_id is not None:
                if data.node is not None:
                    self._running = data.prompt_id
                    self._executing = data.node
                elif data.prompt_id == self._running:
                    self._running = self._executing = None
            case ExecutionSuccess() | ExecutionError() | ExecutionInterrupted():
                # Interruptions of prompts without a client id are broadcast: only ours count.
                if message.data.prompt_id == self._running:
                    self._running = self._executing = None

    def _disconnected(self) -> None:
        was_connected = self.connected.is_set()
        self._running = self._executing = None
        self._socket = None
        self.connected.clear()
        if was_connected:
            log.warning(
                "websocket to %s closed; prompts in flight are followed by polling", self.address
            )
        for watch in list(self._watches.values()):
            watch.put(LOST)

    async def close(self) -> None:
        """Close the socket (the run task is cancelled by its owner)."""
        socket = self._socket
        if socket is not None:
            with contextlib.suppress(websockets.WebSocketException, OSError):
                await socket.close()
