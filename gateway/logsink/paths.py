"""Where the log sink keeps its files; the gateway imports this to announce a job's log path.

A job's file name is fixed when the job is accepted: the UTC time of its submission (the `ts` of
its `queued` event) and its id. Job ids are subject tokens, which may still hold characters that
mean something to a file system (`/`, `\\`, `%`), so those are percent-encoded in the name.
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path
from typing import Final
from urllib.parse import quote, unquote

LOGS_DIR: Final = "logs"
PROMPTS_DIR: Final = "prompts"
INDEX_FILE: Final = "index.duckdb"
SUFFIX: Final = ".jsonl"
_STAMP: Final = "%Y%m%d_%H%M%S"
_STAMP_LEN: Final = 15  # len("20250101_120000")
_SAFE: Final = "-_+=~@,:;!$&'()"


def logs_dir(data_dir_or_logs_dir: str | os.PathLike[str]) -> Path:
    """The logs folder: `<data_dir>/logs`, or the path itself when it is already named `logs`."""
    base = Path(data_dir_or_logs_dir)
    return base if base.name == LOGS_DIR else base / LOGS_DIR


def prompts_dir(data_dir_or_logs_dir: str | os.PathLike[str]) -> Path:
    """The folder of per-job JSONL files."""
    return logs_dir(data_dir_or_logs_dir) / PROMPTS_DIR


def index_path(data_dir_or_logs_dir: str | os.PathLike[str]) -> Path:
    """The DuckDB index file."""
    return logs_dir(data_dir_or_logs_dir) / INDEX_FILE


def log_file_name(job_id: str, submitted_at: float) -> str:
    """`<YYYYmmdd_HHMMSS>_<job_id>.jsonl`, the time in UTC."""
    stamp = dt.datetime.fromtimestamp(submitted_at, dt.UTC).strftime(_STAMP)
    return f"{stamp}_{quote(job_id, safe=_SAFE)}{SUFFIX}"


def log_file_relpath(job_id: str, submitted_at: float) -> str:
    """The job's log file relative to the data folder, with `/`: `logs/prompts/<name>`.

    This is the form stored in the index and suited to JobAccepted.log_file_path.
    """
    return f"{LOGS_DIR}/{PROMPTS_DIR}/{log_file_name(job_id, submitted_at)}"


def log_file_path(
    data_dir_or_logs_dir: str | os.PathLike[str], job_id: str, submitted_at: float
) -> Path:
    """The job's log file: `<data_dir>/logs/prompts/<YYYYmmdd_HHMMSS>_<job_id>.jsonl`."""
    return prompts_dir(data_dir_or_logs_dir) / log_file_name(job_id, submitted_at)


def relpath_of(name: str) -> str:
    """The data-relative path of a file name found in the prompts folder."""
    return f"{LOGS_DIR}/{PROMPTS_DIR}/{name}"


def job_id_of(file_name: str) -> str | None:
    """The job id a log file name stands for, or None if the name is not one of ours."""
    if not file_name.endswith(SUFFIX) or len(file_name) <= _STAMP_LEN + 1 + len(SUFFIX):
        return None
    if file_name[_STAMP_LEN] != "_":
        return None
    try:
        dt.datetime.strptime(file_name[:_STAMP_LEN], _STAMP)
    except ValueError:
        return None
    return unquote(file_name[_STAMP_LEN + 1 : -len(SUFFIX)])


def find_log_file(data_dir_or_logs_dir: str | os.PathLike[str], job_id: str) -> Path | None:
    """The existing log file of a job, found by name whatever its time stamp; None if absent."""
    pattern = f"*_{quote(job_id, safe=_SAFE)}{SUFFIX}"
    found = sorted(prompts_dir(data_dir_or_logs_dir).glob(pattern))
    exact = [path for path in found if job_id_of(path.name) == job_id]
    return exact[0] if exact else None
