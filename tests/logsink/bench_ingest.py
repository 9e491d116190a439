"""Ingest rate of the log sink: N events already in the stream, time until all are stored.

    uv run python tests/logsink/bench_ingest.py [events] [jobs]

Not a test (pytest does not collect it). Events are realistic in size: one `queued` with a
small workflow per job, then node_progress events, spread over `jobs` jobs.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path

from gateway.bus.connection import connect, ensure_resources
from gateway.bus.contract import (
    JobRequest,
    NodeProgressData,
    QueuedData,
    Subjects,
    encode,
    make_event,
)
from gateway.bus.natsserver import start_nats_server
from gateway.logsink import LogSink, log_file_relpath


async def main(total: int, jobs: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        server = await start_nats_server(port=0, store_dir=Path(tmp) / "nats")
        try:
            nc = await connect(server.url, "bench")
            js = nc.jetstream()
            subjects = Subjects()
            await ensure_resources(js, subjects)
            now = time.time()
            payloads: list[tuple[str, bytes]] = []
            per_job = total // jobs
            for j in range(jobs):
                job_id = f"job{j:05}"
                workflow = {str(i): {"class_type": "KSampler", "inputs": {}} for i in range(8)}
                queued = QueuedData(
                    request=JobRequest(workflow=workflow),
                    log_file_path=log_file_relpath(job_id, now),
                )
                payloads.append(
                    (job_id, encode(make_event(queued, job_id=job_id, seq=1, server_id=None)))
                )
                for seq in range(2, per_job + 1):
                    data = NodeProgressData(node_id="3", value=seq, max=per_job)
                    event = make_event(data, job_id=job_id, seq=seq, server_id="gpu1")
                    payloads.append((job_id, encode(event)))
            # Interleave the jobs as a busy fleet would.
            payloads.sort(key=lambda item: int(item[1].split(b'"seq":')[1].split(b",")[0]))
            started = time.perf_counter()
            for chunk in range(0, len(payloads), 2000):
                await asyncio.gather(
                    *(
                        js.publish(subjects.events(job_id), payload)
                        for job_id, payload in payloads[chunk : chunk + 2000]
                    )
                )
            print(f"published {len(payloads)} events in {time.perf_counter() - started:.1f} s")  # noqa: T201
            sink = LogSink(nc, subjects, Path(tmp) / "data")
            started = time.perf_counter()
            async with sink:
                await sink.wait_caught_up()
                elapsed = time.perf_counter() - started
            print(  # noqa: T201 - a benchmark reports on the terminal
                f"stored {sink.events_written} events in {elapsed:.2f} s: "
                f"{sink.events_written / elapsed:,.0f} events/s over {jobs} jobs"
            )
            await nc.close()
        finally:
            await server.stop()


if __name__ == "__main__":
    args = [int(arg) for arg in sys.argv[1:]]
    asyncio.run(main(args[0] if args else 200_000, args[1] if len(args) > 1 else 500))
