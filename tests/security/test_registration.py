"""Registering a server is neither a port scanner nor a door into the gateway's network.

Addresses are judged before anything connects to them (metadata and link-local never, loopback
and private ones only on a loopback-only gateway or through `server_allowlist`, never this
system's own ports); a probe that finds no ComfyUI answers in the same words whatever it found;
and a caller gets a few registrations a minute. The listeners below stand for what may sit at
an address: each counts the connections it was given, so "nothing connected" is observed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from gateway.app.serve import bind_socket
from gateway.settings import Settings
from plugins.simulator import SimulatorConfig, run_simulator
from tests.conftest import running_gateway

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
ADMIN = {"X-API-Key": "admin-key"}
REGISTRATIONS = 10  # the burst the limit test gives each key


class Listener:
    """A TCP server on loopback that counts connections and answers with `handler`."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.port = 0
        self._open: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[Any]] = set()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self._open.add(writer)
        try:
            await self.handler(reader, writer)
        finally:
            writer.close()
            self._open.discard(writer)

    async def close(self) -> None:
        """End the connections still open (the silent handler's) and wait for their handlers."""
        for writer in list(self._open):
            writer.close()
        await asyncio.gather(*self._handlers, return_exceptions=True)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@contextlib.asynccontextmanager
async def listening(handler: Handler) -> AsyncIterator[Listener]:
    listener = Listener(handler)
    server = await asyncio.start_server(listener._serve, "127.0.0.1", 0)
    listener.port = server.sockets[0].getsockname()[1]
    try:
        yield listener
    finally:
        server.close()
        await listener.close()
        await server.wait_closed()


async def respond(
    writer: asyncio.StreamWriter, status: str, body: bytes, content_type: str = "application/json"
) -> None:
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    writer.write(head.encode() + body)
    await writer.drain()


async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Take the connection and close it without a word."""


def answering(status: str, body: bytes, content_type: str = "application/json") -> Handler:
    """An HTTP server that answers every request with `status` and `body`."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await respond(writer, status, body, content_type)

    return handler


async def not_http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """What an SSH server says first."""
    writer.write(b"SSH-2.0-OpenSSH_9.6\r\n")
    await writer.drain()
    await reader.read(1024)


async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Take the request and never answer: the probe gives up on its own deadline."""
    await reader.read()


async def stats_only(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """ComfyUI's /system_stats, and a 404 for /object_info: half a ComfyUI is none."""
    request = await reader.readuntil(b"\r\n\r\n")
    if request.startswith(b"GET /system_stats "):
        await respond(writer, "200 OK", b'{"system": {"os": "posix"}, "devices": []}')
    else:
        await respond(writer, "404 Not Found", b"{}")


def closed_port() -> socket.socket:
    """A loopback port held but not listening: connecting to it is refused."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    return sock


def on_loopback(settings: Settings) -> tuple[socket.socket, Settings]:
    """A socket on loopback for a gateway, and `settings` naming its real port."""
    sock = bind_socket("127.0.0.1", 0)
    return sock, msgspec.structs.replace(settings, port=sock.getsockname()[1])


def beyond_loopback(settings: Settings, **changes: Any) -> tuple[socket.socket, Settings]:
    """A gateway that believes it listens on every interface (0.0.0.0, with a key, as it must
    there), served on a loopback socket so that nothing outside can reach it."""
    sock = bind_socket("127.0.0.1", 0)
    exposed = msgspec.structs.replace(
        settings, host="0.0.0.0", port=sock.getsockname()[1], api_keys=["plain:admin-key"]
    )
    return sock, msgspec.structs.replace(exposed, **changes)


async def register(
    client: httpx.AsyncClient, address: str, name: str = "s", headers: dict[str, str] | None = None
) -> httpx.Response:
    return await client.post("/servers", json={"name": name, "address": address}, headers=headers)


def refused(reply: httpx.Response, rule: str) -> bool:
    """Whether `reply` is the policy's refusal, by `rule`."""
    body = reply.json()
    details = body.get("details") or {}
    return (reply.status_code, body["code"], details.get("rule")) == (
        403,
        "address_not_allowed",
        rule,
    )


# Where no server is ever registered, each spelt as a caller might spell it.
NEVER = (
    "169.254.169.254:80",
    "0xa9fea9fe:80",  # the same, in hex: the resolver reads it so
    "2852039166:80",  # and as one number
    "[::ffff:169.254.169.254]:80",
    "[64:ff9b::a9fe:a9fe]:80",  # through NAT64
    "169.254.170.2:80",
    "[fd00:ec2::254]:80",
    "100.100.100.200:80",
    "metadata.google.internal:80",
    "METADATA.Google.Internal.:80",
    "[fe80::1]:8188",
    "169.254.1.1:8188",
    "224.0.0.1:8188",
    "255.255.255.255:8188",
)


async def test_metadata_link_local_and_any_are_refused_even_when_allowed(
    settings: Settings,
) -> None:
    everything = ["0.0.0.0/0", "::/0", "metadata.google.internal", "metadata"]
    allowing = msgspec.structs.replace(
        settings, server_allowlist=everything, api_keys=["plain:admin-key"]
    )
    async with (
        listening(hang_up) as local,
        running_gateway(allowing) as url,
        httpx.AsyncClient(base_url=url, timeout=30) as client,
    ):
        anywhere = (f"0.0.0.0:{local.port}", f"[::]:{local.port}")  # "any" reaches this host
        for address in (*NEVER, *anywhere):
            reply = await register(client, address, headers=ADMIN)
            assert refused(reply, "never"), (address, reply.text)
            assert "server_allowlist" in reply.json()["message"], reply.text
        assert local.connections == 0
        listed = await client.get("/servers", headers=ADMIN)
        assert listed.json() == []


async def test_a_loopback_only_gateway_takes_loopback_servers_but_not_its_own_ports(
    settings: Settings, tmp_path: Path
) -> None:
    sock, mine = on_loopback(settings)
    nats_port = int(settings.nats_url.rsplit(":", 1)[1])
    config = SimulatorConfig(base_dir=str(tmp_path / "sim"))
    async with (
        run_simulator(config) as sim,
        running_gateway(mine, sock) as url,
        httpx.AsyncClient(base_url=url, timeout=30) as client,
    ):
        for address in (
            f"127.0.0.1:{nats_port}",
            f"localhost:{nats_port}",
            f"127.0.0.1:{mine.port}",
            f"localhost:{mine.port}",
        ):
            reply = await register(client, address)
            assert refused(reply, "own_port"), (address, reply.text)
        reply = await register(client, f"localhost:{sim.port}", "gpu1")
        assert reply.status_code == 201, reply.text


async def test_loopback_needs_the_allowlist_when_the_gateway_listens_beyond_loopback(
    settings: Settings, tmp_path: Path
) -> None:
    sock, exposed = beyond_loopback(settings)
    async with (
        listening(answering("200 OK", b"{}")) as local,
        running_gateway(exposed, sock) as url,
        httpx.AsyncClient(base_url=url, headers=ADMIN, timeout=30) as client,
    ):
        for address in (local.address, f"localhost:{local.port}", f"127.0.0.2:{local.port}"):
            reply = await register(client, address)
            assert refused(reply, "beyond_loopback"), (address, reply.text)
            assert reply.json()["details"]["kind"] == "loopback"
        assert local.connections == 0

    sock, allowed = beyond_loopback(settings, server_allowlist=["127.0.0.1/32"])
    config = SimulatorConfig(base_dir=str(tmp_path / "sim"))
    async with (
        run_simulator(config) as sim,
        running_gateway(allowed, sock) as url,
        httpx.AsyncClient(base_url=url, headers=ADMIN, timeout=30) as client,
    ):
        reply = await register(client, f"127.0.0.2:{sim.port}")
        assert refused(reply, "allowlist"), reply.text
        reply = await register(client, sim.address, "gpu1")
        assert reply.status_code == 201, reply.text


async def test_every_failed_probe_gets_the_same_answer(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.api.probe")
    # The silent listener's probe ends on the step's time limit: 2 s rather than the default 10.
    probing = msgspec.structs.replace(settings, server_probe_timeout_s=2.0)
    kinds: dict[str, Handler] = {
        "hangs up": hang_up,
        "not HTTP": not_http,
        "HTTP 403": answering("403 Forbidden", b"forbidden", "text/plain"),
        "not JSON": answering("200 OK", b"<html>hello</html>", "text/html"),
        "other JSON": answering("200 OK", b'{"status": "ok"}'),
        "half a ComfyUI": stats_only,
        "silent": silent,
    }
    with closed_port() as closed:
        async with (
            running_gateway(probing) as gateway,
            contextlib.AsyncExitStack() as stack,
            httpx.AsyncClient(base_url=gateway, timeout=60) as client,
        ):
            listeners = {k: await stack.enter_async_context(listening(h)) for k, h in kinds.items()}
            addresses = {kind: listener.address for kind, listener in listeners.items()}
            addresses["closed port"] = f"127.0.0.1:{closed.getsockname()[1]}"
            replies = await asyncio.gather(
                *(register(client, address) for address in addresses.values())
            )
            bodies = {
                kind: (reply.status_code, reply.text.replace(addresses[kind], "ADDRESS"))
                for kind, reply in zip(addresses, replies, strict=True)
            }
            assert all(listener.connections >= 1 for listener in listeners.values())
    expected = '{"code":"unreachable","message":"no ComfyUI server answered at ADDRESS"'
    assert len(set(bodies.values())) == 1, bodies
    status, text = bodies["closed port"]
    assert status == 422 and text.startswith(expected), text
    # What was there is the gateway's to know, in its log.
    logged = "\n".join(r.getMessage() for r in caplog.records if r.name == "gateway.api.probe")
    for kind, fragment in (("HTTP 403", "HTTP 403"), ("not JSON", "usable JSON")):
        assert f"{addresses[kind]} refused" in logged and fragment in logged, logged


async def test_registrations_past_the_burst_get_429_per_key(settings: Settings) -> None:
    # A token comes back every 1,000 minutes: none returns while the test runs.
    keyed = msgspec.structs.replace(
        settings,
        api_keys=["plain:one", "plain:two"],
        register_burst=REGISTRATIONS,
        register_rate_per_min=0.001,
    )
    one, two = {"X-API-Key": "one"}, {"X-API-Key": "two"}
    async with (
        listening(hang_up) as local,
        running_gateway(keyed) as url,
        httpx.AsyncClient(base_url=url, timeout=30) as client,
    ):
        # A request refused for its form costs nothing: it reached no address.
        for _ in range(3):
            malformed = await client.post(
                "/servers", json={"name": "s", "address": "nowhere"}, headers=one
            )
            assert malformed.status_code == 400
        for _ in range(REGISTRATIONS):
            reply = await client.post(
                "/servers", json={"name": "s", "address": local.address}, headers=one
            )
            assert reply.status_code == 422, reply.text
        assert local.connections == REGISTRATIONS
        limited = await client.post(
            "/servers", json={"name": "s", "address": local.address}, headers=one
        )
        assert limited.status_code == 429, limited.text
        retry_after = int(limited.headers["retry-after"])
        assert retry_after >= 1
        assert limited.json()["code"] == "rate_limited"
        assert limited.json()["details"]["retry_after_s"] == retry_after
        assert local.connections == REGISTRATIONS  # refused before the probe
        other = await client.post(
            "/servers", json={"name": "s", "address": local.address}, headers=two
        )
        assert other.status_code == 422, other.text
