"""Whether a ComfyUI answers at an address being registered: one question, one answer.

Every way of not being a ComfyUI (nothing listening, a timeout, a reset, something that is not
HTTP, an HTTP error, JSON of another shape) gets the same answer, so that registration cannot be
used to learn what runs where; what really happened goes to the gateway's log.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Final

import httpx

from gateway.api.errors import ApiError
from gateway.api.serveraddress import ServerAddress
from gateway.comfyui.addresses import IPAddress
from gateway.comfyui.tls import tls_context

log = logging.getLogger(__name__)

SYSTEM_HEADER: Final = "X-ComfyAutomate-System"
# The whole probe takes at most this many of its steps (each read, connect or write), so a
# server that drips bytes cannot hold a registration (and the registration lock) for long.
_STEPS_PER_PROBE: Final = 3
# Far above a real /object_info (a few MB with many custom nodes), far below harm.
_MAX_ANSWER_BYTES: Final = 64 * 1024 * 1024


class NotComfyUI(Exception):
    """What the probe found instead of a ComfyUI, in words for the log only."""


def unreachable(address: str) -> ApiError:
    """The one answer to every failed probe: it says nothing of what answered."""
    return ApiError(422, "unreachable", f"no ComfyUI server answered at {address}")


async def probe(server: ServerAddress, system_id: str, *, step_s: float = 10.0) -> None:
    """Refuse `server` where no ComfyUI answers (422 `unreachable`), or where a gateway of
    this system does (422 `own_gateway`). Each step may take `step_s` seconds (the setting
    `server_probe_timeout_s`), the whole probe three times as long.

    A ComfyUI proves itself by the shapes of `/system_stats` (a `system` object and a list of
    `devices`) and `/object_info` (node classes with their inputs and outputs). A gateway of
    this system answers both too, and marks its answers with SYSTEM_HEADER: registering it
    would send the fleet's jobs round in a circle. Connections go to the addresses the policy
    checked, never to a second lookup of the name.
    """
    try:
        if not server.ips:
            raise NotComfyUI(server.unresolved or "the host has no address")
        async with asyncio.timeout(step_s * _STEPS_PER_PROBE):
            await _ask(server, system_id, step_s)
    except (NotComfyUI, httpx.HTTPError, TimeoutError) as exc:
        reason = str(exc) or type(exc).__name__
        log.warning("registration at %s refused, no ComfyUI there: %s", server.address, reason)
        raise unreachable(server.address) from None


async def _ask(server: ServerAddress, system_id: str, step_s: float) -> None:
    # Proxies from the environment are ignored: the address checked must be the one reached.
    async with httpx.AsyncClient(
        timeout=step_s, trust_env=False, verify=tls_context(trust_env=False)
    ) as client:
        stats = await _get(client, server, "/system_stats", system_id)
        if not _looks_like_system_stats(stats):
            raise NotComfyUI("/system_stats is not ComfyUI's (a `system` object and `devices`)")
        nodes = await _get(client, server, "/object_info", system_id)
        if not _looks_like_object_info(nodes):
            raise NotComfyUI("/object_info is not ComfyUI's node list")


async def _get(client: httpx.AsyncClient, server: ServerAddress, path: str, system_id: str) -> Any:
    """The JSON `path` answers with 200, from the first checked address that takes a
    connection; NotComfyUI, an httpx error, or `own_gateway` otherwise."""
    for index, ip in enumerate(server.ips):
        host = f"[{server.host}]" if ":" in server.host else server.host
        request = client.build_request(
            "GET", _url(ip, server.port, path), headers={"Host": f"{host}:{server.port}"}
        )
        try:
            reply = await client.send(request, stream=True)
        except httpx.ConnectError:
            if index == len(server.ips) - 1:
                raise
            continue
        try:
            # Before the status: a gateway with API keys answers 401, and is still itself.
            if reply.headers.get(SYSTEM_HEADER) == system_id:
                raise ApiError(
                    422,
                    "own_gateway",
                    f"{server.address} is a gateway of this system, not a ComfyUI server",
                )
            if reply.status_code != 200:
                raise NotComfyUI(f"{path} answered HTTP {reply.status_code}")
            body = bytearray()
            async for chunk in reply.aiter_bytes():
                body += chunk
                if len(body) > _MAX_ANSWER_BYTES:
                    raise NotComfyUI(f"{path} answered more than {_MAX_ANSWER_BYTES} bytes")
        finally:
            await reply.aclose()
        try:
            return json.loads(body)
        except (ValueError, RecursionError) as exc:
            raise NotComfyUI(f"{path} did not answer usable JSON: {exc!r}") from None
    raise NotComfyUI("the host has no address")


def _url(ip: IPAddress, port: int, path: str) -> str:
    host = f"[{ip}]" if ip.version == 6 else str(ip)
    return f"http://{host}:{port}{path}"


def _looks_like_system_stats(body: Any) -> bool:
    return (
        isinstance(body, dict)
        and isinstance(body.get("system"), dict)
        and isinstance(body.get("devices"), list)
    )


def _looks_like_object_info(body: Any) -> bool:
    return isinstance(body, dict) and all(
        isinstance(node, dict) and "input" in node and "output" in node for node in body.values()
    )
