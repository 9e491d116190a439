"""Per-node progress (`progress_state`, `progress`, previews) and the context nodes run in."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .hub import Hub, preview_frame, preview_metadata_frame, text_binary_frame
from .nodes import Interrupted


class ProgressState:
    """The registry behind `progress_state`: every node started so far in this prompt."""

    def __init__(self, hub: Hub, prompt_id: str, client_id: str | None) -> None:
        self.hub = hub
        self.prompt_id = prompt_id
        self.client_id = client_id
        self._nodes: dict[str, dict[str, Any]] = {}

    def _entry(self, node_id: str) -> dict[str, Any]:
        if node_id not in self._nodes:
            # A node finished without starting (served from cache) keeps integer 0/1,
            # exactly as the recordings show.
            self._nodes[node_id] = {
                "value": 0,
                "max": 1,
                "state": "pending",
                "node_id": node_id,
                "prompt_id": self.prompt_id,
                "display_node_id": node_id,
                "parent_node_id": None,
                "real_node_id": node_id,
            }
        return self._nodes[node_id]

    def _send(self) -> None:
        data = {"prompt_id": self.prompt_id, "nodes": self._nodes}
        self.hub.send("progress_state", data, self.client_id)

    def start(self, node_id: str) -> None:
        entry = self._entry(node_id)
        entry.update(value=0.0, max=1.0, state="running")
        self._send()

    def update(self, node_id: str, value: int, total: int) -> None:
        entry = self._entry(node_id)
        entry.update(value=value, max=total, state="running")
        self._send()

    def finish(self, node_id: str) -> None:
        entry = self._entry(node_id)
        entry.update(value=entry["max"], state="finished")
        self._send()


class NodeContext:
    """What a running node can do: folders, progress, previews, text, interrupt checks."""

    def __init__(
        self,
        progress: ProgressState,
        node_id: str,
        interrupted: Callable[[], bool],
        *,
        folder: Callable[[str], Path],
        step_seconds: Callable[[], float],
        sampler_previews: bool = False,
    ) -> None:
        self.node_id = node_id
        self.sampler_previews = sampler_previews
        self._progress = progress
        self._interrupted = interrupted
        self._folder = folder
        self._step_seconds = step_seconds

    def folder(self, kind: str) -> Path:
        return self._folder(kind)

    async def progress(self, value: int, total: int, preview: bytes | None = None) -> None:
        # ComfyUI's progress hook honours a pending interrupt before it reports anything.
        self.check_interrupted()
        # The prompt and client this node runs for: the engine's running prompt throughout.
        hub = self._progress.hub
        client_id = self._progress.client_id
        prompt_id = self._progress.prompt_id
        self._progress.update(self.node_id, value, total)
        with_metadata = hub.supports_preview_metadata(client_id)
        if preview is not None and with_metadata:
            metadata = {
                "node_id": self.node_id,
                "prompt_id": prompt_id,
                "display_node_id": self.node_id,
                "parent_node_id": None,
                "real_node_id": self.node_id,
                "image_type": "image/png",
            }
            hub.send_binary(preview_metadata_frame(preview, metadata), client_id)
        data = {"value": value, "max": total, "prompt_id": prompt_id, "node": self.node_id}
        hub.send("progress", data, client_id)
        if preview is not None and not with_metadata:
            hub.send_binary(preview_frame(preview), client_id)
        # ComfyUI runs prompts on a thread of their own: between two updates its server
        # answers requests (an /interrupt among them) and its sockets send, however quick
        # the steps are.
        await asyncio.sleep(0)

    def send_text(self, text: str) -> None:
        self._progress.hub.send_binary(text_binary_frame(self.node_id, text), None)

    def check_interrupted(self) -> None:
        if self._interrupted():
            raise Interrupted

    def step_seconds(self) -> float:
        return self._step_seconds()
