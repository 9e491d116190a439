"""`/servers`: register, list, health, remove the ComfyUI servers of the fleet.

Where a server may be registered is `serveraddress`'s rule, whether a ComfyUI answers there is
`probe`'s; this module keeps the registry: one ComfyUI, one server.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Sequence
from typing import Any, Final

from litestar import Controller, Request, Response, delete, get, post
from litestar.params import FromPath, JSONBody
from litestar.types import Guard
from nats.js.errors import InvalidKeyError, KeyNotFoundError

from gateway.api.auth import OPEN, Caller, admin_only, caller_of
from gateway.api.drain import jobs_held, set_draining
from gateway.api.errors import ApiError, error_responses
from gateway.api.limits import take_registration
from gateway.api.probe import SYSTEM_HEADER as SYSTEM_HEADER  # what app.py marks answers with
from gateway.api.probe import probe
from gateway.api.schemas import ServerHealth, ServerRegistration
from gateway.api.serveraddress import ServerAddress, check_reach, parse_address
from gateway.api.services import ServicesDep
from gateway.balancer.costs import ServerCosts
from gateway.balancer.servers import ServerState
from gateway.bus.contract import ContractError, ServerRecord, check_token, decode, encode, now
from gateway.bus.kvdelete import delete_key
from gateway.bus.kvsnapshot import kv_snapshot
from gateway.comfyui.addresses import IPAddress, resolve

# A server id is a subject token and a KV key: the characters both take.
_SERVER_ID = re.compile(r"[A-Za-z0-9_=-]{1,128}")
# Who may change the fleet: every guard here runs before a registration or a removal is
# looked at (reading the fleet is for every caller).
FLEET_CHANGE_GUARDS: Final[Sequence[Guard]] = (admin_only,)


def _server_id(body: ServerRegistration) -> str:
    if body.server_id:
        return body.server_id
    slug = re.sub(r"[^a-z0-9]+", "-", body.name.lower()).strip("-")
    return slug or "server"


async def _place(address: str) -> tuple[frozenset[str], str]:
    """The IP addresses a `host:port` reaches, and its port: how two spellings of one server
    (`localhost`, `127.1`, `0.0.0.0`, `2130706433`) are told to be one."""
    host, _, port = address.lower().rpartition(":")
    host = host.strip("[]")
    try:
        number = int(port)
        ips = await resolve(host, number)
    except (OSError, ValueError):
        return frozenset({host}), port
    return _place_of(ips, str(number))


def _place_of(ips: Iterable[IPAddress], port: str) -> tuple[frozenset[str], str]:
    # A connection to "any" address reaches this machine.
    return frozenset(
        "127.0.0.1" if ip.is_unspecified or ip.is_loopback else str(ip) for ip in ips
    ), port


async def _same_place(place: tuple[frozenset[str], str], address: str) -> bool:
    """Whether `address` names the server at `place` (see _place)."""
    ips, port = await _place(address)
    return port == place[1] and bool(ips & place[0])


def health_of(
    state: ServerState,
    now_monotonic: float,
    *,
    admin: bool = True,
    costs: ServerCosts | None = None,
    jobs_held: int | None = None,
) -> ServerHealth:
    beat = state.heartbeat
    caps = state.capabilities
    age = state.age(now_monotonic)
    return ServerHealth(
        server_id=state.server_id,
        name=state.name,
        address=state.address if admin else None,
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
        seconds_per_unit=costs.seconds_per_unit if costs else None,
        shapes_learnt=costs.shapes if costs else 0,
        # Which models were loaded tells what other callers ran: admins only, as addresses.
        load_seconds=costs.load_seconds if costs and admin else {},
        resident_models=list(state.resident) if admin else [],
        model_slots=state.model_slots,
        draining=state.draining,
        jobs_held=jobs_held if state.draining else None,
    )


async def fleet_health(
    services: ServicesDep, caller: Caller = OPEN, *, only: str | None = None
) -> list[ServerHealth]:
    """Every server's health (or server `only`'s); without addresses for a user key."""
    table = services.fleet.table
    servers = sorted(
        (s for s in table if only is None or s.server_id == only), key=lambda s: s.server_id
    )
    held = await jobs_held(services, [s.server_id for s in servers if s.draining])
    clock = table.now()
    return [
        health_of(
            s,
            clock,
            admin=caller.admin,
            costs=table.costs.describe(s.server_id),
            jobs_held=held.get(s.server_id),
        )
        for s in servers
    ]


class ServerController(Controller):
    path = "/servers"
    tags = ("servers",)

    @post(
        ["/", "/register"],
        status_code=201,
        guards=list(FLEET_CHANGE_GUARDS),
        responses=error_responses(403, 409, 422, 429),
    )
    async def register(
        self,
        request: Request[Any, Any, Any],
        data: JSONBody[ServerRegistration],
        services: ServicesDep,
    ) -> Response[ServerRecord]:
        """Add a ComfyUI server (201); its address must be allowed and answer like ComfyUI.

        One ComfyUI is one server: its address under another explicit id is 409, and so is an
        id that is registered at another address (remove it first to move it). Registering a
        server again (same id, or the same name, and the same address) answers 200 and updates
        what changed (name, weight, capacity, labels) without restarting anything; adding, by
        name only, an address that is already a server answers that server (200, unchanged).
        An address the policy refuses is 403 `address_not_allowed` (nothing connects to it),
        one where no ComfyUI answers 422 `unreachable`, whatever did answer; well-formed
        registrations are rate-limited per caller (429). Also at `/servers/register`, the path
        earlier SDKs used.
        """
        server = parse_address(data.address)
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
        # Counted from here on: what follows resolves the name and may connect to it.
        take_registration(request)
        server = await check_reach(server, services.settings)
        # One registration at a time here, so that two at once cannot both find the address
        # free (gateways elsewhere are not held by this; see docs/API.md).
        async with services.registering:
            return await _register(services, data, server_id, server)

    @get("/")
    async def list_servers(
        self, services: ServicesDep, request: Request[Any, Any, Any]
    ) -> list[ServerHealth]:
        """Every server known: registered ones and those that heartbeat (addresses: admins)."""
        return await fleet_health(services, caller_of(request))

    @get("/health")
    async def health(
        self, services: ServicesDep, request: Request[Any, Any, Any]
    ) -> dict[str, Any]:
        """Fleet health: each server's status, queue and last heartbeat (addresses: admins)."""
        servers = await fleet_health(services, caller_of(request))
        healthy = sum(1 for s in servers if s.status == "healthy")
        return {"servers": servers, "total": len(servers), "healthy": healthy}

    @delete(
        "/{server_id:str}",
        status_code=204,
        guards=list(FLEET_CHANGE_GUARDS),
        responses=error_responses(403, 404),
    )
    async def remove(self, server_id: FromPath[str], services: ServicesDep) -> None:
        """Remove a server for good: its adapter stops, its heartbeats are ignored, jobs
        waiting for it fail `server_removed` and new ones pinned to it are refused. Removing
        it again is harmless (204)."""
        try:
            await services.servers_kv.get(server_id)
        except (KeyNotFoundError, InvalidKeyError, ValueError) as exc:
            if isinstance(exc, KeyNotFoundError) and services.fleet.table.is_removed(server_id):
                return
            raise ApiError(
                404, "unknown_server", f"no server {server_id!r} is registered"
            ) from None
        revision = await delete_key(services.js, services.subjects.servers_bucket, server_id)
        services.fleet.table.on_removed(server_id, revision=revision)

    @post(
        "/{server_id:str}/drain",
        status_code=200,
        guards=list(FLEET_CHANGE_GUARDS),
        responses=error_responses(403, 404),
    )
    async def drain(self, server_id: FromPath[str], services: ServicesDep) -> ServerHealth:
        """Take a server out of service without removing it: it gets no new jobs, finishes
        those it holds, and jobs pinned to it wait (they run once it is undrained). Answers
        the server, with `jobs_held`: 0 once it is drained and safe to stop. Draining it
        again is harmless (the same answer)."""
        return await _drain(services, server_id, draining=True)

    @post(
        "/{server_id:str}/undrain",
        status_code=200,
        guards=list(FLEET_CHANGE_GUARDS),
        responses=error_responses(403, 404),
    )
    async def undrain(self, server_id: FromPath[str], services: ServicesDep) -> ServerHealth:
        """Put a drained server back in service: it takes jobs again, those pinned to it
        first among them. Undraining a server that is not draining is harmless."""
        return await _drain(services, server_id, draining=False)


async def _drain(services: ServicesDep, server_id: str, *, draining: bool) -> ServerHealth:
    """Set or clear the flag, then answer the server as GET /servers shows it."""
    # One change of the registry at a time here: a registration under way keeps the flag.
    async with services.registering:
        await set_draining(services, server_id, draining)
    return (await fleet_health(services, only=server_id))[0]


async def _register(
    services: ServicesDep, data: ServerRegistration, server_id: str, server: ServerAddress
) -> Response[ServerRecord]:
    """The registration proper (see ServerController.register), under the lock."""
    address = server.address
    registered = await _registered(services)
    existing = registered.get(server_id)
    if existing is not None and data.server_id is None and existing.name != data.name:
        # A name made only of letters outside a-z gives the same id as another such name:
        # refuse rather than silently replace the other server.
        raise ApiError(
            409,
            "server_id_taken",
            f"the id {server_id!r} made from the name {data.name!r} is server "
            f"{existing.name!r}'s; give this one a server_id",
        )
    # Resolved once (by the policy check), compared with each registered server.
    place = _place_of(server.ips, str(server.port)) if server.ips else await _place(address)
    if existing is not None and not await _same_place(place, existing.address):
        raise ApiError(
            409,
            "server_exists",
            f"server {server_id!r} is registered at {existing.address}; remove it first "
            f"(DELETE /servers/{server_id}) to register it at {address}",
            {"server_id": server_id, "address": existing.address},
        )
    for other in registered.values():
        if other.server_id != server_id and await _same_place(place, other.address):
            if data.server_id is None and existing is None:
                # Asked to add a ComfyUI that is already a server (the quick start run
                # against `up --comfyui`, say): that server it is, unchanged.
                return Response(other, status_code=200)
            raise ApiError(
                409,
                "address_registered",
                f"the ComfyUI at {address} is server {other.server_id!r} already",
                {"server_id": other.server_id, "address": other.address},
            )
    record = ServerRecord(
        server_id=server_id,
        name=data.name,
        address=address,
        weight=data.weight,
        capacity=data.capacity,
        labels=data.labels,
        registered_at=existing.registered_at if existing is not None else now(),
        # Registering again (the quick start run twice, a changed label) is no undrain.
        draining=existing.draining if existing is not None else False,
    )
    if existing is not None:
        if record != existing:
            revision = await services.servers_kv.put(server_id, encode(record))
            services.fleet.table.on_registered(record, revision=revision)
        return Response(record, status_code=200)
    await probe(server, services.system_id, step_s=services.settings.server_probe_timeout_s)
    revision = await services.servers_kv.put(server_id, encode(record))
    services.fleet.table.on_registered(record, revision=revision)
    return Response(record, status_code=201)


async def _registered(services: ServicesDep) -> dict[str, ServerRecord]:
    """Every server in the registry now, by id (read from KV, not from this gateway's view)."""
    snapshot = await kv_snapshot(services.js, services.subjects.servers_bucket)
    records = {}
    for value in snapshot.values():
        try:
            record = decode(value, ServerRecord)
        except ContractError:
            continue
        records[record.server_id] = record
    return records
