"""Which models the server holds, read from what its prompts tell, for the heartbeat.

ComfyUI does not list the models it holds (`/system_stats` gives only free VRAM, `/free` only
drops them), but every prompt's history says it: a loader node whose output was still cached
is listed in `execution_cached` (its model was held and nothing was loaded), and one that ran
loaded its files. So the adapter keeps the models its prompts used, most recent first, and
learns how many the server keeps: a model loaded again although fewer than N others were used
since means it holds fewer than N; one served from the cache after N others, at least N + 1.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Final

from gateway.comfyui.shape import loaders
from plugins.comfyui.messages import HistoryEntry

# Until evictions tell, this many models are taken to be held (a list longer than the truth
# is corrected by the next reload of one of them).
_UNKNOWN_SLOTS_KEPT: Final = 8


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
        self.models: list[str] = []
        self.slots: int | None = None  # learnt from evictions and hits; None until one

    def observe(self, workflow: Mapping[str, Any], cached: Iterable[str]) -> None:
        """A prompt succeeded with these nodes served from the cache."""
        held, loaded = models_used(workflow, cached)
        if not held and not loaded:
            return
        for model in held:
            if model in self.models and self.slots is not None:
                # Served after `index` others were used since: it keeps at least index + 1.
                self.slots = max(self.slots, self.models.index(model) + 1)
        for model in loaded:
            if model in self.models:
                # Loaded again after only `index` others: it keeps at most `index` of them.
                index = self.models.index(model)
                self.slots = max(1, min(self.slots or index, index))
        used = [*held, *loaded]
        self.models = [*used, *(m for m in self.models if m not in used)]
        keep = self.slots if self.slots is not None else _UNKNOWN_SLOTS_KEPT
        self.models = self.models[: max(keep, len(used))]

    def observe_history(self, entry: HistoryEntry) -> None:
        """A successful prompt's history entry: what its loaders found held, what they loaded."""
        cached = cached_nodes(entry)
        if cached is not None:
            self.observe(entry.workflow, cached)

    def forget(self) -> None:
        """The server restarted (or was told to free its models): it holds nothing."""
        self.models = []
