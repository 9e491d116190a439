"""The code blocks of the project's Markdown files, and what running one means.

A block is run according to its language: `python` and `bash` blocks as a reader would paste
them, `sql` through the gateway's log query, `toml` and `json` parsed, `promql` checked to name
only metrics the gateway's /metrics has. A block without a
language (a diagram, a sample of output) is shown, not run. An HTML comment on the line before
a fence can say otherwise, with its reason: `<!-- docs: not run (starts a server for good) -->`.

The docs name the places of a one-machine system (gateway at 127.0.0.1:8000, NATS at 4222, a
ComfyUI at 8188) and placeholders (JOB_ID); a test maps them to the system it runs.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTS = (
    "README.md",
    *sorted(path.relative_to(ROOT).as_posix() for path in (ROOT / "docs").glob("*.md")),
)
RUN_LANGUAGES = frozenset({"python", "bash", "sql", "toml", "json", "promql"})

_FENCE = re.compile(r"^```(\S*)\s*$")
_DIRECTIVE = re.compile(r"^<!--\s*docs:\s*not run\s*\((?P<why>[^)]+)\)\s*-->\s*$")


@dataclass(frozen=True)
class Block:
    document: str
    line: int
    language: str
    text: str
    not_run: str | None
    """Why the block is not run (from its directive), or None."""

    @property
    def where(self) -> str:
        return f"{self.document}:{self.line}"


def blocks(document: str) -> Iterator[Block]:
    """Every fenced block of a document, in order."""
    lines = (ROOT / document).read_text(encoding="utf-8").splitlines()
    index = 0
    while index < len(lines):
        opened = _FENCE.match(lines[index])
        if opened is None:
            index += 1
            continue
        start = index
        index += 1
        body = []
        while index < len(lines) and not lines[index].startswith("```"):
            body.append(lines[index])
            index += 1
        index += 1
        directive = _DIRECTIVE.match(lines[start - 1]) if start > 0 else None
        yield Block(
            document=document,
            line=start + 1,
            language=opened.group(1).lower(),
            text="\n".join(body) + "\n",
            not_run=directive.group("why") if directive else None,
        )


def commands(text: str) -> Iterator[str]:
    """The commands of a bash block, as bash reads them: a line ending in `\\` or inside an
    open quote goes on on the next; comments and blank lines are left out."""
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.rstrip() if pending else raw.rstrip()
        pending = ""
        if _open_quote(line):
            pending = line + "\n"
            continue
        if line.endswith("\\"):
            pending = line[:-1].rstrip() + " "
            continue
        line = _without_comment(line)
        if line.strip():
            yield line
    if pending.strip():
        yield _without_comment(pending.rstrip())


def _open_quote(line: str) -> bool:
    """Whether `line` ends inside a quote (bash reads on into the next line)."""
    return _scan(line)[1]


def _without_comment(line: str) -> str:
    """The line up to a `#` that starts a shell comment (outside quotes, after a blank)."""
    return line[: _scan(line)[0]].rstrip()


def _scan(line: str) -> tuple[int, bool]:
    """Where a shell comment starts in `line` (its length if none), and whether the line ends
    inside a quote."""
    quote, escaped = "", False
    for index, char in enumerate(line):
        if escaped:
            escaped = False
        elif char == "\\" and quote != "'":
            escaped = True
        elif quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (index == 0 or line[index - 1].isspace()):
            return index, False
    return len(line), bool(quote)


def substitute(text: str, places: Mapping[str, str]) -> str:
    """`text` with each documented place or placeholder replaced by the running system's."""
    for name in sorted(places, key=len, reverse=True):
        text = text.replace(name, places[name])
    return text
