"""Where a simulated server keeps its files: output, input and temp, as ComfyUI's folders."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Folders:
    output: Path
    input: Path
    temp: Path

    def get(self, kind: str) -> Path:
        folders = {"output": self.output, "input": self.input, "temp": self.temp}
        if kind not in folders:
            raise KeyError(kind)
        return folders[kind]
