"""The ComfyUI-compatible `/ws` sockets of one gateway and what each is sent.

ComfyUI routes a prompt's messages to the socket registered under the prompt's client id, and
broadcasts `status` to every socket. Here "every socket" means every socket of the same caller
(API key), so no caller hears of another's work. Events reach this process on one subscription
to all job events, held only while at least one socket is open; those of a prompt this gateway
does not know yet wait for it a moment (early.py).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Final

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from gateway.api.native.early import EarlyEvents
from gateway.api.native.history import HistoryReader
from gateway.api.native.messages import Outgoing, PromptRelay
from gateway.api.native.prompts import Entry, PromptIndex
from gateway.contract import (
    TERMINAL_EVENTS,
    Cancelled,
    ContractError,
    Retried,
    Running,
    Subjects,
    decode_event,
)

log = logging.getLogger(__name__)

# Frames and bytes a socket may have waiting; a client this far behind is disconnected, not
# buffered for.
MAX_BACKLOG: Final = 10_000
MAX_BACKLOG_BYTES: Final = 32 * 1024 * 1024
# A prompt whose end reached this gateway only as a record (its events were missed while the
# connection to NATS was down) is closed on its sockets after this long.
MISSED_END_GRACE_S: Final = 2.0
# How long the closing `executing` waits for the job's record to show the end.
SETTLE_S: Final = 10.0

_encoder = msgspec.json.Encoder()


def frame(kind: str, data: dict[str, Any]) -> str:
    return _encoder.encode({"type": kind, "data": data}).decode()


def status_frame(remaining: int, sid: str | None = None) -> str:
    data: dict[str, Any] = {"status": {"exec_info": {"queue_remaining": remaining}}}
    if sid is not None:
        data["sid"] = sid
    return frame("status", data)


class NativeSocket:
    """One connected client: its identity and the frames waiting to be written to it."""

    def __init__(self, caller: str, client_id: str) -> None:
        self.caller = caller
        self.client_id = client_id
        self.frames: asyncio.Queue[str | bytes | None] = asyncio.Queue(MAX_BACKLOG)
        self.waiting_bytes = 0
        self.previews = False  # asked for preview metadata with feature_flags
        self.closed = False

    def send(self, text: str | bytes) -> None:
        if self.closed:
            return
        size = len(text)
        if self.frames.full() or self.waiting_bytes + size > MAX_BACKLOG_BYTES:
            log.warning("socket %s fell too far behind; closing it", self.client_id)
            self.close()
            return
        self.waiting_bytes += size
        self.frames.put_nowait(text)

    def sent(self, item: str | bytes) -> None:
        self.waiting_bytes -= len(item)

    def close(self) -> None:
        """Ask the writer to stop (it drains nothing more)."""
        self.closed = True
        while True:
            try:
                self.frames.put_nowait(None)
                return
            except asyncio.QueueFull:
                self.frames.get_nowait()


class SocketHub:
    """Routes prompt messages and queue status to the sockets that may see them."""

    def __init__(
        self, nc: Client, subjects: Subjects, index: PromptIndex, history: HistoryReader
    ) -> None:
        self._nc = nc
        self._subjects = subjects
        self._index = index
        self._history = history
        self._sockets: dict[str, set[NativeSocket]] = {}
        self._by_client: dict[tuple[str, str], NativeSocket] = {}
        self._relays: dict[str, PromptRelay] = {}
        self._sub: Subscription | None = None
        self._previews_sub: Subscription | None = None
        # ComfyUI's prompt id of each run (from `running` events) -> our prompt id.
        self._runs: dict[str, str] = {}
        self._events_prefix = subjects.events("x")[:-1]
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing: set[str] = set()  # prompts whose end came as an event here
        self._early = EarlyEvents()
        index.on_add(self._added)
        index.on_finish(self._ended)

    # -- sockets -----------------------------------------------------------------------------

    async def connect(self, caller: str, client_id: str) -> NativeSocket:
        """Register a socket; the newest one of a client id takes over its messages."""
        socket = NativeSocket(caller, client_id)
        self._sockets.setdefault(caller, set()).add(socket)
        self._by_client[(caller, client_id)] = socket
        if self._sub is None:
            self._sub = await self._nc.subscribe(self._subjects.all_events, cb=self._on_event)
        socket.send(status_frame(self._index.remaining(caller), sid=client_id))
        return socket

    async def disconnect(self, socket: NativeSocket) -> None:
        sockets = self._sockets.get(socket.caller, set())
        sockets.discard(socket)
        if not sockets:
            self._sockets.pop(socket.caller, None)
        if self._by_client.get((socket.caller, socket.client_id)) is socket:
            del self._by_client[(socket.caller, socket.client_id)]
        if socket.caller not in self._sockets:
            self._forget_caller(socket.caller)
        if self._previews_sub is not None and not any(
            s.previews for sockets in self._sockets.values() for s in sockets
        ):
            sub, self._previews_sub = self._previews_sub, None
            await sub.unsubscribe()
        if not self._sockets and self._sub is not None:
            sub, self._sub = self._sub, None
            self._early.clear()
            await sub.unsubscribe()

    def _forget_caller(self, caller: str) -> None:
        """Drop the relay state of a caller nobody listens for any more."""
        gone = {
            job_id
            for job_id in self._relays
            if (entry := self._index.get(job_id)) is None or entry.prompt.caller == caller
        }
        for job_id in gone:
            del self._relays[job_id]
        self._runs = {run: job for run, job in self._runs.items() if job not in gone}

    async def want_previews(self, socket: NativeSocket) -> None:
        """The socket negotiated preview metadata: relay binary previews to it."""
        socket.previews = True
        if self._previews_sub is None:
            subject = self._subjects.all_previews
            self._previews_sub = await self._nc.subscribe(subject, cb=self._on_preview)

    async def close(self) -> None:
        for sockets in list(self._sockets.values()):
            for socket in sockets:
                socket.close()
        for sub in (self._sub, self._previews_sub):
            if sub is not None:
                await sub.unsubscribe()
        self._sub = self._previews_sub = None
        self._early.clear()
        for task in list(self._tasks):
            task.cancel()

    # -- what is sent ------------------------------------------------------------------------

    def queue_changed(self, caller: str) -> None:
        """Tell every socket of `caller` how many of its prompts remain."""
        sockets = self._sockets.get(caller)
        if sockets:
            text = status_frame(self._index.remaining(caller))
            for socket in sockets:
                socket.send(text)

    def _deliver(self, entry: Entry, message: Outgoing) -> None:
        client_id = entry.prompt.client_id
        if client_id is not None:
            socket = self._by_client.get((entry.prompt.caller, client_id))
            if socket is not None:
                socket.send(frame(message.type, message.data))
        elif message.broadcast:
            text = frame(message.type, message.data)
            for socket in self._sockets.get(entry.prompt.caller, ()):
                socket.send(text)

    async def _on_event(self, msg: Msg) -> None:
        job_id = msg.subject[len(self._events_prefix) :]
        entry = self._index.get(job_id)
        if entry is None:
            self._early.hold(job_id, msg)  # perhaps a prompt the KV watch has not brought yet
            return
        self._relay_event(entry, msg)

    def _added(self, entry: Entry) -> None:
        for msg in self._early.take(entry.prompt_id):
            self._relay_event(entry, msg)

    def _relay_event(self, entry: Entry, msg: Msg) -> None:
        """Send the messages the event stands for to the sockets that may see them."""
        job_id = entry.prompt_id
        if entry.prompt.caller not in self._sockets:
            return
        try:
            event = decode_event(msg.data)
        except ContractError:
            log.exception("skipping an unreadable event of %s", job_id)
            return
        relay = self._relays.setdefault(job_id, PromptRelay(job_id))
        if isinstance(event, Running):
            entry.run_started = event.ts  # /queue must agree with the messages sent
            self._runs[event.data.prompt_id] = job_id
            self.queue_changed(entry.prompt.caller)  # "picked up", before execution_start
        if isinstance(event, Retried):
            entry.run_started = None
        for message in relay.translate(event):
            self._deliver(entry, message)
        if isinstance(event, TERMINAL_EVENTS):
            self._closing.add(job_id)
            ran = relay.started or not isinstance(event, Cancelled)
            task = asyncio.create_task(self._close_prompt(entry, ran))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _close_prompt(self, entry: Entry, ran: bool) -> None:
        """After the end: `status`, then `executing` null once history has the entry."""
        try:
            await self._index.settle(entry.prompt_id, SETTLE_S)
            # Counted until history has it (even if that outlasts the wait), as on ComfyUI.
            self.queue_changed(entry.prompt.caller)
            client_id = entry.prompt.client_id
            if client_id is None or not ran:
                return  # ComfyUI closes only a client id's prompt, and only one that ran
            socket = self._by_client.get((entry.prompt.caller, client_id))
            if socket is not None:
                socket.send(frame("executing", {"node": None, "prompt_id": entry.prompt_id}))
        finally:
            self._relays.pop(entry.prompt_id, None)
            self._runs = {run: job for run, job in self._runs.items() if job != entry.prompt_id}

    def _ended(self, entry: Entry) -> None:
        if entry.prompt.caller in self._sockets:
            task = asyncio.create_task(self._close_if_missed(entry))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _close_if_missed(self, entry: Entry) -> None:
        """Close a prompt on its sockets if its end never came here as an event."""
        await asyncio.sleep(MISSED_END_GRACE_S)  # the event normally comes first, or close by
        if entry.prompt_id in self._closing:
            self._closing.discard(entry.prompt_id)
            return
        log.info("prompt %s ended without its last event reaching this gateway", entry.prompt_id)
        record = entry.record
        ran = record is not None and record.started_at is not None
        if ran:
            last = (await self._history.messages(entry))[-1]
            self._deliver(entry, Outgoing(last[0], last[1]))
        await self._close_prompt(entry, ran)

    async def _on_preview(self, msg: Msg) -> None:
        preview = parse_preview(msg.data)
        job_id = self._runs.get(preview[0]["prompt_id"]) if preview is not None else None
        entry = self._index.get(job_id) if job_id is not None else None
        if preview is None or entry is None:
            return
        metadata, image = preview
        metadata["prompt_id"] = entry.prompt_id
        data = preview_frame(metadata, image)
        if entry.prompt.client_id is not None:
            socket = self._by_client.get((entry.prompt.caller, entry.prompt.client_id))
            targets = [socket] if socket is not None else []
        else:
            targets = list(self._sockets.get(entry.prompt.caller, ()))
        for socket in targets:
            if socket.previews:
                socket.send(data)


_PREVIEW_WITH_METADATA: Final = 4


def parse_preview(frame: bytes) -> tuple[dict[str, Any], bytes] | None:
    """(metadata, image) of ComfyUI's binary type 4 frame; None for anything else."""
    if len(frame) < 8 or int.from_bytes(frame[:4], "big") != _PREVIEW_WITH_METADATA:
        return None
    length = int.from_bytes(frame[4:8], "big")
    try:
        metadata = msgspec.json.decode(frame[8 : 8 + length])
    except msgspec.DecodeError:
        return None
    if not isinstance(metadata, dict) or not isinstance(metadata.get("prompt_id"), str):
        return None
    return metadata, frame[8 + length :]


def preview_frame(metadata: dict[str, Any], image: bytes) -> bytes:
    """A binary type 4 frame: event type, metadata length, metadata JSON, image bytes."""
    encoded = _encoder.encode(metadata)
    header = _PREVIEW_WITH_METADATA.to_bytes(4, "big") + len(encoded).to_bytes(4, "big")
    return header + encoded + image
