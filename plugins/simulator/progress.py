"""Per-node progress (`progress_state`, `progress`, previews) and the context nodes run in."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .hub import Hub, preview_frame, preview_metadata_frame, text_binary_frame
from .nodes import Interrupted

if TYPE_CHECKING:
    from .engine import Engine


class ProgressState:
    """The registry behind `progress_state`: every node started so far in this prompt."""

    def __init__(self, hub: Hub, prompt_id: str, client_id: str | None) -> None:
        self._hub = hub
        self._prompt_id = prompt_id
        self._client_id = client_id
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
                "prompt_id": self._prompt_id,
                "display_node_id": node_id,
                "parent_node_id": None,
                "real_node_id": node_id,
            }
        return self._nodes[node_id]

    def _send(self) -> None:
        data = {"prompt_id": self._prompt_id, "nodes": self._nodes}
        self._hub.send("progress_state", data, self._client_id)

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
        engine: Engine,
        progress: ProgressState,
        node_id: str,
        interrupted: Callable[[], bool],
    ) -> None:
        self.node_id = node_id
        self._engine = engine
        self._progress = progress
        self._interrupted = interrupted

    def folder(self, kind: str) -> Path:
        return self._engine.folders.get(kind)

    async def progress(self, value: int, total: int, preview: bytes | None = None) -> None:
        engine = self._engine
        client_id = engine.client_id
        prompt_id = engine.running.prompt_id if engine.running is not None else None
        self._progress.update(self.node_id, value, total)
        with_metadata = engine.hub.supports_preview_metadata(client_id)
        if preview is not None and with_metadata:
            metadata = {
                "node_id": self.node_id,
                "prompt_id": prompt_id,
                "display_node_id": self.node_id,
                "parent_node_id": None,
                "real_node_id": self.node_id,
                "image_type": "image/png",
            }
            engine.hub.send_binary(preview_metadata_frame(preview, metadata), client_id)
        data = {"value": value, "max": total, "prompt_id": prompt_id, "node": self.node_id}
        engine.hub.send("progress", data, client_id)
        if preview is not None and not with_metadata:
            engine.hub.send_binary(preview_frame(preview), client_id)

    def send_text(self, text: str) -> None:
        self._engine.hub.send_binary(text_binary_frame(self.node_id, text), None)

    def check_interrupted(self) -> None:
        if self._interrupted():
            raise Interrupted

    def step_seconds(self) -> float:
        return self._engine.config.step_duration()
