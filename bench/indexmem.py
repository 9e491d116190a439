"""The log index's memory over many jobs: flat once DuckDB's cache reaches its share of the limit.

    uv run python bench/indexmem.py [--jobs 100000] [--memory-limit 96MB]

Events of `--jobs` jobs (20 each, 50 jobs interleaved, as bench/logs.py makes them) go straight
into gateway.logsink.store.LogStore.write_batch (the sink's writer code, no NATS) in batches of
10,000, with their stream positions. Every 10,000 jobs: this process's VmRSS, the memory
DuckDB's buffer manager holds (duckdb_memory()) and the index file's size. Without a key on
`events`, what DuckDB holds is cache it can evict, so it levels off below `memory_limit` while
the file grows; with the key (before) it grew ~74 B per event and was never evicted.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import say, table, write_results
from bench.logs import EVENTS_PER_JOB, interleaved
from gateway.logsink.config import SinkConfig
from gateway.logsink.store import LogStore

MB = 2**20


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def slope_per_1000(jobs: list[float], mb: list[float]) -> float:
    n = len(jobs)
    mean_x, mean_y = sum(jobs) / n, sum(mb) / n
    sxx = sum((x - mean_x) ** 2 for x in jobs)
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(jobs, mb, strict=True)) / sxx * 1000


def run(jobs: int, memory_limit: str) -> dict[str, Any]:
    points: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="comfybench-index-") as tmp:
        store = LogStore(Path(tmp), SinkConfig(memory_limit=memory_limit))
        t0 = time.time() - 86_400
        written = 0
        started = time.perf_counter()
        try:
            for start in range(0, jobs, 500):
                batch = interleaved(min(500, jobs - start), t0, start)
                store.write_batch(batch, range(written + 1, written + 1 + len(batch)))
                written += len(batch)
                done = start + 500
                if done % 10_000 == 0 or done >= jobs:
                    (duck,) = store.index.execute(
                        "SELECT sum(memory_usage_bytes) FROM duckdb_memory()"
                    )[0]
                    size = (Path(tmp) / "logs" / "index.duckdb").stat().st_size
                    points.append(
                        {
                            "jobs": done,
                            "events": written,
                            "rss_mb": rss_mb(),
                            "duckdb_mb": (duck or 0) / MB,
                            "file_mb": size / MB,
                        }
                    )
                    say(f"{done:>8,} jobs: {points[-1]}")
        finally:
            store.close()
        seconds = time.perf_counter() - started
    later = points[len(points) // 2 :]  # the second half: after the cache has filled
    x = [p["jobs"] for p in later]
    growth = {key: slope_per_1000(x, [p[key] for p in later]) for key in ("rss_mb", "duckdb_mb")}
    return {"points": points, "seconds": seconds, "growth_second_half": growth}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--memory-limit", default="96MB")
    args = parser.parse_args()
    found = run(args.jobs, args.memory_limit)
    rows = [
        [p["jobs"], p["events"], p["rss_mb"], p["duckdb_mb"], p["file_mb"]] for p in found["points"]
    ]
    say(table(rows, ["jobs", "events", "VmRSS MB", "DuckDB MB", "index file MB"]))
    growth = found["growth_second_half"]
    say(
        f"second half, per 1,000 jobs ({EVENTS_PER_JOB} events each): VmRSS "
        f"{growth['rss_mb']:.3f} MB, DuckDB {growth['duckdb_mb']:.3f} MB; "
        f"{found['seconds']:.0f} s"
    )
    write_results(
        "indexmem",
        {"jobs": args.jobs, "memory_limit": args.memory_limit, "events_per_job": EVENTS_PER_JOB}
        | found,
    )
