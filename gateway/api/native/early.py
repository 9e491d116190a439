"""Events of jobs this gateway does not know as prompts yet, held for a moment.

A prompt taken by another gateway reaches this one through the KV watch, and its job's first
events through the events subscription; nothing orders the two. Events of an unknown job are
therefore kept briefly, to be relayed once the prompt is known. Most unknown jobs are REST jobs
that never will be: what is held is bounded in time and in count.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Final

from nats.aio.msg import Msg

# How long an unknown job's events wait for its prompt; the KV watch is normally milliseconds
# behind.
HOLD_S: Final = 5.0
# The most events held at once (of all unknown jobs together).
MAX_HELD: Final = 2_000


class EarlyEvents:
    """Held events per job id, oldest job first."""

    def __init__(self, hold_s: float = HOLD_S, max_held: int = MAX_HELD) -> None:
        self._hold_s = hold_s
        self._max_held = max_held
        self._held: OrderedDict[str, tuple[float, list[Msg]]] = OrderedDict()
        self._count = 0

    def hold(self, job_id: str, msg: Msg) -> None:
        now = time.monotonic()
        first_seen, messages = self._held.get(job_id) or (now, [])
        messages.append(msg)
        self._held[job_id] = (first_seen, messages)
        self._count += 1
        while self._held:
            oldest, (seen, held) = next(iter(self._held.items()))
            if self._count <= self._max_held and now - seen <= self._hold_s:
                break
            del self._held[oldest]
            self._count -= len(held)

    def take(self, job_id: str) -> list[Msg]:
        """The job's held events, in the order they came; none are kept after this."""
        _, messages = self._held.pop(job_id, (0.0, []))
        self._count -= len(messages)
        return messages

    def clear(self) -> None:
        self._held.clear()
        self._count = 0
