"""Log sink: ingest rate, and query latency over a big index.

    uv run python bench/logs.py [--quick]

1. Ingest through NATS (as tests/logsink/bench_ingest.py): N realistic events already in the
   EVENTS stream, then a LogSink starts; time until all are stored (JSONL + DuckDB) and acked.
2. Store only: the same kind of events straight into gateway.logsink.store.LogStore.write_batch
   in batches of 10,000 (the sink's batch size): the code the sink's writer thread runs, without
   NATS. This is how the big index is built (1,000,000 events full, 200,000 quick): the files
   and index are exactly what the sink writes, only the bus is skipped.
3. Queries over that index, through a LogSink started on it and asked over NATS as the gateway
   asks (gateway.logsink.client.job_log / query_logs): one job's log, failure_rates,
   slowest_nodes, a recent-jobs listing. Each 10 times; median and p95.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import goal, median, pct, print_goals, say, table, write_results
from gateway.bus.connection import connect, ensure_resources
from gateway.bus.contract import (
    DispatchedData,
    FailedData,
    HistoryData,
    JobRequest,
    NodeOutputData,
    NodeProgressData,
    NodeStartedData,
    QueuedData,
    RunningData,
    Subjects,
    SucceededData,
    encode,
    make_event,
)
from gateway.bus.natsserver import start_nats_server
from gateway.logsink import LogSink, log_file_relpath
from gateway.logsink.client import LogQueryError, job_log, query_logs
from gateway.logsink.store import LogStore

CLASSES = ["EmptyImage", "KSampler", "VAEDecode", "ImageBlur", "SaveImage"]
SERVERS = [f"gpu{k}" for k in range(8)]
EVENTS_PER_JOB = 20


def job_events(j: int, t0: float, rng: random.Random) -> list[bytes]:
    """20 events of one job: queued .. node events .. history, succeeded or failed."""
    job_id = f"job{j:07}"
    server = SERVERS[j % len(SERVERS)]
    workflow = {
        str(i): {"class_type": c, "inputs": {"seed": j, "steps": 20}} for i, c in enumerate(CLASSES)
    }
    ts = t0 + j * 0.02
    seq = 0
    out: list[bytes] = []

    def add(data: Any, sid: str | None) -> None:
        nonlocal seq
        seq += 1
        event = make_event(data, job_id=job_id, seq=seq, server_id=sid, ts=ts)
        out.append(encode(event))

    request = JobRequest(workflow=workflow)
    add(QueuedData(request=request, log_file_path=log_file_relpath(job_id, ts)), None)
    ts += 0.01
    add(DispatchedData(server_id=server, attempt=1), None)
    ts += 0.02
    add(RunningData(attempt=1, prompt_id=f"p{j}"), server)
    fail = server == "gpu3" and j % 5 == 0
    for i, c in enumerate(CLASSES):
        add(NodeStartedData(node_id=str(i), class_type=c), server)
        ts += rng.uniform(0.01, 0.1) * (3 if c == "KSampler" else 1)
        add(NodeProgressData(node_id=str(i), value=1, max=1), server)
        ts += 0.001
        add(NodeOutputData(node_id=str(i), output={"images": []}), server)
    ts += 0.005
    add(HistoryData(prompt_id=f"p{j}", history={"status": {"completed": not fail}}), server)
    if fail:
        add(
            FailedData(code="execution_error", message="boom", exception_type="RuntimeError"),
            server,
        )
    else:
        add(SucceededData(attempt=1, duration_s=0.5), server)
    assert len(out) == EVENTS_PER_JOB
    return out


def interleaved(jobs: int, t0: float, start: int = 0) -> list[bytes]:
    """Events of `jobs` jobs, interleaved 50 jobs at a time as a busy fleet would send them."""
    rng = random.Random(start)
    events: list[bytes] = []
    for block in range(start, start + jobs, 50):
        per_job = [job_events(j, t0, rng) for j in range(block, min(block + 50, start + jobs))]
        for k in range(EVENTS_PER_JOB):
            events.extend(ev[k] for ev in per_job)
    return events


async def ingest_via_nats(total: int, tmp: Path) -> dict[str, Any]:
    server = await start_nats_server(port=0, store_dir=tmp / "nats", log_file=tmp / "nats.log")
    try:
        nc = await connect(server.url, "bench")
        try:
            js = nc.jetstream()
            subjects = Subjects()
            await ensure_resources(js, subjects)
            events = interleaved(total // EVENTS_PER_JOB, time.time() - 3600)
            started = time.perf_counter()
            for chunk in range(0, len(events), 2000):
                part = events[chunk : chunk + 2000]
                await asyncio.gather(
                    *(
                        js.publish(
                            subjects.events(raw[raw.index(b'"job_id":"') + 10 :][:10].decode()), raw
                        )
                        for raw in part
                    )
                )
            publish_s = time.perf_counter() - started
            sink = LogSink(nc, subjects, tmp / "data")
            started = time.perf_counter()
            async with sink:
                await asyncio.wait_for(sink.wait_caught_up(), 170)
                elapsed = time.perf_counter() - started
            return {
                "events": sink.events_written,
                "publish_s": publish_s,
                "sink_s": elapsed,
                "events_per_s": sink.events_written / elapsed,
            }
        finally:
            await nc.close()
    finally:
        await server.stop()


def build_index(total: int, data_dir: Path) -> dict[str, Any]:
    """Write `total` events with LogStore.write_batch; return the rate."""
    store = LogStore(data_dir)
    t0 = time.time() - 86_400
    jobs = total // EVENTS_PER_JOB
    written = 0
    spent = 0.0
    try:
        for start in range(0, jobs, 500):  # 500 jobs = 10,000 events = one sink batch
            batch = interleaved(min(500, jobs - start), t0, start)
            seqs = range(written + 1, written + 1 + len(batch))  # as the stream numbers them
            began = time.perf_counter()
            written += store.write_batch(batch, seqs).written
            spent += time.perf_counter() - began
    finally:
        store.close()
    return {"events": written, "store_s": spent, "events_per_s": written / spent}


async def time_queries(data_dir: Path, tmp: Path, total: int, runs: int) -> dict[str, Any]:
    server = await start_nats_server(port=0, store_dir=tmp / "nats", log_file=tmp / "nats.log")
    try:
        nc = await connect(server.url, "bench")
        try:
            subjects = Subjects()
            await ensure_resources(nc.jetstream(), subjects)
            started = time.perf_counter()
            async with LogSink(nc, subjects, data_dir):
                while True:  # the query service subscribes just after start
                    try:
                        await query_logs(nc, subjects, "SELECT 1")
                        break
                    except LogQueryError as exc:
                        if exc.code != "no_log_sink" or time.perf_counter() - started > 60:
                            raise
                        await asyncio.sleep(0.02)
                start_s = time.perf_counter() - started
                jobs = total // EVENTS_PER_JOB
                rng = random.Random(1)
                queries: dict[str, Any] = {
                    "one job's log (job_log)": lambda: job_log(
                        nc, subjects, f"job{rng.randrange(jobs):07}"
                    ),
                    "SELECT * FROM failure_rates": lambda: query_logs(
                        nc, subjects, "SELECT * FROM failure_rates"
                    ),
                    "SELECT * FROM slowest_nodes": lambda: query_logs(
                        nc, subjects, "SELECT * FROM slowest_nodes", timeout_s=30
                    ),
                    "50 latest failed jobs (jobs table)": lambda: query_logs(
                        nc,
                        subjects,
                        "SELECT job_id, server_id, error_type FROM jobs WHERE status = 'failed' "
                        "ORDER BY submitted_at DESC LIMIT 50",
                    ),
                }
                results: dict[str, Any] = {}
                for name, make in queries.items():
                    times = []
                    answer: Any = None
                    for _ in range(runs):
                        began = time.perf_counter()
                        answer = await make()
                        times.append((time.perf_counter() - began) * 1000)
                    size = len(answer.entries) if hasattr(answer, "entries") else len(answer.rows)
                    results[name] = {
                        "median_ms": median(times),
                        "p95_ms": pct(times, 95),
                        "first_ms": times[0],
                        "rows": size,
                    }
            return {"sink_start_s": start_s, "queries": results}
        finally:
            await nc.close()
    finally:
        await server.stop()


async def main(quick: bool) -> dict[str, Any]:
    ingest_n = 40_000 if quick else 200_000
    index_n = 200_000 if quick else 1_000_000
    runs = 5 if quick else 10
    with tempfile.TemporaryDirectory(prefix="comfybench-logs-") as tmp_name:
        tmp = Path(tmp_name)
        say(f"1. ingest through NATS: {ingest_n:,} events ...")
        ingest = await ingest_via_nats(ingest_n, tmp / "ingest")
        say(f"2. store only (LogStore.write_batch): {index_n:,} events ...")
        built = await asyncio.to_thread(build_index, index_n, tmp / "big" / "data")
        say("3. queries over that index through a LogSink on NATS ...")
        queried = await time_queries(tmp / "big" / "data", tmp / "big", index_n, runs)
    say("")
    say(
        table(
            [
                [
                    "sink from NATS stream (JSONL + DuckDB, acked)",
                    ingest["events"],
                    ingest["sink_s"],
                    ingest["events_per_s"],
                ],
                [
                    "LogStore.write_batch only (no NATS)",
                    built["events"],
                    built["store_s"],
                    built["events_per_s"],
                ],
            ],
            ["ingest path", "events", "seconds", "events/s"],
        )
    )
    say(
        f"\nqueries over {index_n:,} events ({index_n // EVENTS_PER_JOB:,} jobs); "
        f"sink start {queried['sink_start_s']:.2f} s"
    )
    say(
        table(
            [
                [k, v["rows"], v["first_ms"], v["median_ms"], v["p95_ms"]]
                for k, v in queried["queries"].items()
            ],
            ["query", "rows", "first ms", "median ms", "p95 ms"],
        )
    )
    q = queried["queries"]
    goals = [
        goal("sink ingest from NATS", ingest["events_per_s"], "events/s", 50_000, True),
        goal(
            f"one job's log over {index_n:,} events (median)",
            q["one job's log (job_log)"]["median_ms"],
            "ms",
            50,
            False,
        ),
        goal(
            "failure_rates (median)",
            q["SELECT * FROM failure_rates"]["median_ms"],
            "ms",
            500,
            False,
        ),
        goal(
            "slowest_nodes (median)",
            q["SELECT * FROM slowest_nodes"]["median_ms"],
            "ms",
            500,
            False,
        ),
    ]
    say("")
    print_goals(goals)
    return {
        "mode": "quick" if quick else "full",
        "ingest_via_nats": ingest,
        "store_only": built,
        "index_events": index_n,
        "index_built_with": (
            "gateway.logsink.store.LogStore.write_batch (the sink's writer code), not through NATS"
        ),
        "queries": queried,
        "note": "2-core machine shared with other engineers' tests.",
        "goals": goals,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="40k ingest, 200k-event index")
    args = parser.parse_args()
    write_results("logs", asyncio.run(main(args.quick)))
