"""`GET /whoami`: the caller and role of the key that asks, so that a client (the dashboard)
offers only what the key may do; the gateway refuses the rest whatever a client shows."""

from __future__ import annotations

from typing import Any

from litestar import Request, get

from gateway.api.auth import caller_of
from gateway.api.schemas import Identity


@get("/whoami", tags=["system"])
async def whoami(request: Request[Any, Any, Any]) -> Identity:
    """The asking key's caller id and role (`admin` or `user`); nothing about the key itself."""
    caller = caller_of(request)
    return Identity(caller=caller.id, role="admin" if caller.admin else "user")
