"""Where a ComfyUI server's HTTP API and websocket are, given its registered address."""

from __future__ import annotations


def base_url(address: str) -> str:
    """`host:port` or a URL, as the base URL of the server's HTTP API."""
    address = address.strip().rstrip("/")
    return address if "://" in address else f"http://{address}"


def ws_url(address: str, client_id: str) -> str:
    """The websocket URL for `client_id` on the server at `address`."""
    url = base_url(address)
    scheme, rest = url.split("://", 1)
    return f"{'wss' if scheme == 'https' else 'ws'}://{rest}/ws?clientId={client_id}"
