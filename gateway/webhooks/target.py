"""Where a webhook may be sent: the same rules as URL inputs (gateway/comfyui/addresses.py).

A host is resolved and every address it has must be public, or named by `webhook_allowlist`;
cloud metadata, unspecified and broadcast addresses never. Checked at submission and again
before each attempt (a name may resolve elsewhere by then), and the request goes to the checked
address, never to a second lookup.
"""

from __future__ import annotations

from typing import Final

import httpx

from gateway.comfyui.addresses import (
    Allowlist,
    IPAddress,
    host_key,
    is_broadcast,
    is_metadata,
    kind_of,
    resolve,
)

MAX_URL_LENGTH: Final = 2048
_DEFAULT_PORTS: Final = {"http": 80, "https": 443}


class TargetRefused(ValueError):
    """A webhook URL that is malformed or leads where webhooks may not go."""


class Unresolvable(TargetRefused):
    """The webhook's host has no address now (it may have one later)."""


def parse_url(url: str) -> httpx.URL:
    """`url` as a URL a webhook can be POSTed to: http(s), with a host."""
    if len(url) > MAX_URL_LENGTH:
        raise TargetRefused(f"the webhook URL is longer than {MAX_URL_LENGTH} characters")
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise TargetRefused(f"the webhook URL {url!r} is not a valid URL: {exc}") from None
    if parsed.scheme not in _DEFAULT_PORTS or not parsed.host:
        raise TargetRefused(f"the webhook URL {url!r} must be http:// or https:// with a host")
    return parsed


async def checked_addresses(url: httpx.URL, allowlist: Allowlist) -> list[IPAddress]:
    """Every address of the URL's host, each allowed; TargetRefused naming the first that is not."""
    host = url.raw_host.decode("ascii")
    try:
        addresses = await resolve(host, url.port or _DEFAULT_PORTS[url.scheme])
    except OSError as exc:
        raise Unresolvable(f"the webhook host {host!r} does not resolve: {exc}") from None
    if not addresses:
        raise Unresolvable(f"the webhook host {host!r} has no address")
    for address in addresses:
        shown = host if host_key(host) == str(address) else f"{host} ({address})"
        if is_metadata(host, address) or is_broadcast(address) or address.is_unspecified:
            raise TargetRefused(f"the webhook host {shown} is never allowed")
        kind = kind_of(address)
        if kind is not None and not allowlist.allows(host, address):
            raise TargetRefused(
                f"the webhook host {shown} is a {kind} address: webhooks go to public "
                "addresses only, unless the setting webhook_allowlist names the host or "
                "its network"
            )
    return addresses
