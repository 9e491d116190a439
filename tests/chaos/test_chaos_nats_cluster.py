"""A JetStream cluster of three nodes loses one node at a time under load: nothing is lost.

The broker is three nats-server processes on loopback, each with its own store, and every
stream, bucket and the object store has 3 replicas (`nats_replicas`); the roles run as
processes pointed at all three nodes, outputs go to the object store. While a stream of jobs
flows, the node leading JOBS is SIGKILLed, then the JetStream meta leader, then the node
leading `KV_comfy_jobs`, whose store is deleted before it comes back (it must catch up from
its peers). Each comes back once more jobs succeeded without it,
and the next loss waits until every copy is current again. Then every witness of every job is
compared (ledger.py), as in test_chaos_stream.py.

`CLUSTER_ROUNDS=N` runs every kind of loss N times over in one longer stream.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from gateway.bus.contract import JobStatus, Subjects
from tests.chaos.cluster import running_cluster
from tests.chaos.scenario import NODE_FAULTS, Outcome, Plan, run_stream
from tests.chaos.stream import Tracker

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.chaos]

# The default run: three losses, the last one with its store deleted. CLUSTER_ROUNDS=N runs
# every kind of loss (NODE_FAULTS) N times over instead, in one longer stream.
ROUNDS = int(os.environ.get("CLUSTER_ROUNDS", "0"))
FAULTS = NODE_FAULTS * ROUNDS or ("jobs_leader_loss", "meta_leader_loss", "jobs_bucket_store_lost")
PLAN = Plan(outstanding=30, gap=4, faults=FAULTS, prefix="n")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def outcome(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Outcome]:
    base = tmp_path_factory.mktemp("nats-cluster")
    async with running_cluster(base, ["s1", "s2"], nats_nodes=3, storage="nats") as cluster:
        assert cluster.nc is not None
        tracker = Tracker(cluster.nc, Subjects())
        await tracker.start()
        yield await run_stream(cluster, tracker, PLAN)


def _report(outcome: Outcome) -> str:
    lines = [
        f"{n.name}: at {n.at_succeeded} succeeded, {n.unfinished} unfinished, "
        f"{n.seconds:.1f} s: {n.detail}"
        for n in outcome.notes
    ]
    lines.append(f"feeder {outcome.feeder}; {outcome.verdict.numbers}; {outcome.timings}")
    lines.append(f"known issues (README.md): {outcome.verdict.known}")
    return "\n".join(lines)


@pytest.mark.timeout(300)
async def test_losing_any_one_node_under_load_loses_nothing(outcome: Outcome) -> None:
    report = _report(outcome)
    assert len(outcome.notes) == len(PLAN.faults), report
    assert not outcome.verdict.problems, outcome.verdict.text() + "\n" + report
    assert not outcome.verdict.known, report
    # Every accepted job ran to success: a node's loss is a pause, never a failed job.
    failed = {
        j: (r.status, r.error and (r.error.code, r.error.message))
        for j, r in outcome.records.items()
        if r.status is not JobStatus.SUCCEEDED
    }
    assert not failed, f"{failed}\n{report}"
    assert not outcome.feeder["refused"], report
    # Submissions during an election wait or are told to come back (503), never a 500.
    assert "internal" not in outcome.feeder["transient"], report
