"""Where a ComfyUI server may be registered: the address's form, then where it leads.

Registering makes the gateway probe the address at once and its adapter connect to it for good,
from inside the deployment's network; so the address is resolved, and every address the host
has must pass, before anything connects to it:

- cloud metadata services, link-local, multicast, unspecified and broadcast addresses are
  never registered, whatever `server_allowlist` says;
- neither are this system's own ports on its own host (the NATS broker, the gateway's HTTP);
- with a `server_allowlist`, only what it names (a network, or a host name exactly);
- without one, public addresses, and loopback and private ones only while the gateway listens
  on loopback alone (then whoever registers already sits on this machine).
"""

from __future__ import annotations

import ipaddress
import logging
import re
from typing import Final
from urllib.parse import urlsplit

import msgspec

from gateway.api.auth import is_loopback
from gateway.api.errors import ApiError
from gateway.comfyui.addresses import (
    METADATA_HOSTS,
    Allowlist,
    IPAddress,
    host_key,
    is_broadcast,
    is_metadata,
    is_this_host,
    kind_of,
    resolve,
)
from gateway.settings import Settings

log = logging.getLogger(__name__)

_ADDRESS: Final = re.compile(r"^(?P<host>\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+):(?P<port>\d{1,5})$")
# Kinds no allowlist opens: what sits there is never a ComfyUI, and some of it (a metadata
# service) hands out the host's credentials to whoever asks.
_NEVER: Final = frozenset({"link-local", "multicast", "unspecified"})
_NATS_PORT: Final = 4222
_THIS_HOST: Final = "this host"


class ServerAddress(msgspec.Struct, frozen=True):
    """A registration's `host:port`, well formed; `ips` once resolved (empty if it did not)."""

    address: str
    host: str
    port: int
    ips: tuple[IPAddress, ...] = ()
    unresolved: str | None = None  # why it did not resolve, for the log


def parse_address(address: str) -> ServerAddress:
    """`host:port` of a ComfyUI server, or a 400 `invalid_address`; nothing is resolved."""
    address = address.strip().removeprefix("http://").rstrip("/")
    match = _ADDRESS.match(address)
    if match is None or not 0 < int(match["port"]) < 65536 or not _plain_host(match["host"]):
        raise ApiError(400, "invalid_address", f"{address!r} is not host:port (e.g. 10.0.0.5:8188)")
    return ServerAddress(address=address, host=match["host"].strip("[]"), port=int(match["port"]))


def _plain_host(host: str) -> bool:
    """A name, or an IP address written as one (not `127.000.000.001`, which URLs refuse)."""
    if host.startswith("["):
        host = host.strip("[]")
    elif not all(part.isdigit() for part in host.split(".")):
        return True  # a name
    try:
        ipaddress.ip_address(host)
    except ValueError:
        # `127.1` and `2130706433` are IPv4 in other spellings; resolving them says so.
        return host.count(".") < 3
    return True


class AddressNotAllowed(ApiError):
    """403 `address_not_allowed`, naming the rule (`details.rule`) and the kind of address."""

    def __init__(self, address: str, rule: str, kind: str, why: str) -> None:
        super().__init__(
            403,
            "address_not_allowed",
            f"{address} is not allowed: {why}",
            {"rule": rule, "kind": kind},
        )


async def check_reach(server: ServerAddress, settings: Settings) -> ServerAddress:
    """`server` with the addresses it resolves to, once each passed the policy above.

    Raises AddressNotAllowed. A host that does not resolve passes with no addresses: there is
    nothing to connect to, and the probe says so in the same words as for any other failure.
    """
    address = server.address
    if host_key(server.host) in METADATA_HOSTS:
        raise _never(address, "cloud metadata")
    try:
        ips = tuple(await resolve(server.host, server.port))
    except OSError as exc:
        log.info("registration at %s: the host does not resolve: %s", address, exc)
        return msgspec.structs.replace(server, unresolved=f"the host does not resolve: {exc}")
    allowlist = Allowlist(settings.server_allowlist)
    own = await _own_endpoints(settings)
    for ip in ips:
        kind = kind_of(ip)
        if is_metadata(server.host, ip):
            raise _never(address, "cloud metadata")
        if is_broadcast(ip):
            raise _never(address, "broadcast")
        if kind in _NEVER:
            raise _never(address, kind)
        what = own.get((_THIS_HOST if is_this_host(ip) else ip, server.port))
        if what is not None:
            raise AddressNotAllowed(address, "own_port", kind or "public", f"it is {what}")
        if allowlist:
            if not allowlist.allows(server.host, ip):
                raise AddressNotAllowed(
                    address,
                    "allowlist",
                    kind or "public",
                    "server_allowlist names neither its host nor its network",
                )
        elif kind is not None and not is_loopback(settings.host):
            raise AddressNotAllowed(
                address,
                "beyond_loopback",
                kind,
                f"it is {_a(kind)} address, and a gateway that listens beyond loopback (on "
                f"{settings.host}) registers those only where server_allowlist names them",
            )
    return msgspec.structs.replace(server, ips=ips)


def _never(address: str, kind: str) -> AddressNotAllowed:
    return AddressNotAllowed(
        address,
        "never",
        kind,
        f"it is {_a(kind)} address, where no server is ever registered (whatever "
        "server_allowlist says)",
    )


def _a(kind: str) -> str:
    return f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}"


async def _own_endpoints(settings: Settings) -> dict[tuple[IPAddress | str, int], str]:
    """This system's own ports, as (address, or "this host" for any of its own, port)."""
    named: list[tuple[str, int, str]] = []
    for url in settings.nats_url.split(","):
        parts = urlsplit(url.strip() if "://" in url else f"nats://{url.strip()}")
        try:
            port = parts.port or _NATS_PORT
        except ValueError:
            continue  # not a port: the bus could not have connected there either
        named.append((parts.hostname or "127.0.0.1", port, "the NATS broker's port"))
    if settings.port:
        named.append((settings.host, settings.port, "this gateway's own HTTP port"))
    own: dict[tuple[IPAddress | str, int], str] = {}
    for host, port, what in named:
        try:
            ips = await resolve(host, port)
        except OSError as exc:
            log.warning("cannot resolve %s (%s) to keep it unregistrable: %s", host, what, exc)
            continue
        for ip in ips:
            own[(_THIS_HOST if is_this_host(ip) else ip, port)] = what
    return own
