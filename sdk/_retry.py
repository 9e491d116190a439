"""When the clients send a request again, and how long they wait before they do.

A gateway that answers 503 with a `Retry-After` (unavailable for a moment: no balancer yet, NATS
electing a leader or out of reach) or 429 (too many requests: the submission rate limit,
admission control, busy log queries) is asked again after the wait it names (for a 429 without
one, a jittered backoff), for `retry_for` seconds in all. A 503 without a `Retry-After` (no log
sink, no storage, too many event streams) is not a pause the gateway foresees an end to: it is
raised at once. Only a request that cannot do a thing twice is sent again:
reads, and submissions that name what they make (an `Idempotency-Key`, a `job_id`, a
`batch_id`), so that a retry finds the job the first try made instead of making another.
"""

from __future__ import annotations

import email.utils
import math
import random
import time
import uuid
from collections.abc import Callable, Mapping
from datetime import UTC
from typing import Any, Final

RETRIED_STATUS: Final = frozenset({429, 503})
DEFAULT_RETRY_FOR_S: Final = 30.0
# Without a Retry-After: 0.25 s, doubling, up to 8 s.
BACKOFF_FIRST_S: Final = 0.25
BACKOFF_MAX_S: Final = 8.0
# Each wait is stretched by up to this fraction, so clients told the same Retry-After do not
# all come back in the same instant.
JITTER: Final = 0.25
# Reading or removing again changes nothing (DELETE /servers/{id} again is 204).
_SAFE_METHODS: Final = frozenset({"GET", "HEAD", "DELETE"})
# POSTs that only read: a log query is a sandboxed SELECT.
_READS: Final = frozenset({"/logs/query"})
_SUBMITS: Final = frozenset({"/workflow/submit", "/workflow/execute", "/workflow/batch"})
_KEY_HEADER: Final = "idempotency-key"


def repeatable(method: str, path: str, headers: Mapping[str, str] | None, body: Any = None) -> bool:
    """Whether a request may be sent again: a read, or a submission that names what it makes.

    A submission without an idempotency key, `job_id` or `batch_id` is never repeated: its
    first try may have made a job whose answer was lost.
    """
    if method.upper() in _SAFE_METHODS or path in _READS:
        return True
    if path not in _SUBMITS:
        return False
    if any(name.lower() == _KEY_HEADER for name in headers or {}):
        return True
    return isinstance(body, Mapping) and any(body.get(k) for k in ("job_id", "batch_id"))


def new_key() -> str:
    """An idempotency key for one submission call (its retries send it again)."""
    return f"sdk-{uuid.uuid4().hex}"


def new_batch_id() -> str:
    """A batch id for one submit_batch call (32 hex characters, as the gateway makes them):
    a batch takes a `batch_id` or an idempotency key, not both."""
    return uuid.uuid4().hex


def retry_after_s(value: str | None, now: Callable[[], float] = time.time) -> float | None:
    """The seconds a `Retry-After` header asks for: a number of seconds or an HTTP date;
    None when there is none or it says neither."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            moment = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError):
            return None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return max(0.0, moment.timestamp() - now())
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


class Retries:
    """The retries of one call: how long to wait before the next try, until `budget_s` is
    spent; then what to say about giving up."""

    def __init__(
        self,
        budget_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        draw: Callable[[], float] = random.random,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.budget_s = budget_s
        self._clock = clock
        self._draw = draw
        self._wall = wall
        self._began = clock()
        self.tries = 0
        self._refusal = ""  # why the last wait was not started, when that is why it gave up
        self._unforeseen = False  # the last answer named no end to it: not retried at all

    @property
    def elapsed_s(self) -> float:
        return self._clock() - self._began

    def wait(self, status: int, retry_after: str | None) -> float | None:
        """Seconds to wait before trying again after an answer of `status`; None: do not.

        Counts the answer as a try. A wait that would end past the budget is not started.
        """
        self.tries += 1
        if status not in RETRIED_STATUS:
            return None
        asked = retry_after_s(retry_after, self._wall)
        if status == 503 and asked is None:
            self._unforeseen = True
            return None
        backoff = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2.0 ** (self.tries - 1))
        delay = max(asked or 0.0, backoff) * (1.0 + JITTER * self._draw())
        left = self.budget_s - self.elapsed_s
        if delay > left:
            if asked is not None and asked > left:
                self._refusal = f"the gateway asked to wait {asked:g} s"
            return None
        return delay

    def account(self) -> str | None:
        """Why the call stopped retrying, and after how long (for the error it raises); None
        when the answer was not one to retry (a 503 without a Retry-After) and none was."""
        if self._unforeseen and self.tries == 1:
            return None
        if self.budget_s <= 0:
            return "not retried (retry_for is 0)"
        tries = "1 try" if self.tries == 1 else f"{self.tries} tries"
        spent = f"{tries} in {self.elapsed_s:.1f} s"
        if self._refusal:
            return (
                f"gave up after {spent}: {self._refusal}, past the {self.budget_s:g} s that "
                "retry_for allows"
            )
        return f"gave up after {spent} (retry_for is {self.budget_s:g} s)"
