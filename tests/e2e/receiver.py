"""A webhook receiver for the tests: a small HTTP server on loopback that keeps every request.

It checks each request's Standard Webhooks signature itself (HMAC-SHA256 of
`id.timestamp.body`, keyed by the base64 after `whsec_`), without the gateway's code, and
answers 500 while told to fail.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec


class Received(msgspec.Struct, kw_only=True):
    headers: dict[str, str]
    body: bytes
    status: int

    @property
    def delivery_id(self) -> str:
        return self.headers["webhook-id"]

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    def signed_by(self, secret: str) -> bool:
        """Whether the signature checks out under `secret`, per the specification."""
        key = base64.b64decode(secret.removeprefix("whsec_"))
        signed = (
            f"{self.headers['webhook-id']}.{self.headers['webhook-timestamp']}.".encode()
            + self.body
        )
        expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
        offered = [
            part.partition(",")[2]
            for part in self.headers["webhook-signature"].split(" ")
            if part.startswith("v1,")
        ]
        return any(hmac.compare_digest(expected, candidate) for candidate in offered)


class Receiver:
    """Requests received, in order; `failing` makes it answer 500."""

    def __init__(self) -> None:
        self.requests: list[Received] = []
        self.failing = False
        self.url = ""
        self._changed = asyncio.Condition()

    async def wait_for(self, check: Callable[[list[Received]], bool], within: float = 30) -> None:
        """Until `check(requests)` holds (woken by each request); fail after `within` s."""
        async with asyncio.timeout(within), self._changed:
            await self._changed.wait_for(lambda: check(self.requests))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            headers = {}
            for line in lines[1:]:
                name, sep, value = line.partition(":")
                if sep:
                    headers[name.strip().lower()] = value.strip()
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            status = 500 if self.failing else 200
            writer.write(
                f"HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".encode()
            )
            await writer.drain()
            async with self._changed:
                self.requests.append(Received(headers=headers, body=body, status=status))
                self._changed.notify_all()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # a client that went away: nothing was received
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def receiving() -> AsyncIterator[Receiver]:
    """A receiver listening on 127.0.0.1 (a free port) for the block."""
    receiver = Receiver()
    server = await asyncio.start_server(receiver._serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    receiver.url = f"http://127.0.0.1:{port}/hook"
    try:
        yield receiver
    finally:
        server.close()
        await server.wait_closed()
