"""Which models the server holds, read from what its prompts tell, for the heartbeat.

ComfyUI does not list the models it holds (`/system_stats` gives only free VRAM, `/free` only
drops them), but every prompt's history says it: a loader node whose output was still cached
is listed in `execution_cached` (its model was held and nothing was loaded), and one that ran
loaded its files. So the adapter keeps the models its prompts used, most recent first, and
learns how many the server keeps: a model loaded again although fewer than N others were used
since means it holds fewer than N; one served from the cache after N others, at least N + 1.
It remembers more models than it reports held, so that a hit deeper than it thought still
teaches it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Final

from gateway.comfyui.shape import loaders
from plugins.comfyui.messages import HistoryEntry

# Models remembered in the order they were used: what is reported held until evictions tell
# how many the server keeps (a list longer than the truth is corrected by the next reload of
# one of them), and what a later hit or reload is read against.
_USES_REMEMBERED: Final = 8


def cached_nodes(entry: HistoryEntry) -> list[str] | None:
    """The node ids served from the cache in a finished prompt; None if the entry says not."""
    if entry.status is None:
        return None
    cached = entry.status.message("execution_cached")
    if cached is None or not isinstance(cached.get("nodes"), list):
        return None
    return [str(node) for node in cached["nodes"]]


def models_used(workflow: Mapping[str, Any], cached: Iterable[str]) -> tuple[list[str], list[str]]:
    """(models served from the cache, models loaded) by a prompt's loader nodes."""
    served = set(cached)
    held: list[str] = []
    loaded: list[str] = []
    for node_id, models in sorted(loaders(workflow).items()):
        target = held if node_id in served else loaded
        target.extend(m for m in models if m not in target)
    return held, [m for m in loaded if m not in held]


class Residency:
    """The models the server holds, most recently used first, and how many it keeps."""

    def __init__(self) -> None:
        self._used: list[str] = []  # most recent first, _USES_REMEMBERED at most
        self._last = 1  # models the last prompt used: held whatever the slots
        self.slots: int | None = None  # learnt from evictions and hits; None until one

    @property
    def models(self) -> list[str]:
        """The models it holds, most recent first: all remembered until the slots are known."""
        if self.slots is None:
            return list(self._used)
        return self._used[: max(self.slots, self._last)]

    def observe(self, workflow: Mapping[str, Any], cached: Iterable[str]) -> None:
        """A prompt succeeded with these nodes served from the cache."""
        held, loaded = models_used(workflow, cached)
        if not held and not loaded:
            return
        for model in held:
            index = self._used.index(model) if model in self._used else 0
            if index:
                # Served after `index` others were used since: it keeps at least index + 1.
                self.slots = max(self.slots or 1, index + 1)
        for model in loaded:
            if model in self._used:
                # Loaded again after only `index` others: it keeps at most `index` of them.
                index = self._used.index(model)
                self.slots = max(1, min(self.slots or index, index))
        used = [*held, *loaded]
        self._last = len(used)
        self._used = [*used, *(m for m in self._used if m not in used)]
        del self._used[max(_USES_REMEMBERED, len(used)) :]

    def observe_history(self, entry: HistoryEntry) -> None:
        """A successful prompt's history entry: what its loaders found held, what they loaded."""
        cached = cached_nodes(entry)
        if cached is not None:
            self.observe(entry.workflow, cached)

    def forget(self) -> None:
        """The server restarted (or was told to free its models): it holds nothing."""
        self._used = []
