"""Where a job's input files live on a ComfyUI server, and keeping other workflows out of there.

The adapter uploads each attempt's input files into a folder of that attempt's own inside
ComfyUI's input folder, `comfyautomate-jobs/<job id>-<attempt>/`, and clears them when the
attempt ends. A workflow may name any file a server already has (its own input files are the
operator's), but never one in that folder: it would load another job's file, perhaps another
caller's. ComfyUI joins a LoadImage value to its input folder without checking it (an absolute
path, `..` or a `[output]` annotation lead elsewhere), so every path-like string of the
workflow is looked at, not only those of loaders.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any, Final

JOB_FILES: Final = "comfyautomate-jobs"
"""The folder of ComfyUI's input folder that holds the jobs' own files."""

_MAX_PROBLEMS: Final = 10
_SHOWN_CHARS: Final = 120
# ComfyUI strips the last 8-9 characters of "x.png [input]" ("[output]", "[temp]") and reads
# the rest from that folder.
_ANNOTATION = re.compile(r"\s*\[(?:input|output|temp)\]\s*$")


def job_folder(job_id: str, attempt: int) -> str:
    """The subfolder of ComfyUI's input folder that holds one attempt's input files."""
    return f"{JOB_FILES}/{job_id}-{attempt}"


def without_annotation(value: str) -> str:
    """`value` without ComfyUI's folder annotation: "x.png [output]" -> "x.png"."""
    return _ANNOTATION.sub("", value)


def names_job_files(value: str) -> bool:
    """Whether `value`, read as a path on some server, leads into the job-files folder.

    Separators of either kind, a trailing annotation, letter case and the trailing dots and
    spaces that Windows ignores make no difference.
    """
    if JOB_FILES not in value.casefold():
        return False  # the common case, decided without splitting
    path = without_annotation(value).replace("\\", "/")
    return any(part.strip().rstrip(". ").casefold() == JOB_FILES for part in path.split("/"))


def _strings(value: Any) -> Iterator[str]:
    """Every string in an input value, nested lists and objects included (no recursion:
    a value may be nested thousands deep)."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            yield item
        elif isinstance(item, list):
            pending.extend(item)
        elif isinstance(item, dict):
            pending.extend(item.values())


def job_file_problems(workflow: Mapping[str, Any]) -> list[str]:
    """Inputs of `workflow` that name the job-files folder; empty when there are none.

    The nodes must already have passed `workflow_problems` (each an object with inputs).
    """
    problems: list[str] = []
    hits = 0
    for node_id, node in workflow.items():
        for input_name, value in node.get("inputs", {}).items():
            for text in _strings(value):
                if not names_job_files(text):
                    continue
                hits += 1
                if len(problems) < _MAX_PROBLEMS:
                    shown = text if len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS] + "..."
                    problems.append(
                        f"node {node_id!r}: input {input_name!r} names {shown!r}, in the "
                        f"folder {JOB_FILES}/ of ComfyUI's input folder, which holds other "
                        "jobs' files; send the file with the job instead (as one of its "
                        "inputs, or uploaded through /upload/image to another subfolder)"
                    )
                break
    if hits > len(problems):
        problems.append(f"and {hits - len(problems)} more inputs that name {JOB_FILES}/")
    return problems
