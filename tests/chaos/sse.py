"""A client of `GET /workflow/events/{id}` that stops reading: tiny socket buffers, no reads.

It sends the request, then leaves the answer in the kernel until told to read, so the gateway
meets a client that takes nothing (its writes back up). Then it reads to the end and parses the
Server-Sent Events out of the (chunked) HTTP answer.
"""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

_RCVBUF = 2048
_READER_LIMIT = 1024


class StalledReader:
    def __init__(self, host: str, port: int, job_id: str) -> None:
        self.host = host
        self.port = port
        self.job_id = job_id
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # Before connecting, so the advertised window is small from the start.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RCVBUF)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (self.host, self.port))
        self._reader, self._writer = await asyncio.open_connection(sock=sock, limit=_READER_LIMIT)
        request = (
            f"GET /workflow/events/{self.job_id} HTTP/1.1\r\n"
            f"Host: {self.host}:{self.port}\r\nAccept: text/event-stream\r\n"
            "Connection: close\r\n\r\n"
        )
        self._writer.write(request.encode())
        await self._writer.drain()

    async def read_all(self) -> tuple[int, list[dict[str, Any]]]:
        """Read to the end of the answer: (HTTP status, the events' JSON in order)."""
        assert self._reader is not None and self._writer is not None
        raw = bytearray()
        while chunk := await self._reader.read(65536):
            raw += chunk
        self._writer.close()
        head, _, body = bytes(raw).partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        fields = (h.partition(":") for h in lines[1:])
        headers = {k.strip().lower(): v.strip() for k, _, v in fields}
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = _dechunk(body)
        events = []
        for line in body.decode().splitlines():
            # A keep-alive is a comment with an empty data line.
            if line.startswith("data:") and line[5:].strip():
                try:
                    events.append(json.loads(line[5:]))
                except ValueError:
                    text = f"not an SSE data line: {line!r}\n{bytes(raw)!r}"
                    raise AssertionError(text) from None
        return status, events

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def _dechunk(body: bytes) -> bytes:
    out = bytearray()
    at = 0
    while True:
        end = body.index(b"\r\n", at)
        size = int(body[at:end].split(b";")[0], 16)
        if size == 0:
            return bytes(out)
        out += body[end + 2 : end + 2 + size]
        at = end + 2 + size + 2
