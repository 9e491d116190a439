"""How fast jobs end, in all and per caller, over a recent window: how fast the queue drains,
which tells a refused submission when to come back (its Retry-After)."""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Final

# Long enough to smooth over jobs of a minute, short enough to follow a fleet that changes.
WINDOW_S: Final = 60.0
# A meter younger than this divides by this much: a leader that saw two jobs end in its first
# tenth of a second has not seen 20 jobs a second.
_MIN_SPAN_S: Final = 5.0


class EndRates:
    """Jobs ended per second over the last WINDOW_S seconds, in all and per caller."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._since = clock()
        self._ends: deque[tuple[float, str]] = deque()
        self._per_caller: Counter[str] = Counter()

    def ended(self, caller: str) -> None:
        """One of the caller's jobs ended now."""
        self._ends.append((self._clock(), caller))
        self._per_caller[caller] += 1

    def _expire(self, now: float) -> None:
        while self._ends and now - self._ends[0][0] > WINDOW_S:
            _, caller = self._ends.popleft()
            self._per_caller[caller] -= 1
            if not self._per_caller[caller]:
                del self._per_caller[caller]

    def _span(self, now: float) -> float:
        return max(_MIN_SPAN_S, min(WINDOW_S, now - self._since))

    def overall(self) -> float:
        """Jobs ended per second, every caller's."""
        now = self._clock()
        self._expire(now)
        return len(self._ends) / self._span(now)

    def of(self, caller: str) -> float:
        """The caller's jobs ended per second."""
        now = self._clock()
        self._expire(now)
        return self._per_caller.get(caller, 0) / self._span(now)
