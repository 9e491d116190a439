"""One stream of jobs through a cluster of processes, and faults injected one after another.

Each fault is triggered by observed progress (so many more jobs succeeded, a job running on the
server about to lose its adapter), never by time, and lasts until so many more jobs succeeded
elsewhere. The stream keeps `outstanding` jobs accepted and unfinished while faults happen; then
it drains, and every witness is compared (ledger.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats.errors

from gateway.bus.contract import JobRecord, JobStatus, Subjects
from gateway.bus.replication import replication_status
from sdk.nats import NatsClient
from tests.chaos.cluster import Cluster, running_cluster
from tests.chaos.ledger import Verdict, verify
from tests.chaos.sse import StalledReader
from tests.chaos.stream import Feeder, Tracker
from tests.helpers import poll_until

ALL_FAULTS = (
    "slow_sse",
    "ws_drops",
    "sink_kill",
    "adapter_kills",
    "sim_crash",
    "gateway_restart",
    "sim_hang",
    "full_disk",
    "nats_restart",
)

# On a JetStream cluster (Cluster(nats_nodes=3)): one node SIGKILLed at a time, chosen by what
# it leads, and started again once the system has gone on without it.
NODE_FAULTS = (
    "jobs_leader_loss",
    "meta_leader_loss",
    "jobs_bucket_leader_loss",
    "node_store_lost",
    "jobs_bucket_store_lost",
)

_BACKGROUND = frozenset({"slow_sse", "ws_drops", "sink_kill"})
_CUTS_CLIENTS = frozenset({"gateway_restart", "nats_restart", *NODE_FAULTS})


@dataclass
class Plan:
    """What to do: how much load, which faults, how long each lasts (in jobs succeeded)."""

    outstanding: int = 210  # so that at least 200 are unfinished while the feeder tops up
    gap: int = 8
    faults: tuple[str, ...] = ALL_FAULTS
    adapter_kills: int = 1  # full_disk kills one more adapter mid-job
    slow_readers: int = 20
    prefix: str = "c"
    gateway_signal: int = signal.SIGTERM
    drain_rounds: int = 20  # of 3 s each, once the faults are over
    submit_on_bus: bool = True  # sdk.nats; False submits by REST (the async SDK)


@dataclass
class FaultNote:
    name: str
    at_succeeded: int
    unfinished: int
    seconds: float
    detail: str = ""


@dataclass
class Outcome:
    verdict: Verdict
    records: dict[str, JobRecord]
    notes: list[FaultNote] = field(default_factory=list)
    feeder: dict[str, Any] = field(default_factory=dict)
    full_disk_failures: set[str] = field(default_factory=set)
    sse: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    sse_problems: list[str] = field(default_factory=list)
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    broker_killed_at: float | None = None
    claimed_at_broker: int = 0

    @property
    def finished_before_broker(self) -> set[str]:
        """Jobs that had ended, and whose every event is older than the broker's first kill."""
        cut = self.broker_killed_at
        if cut is None:
            return set(self.records)
        return {
            j
            for j, ts in self.verdict.last_event_at.items()
            if ts < cut and self.records[j].status.terminal
        }

    def split(self) -> tuple[Verdict, Verdict]:
        """The verdict on jobs that ended before the broker's first restart, and on the rest."""
        before = self.finished_before_broker
        return self.verdict.only(before), self.verdict.only(set(self.records) - before)


def full_disk_wrapper(outputs: Path) -> list[str] | None:
    """A command prefix that runs the adapter where `outputs` is a full file system.

    A private mount namespace (in a user namespace, so no privilege is needed where those are
    allowed) gets a 64 KiB tmpfs over the storage folder, filled to the last block before the
    adapter starts: its writes fail with ENOSPC, as on a full disk. None where namespaces are
    not available.
    """
    unshare = shutil.which("unshare")
    if unshare is None:
        return None
    probe = subprocess.run(
        [unshare, "--user", "--map-root-user", "--mount", "true"], capture_output=True, check=False
    )
    if probe.returncode != 0:
        return None
    script = (
        'mkdir -p "$0" && mount -t tmpfs -o size=64k tmpfs "$0" || exit 97; '
        'head -c 1048576 /dev/zero > "$0/.fill" 2>/dev/null; exec "$@"'
    )
    return [unshare, "--user", "--map-root-user", "--mount", "sh", "-c", script, str(outputs)]


def _killer(pid: int) -> Callable[[JobRecord], None]:
    """SIGKILL `pid` right away (from inside the record callback: the job is still running)."""
    return lambda _: os.kill(pid, signal.SIGKILL)


class Run:
    """The scenario's state while it runs."""

    def __init__(self, cluster: Cluster, plan: Plan, tracker: Tracker, feeder: Feeder) -> None:
        self.cluster = cluster
        self.plan = plan
        self.tracker = tracker
        self.feeder = feeder
        self.notes: list[FaultNote] = []
        self.full_disk_failures: set[str] = set()
        self.sse: dict[str, list[dict[str, Any]]] = {}
        self.sse_problems: list[str] = []
        self.full_disk_server: str | None = None
        self.faults_over = asyncio.Event()
        self.timings: dict[str, float] = {}
        self.cleanups: list[Callable[[], None]] = []
        # When the broker was first killed (None: it never was), and how far the feeder was.
        self.broker_killed_at: float | None = None
        self.claimed_at_broker = 0  # jobs the feeder had started submitting by then

    async def more_succeeded(self, count: int, what: str, within: float = 60.0) -> None:
        target = self.tracker.succeeded + count
        await self.tracker.wait_for(
            lambda: self.tracker.succeeded >= target,
            f"{count} more jobs succeeded ({what})",
            within,
        )

    async def more_succeeded_elsewhere(self, server_id: str, count: int, what: str) -> None:
        def elsewhere() -> int:
            return sum(n for s, n in self.tracker.succeeded_on.items() if s != server_id)

        target = elsewhere() + count
        await self.tracker.wait_for(lambda: elsewhere() >= target, what, within=60)

    async def when_running_on(self, server_id: str, action: Callable[[JobRecord], None]) -> str:
        """Call `action` at once when a job is seen running on `server_id`; that job's id."""
        fired: asyncio.Future[str] = asyncio.get_running_loop().create_future()

        def hook(record: JobRecord) -> None:
            if fired.done() or record.server_id != server_id:
                return
            if record.status is JobStatus.RUNNING:
                action(record)
                fired.set_result(record.job_id)

        remove = self.tracker.on_change(hook)
        try:
            async with asyncio.timeout(60):
                return await fired
        except TimeoutError:
            raise AssertionError(f"no job was seen running on {server_id} within 60 s") from None
        finally:
            remove()

    async def fault(self, name: str, body: Callable[[], Awaitable[str]]) -> None:
        started = time.monotonic()
        at, unfinished = self.tracker.succeeded, self.feeder.unfinished()
        detail = await body()
        self.notes.append(FaultNote(name, at, unfinished, time.monotonic() - started, detail))

    # -- the faults --------------------------------------------------------------------------

    async def slow_sse(self) -> str:
        # The oldest jobs still waiting: their events come soon, while the readers take nothing.
        waiting = [
            job_id
            for job_id in self.feeder.accepted
            if (r := self.tracker.records.get(job_id)) is not None and r.status is JobStatus.QUEUED
        ][: self.plan.slow_readers]
        readers = [StalledReader("127.0.0.1", self.cluster.gateway_port, j) for j in waiting]
        for reader in readers:
            await reader.open()
        try:
            # Other clients' jobs go on while these readers take nothing.
            await self.more_succeeded(
                max(self.plan.gap, 2 * len(readers)), "while SSE readers are stalled"
            )
            await self.tracker.wait_for(
                lambda: all(self.tracker.records[j].status.terminal for j in waiting),
                "the stalled readers' jobs ended",
            )
            async with asyncio.timeout(30):
                results = await asyncio.gather(*(r.read_all() for r in readers))
        finally:
            for reader in readers:
                reader.close()
        for job_id, (status, events) in zip(waiting, results, strict=True):
            self.sse[job_id] = events
            seqs = [e["seq"] for e in events]
            if status != 200 or seqs != list(range(1, len(seqs) + 1)):
                self.sse_problems.append(f"{job_id}: HTTP {status}, seqs {seqs}")
            elif events[-1]["type"] not in ("succeeded", "failed", "cancelled"):
                self.sse_problems.append(f"{job_id}: stream ended with {events[-1]['type']}")
        return f"{len(readers)} readers"

    async def ws_drops(self) -> str:
        """Every fake cuts its websockets each `gap` jobs, until the other faults are over."""
        cut = drops = 0
        while not self.faults_over.is_set():
            await self.more_succeeded(self.plan.gap, "before a websocket drop")
            cut += sum(sim.drop_websockets() for sim in self.cluster.sims.values())
            drops += 1
        return f"{drops} drops, {cut} websockets cut"

    async def adapter_kills(self) -> str:
        """SIGKILL adapters mid-job, one server after another; each restarted at once."""
        ids = self.cluster.server_ids
        killed = []
        for index in range(self.plan.adapter_kills):
            server_id = ids[(index + 1) % len(ids)]
            await self.more_succeeded(self.plan.gap, "before an adapter kill")
            await self.cluster.wait_adapter_ready(server_id)
            kill = _killer(self.cluster.adapters[server_id].pid)
            job_id = await self.when_running_on(server_id, kill)
            await self.cluster.kill_adapter(server_id)  # reaps it
            killed.append(f"{server_id}({job_id})")
            await self.cluster.start_adapter(server_id)
        return "killed mid-job: " + ", ".join(killed)

    async def sim_crash(self) -> str:
        server_id = self.cluster.server_ids[1 % len(self.cluster.server_ids)]
        sim = self.cluster.sims[server_id]
        await self.more_succeeded(self.plan.gap, "before a fake crashes")
        job_id = await self.when_running_on(server_id, lambda _: sim.crash())
        await self.cluster.crash_sim(server_id)
        await self.more_succeeded_elsewhere(server_id, self.plan.gap, "while a fake is down")
        restarted = time.monotonic()
        await self.cluster.start_sim(server_id)

        async def healthy_again() -> bool:
            seen = self.cluster.heartbeats.get(server_id)
            return seen is not None and seen[0] > restarted and seen[1].healthy

        await poll_until(healthy_again, f"{server_id} healthy after its restart", within=30)
        return f"{server_id} crashed with {job_id} running"

    async def sim_hang(self) -> str:
        server_id = self.cluster.server_ids[2 % len(self.cluster.server_ids)]
        self.cluster.sims[server_id].set_hang(True)
        try:
            await self.more_succeeded_elsewhere(server_id, self.plan.gap, "while a fake hangs")
        finally:
            held = [
                r.job_id
                for r in self.tracker.records.values()
                if r.server_id == server_id and not r.status.terminal
            ]
            self.cluster.sims[server_id].set_hang(False)
        return f"{server_id} hung with {len(held)} job(s) bound"

    async def sink_kill(self) -> str:
        await self.more_succeeded(self.plan.gap, "before killing the log sink")
        await self.cluster.kill_sink()
        await self.more_succeeded(self.plan.gap, "while the log sink is dead")
        await self.cluster.start_sink()
        return "SIGKILL, restarted"

    async def gateway_restart(self) -> str:
        await self.more_succeeded(self.plan.gap, "before the gateway restart")
        code = await self.cluster.restart_gateway(self.plan.gateway_signal)
        return f"{signal.Signals(self.plan.gateway_signal).name}, exit code {code}"

    async def nats_restart(self) -> str:
        await self.more_succeeded(self.plan.gap, "before the broker restart")
        if self.broker_killed_at is None:
            self.claimed_at_broker = self.feeder.claimed
            self.broker_killed_at = time.time()
        await self.cluster.restart_nats()

        async def resynced() -> bool:
            try:
                await self.tracker.resync()
            except (nats.errors.Error, OSError):
                return False
            return True

        await poll_until(resynced, "the job records read again after the broker restart")
        return "SIGKILL, restarted on the same port and store"

    async def full_disk(self) -> str:
        server_id = self.cluster.server_ids[0]
        wrapper = full_disk_wrapper(self.cluster.data_dir / "outputs")
        if wrapper is None:
            return "skipped: no user and mount namespaces here"
        await self.more_succeeded(self.plan.gap, "before the disk fills")
        await self.cluster.wait_adapter_ready(server_id)
        # The adapter is SIGKILLed mid-job, and comes back on a full disk.
        await self.when_running_on(server_id, _killer(self.cluster.adapters[server_id].pid))
        await self.cluster.kill_adapter(server_id)
        self.full_disk_server = server_id
        enough: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def hook(record: JobRecord) -> None:
            if record.status is JobStatus.FAILED and record.server_id == server_id:
                self.full_disk_failures.add(record.job_id)
                if len(self.full_disk_failures) >= 3 and not enough.done():
                    enough.set_result(None)

        # Kept to the end of the stream: a failure may be recorded after the adapter is gone.
        self.cleanups.append(self.tracker.on_change(hook))
        await self.cluster.start_adapter(server_id, wrap=wrapper)
        try:
            async with asyncio.timeout(60):
                await enough
        except TimeoutError:
            raise AssertionError("no job failed on the full disk within 60 s") from None
        await self.cluster.kill_adapter(server_id)
        await self.cluster.start_adapter(server_id)
        return f"{server_id}: {len(self.full_disk_failures)} job(s) failed"

    # -- a node of a NATS cluster lost --------------------------------------------------------

    async def _stream_leader(self, stream: str) -> str:
        assert self.cluster.nc is not None
        info = await self.cluster.nc.jetstream().stream_info(stream)
        assert info.cluster is not None and info.cluster.leader is not None, info.cluster
        return info.cluster.leader

    async def _meta_leader(self) -> str:
        assert self.cluster.broker is not None
        return await self.cluster.broker.wait_meta_leader()

    async def _node_loss(self, pick: Callable[[], Awaitable[str]], what: str, wipe: bool) -> str:
        """SIGKILL the node `pick` names; start it again (its store deleted when `wipe`) after
        `gap` more jobs succeeded without it; return once every resource is current again."""
        broker = self.cluster.broker
        assert broker is not None and self.cluster.nc is not None
        await self.more_succeeded(self.plan.gap, f"before the node leading {what} is killed")
        name = await pick()
        node = broker.node(name)
        if self.broker_killed_at is None:
            self.claimed_at_broker = self.feeder.claimed
            self.broker_killed_at = time.time()
        await node.stop(kill=True)
        await self.more_succeeded(self.plan.gap, f"while {name} is down")
        if wipe:
            node.wipe_store()
        await node.start()
        js = self.cluster.nc.jetstream()

        async def caught_up() -> bool:
            status = await replication_status(js, self.cluster.subjects)
            return all(r.current for r in status)

        # The next loss must find every copy in place, or it could take a quorum with it.
        await poll_until(caught_up, f"every resource current after {name} came back", within=60)

        async def resynced() -> bool:
            try:
                await self.tracker.resync()
            except (nats.errors.Error, OSError):
                return False
            return True

        await poll_until(resynced, "the job records read again after the node's loss")
        return f"{name} (leading {what}) SIGKILLed, {'store deleted, ' if wipe else ''}restarted"

    async def jobs_leader_loss(self) -> str:
        stream = self.cluster.subjects.jobs_stream
        return await self._node_loss(lambda: self._stream_leader(stream), stream, wipe=False)

    async def meta_leader_loss(self) -> str:
        return await self._node_loss(self._meta_leader, "the JetStream meta group", wipe=False)

    async def jobs_bucket_leader_loss(self) -> str:
        stream = f"KV_{self.cluster.subjects.jobs_bucket}"
        return await self._node_loss(lambda: self._stream_leader(stream), stream, wipe=False)

    async def jobs_bucket_store_lost(self) -> str:
        stream = f"KV_{self.cluster.subjects.jobs_bucket}"
        return await self._node_loss(lambda: self._stream_leader(stream), stream, wipe=True)

    async def node_store_lost(self) -> str:
        stream = self.cluster.subjects.events_stream
        return await self._node_loss(lambda: self._stream_leader(stream), stream, wipe=True)


async def drain(tracker: Tracker, accepted: set[str], rounds: int) -> None:
    """Wait (rounds of 3 s) until every accepted job finished, or nothing moves any more.

    Some faults strand a job for good (known bugs, README.md): once no record has changed for
    two rounds while jobs are left, waiting longer only burns the time budget.
    """
    still = 0
    for _ in range(rounds):
        seen = tracker.version
        try:
            await tracker.wait_for(
                lambda: tracker.finished(accepted) >= len(accepted),
                "every accepted job finished",
                within=3,
            )
            return
        except AssertionError:
            pass
        # A record changed while the broker was away: read them all again.
        with contextlib.suppress(nats.errors.Error, OSError):
            await tracker.resync()
        still = still + 1 if tracker.version == seen else 0
        if still >= 2:
            return


async def run_scenario(base: Path, plan: Plan) -> Outcome:
    """Start a cluster under `base`, stream jobs through the faults of `plan`, then verify."""
    started = time.monotonic()
    async with running_cluster(base) as cluster:
        assert cluster.nc is not None
        up = time.monotonic() - started
        tracker = Tracker(cluster.nc, Subjects())
        await tracker.start()
        outcome = await run_stream(cluster, tracker, plan)
        outcome.timings["cluster_up"] = up
        return outcome


async def run_stream(cluster: Cluster, tracker: Tracker, plan: Plan) -> Outcome:
    """Stream jobs through the faults of `plan` on a running cluster, then verify them."""
    started = time.monotonic()
    base = cluster.base
    async with contextlib.AsyncExitStack() as stack:
        bus = None
        if plan.submit_on_bus:
            bus = await NatsClient.connect(cluster.nats_url)
            stack.push_async_callback(bus.close)
        feeder = Feeder(
            cluster.url, tracker, prefix=plan.prefix, bus=bus, outstanding=plan.outstanding
        )
        run = Run(cluster, plan, tracker, feeder)
        background: dict[str, asyncio.Task[None]] = {}
        feeder.start()
        try:
            await tracker.wait_for(
                lambda: feeder.unfinished() >= plan.outstanding and tracker.succeeded >= plan.gap,
                f"{plan.outstanding} jobs in the stream",
            )
            run.timings["flowing"] = time.monotonic() - started
            # Stalled readers and websocket drops run alongside the faults that follow.
            background = {
                name: asyncio.create_task(run.fault(name, getattr(run, name)))
                for name in plan.faults
                if name in _BACKGROUND
            }
            for name in plan.faults:
                if name in _BACKGROUND:
                    continue
                if name in _CUTS_CLIENTS and "slow_sse" in background:
                    await background.pop("slow_sse")  # a restart would cut the readers
                await run.fault(name, getattr(run, name))
            run.faults_over.set()
            await asyncio.gather(*background.values())
            await feeder.stop()
            run.timings["faults_over"] = time.monotonic() - started
            accepted = set(feeder.accepted)
            await drain(tracker, accepted, plan.drain_rounds)
            await tracker.resync()
            run.timings["drained"] = time.monotonic() - started
            records = {job_id: tracker.records[job_id] for job_id in accepted}
            sims = cluster.sims.values()
            assert cluster.nc is not None
            verdict = await verify(
                cluster.nc,
                Subjects(),
                cluster.data_dir,
                plan.prefix,
                records,
                sim_urls=[sim.url for sim in sims],
                sim_output_dirs=sorted((base / "sims").glob("*/comfy-output")),
                storage_name=cluster.storage,
            )
            run.timings["verified"] = time.monotonic() - started
            for job_id, events in run.sse.items():
                streamed = [e["event_id"] for e in events]
                if streamed != verdict.event_ids.get(job_id, [])[: len(streamed)]:
                    run.sse_problems.append(f"{job_id}: SSE events differ from the stream's")
        except BaseException as exc:
            exc.add_note(cluster.tails())
            raise
        finally:
            for cleanup in run.cleanups:
                cleanup()
            for task in background.values():
                task.cancel()
            await asyncio.gather(*background.values(), return_exceptions=True)
            await feeder.close()
        return Outcome(
            verdict=verdict,
            records=records,
            notes=run.notes,
            feeder={
                "accepted": len(feeder.accepted),
                "duplicates": feeder.duplicates,
                "retries": feeder.retries,
                "transient": dict(feeder.transient),
                "refused": feeder.refused,
            },
            full_disk_failures=run.full_disk_failures,
            sse=run.sse,
            sse_problems=run.sse_problems,
            seconds=time.monotonic() - started,
            timings=run.timings,
            broker_killed_at=run.broker_killed_at,
            claimed_at_broker=run.claimed_at_broker,
        )
