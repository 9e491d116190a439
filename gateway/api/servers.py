"""`/servers`: register, list, health, remove the ComfyUI servers of the fleet."""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from typing import Any

import httpx
from litestar import Controller, delete, get, post
from litestar.params import FromPath, JSONBody
from nats.js.errors import InvalidKeyError, KeyNotFoundError

from gateway.api.errors import ApiError, error_responses
from gateway.api.schemas import ServerHealth, ServerRegistration
from gateway.api.services import ServicesDep
from gateway.balancer.servers import ServerState
from gateway.bus.contract import ContractError, ServerRecord, check_token, decode, encode, now

# A server id is a subject token and a KV key: the characters both take.
_SERVER_ID = re.compile(r"[A-Za-z0-9_=-]{1,128}")
_ADDRESS = re.compile(r"^(?P<host>\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+):(?P<port>\d{1,5})$")


def _server_id(body: ServerRegistration) -> str:
    if body.server_id:
        return body.server_id
    slug = re.sub(r"[^a-z0-9]+", "-", body.name.lower()).strip("-")
    return slug or "server"


def check_address(address: str, allowlist: list[str]) -> str:
    """`host:port` of a ComfyUI server, refused with a 400 when malformed or not allowed."""
    address = address.strip().removeprefix("http://").rstrip("/")
    match = _ADDRESS.match(address)
    if match is None or not 0 < int(match["port"]) < 65536:
        raise ApiError(400, "invalid_address", f"{address!r} is not host:port (e.g. 10.0.0.5:8188)")
    if allowlist and not _allowed(match["host"].strip("[]"), allowlist):
        raise ApiError(403, "address_not_allowed", f"{address} is not in the allowed networks")
    return address


def _allowed(host: str, allowlist: list[str]) -> bool:
    """An entry is a network (`10.0.0.0/8`, `127.0.0.1`) or a host name matched exactly."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    for entry in allowlist:
        try:
            network = ipaddress.ip_network(entry, strict=False)
        except ValueError:
            if host == entry:
                return True
            continue
        if ip is not None and ip in network:
            return True
    return False


async def probe(address: str) -> None:
    """Refuse an address where no ComfyUI answers."""
    try:
        async with httpx.AsyncClient(timeout=3.0) as client:
            reply = await client.get(f"http://{address}/system_stats")
    except httpx.HTTPError as exc:
        raise ApiError(
            422, "unreachable", f"no ComfyUI answers at {address}: {exc or type(exc).__name__}"
        ) from None
    if reply.status_code != 200 or "system" not in reply.text:
        raise ApiError(
            422, "not_comfyui", f"{address} answered /system_stats with {reply.status_code}"
        )


def health_of(state: ServerState, now_monotonic: float) -> ServerHealth:
    beat = state.heartbeat
    caps = state.capabilities
    age = state.age(now_monotonic)
    return ServerHealth(
        server_id=state.server_id,
        name=state.name,
        address=state.address,
        status=state.status(now_monotonic),
        reason=beat.reason if beat else None,
        last_seen_s=None if age is None else round(age, 3),
        queue_running=beat.queue_running if beat else 0,
        queue_pending=beat.queue_pending if beat else 0,
        in_flight=len(beat.in_flight) if beat else 0,
        capacity=state.capacity,
        weight=state.weight,
        labels=state.labels,
        node_types=len(caps.node_types) if caps else 0,
        models={folder: len(files) for folder, files in caps.models.items()} if caps else {},
        device=caps.device if caps else None,
        seconds_per_job=state.seconds_per_job,
    )


def fleet_health(services: ServicesDep) -> list[ServerHealth]:
    table = services.fleet.table
    clock = table.now()
    return [health_of(s, clock) for s in sorted(table, key=lambda s: s.server_id)]


class ServerController(Controller):
    path = "/servers"
    tags = ("servers",)

    @post(["/", "/register"], status_code=201, responses=error_responses(403, 409, 422))
    async def register(
        self, data: JSONBody[ServerRegistration], services: ServicesDep
    ) -> ServerRecord:
        """Add a ComfyUI server; its address must answer like ComfyUI.

        Also at `/servers/register`, the path earlier SDKs used.
        """
        address = check_address(data.address, services.settings.server_allowlist)
        if not data.name.strip() or any(unicodedata.category(ch) == "Cc" for ch in data.name):
            raise ApiError(
                400,
                "invalid_request",
                f"server name {data.name!r} is empty or has a control character",
            )
        server_id = _server_id(data)
        try:
            check_token(server_id, "server id")
        except ContractError as exc:
            raise ApiError(400, "invalid_server_id", str(exc)) from None
        if _SERVER_ID.fullmatch(server_id) is None:
            raise ApiError(
                400,
                "invalid_server_id",
                f"server id {server_id!r} is not usable: 1-128 letters, digits, '-', '_' or '='",
            )
        if not 1 <= data.capacity <= 64 or data.weight <= 0:
            raise ApiError(400, "invalid_request", "capacity must be 1-64 and weight positive")
        if data.server_id is None:
            # A name made only of letters outside a-z gives the same id as another such name:
            # refuse rather than silently replace the other server.
            try:
                taken = await services.servers_kv.get(server_id)
            except KeyNotFoundError:
                taken = None
            if taken is not None and taken.value:
                other = decode(taken.value, ServerRecord)
                if other.name != data.name:
                    raise ApiError(
                        409,
                        "server_id_taken",
                        f"the id {server_id!r} made from the name {data.name!r} is server "
                        f"{other.name!r}'s; give this one a server_id",
                    )
        await probe(address)
        record = ServerRecord(
            server_id=server_id,
            name=data.name,
            address=address,
            weight=data.weight,
            capacity=data.capacity,
            labels=data.labels,
            registered_at=now(),
        )
        await services.servers_kv.put(server_id, encode(record))
        services.fleet.table.on_registered(record)
        return record

    @get("/")
    async def list_servers(self, services: ServicesDep) -> list[ServerHealth]:
        """Every server known: registered ones and those that heartbeat."""
        return fleet_health(services)

    @get("/health")
    async def health(self, services: ServicesDep) -> dict[str, Any]:
        """Fleet health: each server's status, queue and last heartbeat."""
        servers = fleet_health(services)
        healthy = sum(1 for s in servers if s.status == "healthy")
        return {"servers": servers, "total": len(servers), "healthy": healthy}

    @delete("/{server_id:str}", status_code=204, responses=error_responses(404))
    async def remove(self, server_id: FromPath[str], services: ServicesDep) -> None:
        """Remove a server from the registry; its adapter stops getting new jobs."""
        try:
            await services.servers_kv.get(server_id)
        except (KeyNotFoundError, InvalidKeyError, ValueError):
            raise ApiError(
                404, "unknown_server", f"no server {server_id!r} is registered"
            ) from None
        await services.servers_kv.delete(server_id)
        services.fleet.table.on_removed(server_id)
