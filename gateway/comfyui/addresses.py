"""What kind of address a host reaches: the check behind URL inputs and server registration.

Both make this system connect where a request says, from inside its network: a host is
resolved, every address it has is classified, and the caller decides which kinds it accepts
(and which an allowlist of networks and host names may open).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable
from typing import Any, Final

import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Instance metadata services: a request that reaches one can read the host's cloud
# credentials. Most are link-local too; the others sit in private or shared address space.
METADATA_ADDRESSES: Final = frozenset(
    ipaddress.ip_address(address)
    for address in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, DigitalOcean, Oracle
        "169.254.170.2",  # AWS ECS task credentials
        "169.254.170.23",  # AWS EKS pod identity
        "fd00:ec2::254",  # AWS over IPv6
        "fd00:ec2::23",  # AWS EKS pod identity over IPv6
        "100.100.100.200",  # Alibaba Cloud
        "192.0.0.192",  # Oracle Cloud (classic)
    )
)
METADATA_HOSTS: Final = frozenset(
    {
        "metadata",
        "metadata.google.internal",
        "metadata.goog",
        "instance-data",
        "instance-data.ec2.internal",
        "metadata.tencentyun.com",
    }
)
# IPv6 prefixes that carry an IPv4 address a gateway or tunnel would connect to in the end.
_NAT64: Final = ipaddress.ip_network("64:ff9b::/96")


def host_key(host: str) -> str:
    """`host` as allowlists and the metadata names compare it: bare, lowercase, no final dot."""
    return host.strip().strip("[]").rstrip(".").lower()


def unmapped(address: IPAddress) -> IPAddress:
    """The IPv4 address an IPv6 one stands for (mapped, NAT64, 6to4), else `address`."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address in _NAT64:
            return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if address.sixtofour is not None:
            return address.sixtofour
    return address


def kind_of(address: IPAddress) -> str | None:
    """What is not public about `address` ("loopback", "private", ...), or None if public."""
    address = unmapped(address)
    checks = (
        ("loopback", address.is_loopback),
        ("link-local", address.is_link_local),
        ("multicast", address.is_multicast),
        ("unspecified", address.is_unspecified),
        ("private", address.is_private),
        ("reserved", address.is_reserved),
        ("non-public", not address.is_global),
    )
    return next((kind for kind, hit in checks if hit), None)


def is_metadata(host: str, address: IPAddress) -> bool:
    """Whether `host` (which resolved to `address`) is a cloud instance metadata service."""
    return host_key(host) in METADATA_HOSTS or unmapped(address) in METADATA_ADDRESSES


def is_broadcast(address: IPAddress) -> bool:
    return unmapped(address) == ipaddress.IPv4Address("255.255.255.255")


class Allowlist:
    """Networks and host names a deployment opens beyond what is allowed by default.

    An entry is a network (`10.0.0.0/8`, `192.168.1.20`, `fd00::/8`) or a host name, matched
    exactly and without regard to case; a host name allows whatever addresses it resolves to.
    """

    def __init__(self, entries: Iterable[str] = ()) -> None:
        self.networks: list[IPNetwork] = []
        self.hosts: set[str] = set()
        for entry in (raw.strip() for raw in entries):
            if not entry:
                continue
            try:
                self.networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                self.hosts.add(host_key(entry))

    def __bool__(self) -> bool:
        return bool(self.networks or self.hosts)

    def allows(self, host: str, address: IPAddress) -> bool:
        address = unmapped(address)
        return host_key(host) in self.hosts or any(address in net for net in self.networks)


async def resolve(host: str, port: int) -> list[IPAddress]:
    """Every address `host` has (an IP address written out is its own), each once.

    Raises OSError when the name does not resolve.
    """
    try:
        return [ipaddress.ip_address(host_key(host))]
    except ValueError:
        pass
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    found: list[IPAddress] = []
    for _, _, _, _, sockaddr in infos:
        address = ipaddress.ip_address(str(sockaddr[0]).split("%")[0])
        if address not in found:
            found.append(address)
    return found


def is_this_host(address: IPAddress) -> bool:
    """Whether a connection to `address` reaches this machine: loopback, "any", or one of its
    own interface addresses (which a socket can be bound to; nothing is sent)."""
    address = unmapped(address)
    if address.is_loopback or address.is_unspecified:
        return True
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((str(address), 0))
        except OSError:
            return False
    return True


def pinned(url: httpx.URL, address: IPAddress) -> tuple[httpx.URL, dict[str, str], dict[str, Any]]:
    """`url` aimed at the checked `address`, with the original Host header and TLS name, so a
    name that resolves elsewhere by the time of the request cannot lead it astray."""
    headers = {"Host": url.netloc.decode("ascii")}
    extensions: dict[str, Any] = {}
    host = url.raw_host.decode("ascii")
    if url.scheme == "https" and host_key(host) != str(address):
        extensions["sni_hostname"] = host
    return url.copy_with(host=str(address)), headers, extensions
