"""Websocket clients and message routing, with ComfyUI's rules.

Sockets are registered by clientId in one dict, exactly like the real server: a second socket
with the same clientId replaces the first, and when any socket closes its clientId is removed,
even if a newer socket now owns it (the reconnect pitfall). A message with a clientId goes to
that socket only; with none it goes to every socket. Each socket has its own queue drained by
one writer task, so messages reach a client in the order they were produced.
"""

from __future__ import annotations

import asyncio
import json
import logging
import struct
from collections.abc import Callable
from typing import Any

import msgspec

log = logging.getLogger(__name__)

PREVIEW_IMAGE = 1
TEXT = 3
PREVIEW_IMAGE_WITH_METADATA = 4
_PNG_FORMAT = 2

Frame = str | bytes


class Connection:
    """One accepted websocket."""

    def __init__(self, sid: str, abort: Callable[[], None]) -> None:
        self.sid = sid
        self.supports_preview_metadata = False
        self.queue: asyncio.Queue[Frame | None] = asyncio.Queue()
        self._abort = abort
        self.dropped = False

    def put(self, frame: Frame) -> None:
        if not self.dropped:
            self.queue.put_nowait(frame)

    def drop(self) -> None:
        """Cut the connection abruptly (no close frame), as a crashed peer would."""
        if not self.dropped:
            self.dropped = True
            self.queue.put_nowait(None)
            self._abort()

    def close(self) -> None:
        self.queue.put_nowait(None)


def text_frame(event: str, data: dict[str, Any]) -> str:
    return msgspec.json.encode({"type": event, "data": data}).decode()


def preview_frame(image: bytes) -> bytes:
    return struct.pack(">II", PREVIEW_IMAGE, _PNG_FORMAT) + image


def preview_metadata_frame(image: bytes, metadata: dict[str, Any]) -> bytes:
    # json.dumps, as the real server does; clients read the length prefix, not the spacing.
    encoded = json.dumps(metadata).encode()
    return struct.pack(">II", PREVIEW_IMAGE_WITH_METADATA, len(encoded)) + encoded + image


def text_binary_frame(node_id: str, text: str) -> bytes:
    node = node_id.encode()
    return struct.pack(">II", TEXT, len(node)) + node + text.encode()


class Hub:
    """The registry of sockets and the only way messages leave the server."""

    def __init__(self, drop_on_message: str | None = None) -> None:
        self.sockets: dict[str, Connection] = {}
        self.drop_on_message = drop_on_message
        self._dropped_for_message: set[int] = set()

    def register(self, conn: Connection) -> None:
        self.sockets[conn.sid] = conn

    def unregister(self, sid: str) -> None:
        # Pops by clientId, whoever owns it now: this is the real server's behaviour.
        self.sockets.pop(sid, None)

    def supports_preview_metadata(self, sid: str | None) -> bool:
        conn = self.sockets.get(sid) if sid is not None else None
        return conn is not None and conn.supports_preview_metadata

    def _targets(self, sid: str | None) -> list[Connection]:
        if sid is None:
            return list(self.sockets.values())
        conn = self.sockets.get(sid)
        return [conn] if conn is not None else []

    def send(self, event: str, data: dict[str, Any], sid: str | None) -> None:
        """Send a text message to `sid`, or to everyone when `sid` is None."""
        targets = self._targets(sid)
        if not targets:
            return
        frame = text_frame(event, data)
        for conn in targets:
            if event == self.drop_on_message and id(conn) not in self._dropped_for_message:
                self._dropped_for_message.add(id(conn))
                log.info("dropping websocket %s instead of sending %s", conn.sid, event)
                conn.drop()
                continue
            conn.put(frame)

    def send_binary(self, frame: bytes, sid: str | None) -> None:
        for conn in self._targets(sid):
            conn.put(frame)

    def drop_all(self) -> int:
        """Cut every socket abruptly; returns how many were cut."""
        conns = list(self.sockets.values())
        for conn in conns:
            conn.drop()
        return len(conns)
