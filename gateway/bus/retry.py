"""Riding out a NATS leader election: which errors pass by themselves, and retrying through them.

When a broker node of a cluster dies, each stream it led elects a new leader among the others
(a few seconds; longer when the JetStream meta leader died too). Meanwhile JetStream answers
with errors that say "not now" rather than "no": nobody answers a publish
(`NoStreamResponseError`), the API says it is unavailable (503), a request times out. The same
call a moment later succeeds. Every role goes through this module for those calls, so that an
election costs a pause, never an exit or a lost job.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Final, TypeVar

import nats.errors
from nats.js.errors import APIError, NoStreamResponseError, ServiceUnavailableError

log = logging.getLogger(__name__)

T = TypeVar("T")

# Long enough for a stream's election after its leader died, and for the meta leader's.
ELECTION_S: Final = 30.0
_FIRST_PAUSE_S: Final = 0.05
_LONGEST_PAUSE_S: Final = 1.0
# JetStream error codes that mean "the cluster is electing or catching up": 10008 "JetStream
# system temporarily unavailable", 10118 "stream is offline", 10119 "consumer is offline".
_ELECTION_CODES: Final = frozenset({10008, 10118, 10119})


# What nats-py raises while a leader is being elected (also `except retry.TRANSIENT`).
TRANSIENT: Final = (
    NoStreamResponseError,
    ServiceUnavailableError,
    nats.errors.NoRespondersError,
    nats.errors.TimeoutError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.StaleConnectionError,
)


def transient(exc: BaseException) -> bool:
    """Whether `exc` is what NATS answers while a leader is being elected (try again soon)."""
    if isinstance(exc, TRANSIENT):
        return True
    # nats-py's KV errors are APIErrors made without the attributes set: read them with care.
    return isinstance(exc, APIError) and getattr(exc, "err_code", None) in _ELECTION_CODES


def pauses(first: float = _FIRST_PAUSE_S, longest: float = _LONGEST_PAUSE_S) -> _Pauses:
    """A fresh backoff: jittered pauses doubling from `first` up to `longest`."""
    return _Pauses(first, longest)


class _Pauses:
    def __init__(self, first: float, longest: float) -> None:
        self._next = first
        self._longest = longest

    def next(self) -> float:
        pause = self._next * random.uniform(0.5, 1.0)
        self._next = min(self._next * 2, self._longest)
        return pause


async def through_election(
    call: Callable[[], Awaitable[T]],
    what: str,
    *,
    within: float = ELECTION_S,
) -> T:
    """`await call()`, again after a pause while it fails with a transient error.

    Gives up after `within` seconds by raising the last error: every wait has a bound, and a
    cluster that stays leaderless longer is an outage the caller must report. Other errors
    pass through at once.
    """
    deadline = time.monotonic() + within
    backoff = pauses()
    tries = 0
    while True:
        # Each try gets only the time left: a call that hangs (nats-py waits 5 s for an answer)
        # must not carry the whole beyond `within`.
        scope = asyncio.timeout(max(deadline - time.monotonic(), 0.001))
        try:
            async with scope:
                return await call()
        except Exception as exc:
            if scope.expired():
                log.warning("%s: no answer within %.0f s; giving up", what, within)
                raise nats.errors.TimeoutError from exc
            if not transient(exc):
                raise
            pause = backoff.next()
            if time.monotonic() + pause > deadline:
                log.warning("%s: still failing after %.0f s (%s); giving up", what, within, exc)
                raise
            tries += 1
            # The first one says an election is on; the rest would only repeat it.
            level = logging.WARNING if tries == 1 else logging.DEBUG
            log.log(level, "%s: %s; retrying while NATS elects a leader", what, _short(exc))
            await asyncio.sleep(pause)


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
