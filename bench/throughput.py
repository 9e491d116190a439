"""Throughput: jobs/s completed end to end by one gateway over 10 fake ComfyUIs (node time 0).

    uv run python bench/throughput.py [--quick] [--jobs N] [--concurrency C]
    uv run --with pyinstrument python bench/throughput.py --quick --profile

Two client paths, one after the other on the same system: AsyncComfyUISDK.submit_workflow over
REST, and sdk.nats.NatsClient.submit straight on the bus; C submitters each. A job counts as
completed when its record in the jobs KV bucket turns terminal (what /workflow/result waits on).
At the end the log index is asked (POST /logs/query) whether every job has all its events:
events rows == sum(last_seq) (seqs are gap-free) and every job indexed as succeeded.

Everything (NATS aside) runs in this one process and event loop: gateway, balancer, 10
adapters, log sink, 10 fake servers and the clients share one core. --profile runs pyinstrument
over the REST pass and prints the functions with the most own time.

--split runs the roles as processes instead, as a deployment does: nats-server, `comfyautomate
gateway` (REST API and balancer), `comfyautomate logsink`, one process with the 10 adapters and
one with the 10 fake ComfyUIs (bench/roles.py); the clients stay here. Each process's CPU time
per job (from /proc) says which role limits the rate, and how many cores 1,000 jobs/s needs.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import goal, print_goals, running_system, say, table, tiny, write_results
from bench.split import cpu_seconds, split_system
from gateway.bus.connection import connect
from gateway.bus.contract import JobRecord, Subjects, decode
from plugins.simulator import SimulatorConfig
from sdk import AsyncComfyUISDK
from sdk.nats import NatsClient

SERVERS = 10


class Completions:
    """Follows the jobs KV bucket; wakes whoever waits for n terminal jobs."""

    def __init__(self) -> None:
        self.done: dict[str, str] = {}
        self.changed = asyncio.Event()

    async def run(self, js: Any) -> None:
        kv = await js.key_value(Subjects().jobs_bucket)
        watcher = await kv.watchall()
        try:
            async for entry in watcher:
                if entry is None or entry.value is None:
                    continue
                record = decode(entry.value, JobRecord)
                if record.status.terminal and record.job_id not in self.done:
                    self.done[record.job_id] = record.status.value
                    self.changed.set()
        finally:
            await watcher.stop()

    async def wait_for(self, ids: set[str], within: float) -> None:
        deadline = time.monotonic() + within
        while not ids <= self.done.keys():
            self.changed.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                return
            try:
                await asyncio.wait_for(self.changed.wait(), min(left, 1.0))
            except TimeoutError:
                continue


async def submit_all(n: int, concurrency: int, submit: Any, base: int) -> tuple[list[str], float]:
    ids: list[str] = []
    counter = iter(range(n))

    async def worker() -> None:
        for i in counter:
            ids.append(await submit(tiny(base + i, "tp")))  # noqa: PERF401 - awaits in order

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return ids, time.perf_counter() - started


async def one_pass(
    name: str, n: int, concurrency: int, submit: Any, completions: Completions, base: int
) -> dict[str, Any]:
    started = time.perf_counter()
    cpu0 = time.process_time()
    ids, submit_s = await submit_all(n, concurrency, submit, base)
    await completions.wait_for(set(ids), within=max(60.0, n / 20))
    total_s = time.perf_counter() - started
    cpu_s = time.process_time() - cpu0
    statuses = Counter(completions.done.get(i, "unfinished") for i in ids)
    return {
        "client": name,
        "jobs": n,
        "concurrency": concurrency,
        "submit_s": submit_s,
        "submit_per_s": n / submit_s,
        "end_to_end_s": total_s,
        "completed_per_s": statuses.get("succeeded", 0) / total_s,
        "process_cpu_s": cpu_s,
        "cpu_ms_per_job": cpu_s / n * 1000,
        "cpu_utilisation": cpu_s / total_s,
        "statuses": dict(statuses),
        "ids": ids,
    }


async def check_logs(sdk: AsyncComfyUISDK, ids: list[str], within: float) -> dict[str, Any]:
    """Wait until the log index holds every job as succeeded; then compare event counts."""
    started = time.perf_counter()
    want = len(ids)
    indexed = 0
    while time.perf_counter() - started < within:
        rows = (await sdk.query_logs("SELECT count(*) FROM jobs WHERE status = 'succeeded'"))[
            "rows"
        ]
        indexed = rows[0][0]
        if indexed >= want:
            break
        await asyncio.sleep(0.25)
    lag = time.perf_counter() - started
    agg = (
        await sdk.query_logs(
            "SELECT count(*), sum(last_seq), sum(event_count), "
            "(SELECT count(*) FROM events) FROM jobs"
        )
    )["rows"][0]
    sample = ids[:: max(1, len(ids) // 20)]
    api_ok = 0
    for job_id in sample:
        log = await sdk.get_logs(job_id)
        types = [e.get("type") for e in log["entries"]]
        seqs = [e.get("seq") for e in log["entries"]]
        if types and types[-1] == "succeeded" and seqs == list(range(1, len(seqs) + 1)):
            api_ok += 1
    return {
        "jobs_submitted": want,
        "jobs_indexed_succeeded": indexed,
        "sink_lag_after_last_completion_s": lag,
        "jobs_rows": agg[0],
        "sum_last_seq": agg[1],
        "sum_event_count": agg[2],
        "events_rows": agg[3],
        "all_events_logged": bool(agg[3] == agg[1] == agg[2] and indexed >= want),
        "job_log_api_sample": f"{api_ok}/{len(sample)} complete (queued..succeeded, gap-free)",
    }


def _where(frame: Any) -> str:
    path = frame.file_path or "?"
    for marker in ("/site-packages/", "/work/main/", "/lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{frame.function} ({path}:{frame.line_no})"


def top_functions(profiler: Any, limit: int = 25) -> list[tuple[str, float]]:
    """Own time per function over the whole profile, most first (% of profiled wall time)."""
    own: Counter[str] = Counter()
    stack = [profiler.last_session.root_frame()]
    while stack:
        frame = stack.pop()
        if frame is None:
            continue
        if frame.function and frame.function.startswith("["):
            continue  # pyinstrument's synthetic [self] / [await] frames
        own[_where(frame)] += frame.total_self_time
        stack.extend(frame.children)
    total = profiler.last_session.duration
    return [(name, t / total * 100) for name, t in own.most_common(limit)]


def top_modules(profiler: Any, limit: int = 30) -> list[tuple[str, float]]:
    """Total time per file that a frame of it is on the stack (inclusive), most first."""
    incl: Counter[str] = Counter()

    def walk(frame: Any, on_stack: frozenset[str]) -> None:
        where = frame.file_path or "?"
        for marker in ("/site-packages/", "/work/main/", "/lib/python3"):
            if marker in where:
                where = where.split(marker, 1)[1]
                break
        key = where.split("/")[0] if "site-packages" in (frame.file_path or "") else where
        if (frame.function or "").startswith("["):
            key = "?"
        if key not in on_stack:
            incl[key] += frame.time
            on_stack = on_stack | {key}
        for child in frame.children:
            walk(child, on_stack)

    sys.setrecursionlimit(20000)
    walk(profiler.last_session.root_frame(), frozenset())
    total = profiler.last_session.duration
    return [(name, t / total * 100) for name, t in incl.most_common(limit)]


async def main(jobs: int, concurrency: int, quick: bool, profile: bool) -> dict[str, Any]:
    async with running_system() as system:
        for k in range(SERVERS):
            await system.add_server(f"sim{k}", SimulatorConfig(node_seconds=0.0))
        nc = await connect(system.settings.nats_url, "bench-watch")
        completions = Completions()
        watch = asyncio.create_task(completions.run(nc.jetstream()))
        passes = []
        profiler = None
        try:
            async with (
                AsyncComfyUISDK(system.url, timeout=120) as sdk,
                await NatsClient.connect(system.settings.nats_url) as bus,
            ):
                # Warm-up, not counted.
                warm = await one_pass("warm", 40, 8, sdk.submit_workflow, completions, 90_000_000)

                async def by_bus(workflow: dict[str, Any]) -> str:
                    return (await bus.submit(workflow)).job_id

                if profile:
                    from pyinstrument import Profiler

                    profiler = Profiler(interval=0.005, async_mode="disabled")
                    profiler.start()
                say(f"REST pass: {jobs} jobs, {concurrency} submitters ...")
                passes.append(
                    await one_pass(
                        "sdk REST", jobs, concurrency, sdk.submit_workflow, completions, 0
                    )
                )
                if profiler is not None:
                    profiler.stop()
                say(f"NATS pass: {jobs} jobs, {concurrency} submitters ...")
                passes.append(
                    await one_pass("NatsClient", jobs, concurrency, by_bus, completions, 10**7)
                )
                say("checking the logs ...")
                all_ids = warm["ids"] + [i for p in passes for i in p["ids"]]
                logs = await check_logs(sdk, all_ids, within=120)
        finally:
            watch.cancel()
            await asyncio.gather(watch, return_exceptions=True)
            await nc.close()
    rows = [
        [
            p["client"],
            p["jobs"],
            p["concurrency"],
            p["submit_per_s"],
            p["end_to_end_s"],
            p["completed_per_s"],
            p["cpu_ms_per_job"],
            p["cpu_utilisation"],
            " ".join(f"{k}={v}" for k, v in p["statuses"].items()),
        ]
        for p in passes
    ]
    say(f"\nthroughput, {SERVERS} fake servers, node time 0, everything in one process")
    say(
        table(
            rows,
            [
                "client",
                "jobs",
                "conc",
                "submitted/s",
                "e2e s",
                "completed/s",
                "CPU ms/job",
                "CPU cores busy",
                "status",
            ],
        )
    )
    say("\nlogs: " + ", ".join(f"{k}={v}" for k, v in logs.items()))
    result: dict[str, Any] = {
        "mode": "quick" if quick else "full",
        "servers": SERVERS,
        "passes": [{k: v for k, v in p.items() if k != "ids"} for p in passes],
        "logs": logs,
        "note": (
            "gateway, adapters, sink, fake servers and clients share one Python process on a "
            "2-core machine shared with other engineers' tests; NATS is a separate process."
        ),
    }
    if profiler is not None:
        funcs = top_functions(profiler)
        mods = top_modules(profiler)
        say("\nprofile of the REST pass: own time per function (% of wall time)")
        say(table([[n, t] for n, t in funcs], ["function", "%"]))
        say("\nprofile: inclusive time per file / package (% of wall time)")
        say(table([[n, t] for n, t in mods], ["file or package", "%"]))
        result["profile_top_functions_pct"] = funcs
        result["profile_top_files_pct"] = mods
    return with_goals(result, passes, logs)


# -- roles as processes (--split) -------------------------------------------------------------


async def split_main(jobs: int, concurrency: int, quick: bool) -> dict[str, Any]:
    async with split_system(SERVERS) as system:
        nc = await connect(system.nats_url, "bench-watch")
        completions = Completions()
        watch = asyncio.create_task(completions.run(nc.jetstream()))
        passes = []
        try:
            async with (
                AsyncComfyUISDK(system.url, timeout=120) as sdk,
                await NatsClient.connect(system.nats_url) as bus,
            ):
                warm = await one_pass("warm", 40, 8, sdk.submit_workflow, completions, 90_000_000)

                async def by_bus(workflow: dict[str, Any]) -> str:
                    return (await bus.submit(workflow)).job_id

                for name, submit, base in (
                    ("sdk REST", sdk.submit_workflow, 0),
                    ("NatsClient", by_bus, 10**7),
                ):
                    say(f"{name} pass (roles as processes): {jobs} jobs ...")
                    pids = system.pids
                    before = {role: cpu_seconds(pid) for role, pid in pids.items()}
                    result = await one_pass(name, jobs, concurrency, submit, completions, base)
                    after = {role: cpu_seconds(pid) for role, pid in pids.items()}
                    result["cpu_ms_per_job_by_process"] = {
                        role: (after[role] - before[role]) / jobs * 1000 for role in pids
                    } | {"clients (this process)": result["cpu_ms_per_job"]}
                    passes.append(result)
                say("checking the logs ...")
                every = warm["ids"] + [i for p in passes for i in p["ids"]]
                logs = await check_logs(sdk, every, 120)
        finally:
            watch.cancel()
            await asyncio.gather(watch, return_exceptions=True)
            await nc.close()
    return split_report(passes, logs, quick)


def split_report(passes: list[dict[str, Any]], logs: dict[str, Any], quick: bool) -> dict[str, Any]:
    say(f"\nthroughput, {SERVERS} fake servers, node time 0, roles as separate processes")
    say(
        table(
            [
                [
                    p["client"],
                    p["jobs"],
                    p["submit_per_s"],
                    p["completed_per_s"],
                    " ".join(f"{k}={v}" for k, v in p["statuses"].items()),
                ]
                for p in passes
            ],
            ["client", "jobs", "submitted/s", "completed/s", "status"],
        )
    )
    roles = list(passes[0]["cpu_ms_per_job_by_process"])
    rows = []
    for role in roles:
        ms = [p["cpu_ms_per_job_by_process"][role] for p in passes]
        rows.append([role, *ms, 1000 / max(ms[-1], 1e-9)])
    say("\nCPU ms per job, by process (the last column: jobs/s one core gives that role)")
    say(table(rows, ["process", *[p["client"] for p in passes], "jobs/s per core (bus)"]))
    say("\nlogs: " + ", ".join(f"{k}={v}" for k, v in logs.items()))
    bus = passes[-1]["cpu_ms_per_job_by_process"]
    ours = sum(v for k, v in bus.items() if not k.startswith(("fake", "clients")))
    result: dict[str, Any] = {
        "mode": ("quick" if quick else "full") + ", roles as processes",
        "servers": SERVERS,
        "passes": [{k: v for k, v in p.items() if k != "ids"} for p in passes],
        "logs": logs,
        "system_cpu_ms_per_job_bus_path_without_fakes_and_clients": ours,
        "cores_needed_for_1000_jobs_per_s": ours,  # ms per job x 1000 jobs/s / 1000 ms
    }
    return with_goals(result, passes, logs)


def with_goals(
    result: dict[str, Any], passes: list[dict[str, Any]], logs: dict[str, Any]
) -> dict[str, Any]:
    """`result` with the issue's goals (best client's rate, every event logged), printed."""
    best = max(p["completed_per_s"] for p in passes)
    result["goals"] = [
        goal("jobs/s completed through one gateway (best client)", best, "jobs/s", 1000, True),
        goal("every job's events in the logs", float(logs["all_events_logged"]), "bool", 1, True),
    ]
    say("")
    print_goals(result["goals"])
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="300 jobs per client (< 60 s)")
    parser.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="jobs per client path (full: 1200; 5000 does not fit 3 min at ~30 jobs/s)",
    )
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--profile", action="store_true", help="needs: uv run --with pyinstrument")
    parser.add_argument("--split", action="store_true", help="run the roles as processes")
    args = parser.parse_args()
    n = args.jobs or (300 if args.quick else 1200)
    if args.split:
        write_results("throughput_split", asyncio.run(split_main(n, args.concurrency, args.quick)))
        sys.exit(0)
    write_results(
        "throughput" + ("_profile" if args.profile else ""),
        asyncio.run(main(n, args.concurrency, args.quick, args.profile)),
    )
