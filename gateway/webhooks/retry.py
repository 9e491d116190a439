"""How long a failed delivery waits before its next attempt: exponential, capped, jittered."""

from __future__ import annotations

import random

# 2**60 times any base is past every cap; a higher power would only overflow.
_MAX_DOUBLINGS = 60


def retry_delay(attempt: int, base_s: float, max_s: float) -> float:
    """The pause after failed attempt number `attempt` (1 for the first): `base_s` doubling per
    attempt up to `max_s`, drawn between half and all of it so that deliveries failed together
    by one receiver do not all come back at the same instant."""
    ceiling = min(max_s, base_s * 2 ** min(max(attempt - 1, 0), _MAX_DOUBLINGS))
    return random.uniform(ceiling / 2, ceiling)
