"""Limits on what one client can take: submit and registration rates, concurrent event streams,
body size.

The app keeps one `Limits` in its state; handlers reach it through `limits_of(app)`.
"""

from __future__ import annotations

import math
import time
import weakref
from collections.abc import AsyncIterator, Callable, Mapping
from types import TracebackType
from typing import Any, Final, TypeVar

from litestar import Litestar, Request, Response
from litestar.connection import ASGIConnection
from litestar.exceptions import HTTPException
from litestar.handlers import BaseRouteHandler

from gateway.api.auth import OPEN, caller_of
from gateway.api.errors import ApiError
from gateway.settings import Settings, SettingsError

T = TypeVar("T")

STATE_KEY: Final = "comfyautomate_limits"
# Buckets of clients idle long enough to be full again are dropped past this many, so a stream
# of new addresses cannot grow the table without end.
_PRUNE_ABOVE: Final = 10_000


class RateLimited(ApiError):
    """429 with the seconds to wait, in `Retry-After` and in `details`."""

    def __init__(self, retry_after: int, terms: str, details: Mapping[str, Any]) -> None:
        super().__init__(
            429,
            "rate_limited",
            f"{terms}; retry in {retry_after} s",
            {"retry_after_s": retry_after, **details},
        )
        self.retry_after = retry_after


class TokenBuckets:
    """One token bucket per client: `burst` tokens, refilled at `rate` per second.

    A refusal says what is limited and how (`terms`, with the settings that set it), and
    carries `details` besides the seconds to wait.
    """

    def __init__(
        self,
        rate: float,
        burst: int,
        clock: Callable[[], float] = time.monotonic,
        *,
        terms: str = "",
        details: Mapping[str, Any] | None = None,
    ) -> None:
        self.rate = rate
        self.burst = burst
        self.terms = terms or f"too many requests: {burst} at once, then {rate:g} per second"
        self.details = dict(details or {})
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, at)

    def _level(self, client: str, now: float) -> float:
        tokens, at = self._buckets.get(client, (float(self.burst), now))
        return min(float(self.burst), tokens + (now - at) * self.rate)

    def take(self, client: str) -> None:
        """Spend one token of `client`'s bucket, or raise RateLimited."""
        now = self._clock()
        tokens = self._level(client, now)
        if tokens < 1.0:
            wait = math.ceil((1.0 - tokens) / self.rate)
            raise RateLimited(wait, self.terms, self.details)
        self._buckets[client] = (tokens - 1.0, now)
        if len(self._buckets) > _PRUNE_ABOVE:
            full = [c for c in self._buckets if self._level(c, now) >= self.burst]
            for c in full:
                del self._buckets[c]


class StreamSlot:
    """One held event stream; released once, however many times `release` is called."""

    def __init__(self, slots: StreamSlots, client: str) -> None:
        self._slots: StreamSlots | None = slots
        self._client = client

    def release(self) -> None:
        if self._slots is not None:
            self._slots.give_back(self._client)
            self._slots = None

    def __enter__(self) -> StreamSlot:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


class StreamSlots:
    """Counts SSE and websocket event streams together against `max_event_streams`, and each
    client's (API key, else address) against `max_event_streams_per_key`, so that one client
    cannot take every stream from the others."""

    def __init__(self, limit: int, per_client: int) -> None:
        self.limit = limit
        self.per_client = per_client
        self.in_use = 0
        self._by_client: dict[str, int] = {}

    def acquire(self, client: str) -> StreamSlot:
        """A slot for `client`, or a 503 `too_many_streams` when all (or its own) are taken."""
        held = self._by_client.get(client, 0)
        if held >= self.per_client:
            raise ApiError(
                503,
                "too_many_streams",
                f"this API key (or address) has {held} event streams open, the most one client "
                "may (max_event_streams_per_key); close one, or poll /workflow/status",
                {"max_event_streams_per_key": self.per_client},
            )
        if self.in_use >= self.limit:
            raise ApiError(
                503,
                "too_many_streams",
                f"{self.limit} event streams are open, the most this gateway serves "
                "(max_event_streams); retry later or poll /workflow/status",
                {"max_event_streams": self.limit},
            )
        self.in_use += 1
        self._by_client[client] = held + 1
        return StreamSlot(self, client)

    def give_back(self, client: str) -> None:
        self.in_use -= 1
        left = self._by_client.get(client, 1) - 1
        if left > 0:
            self._by_client[client] = left
        else:
            self._by_client.pop(client, None)


def hold(slot: StreamSlot, stream: AsyncIterator[T]) -> AsyncIterator[T]:
    """`stream`, releasing `slot` when it ends, fails, or is dropped without ever starting."""

    async def held() -> AsyncIterator[T]:
        with slot:
            async for item in stream:
                yield item

    wrapped = held()
    # A generator that is never iterated (the client left before the body) never runs its
    # `with`; the finalizer gives the slot back when the generator is collected.
    weakref.finalize(wrapped, slot.release)
    return wrapped


class Limits:
    """The per-app limiters built from the settings."""

    def __init__(self, settings: Settings) -> None:
        if settings.max_body_bytes < 1:
            raise SettingsError("max_body_bytes must be at least 1")
        if settings.submit_rate_per_s < 0 or settings.submit_burst < 1:
            raise SettingsError("submit_rate_per_s must be >= 0 and submit_burst >= 1")
        if settings.max_event_streams < 1 or settings.max_event_streams_per_key < 1:
            raise SettingsError("max_event_streams and max_event_streams_per_key must be >= 1")
        if not 0 < settings.event_keepalive_s <= 3600:
            raise SettingsError("event_keepalive_s must be over 0 and at most 3600 seconds")
        if not settings.register_rate_per_min > 0 or settings.register_burst < 1:
            raise SettingsError("register_rate_per_min must be > 0 and register_burst >= 1")
        self.max_body_bytes = settings.max_body_bytes
        rate, burst = settings.submit_rate_per_s, settings.submit_burst
        # A rate of 0 turns the submit limit off.
        self.submits = (
            TokenBuckets(
                rate,
                burst,
                terms=f"too many submissions: {burst} at once, then {rate:g} per second "
                "(submit_burst, submit_rate_per_s)",
                details={"submit_rate_per_s": rate, "submit_burst": burst},
            )
            if rate > 0
            else None
        )
        # Always on: each registration makes the gateway resolve and probe an address, which
        # must not become a way to scan the network it sits in.
        burst, per_minute = settings.register_burst, settings.register_rate_per_min
        self.registrations = TokenBuckets(
            per_minute / 60.0,
            burst,
            terms=f"too many server registrations: {burst} at once, then {per_minute:g} per "
            "minute (register_burst, register_rate_per_min)",
            details={"register_burst": burst, "register_rate_per_min": per_minute},
        )
        self.streams = StreamSlots(settings.max_event_streams, settings.max_event_streams_per_key)


def take_stream(connection: ASGIConnection[Any, Any, Any, Any]) -> StreamSlot:
    """One of the gateway's event streams for this client, or a 503 `too_many_streams`."""
    return limits_of(connection.app).streams.acquire(client_id(connection))


def limits_of(app: Litestar) -> Limits:
    limits = app.state[STATE_KEY]
    assert isinstance(limits, Limits)
    return limits


def client_id(connection: ASGIConnection[Any, Any, Any, Any]) -> str:
    """Who a limit applies to: the API key the guard accepted, else the client's address."""
    caller = caller_of(connection)
    if caller.id and caller is not OPEN:
        return caller.id
    return "addr:" + (connection.client.host if connection.client else "?")


async def submit_rate_limit(
    connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler
) -> None:
    """Guard for submit and execute: one token per request, before the body is read.

    Async although it never waits, so that Litestar calls it on the loop, not in a thread.
    """
    buckets = limits_of(connection.app).submits
    if buckets is not None:
        buckets.take(client_id(connection))


def take_registration(connection: ASGIConnection[Any, Any, Any, Any]) -> None:
    """Spend one of the caller's server registrations, or raise RateLimited."""
    limits_of(connection.app).registrations.take(client_id(connection))


def rate_limited(_: Request[Any, Any, Any], exc: RateLimited) -> Response[dict[str, Any]]:
    return Response(
        {"code": exc.code, "message": exc.message, "details": exc.details},
        status_code=exc.status,
        headers={"Retry-After": str(exc.retry_after)},
    )


def too_large(limit: int) -> Callable[[Request[Any, Any, Any], HTTPException], Response[Any]]:
    """Handler of 413 that names the limit and the setting, in the API's error shape."""

    def handler(_: Request[Any, Any, Any], exc: HTTPException) -> Response[dict[str, Any]]:
        return Response(
            {
                "code": "too_large",
                "message": f"the request body is over {limit} bytes (max_body_bytes)",
                "details": {"max_body_bytes": limit},
            },
            status_code=413,
        )

    return handler
