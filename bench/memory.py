"""Memory: RSS of each role idle after rounds of jobs, with jobs in flight, under a 1 GB output.

    uv run python bench/memory.py [--quick] [--jobs N] [--rounds K]
    uv run python bench/memory.py --trace gateway|adapters|sink [--jobs N]

The roles run as processes, as `throughput.py --split` runs them: nats-server, `comfyautomate
gateway` (REST + balancer), `comfyautomate logsink`, the 10 adapters in one process
(bench/roles.py), the fake ComfyUIs in another (bench/memprobe.py sims). VmRSS and VmHWM come
from /proc/PID/status; jobs go on the bus (sdk.nats.NatsClient, 32 submitters).

1. Growth once idle: K rounds of jobs; after each, 3 s without work, then RSS is sampled until
   stable (the log sink's DuckDB memory and the streams' contents are read too). Growth = the
   least-squares slope of idle RSS over the points after rounds 1..K, per 1,000 jobs (round 1
   warms caches; one idle sample can be a few MB off either way). Goal: at most 0.2 MB per
   1,000 jobs (20 MB over the issue's 100,000). A bounded cache that is still filling shows as
   growth. Full mode: 5 rounds of 500 (2,500 jobs, what fits 3 min; the issue's 100,000 take
   ~45 min at ~40 jobs/s: `--jobs 100000 --rounds 20`); quick: 3 rounds of 150.
2. 1 GB output: one job whose SaveImage writes a 1 GB file (quick: 256 MB), run by one adapter
   in a process of its own; its RSS is sampled every 50 ms and its VmHWM read afterwards.
   Both copies of the file are deleted at once.
3. Jobs in flight: every fake's queue hung (prompts taken, never run), then 10,000 jobs
   (quick: 2,000) submitted as fast as the bus takes them; RSS sampled throughout. The jobs are
   never run: the system is stopped with them queued.

--trace ROLE runs the rounds only, with ROLE under tracemalloc (bench/memprobe.py): snapshots
after round 1 and after the last round, the top growth by file:line printed and stored under
`tracemalloc` in memory.json (goals of the last plain run kept). RSS is inflated by tracing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx

from bench.common import RESULTS, goal, print_goals, say, table, tiny, write_results
from bench.memprobe import TRACE_ENV
from bench.split import free_port, wait_healthy
from bench.throughput import Completions, submit_all
from gateway.bus.connection import connect
from gateway.bus.contract import JobRecord, Subjects, decode
from gateway.bus.natsserver import NatsServer, start_nats_server
from gateway.logsink.client import query_logs
from sdk.nats import NatsClient

ROOT = Path(__file__).resolve().parents[1]
SERVERS = 10
ROLES = ("gateway", "adapters", "log sink", "nats-server", "fakes")
OURS = ("gateway", "adapters", "log sink")  # the roles with a goal
TRACEABLE = {"gateway": "gateway", "adapters": "adapters", "sink": "log sink"}
GROWTH_TARGET_MB = 0.2  # per 1,000 jobs: 20 MB over the 100,000 jobs counts as none
BIG_GROWTH_TARGET_MB = 50.0
MB = 2**20


# -- /proc -------------------------------------------------------------------------------------


def status_mb(pid: int) -> dict[str, float]:
    """VmRSS, VmHWM and RssAnon of a process in MB (NaN once it is gone)."""
    wanted = {"VmRSS", "VmHWM", "RssAnon"}
    found = dict.fromkeys(wanted, float("nan"))
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in wanted:
                found[key] = int(value.split()[0]) / 1024
    return found


def rss_mb(pid: int) -> float:
    return status_mb(pid)["VmRSS"]


def reset_peak(pid: int) -> None:
    """Set VmHWM back to VmRSS (Linux: clear_refs 5), so it holds the peak of what follows."""
    with contextlib.suppress(OSError):
        Path(f"/proc/{pid}/clear_refs").write_text("5")


async def settle(pids: dict[str, int], quiet: float = 3.0, within: float = 12.0) -> dict:
    """Idle RSS per role: after `quiet` s without work, sampled until no role moves > 0.5 MB.

    The median of the last five samples (0.5 s apart); `within` bounds the wait.
    """
    await asyncio.sleep(quiet)
    deadline = time.monotonic() + within
    samples: list[dict[str, float]] = []
    while True:
        samples.append({role: rss_mb(pid) for role, pid in pids.items()})
        last = samples[-5:]
        steady = len(last) == 5 and all(
            max(s[r] for s in last) - min(s[r] for s in last) <= 0.5 for r in pids
        )
        if steady or time.monotonic() > deadline:
            return {r: sorted(s[r] for s in last)[len(last) // 2] for r in pids}
        await asyncio.sleep(0.5)


# -- the system --------------------------------------------------------------------------------


@dataclass
class System:
    tmp: Path
    nats: NatsServer
    url: str
    addresses: dict[str, str]
    children: dict[str, asyncio.subprocess.Process] = field(default_factory=dict)

    @property
    def data(self) -> str:
        return str(self.tmp / "data")

    @property
    def pids(self) -> dict[str, int]:
        return {role: p.pid for role, p in self.children.items()} | {"nats-server": self.nats.pid}


async def start(
    argv: list[str], log: Path, env: dict[str, str] | None = None, pipe: bool = False
) -> asyncio.subprocess.Process:
    """A Python child writing to `log` (stdout piped to us with `pipe`)."""
    with log.open("ab") as out:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            *argv,
            stdout=asyncio.subprocess.PIPE if pipe else out,
            stderr=out,
            env=env,
        )


def role_argv(argv: list[str], traced: bool) -> list[str]:
    """The command of a role, wrapped by memprobe when it is the one traced."""
    return [str(ROOT / "bench" / "memprobe.py"), "run", *argv] if traced else argv


@asynccontextmanager
async def running(tmp: Path, big_bytes: int, trace: str | None) -> AsyncIterator[System]:
    """nats-server, fakes, gateway, log sink and adapters as processes; all stopped after."""
    nats = await start_nats_server(port=0, store_dir=tmp / "nats", log_file=tmp / "nats.log")
    system = System(tmp, nats, "", {})
    try:
        common = ["--nats-url", nats.url, "--data-dir", system.data, "--log-level", "WARNING"]
        env = os.environ | {TRACE_ENV: str(tmp / "trace.json")}
        sims = system.children["fakes"] = await start(
            [str(ROOT / "bench" / "memprobe.py"), "sims", "--count", str(SERVERS),
             "--base-dir", str(tmp / "sims"), "--big-bytes", str(big_bytes)],
            tmp / "fakes.log", pipe=True,
        )  # fmt: skip
        assert sims.stdout is not None
        line = await sims.stdout.readline()
        if not line:
            raise RuntimeError(
                "the fakes did not start: " + (tmp / "fakes.log").read_text()[-2000:]
            )
        system.addresses = json.loads(line)["addresses"]
        port = free_port()
        system.url = f"http://127.0.0.1:{port}"
        argvs = {
            "gateway": ["-m", "gateway.app.cli", "gateway", *common, "--port", str(port)],
            "log sink": ["-m", "gateway.app.cli", "logsink", *common],
            "adapters": adapters_argv(system, [f"sim{k}" for k in range(SERVERS)]),
        }
        for role, argv in argvs.items():
            traced = TRACEABLE.get(trace or "") == role
            system.children[role] = await start(
                role_argv(argv, traced), tmp / f"{role}.log", env if traced else None
            )
        await wait_healthy(system.url, SERVERS, 60)
        yield system
    finally:
        await asyncio.gather(*(stop(p, 5.0) for p in system.children.values()))
        await nats.stop()


async def stop(process: asyncio.subprocess.Process, grace: float) -> None:
    """SIGTERM, then SIGKILL after `grace` s.

    Short on purpose: after the in-flight part the adapters hold jobs of hung fakes, and their
    drain would wait out its 30 s grace period for jobs that never end.
    """
    if process.returncode is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(process.wait(), grace)
    except TimeoutError:
        process.kill()
        await process.wait()


def adapters_argv(system: System, names: list[str]) -> list[str]:
    servers = [arg for name in names for arg in ("--server", f"{name}={system.addresses[name]}")]
    return [str(ROOT / "bench" / "roles.py"), "adapters", "--nats-url", system.nats.url,
            "--data-dir", system.data, *servers]  # fmt: skip


async def wait_server(url: str, server_id: str, within: float) -> None:
    deadline = time.monotonic() + within
    async with httpx.AsyncClient(base_url=url, timeout=5) as client:
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                for s in (await client.get("/servers")).json():
                    if s["server_id"] == server_id and s["status"] == "healthy":
                        return
            await asyncio.sleep(0.2)
    raise TimeoutError(f"server {server_id} did not turn healthy within {within} s")


async def duckdb_usage(nc: Any) -> dict[str, Any]:
    """The sink's DuckDB: memory its buffer manager holds (MB), and the index file's size."""
    sql = (
        "SELECT (SELECT sum(memory_usage_bytes) FROM duckdb_memory()), database_size, "
        "wal_size, memory_limit FROM pragma_database_size()"
    )
    try:
        row = (await query_logs(nc, Subjects(), sql, timeout_s=10)).rows[0]
    except Exception as exc:  # noqa: BLE001 - a figure missing is no reason to stop the run
        say(f"  (DuckDB's memory not answered: {exc})")
        return {"memory_mb": float("nan")}
    return {"memory_mb": float(row[0] or 0) / MB, "file": row[1], "wal": row[2], "limit": row[3]}


async def streams(nc: Any) -> dict[str, dict[str, int]]:
    """Messages and bytes each non-empty JetStream stream holds (what nats-server keeps)."""
    return {
        info.config.name: {"messages": info.state.messages, "bytes": info.state.bytes}
        for info in await nc.jetstream().streams_info()
        if info.state.messages
    }


async def wait_sink(nc: Any, within: float) -> None:
    """Until the log sink answers queries (it starts after the servers turn healthy)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            await query_logs(nc, Subjects(), "SELECT 1", timeout_s=2)
            return
        await asyncio.sleep(0.5)
    raise TimeoutError(f"the log sink did not answer within {within} s")


# -- 1. growth once idle -----------------------------------------------------------------------


@dataclass
class Bench:
    """What every phase uses: the system, a bus client and the watcher of job records."""

    system: System
    bus: NatsClient
    completions: Completions
    nc: Any

    async def submit(self, workflow: dict[str, Any], **options: Any) -> str:
        return (await self.bus.submit(workflow, **options)).job_id

    async def record(self, job_id: str) -> JobRecord:
        kv = await self.nc.jetstream().key_value(Subjects().jobs_bucket)
        return decode((await kv.get(job_id)).value, JobRecord)


def folder_mb(folder: Path) -> float:
    """What the files below `folder` take on disk (allocated blocks), in MB."""
    total = 0
    for path in folder.rglob("*"):
        with contextlib.suppress(OSError):
            if path.is_file():
                total += path.stat().st_blocks * 512
    return total / MB


async def idle_point(b: Bench, moment: str, jobs: int) -> dict[str, Any]:
    """RSS of every role once idle, with DuckDB's memory, the streams' contents and the disk
    taken by NATS's store and by the logs (JSONL files and index)."""
    rss = await settle(b.system.pids)
    return {
        "moment": moment,
        "jobs": jobs,
        "rss": rss,
        "duckdb": await duckdb_usage(b.nc),
        "streams": await streams(b.nc),
        "disk_mb": {
            "nats": folder_mb(b.system.tmp / "nats"),
            "logs": folder_mb(Path(b.system.data) / "logs"),
        },
    }


async def rounds_of_jobs(b: Bench, rounds: int, per_round: int, traced: int | None) -> list:
    """Idle RSS (and DuckDB memory) at start and after each round; SIGUSR2 to `traced`."""
    await wait_sink(b.nc, 60)
    points = [await idle_point(b, "idle after start", 0)]
    done = 0
    for k in range(1, rounds + 1):
        say(f"round {k}/{rounds}: {per_round} jobs ...")
        started = time.perf_counter()
        ids, _ = await submit_all(per_round, 32, b.submit, k * 10**7)
        await b.completions.wait_for(set(ids), within=max(120.0, per_round / 5))
        unfinished = len(set(ids) - b.completions.done.keys())
        if unfinished:
            raise TimeoutError(f"round {k}: {unfinished} jobs unfinished")
        seconds = time.perf_counter() - started
        done += per_round
        points.append(await idle_point(b, f"idle after round {k}", done) | {"seconds": seconds})
        if traced is not None and k in (1, rounds):
            os.kill(traced, signal.SIGUSR2)  # snapshot (the second one writes the diff)
    return points


def slope_per_1000(jobs: list[float], mb: list[float]) -> float:
    """Least-squares MB per 1,000 jobs: one idle sample can be a few MB off either way."""
    n = len(jobs)
    if n < 2:
        return float("nan")
    mean_x, mean_y = sum(jobs) / n, sum(mb) / n
    sxx = sum((x - mean_x) ** 2 for x in jobs)
    sxy = sum((x - mean_x) * (y - mean_y) for x, y in zip(jobs, mb, strict=True))
    return sxy / sxx * 1000


def growth_per_1000(points: list[dict[str, Any]], role: str) -> float:
    """MB per 1,000 jobs over the idle points after round 1, 2, ... (round 1 warms up)."""
    later = points[1:]
    return slope_per_1000([p["jobs"] for p in later], [p["rss"][role] for p in later])


# -- 2. a 1 GB output --------------------------------------------------------------------------


async def sample_every(pid: int, period: float, into: list[float]) -> None:
    while True:
        into.append(rss_mb(pid))
        await asyncio.sleep(period)


def delete_big_files(folders: list[Path], size: int) -> int:
    """Remove the files of at least half `size` below `folders`; how many went."""
    gone = 0
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file() and path.stat().st_size >= size // 2:
                path.unlink()
                gone += 1
    return gone


async def big_output(b: Bench, size: int) -> dict[str, Any]:
    """One job with a `size`-byte output through one adapter process; its RSS throughout."""
    free = shutil.disk_usage(b.system.tmp).free
    if free < 2 * size + 2**30:
        return {"skipped": f"{free / 2**30:.1f} GB free, {2 * size / 2**30:.1f} GB needed"}
    tmp = b.system.tmp
    adapter = await start(adapters_argv(b.system, ["big"]), tmp / "big-adapter.log")
    try:
        await wait_server(b.system.url, "big", 30)
        warm = await b.submit(tiny(1, "warm"), server="big")  # imports and pools warmed up
        await b.completions.wait_for({warm}, within=30)
        idle = (await settle({"adapter": adapter.pid}, quiet=1.0))["adapter"]
        reset_peak(adapter.pid)
        workflow = tiny(2, "big")
        workflow["1"]["inputs"].update(width=1024, height=1024)
        samples: list[float] = []
        sampler = asyncio.create_task(sample_every(adapter.pid, 0.05, samples))
        started = time.perf_counter()
        try:
            job_id = await b.submit(workflow, server="big")
            await b.completions.wait_for({job_id}, within=240)
        finally:
            sampler.cancel()
            await asyncio.gather(sampler, return_exceptions=True)
        seconds = time.perf_counter() - started
        hwm = status_mb(adapter.pid)["VmHWM"]
        record = await b.record(job_id)
    finally:
        await stop(adapter, 20.0)
        gone = delete_big_files([tmp / "sims" / "big", tmp / "data" / "outputs"], size)
    stored = record.outputs[0].size if record.outputs else 0
    return {
        "status": record.status.value,
        "bytes": size,
        "stored_bytes": stored,
        "seconds": seconds,
        "mb_per_s": stored / MB / seconds,
        "idle_mb": idle,
        "max_sampled_mb": max(samples),
        "vmhwm_mb": hwm,
        "growth_mb": max(max(samples), hwm) - idle,
        "samples": len(samples),
        "files_deleted": gone,
    }


# -- 3. jobs in flight -------------------------------------------------------------------------


async def submit_until(b: Bench, n: int, deadline: float, ids: list[str]) -> int:
    """Submit up to n jobs (64 at a time) until `deadline`; ids appended as accepted."""
    counter = iter(range(n))
    refused = 0

    async def worker() -> None:
        nonlocal refused
        for i in counter:
            if time.monotonic() > deadline:
                return
            try:
                ids.append(await b.submit(tiny(9 * 10**8 + i, "flight")))
            except Exception:  # noqa: BLE001 - counted and reported; the peak is what we want
                refused += 1

    await asyncio.gather(*(worker() for _ in range(64)))
    return refused


async def in_flight(b: Bench, n: int, budget_s: float) -> dict[str, Any]:
    """Hang every fake, submit n jobs, sample each role's RSS; the peak with most in flight."""
    pids = b.system.pids
    idle = await settle(pids, quiet=1.0)
    for pid in pids.values():
        reset_peak(pid)
    os.kill(b.system.children["fakes"].pid, signal.SIGUSR2)  # every queue hangs from now
    ids: list[str] = []
    peaks = dict(idle)
    series: list[dict[str, Any]] = []

    async def sample() -> None:
        started = time.monotonic()
        while True:
            rss = {role: rss_mb(pid) for role, pid in pids.items()}
            for role, value in rss.items():
                peaks[role] = max(peaks[role], value)
            series.append({"t": time.monotonic() - started, "accepted": len(ids), "rss": rss})
            await asyncio.sleep(0.25)

    sampler = asyncio.create_task(sample())
    started = time.perf_counter()
    try:
        refused = await submit_until(b, n, time.monotonic() + budget_s, ids)
        submit_s = time.perf_counter() - started
        await asyncio.sleep(5)  # the dispatcher and the sink catch up with the last ones
    finally:
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)
    terminal = len(set(ids) & b.completions.done.keys())
    return {
        "asked": n,
        "accepted": len(ids),
        "refused_or_failed_submits": refused,
        "terminal": terminal,
        "in_flight": len(ids) - terminal,
        "submit_s": submit_s,
        "submitted_per_s": len(ids) / submit_s,
        "idle_mb": idle,
        "peak_mb": peaks,
        "vmhwm_mb": {role: status_mb(pid)["VmHWM"] for role, pid in pids.items()},
        "series": series[:: max(1, len(series) // 40)],
    }


# -- tracemalloc -------------------------------------------------------------------------------


async def read_trace(path: Path, within: float = 120.0) -> dict[str, Any]:
    """The report memprobe writes after the second snapshot."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if path.exists():
            report = json.loads(path.read_text())
            if len(report["points"]) >= 2:
                return report
        await asyncio.sleep(0.5)
    raise TimeoutError(f"no tracemalloc report in {path} within {within} s")


def print_trace(role: str, report: dict[str, Any]) -> None:
    a, b = report["points"][0], report["points"][-1]
    say(
        f"\ntracemalloc in {role}, after round 1 -> after the last: Python heap grew "
        f"{report['heap_growth_kb'] / 1024:.2f} MB (all sites); RSS {a['rss_mb']:.1f} -> "
        f"{b['rss_mb']:.1f} MB (inflated by tracing)"
    )
    rows = [[s["site"], s["size_diff_kb"], s["count_diff"]] for s in report["top_lines"][:15]]
    say(table(rows, ["allocation site", "KB grown", "blocks grown"]))
    say("\nlargest growth by stack (innermost first):")
    for s in report["top_stacks"][:5]:
        say(f"  {s['size_diff_kb']:.1f} KB, {s['count_diff']} blocks: " + " <- ".join(s["stack"]))


def store_trace(role: str, points: list[dict[str, Any]], report: dict[str, Any]) -> None:
    """Keep the report in memory.json beside the goals of the last plain run."""
    path = RESULTS / "memory.json"
    data = json.loads(path.read_text()) if path.exists() else {"name": "memory", "goals": []}
    about = {
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "jobs": points[-1]["jobs"],
        "jobs_between_snapshots": points[-1]["jobs"] - points[1]["jobs"],
    }
    data.setdefault("tracemalloc", {})[role] = about | report
    path.write_text(json.dumps(data, indent=2) + "\n")
    say(f"\nstored under tracemalloc.{role} in {path}")


# -- reporting ---------------------------------------------------------------------------------


def report_rounds(points: list[dict[str, Any]]) -> dict[str, float]:
    say("\nidle RSS (MB) by process after each round (VmRSS; DuckDB = duckdb_memory() in the sink)")
    rows = [
        [p["moment"], p["jobs"], *[p["rss"][r] for r in ROLES], p["duckdb"]["memory_mb"]]
        for p in points
    ]
    growth = {r: growth_per_1000(points, r) for r in ROLES}
    later = points[1:]
    duck = slope_per_1000([p["jobs"] for p in later], [p["duckdb"]["memory_mb"] for p in later])
    rows.append(["MB per 1,000 jobs (fit, round 1 on)", "", *growth.values(), duck])
    say(table(rows, ["moment", "jobs", *ROLES, "DuckDB"]))
    first, last = points[1]["duckdb"], points[-1]["duckdb"]
    say(
        f"log index after round 1: file {first.get('file')}, WAL {first.get('wal')}; after the "
        f"last: file {last.get('file')}, WAL {last.get('wal')}; memory_limit {last.get('limit')}"
    )
    held = points[-1]["streams"].items()
    say(
        "JetStream messages held after the last round: "
        + ", ".join(f"{k} {v['messages']:,} ({v['bytes'] / MB:.1f} MB)" for k, v in held)
    )
    jobs = [p["jobs"] for p in later]
    disk = {
        where: slope_per_1000(jobs, [p["disk_mb"][where] for p in later])
        for where in ("nats", "logs")
    }
    final = points[-1]["disk_mb"]
    say(
        "disk per 1,000 jobs (fit, round 1 on): NATS store "
        f"{disk['nats']:.2f} MB, logs (JSONL files and index) {disk['logs']:.2f} MB; after the "
        f"last round {final['nats']:.1f} MB and {final['logs']:.1f} MB"
    )
    return growth | {f"disk {where}": value for where, value in disk.items()}


def report_big(big: dict[str, Any]) -> None:
    if "skipped" in big:
        say(f"\n1 GB output: skipped ({big['skipped']})")
        return
    say(f"\n{big['bytes'] / MB:,.0f} MB output streamed by one adapter process (RSS every 50 ms)")
    rows = [
        ["adapter RSS idle before the job", big["idle_mb"], "MB"],
        ["max VmRSS sampled during the job", big["max_sampled_mb"], "MB"],
        ["VmHWM after the job (reset before it)", big["vmhwm_mb"], "MB"],
        ["growth over idle", big["growth_mb"], "MB"],
        ["bytes stored", f"{big['stored_bytes']:,}", ""],
        ["job time (submit -> record terminal)", big["seconds"], "s"],
        ["rate", big["mb_per_s"], "MB/s"],
    ]
    say(table(rows, ["", "value", "unit"]))


def report_flight(fl: dict[str, Any]) -> None:
    say(
        f"\njobs in flight: {fl['accepted']:,} of {fl['asked']:,} accepted in "
        f"{fl['submit_s']:.1f} s ({fl['submitted_per_s']:.0f}/s), {fl['terminal']} terminal, "
        f"{fl['in_flight']:,} in flight; fakes hung, so at most 2 per server are running"
    )
    rows = [
        [
            role,
            fl["idle_mb"][role],
            fl["peak_mb"][role],
            fl["vmhwm_mb"][role],
            fl["peak_mb"][role] - fl["idle_mb"][role],
        ]
        for role in ROLES
    ]
    say(table(rows, ["process", "idle MB", "peak VmRSS MB", "VmHWM MB", "peak - idle MB"]))


def goals_of(
    growth: dict[str, float], big: dict[str, Any], fl: dict[str, Any], asked: int
) -> list[dict[str, Any]]:
    goals = [
        goal(f"{role} RSS growth once idle", growth[role], "MB/1000 jobs", GROWTH_TARGET_MB, False)
        for role in OURS
    ]
    if "skipped" not in big:
        name = f"adapter RSS growth streaming a {big['bytes'] / MB:,.0f} MB output"
        goals.append(goal(name, big["growth_mb"], "MB", BIG_GROWTH_TARGET_MB, False))
        whole = float(big["stored_bytes"] == big["bytes"] and big["status"] == "succeeded")
        goals.append(goal("that output stored whole", whole, "bool", 1, True))
    goals.append(goal("jobs in flight at the peak", fl["in_flight"], "jobs", asked, True))
    return goals


# -- main --------------------------------------------------------------------------------------


@asynccontextmanager
async def bench(tmp: Path, big_bytes: int, trace: str | None) -> AsyncIterator[Bench]:
    async with running(tmp, big_bytes, trace) as system:
        nc = await connect(system.nats.url, "bench-mem")
        completions = Completions()
        watch = asyncio.create_task(completions.run(nc.jetstream()))
        try:
            async with await NatsClient.connect(system.nats.url) as bus:
                yield Bench(system, bus, completions, nc)
        finally:
            watch.cancel()
            await asyncio.gather(watch, return_exceptions=True)
            await nc.close()


@contextlib.contextmanager
def timed(phases: dict[str, float], name: str) -> Iterator[None]:
    mark = time.perf_counter()
    try:
        yield
    finally:
        phases[name] = time.perf_counter() - mark


async def measure(b: Bench, args: argparse.Namespace, phases: dict[str, float]) -> dict:
    """The rounds, then (unless tracing) the big output and the jobs in flight."""
    rounds = args.rounds or (3 if args.quick else 5)
    per_round = (args.jobs or (450 if args.quick else 2500)) // rounds
    traced = b.system.children[TRACEABLE[args.trace]].pid if args.trace else None
    with timed(phases, "rounds"):
        found: dict[str, Any] = {"points": await rounds_of_jobs(b, rounds, per_round, traced)}
    if args.trace:
        found["trace"] = await read_trace(b.system.tmp / "trace.json")
        return found
    size = 256 * MB if args.quick else 1024 * MB
    say(f"{size / MB:,.0f} MB output ...")
    with timed(phases, "big output"):
        found["big"] = await big_output(b, size)
    flight = 2000 if args.quick else 10_000
    say(f"{flight:,} jobs in flight ...")
    with timed(phases, "in flight"):
        found["flight"] = await in_flight(b, flight, budget_s=40 if args.quick else 60)
    return found


async def main(args: argparse.Namespace) -> dict[str, Any] | None:
    phases: dict[str, float] = {}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="comfybench-mem-") as tmp:
        big_bytes = 0 if args.trace else (256 if args.quick else 1024) * MB
        async with bench(Path(tmp), big_bytes, args.trace) as b:
            phases["start"] = time.perf_counter() - t0
            say(f"up in {phases['start']:.1f} s; pids {b.system.pids}")
            found = await measure(b, args, phases)
            stopping = time.perf_counter()
        phases["stop"] = time.perf_counter() - stopping
    run_s = time.perf_counter() - t0
    points = found["points"]
    growth = report_rounds(points)
    if args.trace:
        print_trace(args.trace, found["trace"])
        store_trace(args.trace, points, found["trace"])
        return None
    big, fl = found["big"], found["flight"]
    report_big(big)
    report_flight(fl)
    say(f"\nrun took {run_s:.0f} s: " + ", ".join(f"{k} {v:.0f} s" for k, v in phases.items()))
    goals = goals_of(growth, big, fl, fl["asked"])
    say("")
    print_goals(goals)
    return {
        "mode": "quick" if args.quick else "full",
        "run_s": run_s,
        "phase_s": phases,
        "servers": SERVERS,
        "rounds": points,
        "growth_mb_per_1000_jobs": growth,
        "big_output": big,
        "in_flight": fl,
        "note": "roles as processes; VmRSS from /proc; fakes' queues hung for the in-flight part",
        "goals": goals,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 x 150 jobs, 256 MB, 2,000")
    parser.add_argument("--jobs", type=int, help="jobs over all rounds (full 2500, quick 450)")
    parser.add_argument("--rounds", type=int, help="rounds of jobs (full 5, quick 3)")
    parser.add_argument("--trace", choices=sorted(TRACEABLE), help="rounds only, role traced")
    args = parser.parse_args()
    if args.rounds is not None and args.rounds < 2:
        parser.error("--rounds must be at least 2: growth is measured from round 1 on")
    result = asyncio.run(main(args))
    if result is not None:
        old = RESULTS / "memory.json"
        traces = json.loads(old.read_text()).get("tracemalloc") if old.exists() else None
        write_results("memory", result | ({"tracemalloc": traces} if traces else {}))
