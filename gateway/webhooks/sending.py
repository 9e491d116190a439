"""One attempt: the signed POST of an event's body to a webhook, and what came of it."""

from __future__ import annotations

import datetime
import logging
import time
from typing import Final

import httpx
import msgspec

from gateway.comfyui.addresses import Allowlist, pinned
from gateway.webhooks.signing import signed_headers
from gateway.webhooks.target import (
    TargetRefused,
    Unresolvable,
    checked_addresses,
    parse_url,
)

log = logging.getLogger(__name__)

USER_AGENT: Final = "ComfyAutomate-Webhooks/1"
GONE: Final = 410
# What is kept of a receiver's or a library's words about a failure.
_MAX_ERROR = 300


class Result(msgspec.Struct, kw_only=True):
    """What one attempt came to. `final`: no later attempt could do better (410, a refused
    target, nothing to sign with)."""

    delivered: bool = False
    final: bool = False
    status_code: int | None = None
    latency_ms: float | None = None
    error: str | None = None


def body_of(event_type: str, event_ts: float, event: bytes, batch_id: str | None = None) -> bytes:
    """The request body: the Standard Webhooks envelope around the event as its log holds it,
    with the job's batch when it has one."""
    stamp = datetime.datetime.fromtimestamp(event_ts, datetime.UTC)
    body: dict[str, object] = {
        "type": f"job.{event_type}",
        "timestamp": stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "data": msgspec.Raw(event),
    }
    if batch_id is not None:
        body["batch_id"] = batch_id
    return msgspec.json.encode(body)


async def post(
    http: httpx.AsyncClient,
    url: str,
    *,
    msg_id: str,
    body: bytes,
    key: bytes,
    allowlist: Allowlist,
    timeout_s: float,
) -> Result:
    """POST `body` to `url`, signed with `key`, at an address checked just now."""
    try:
        parsed = parse_url(url)
        addresses = await checked_addresses(parsed, allowlist)
    except Unresolvable as exc:
        return Result(error=str(exc)[:_MAX_ERROR])  # it may resolve later
    except TargetRefused as exc:
        # Leads where webhooks may not go (its name resolves elsewhere since the submission).
        return Result(final=True, error=str(exc)[:_MAX_ERROR])
    headers = {
        "content-type": "application/json",
        "user-agent": USER_AGENT,
        **signed_headers(key, msg_id, body),
    }
    started = time.monotonic()
    for index, address in enumerate(addresses):
        target, host, extensions = pinned(parsed, address)
        try:
            reply = await http.post(
                target,
                content=body,
                headers={**headers, **host},
                extensions=extensions,
                timeout=timeout_s,
            )
        except httpx.ConnectError as exc:
            if index < len(addresses) - 1:
                continue
            return _failed(started, f"cannot connect: {exc}")
        except httpx.TimeoutException:
            return _failed(started, f"no answer within {timeout_s:g} s")
        except httpx.HTTPError as exc:
            return _failed(started, f"{type(exc).__name__}: {exc}")
        latency = (time.monotonic() - started) * 1000
        code = reply.status_code
        if 200 <= code < 300:
            return Result(delivered=True, status_code=code, latency_ms=latency)
        return Result(
            final=code == GONE,
            status_code=code,
            latency_ms=latency,
            error=f"the receiver answered HTTP {code}",
        )
    raise AssertionError("unreachable: a checked host has at least one address")


def _failed(started: float, error: str) -> Result:
    return Result(latency_ms=(time.monotonic() - started) * 1000, error=error[:_MAX_ERROR])
