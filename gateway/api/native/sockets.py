"""The ComfyUI-compatible `/ws` sockets of one gateway and what each is sent.

ComfyUI routes a prompt's messages to the socket registered under the prompt's client id, and
broadcasts `status` and binary TEXT frames to every socket. Here "every socket" means every
socket of the same caller (API key), so no caller hears of another's work. Events reach this
process on one subscription to all job events, held while a socket is open or a prompt's relay
state is kept for a socket that may rejoin it (relays.py); those of a prompt this gateway does
not know yet wait for it a moment (early.py). The adapters' binary frames come on a second
subscription, held while a socket is open. Images that nodes sent over ComfyUI's websocket are
outputs: they come as events, and each socket gets them from storage in the layout it
negotiated, type 4 with metadata or type 1 without, as ComfyUI would send them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, Final

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from gateway.api.native.early import EarlyEvents
from gateway.api.native.frames import (
    TEXT,
    StoredFrame,
    image_header,
    preview_frame,
    split_frame,
)
from gateway.api.native.history import HistoryReader
from gateway.api.native.messages import Outgoing, OutgoingImage, PromptRelay, Said
from gateway.api.native.prompts import Entry, PromptIndex
from gateway.api.native.relays import RelayBook
from gateway.bus.contract import (
    TERMINAL_EVENTS,
    Cancelled,
    ContractError,
    Event,
    Retried,
    Running,
    Subjects,
    decode_event,
)
from gateway.storage import Storage

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
# Started prompts whose relay state is kept while no socket of their caller is open (beyond
# it the oldest are dropped, and caught up from their events if a socket rejoins them).
MAX_UNHEARD_RELAYS: Final = 1_000

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
        self.frames: asyncio.Queue[str | bytes | StoredFrame | None] = asyncio.Queue(MAX_BACKLOG)
        self.waiting_bytes = 0
        self.previews = False  # asked for preview metadata with feature_flags
        self.closed = False

    def send(self, text: str | bytes | StoredFrame) -> None:
        if self.closed:
            return
        size = len(text)
        if self.frames.full() or self.waiting_bytes + size > MAX_BACKLOG_BYTES:
            log.warning("socket %s fell too far behind; closing it", self.client_id)
            self.close()
            return
        self.waiting_bytes += size
        self.frames.put_nowait(text)

    def sent(self, item: str | bytes | StoredFrame) -> None:
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
        self,
        nc: Client,
        subjects: Subjects,
        index: PromptIndex,
        history: HistoryReader,
        storage: Storage | None = None,
    ) -> None:
        self._nc = nc
        self._storage = storage
        self._subjects = subjects
        self._index = index
        self._history = history
        self._sockets: dict[str, set[NativeSocket]] = {}
        self._by_client: dict[tuple[str, str], NativeSocket] = {}
        self._relays = RelayBook(history, self._relay_held, self._relay_frame)
        self._sub: Subscription | None = None
        self._frames_sub: Subscription | None = None
        self._events_prefix = subjects.events("x")[:-1]
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing: set[str] = set()  # prompts whose end came as an event here
        # Prompts closed before their record showed the end: their `status` still counted them.
        self._unsettled: set[str] = set()
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
        if self._frames_sub is None:
            subject = self._subjects.all_previews
            self._frames_sub = await self._nc.subscribe(subject, cb=self._on_frame)
        socket.send(status_frame(self._index.remaining(caller), sid=client_id))
        await self._rejoin(socket)
        return socket

    async def _rejoin(self, socket: NativeSocket) -> None:
        """Tell a socket joining a running prompt of its client id where it is, as ComfyUI does.

        Every running prompt of the caller is made ready to relay from its current state, so
        `progress_state` goes on carrying every node started so far.
        """
        for entry in self._index.running_of(socket.caller):
            relay = self._relays.get(entry.prompt_id)

            def joined(relay: PromptRelay, entry: Entry = entry) -> None:
                mine = entry.prompt.client_id == socket.client_id
                if mine and relay.last_started is not None and self._owns(socket):
                    socket.send(frame("executing", {"node": relay.last_started}))

            if relay is not None and relay.started:
                joined(relay)
            else:
                await self._relays.catch_up(entry.prompt_id, joined)

    def _owns(self, socket: NativeSocket) -> bool:
        return self._by_client.get((socket.caller, socket.client_id)) is socket

    async def disconnect(self, socket: NativeSocket) -> None:
        sockets = self._sockets.get(socket.caller, set())
        sockets.discard(socket)
        if not sockets:
            self._sockets.pop(socket.caller, None)
        if self._owns(socket):
            del self._by_client[(socket.caller, socket.client_id)]
        if socket.caller not in self._sockets:
            self._unheard(socket.caller)
        await self._unsubscribe_if_idle()

    def _unheard(self, caller: str) -> None:
        """The caller's last socket closed: keep only the relay state a rejoining one needs.

        A prompt not started yet needs none (its run starts its relay afresh); of the started
        ones of callers without sockets, only the newest MAX_UNHEARD_RELAYS are kept.
        """
        unheard = []
        for job_id in self._relays:
            entry = self._index.get(job_id)
            relay = self._relays.get(job_id)
            if entry is None or relay is None or not relay.started:
                if entry is None or entry.prompt.caller == caller:
                    self._relays.forget(job_id)
            elif entry.prompt.caller not in self._sockets:
                unheard.append(job_id)
        for job_id in unheard[: max(0, len(unheard) - MAX_UNHEARD_RELAYS)]:
            self._relays.forget(job_id)

    async def _unsubscribe_if_idle(self) -> None:
        if not self._sockets and self._frames_sub is not None:
            sub, self._frames_sub = self._frames_sub, None
            await sub.unsubscribe()
        if not self._sockets and not self._relays and self._sub is not None:
            sub, self._sub = self._sub, None
            self._early.clear()
            await sub.unsubscribe()

    def want_previews(self, socket: NativeSocket) -> None:
        """The socket negotiated preview metadata: relay binary previews to it."""
        socket.previews = True

    async def close(self) -> None:
        for sockets in list(self._sockets.values()):
            for socket in sockets:
                socket.close()
        for sub in (self._sub, self._frames_sub):
            if sub is not None:
                await sub.unsubscribe()
        self._sub = self._frames_sub = None
        self._early.clear()
        self._relays.close()
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

    def _deliver(self, entry: Entry, message: Said) -> None:
        if isinstance(message, OutgoingImage):
            self._deliver_image(entry, message)
            return
        client_id = entry.prompt.client_id
        if client_id is not None:
            socket = self._by_client.get((entry.prompt.caller, client_id))
            if socket is not None:
                socket.send(frame(message.type, message.data))
        elif message.broadcast:
            text = frame(message.type, message.data)
            for socket in self._sockets.get(entry.prompt.caller, ()):
                socket.send(text)

    def _deliver_image(self, entry: Entry, image: OutgoingImage) -> None:
        """To the prompt's client, or to every socket of its caller if it has no client id
        (ComfyUI broadcasts binary frames then), in the layout each socket negotiated."""
        header = image_header(entry.prompt_id, image.output, flagged=image.flagged)
        if header is None or self._storage is None:
            return
        client_id = entry.prompt.client_id
        if client_id is None:
            sockets = set(self._sockets.get(entry.prompt.caller, ()))
        else:
            owner = self._by_client.get((entry.prompt.caller, client_id))
            sockets = {owner} if owner is not None else set()
        stored = StoredFrame(header, image.output.key, self._storage)
        for socket in sockets:
            if socket.previews == image.flagged:
                socket.send(stored)

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
        job_id = entry.prompt_id
        if entry.prompt.caller not in self._sockets and job_id not in self._relays:
            return  # nobody listens, and nobody will need this prompt's state
        try:
            event = decode_event(msg.data)
        except ContractError:
            log.exception("skipping an unreadable event of %s", job_id)
            return
        if not self._relays.hold(job_id, event):
            self._relay(entry, event)

    def _relay_held(self, job_id: str, events: list[Event]) -> None:
        entry = self._index.get(job_id)
        if entry is not None:
            for event in events:
                self._relay(entry, event)

    def _relay(self, entry: Entry, event: Event) -> None:
        """Send the messages the event stands for to the sockets that may see them."""
        job_id = entry.prompt_id
        if entry.prompt.caller not in self._sockets and job_id not in self._relays:
            return
        relay = self._relays.open(job_id)
        if isinstance(event, Running):
            entry.run_started = event.ts  # /queue must agree with the messages sent
            self._relays.note_run(event.data.prompt_id, job_id)
            self.queue_changed(entry.prompt.caller)  # "picked up", before execution_start
        if isinstance(event, Retried):
            entry.run_started = None
        for message in relay.translate(event):
            self._deliver(entry, message)
        if isinstance(event, TERMINAL_EVENTS):
            self._closing.add(job_id)
            ran = relay.started or not isinstance(event, Cancelled)
            self._spawn(self._close_prompt(entry, ran))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _close_prompt(self, entry: Entry, ran: bool) -> None:
        """After the end: `status`, then `executing` null once history has the entry."""
        try:
            await self._index.settle(entry.prompt_id, SETTLE_S)
            # Counted until history has it (even if that outlasts the wait), as on ComfyUI;
            # `_ended` sends the status that no longer counts it.
            if not entry.settled.is_set():
                self._unsettled.add(entry.prompt_id)
            self.queue_changed(entry.prompt.caller)
            client_id = entry.prompt.client_id
            if client_id is None or not ran:
                return  # ComfyUI closes only a client id's prompt, and only one that ran
            socket = self._by_client.get((entry.prompt.caller, client_id))
            if socket is not None:
                socket.send(frame("executing", {"node": None, "prompt_id": entry.prompt_id}))
        finally:
            self._relays.forget(entry.prompt_id)
            await self._unsubscribe_if_idle()

    def _ended(self, entry: Entry) -> None:
        if entry.prompt_id in self._unsettled:
            self._unsettled.discard(entry.prompt_id)
            self.queue_changed(entry.prompt.caller)
        if entry.prompt.caller in self._sockets or entry.prompt_id in self._relays:
            self._spawn(self._close_if_missed(entry))

    async def _close_if_missed(self, entry: Entry) -> None:
        """Close a prompt on its sockets if its end never came here as an event."""
        await asyncio.sleep(MISSED_END_GRACE_S)  # the event normally comes first, or close by
        if entry.prompt_id in self._closing:
            self._closing.discard(entry.prompt_id)
            return
        if entry.prompt.caller not in self._sockets:
            self._relays.forget(entry.prompt_id)  # nobody to tell
            await self._unsubscribe_if_idle()
            return
        log.info("prompt %s ended without its last event reaching this gateway", entry.prompt_id)
        record = entry.record
        ran = record is not None and record.started_at is not None
        if ran:
            last = (await self._history.messages(entry))[-1]
            self._deliver(entry, Outgoing(last[0], last[1]))
        await self._close_prompt(entry, ran)

    async def _on_frame(self, msg: Msg) -> None:
        self._relay_frame(msg)

    def _relay_frame(self, msg: Msg) -> None:
        """A binary frame an adapter published: a preview, or a TEXT frame of a node."""
        parts = split_frame(msg.data)
        run_id = parts[1]["prompt_id"] if parts is not None else None
        job_id = self._relays.job_of_run(run_id, msg) if run_id is not None else None
        entry = self._index.get(job_id) if job_id is not None else None
        if parts is None or entry is None:
            return
        event, metadata, payload = parts
        sockets = self._sockets.get(entry.prompt.caller, set())
        if event == TEXT:
            # ComfyUI sends it to every socket, client id or not: here, every socket of the
            # prompt's caller, as the server sent it.
            for socket in sockets:
                socket.send(payload)
            return
        metadata["prompt_id"] = entry.prompt_id
        data = preview_frame(metadata, payload)
        if entry.prompt.client_id is not None:
            owner = self._by_client.get((entry.prompt.caller, entry.prompt.client_id))
            sockets = {owner} if owner is not None else set()
        for socket in sockets:
            if socket.previews:
                socket.send(data)
