"""Soak: a long stream of jobs through every fault, heavier than tests/chaos can afford.

The cluster is the one tests/chaos/ uses (tests/chaos/cluster.py): nats-server, the gateway, the
log sink and one adapter per fake ComfyUI server as processes, the fakes in this loop. A feeder
keeps `--outstanding` jobs accepted and unfinished while the faults of the plan happen one after
another (each triggered by progress, not time); then the stream drains and every witness is
compared (tests/chaos/ledger.py): KV records, EVENTS, the log sink's index and JSONL files,
storage, and the fakes' /history and output folders.

    uv run python bench/soak.py [--quick] [--outstanding N] [--kills N] [--rest] [--keep DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import re
import signal
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import goal, print_goals, say, table, write_results
from gateway.bus.contract import JobStatus
from tests.chaos.scenario import ALL_FAULTS, Outcome, Plan, run_scenario

# Problems of the ledger, by what they mean.
_KINDS = (
    ("unfinished", re.compile(r": still ")),
    ("ends_of_final_attempt_not_one", re.compile(r"terminal events of its final attempt")),
    ("ran_twice_without_hand_back", re.compile(r"ran to success \d+ times")),
    ("events_disagree_with_record", re.compile(r"the events give ")),
    ("logs_disagree", re.compile(r"index |log file|not in the log index")),
    ("outputs_missing", re.compile(r"output")),
)


def classify(problems: list[str]) -> Counter[str]:
    kinds: Counter[str] = Counter()
    for problem in problems:
        kind = next((k for k, pattern in _KINDS if pattern.search(problem)), "other")
        kinds[kind] += 1
    return kinds


def plan_for(args: argparse.Namespace) -> Plan:
    heavy = not args.quick
    faults = list(ALL_FAULTS)
    if heavy:
        # Each fault a second time, late in the stream, when queues and logs are larger.
        faults += ["sim_crash", "sim_hang", "gateway_restart", "nats_restart", "adapter_kills"]
    return Plan(
        outstanding=args.outstanding or (400 if heavy else 210),
        gap=args.gap or (25 if heavy else 8),
        faults=tuple(faults),
        adapter_kills=args.kills or (6 if heavy else 2),
        slow_readers=50 if heavy else 20,
        prefix="soak",
        gateway_signal=signal.SIGKILL if heavy else signal.SIGTERM,
        submit_on_bus=not args.rest,
    )


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    plan = plan_for(args)
    say(
        f"soak: {len(plan.faults)} faults, {plan.outstanding} jobs kept unfinished, "
        f"{plan.gap} jobs between steps, {plan.adapter_kills} adapter kills per round, "
        f"submitting {'by REST' if args.rest else 'on the bus'}"
    )
    if args.keep:
        base = Path(args.keep)
        base.mkdir(parents=True, exist_ok=True)
        outcome = await run_scenario(base, plan)
    else:
        with tempfile.TemporaryDirectory(prefix="comfysoak-") as tmp:
            outcome = await run_scenario(Path(tmp), plan)
    return report(plan, outcome)


def report(plan: Plan, outcome: Outcome) -> dict[str, Any]:
    rows = [
        [n.name, n.at_succeeded, n.unfinished, round(n.seconds, 2), n.detail] for n in outcome.notes
    ]
    say(table(rows, ["fault", "at succeeded", "unfinished", "s", "what happened"]))
    statuses = Counter(r.status.value for r in outcome.records.values())
    failed_codes = Counter(
        r.error.code if r.error else "?"
        for r in outcome.records.values()
        if r.status is JobStatus.FAILED
    )
    kinds = classify(outcome.verdict.problems)
    known = {k: len(v) for k, v in outcome.verdict.known.items()}
    say()
    say(
        table(
            [[k, v] for k, v in sorted({**dict(statuses), **outcome.verdict.numbers}.items())],
            ["count", "value"],
        )
    )
    say(
        f"\nfailed by code: {dict(failed_codes)}; full-disk failures: "
        f"{len(outcome.full_disk_failures)}"
    )
    say(f"problems by kind: {dict(kinds)}; known issues: {known}")
    for line in outcome.verdict.problems[:20]:
        say("  " + line)
    unexplained_failures = sum(
        1
        for job_id, r in outcome.records.items()
        if r.status is JobStatus.FAILED and job_id not in outcome.full_disk_failures
    )
    goals = [
        goal(
            "accepted jobs left unfinished",
            kinds["unfinished"] + known.get("bound_never_sent", 0),
            "jobs",
            0,
            False,
        ),
        goal(
            "jobs without exactly one end of their final attempt",
            kinds["ends_of_final_attempt_not_one"],
            "jobs",
            0,
            False,
        ),
        goal(
            "jobs run to success twice without a hand-back",
            kinds["ran_twice_without_hand_back"],
            "jobs",
            0,
            False,
        ),
        goal(
            "records, events, logs, storage disagree", len(outcome.verdict.problems), "", 0, False
        ),
        goal("jobs showing a known issue", sum(known.values()), "jobs", 0, False),
        goal("jobs failed other than on the full disk", unexplained_failures, "jobs", 0, False),
        goal(
            "SSE readers that missed or reordered events", len(outcome.sse_problems), "", 0, False
        ),
    ]
    say()
    print_goals(goals)
    return {
        "plan": {
            "outstanding": plan.outstanding,
            "gap": plan.gap,
            "faults": list(plan.faults),
            "adapter_kills": plan.adapter_kills,
            "gateway_signal": signal.Signals(plan.gateway_signal).name,
            "submit_on_bus": plan.submit_on_bus,
        },
        "faults": [vars(n) for n in outcome.notes],
        "feeder": outcome.feeder,
        "statuses": dict(statuses),
        "failed_by_code": dict(failed_codes),
        "numbers": outcome.verdict.numbers,
        "problems_by_kind": dict(kinds),
        "problems": outcome.verdict.problems[:200],
        "known_issues": outcome.verdict.known,
        "sse_problems": outcome.sse_problems,
        "timings_s": {k: round(v, 2) for k, v in outcome.timings.items()},
        "seconds": round(outcome.seconds, 1),
        "goals": goals,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the tests' load, every fault once")
    parser.add_argument("--outstanding", type=int, help="jobs kept unfinished (400; quick 210)")
    parser.add_argument("--gap", type=int, help="jobs succeeded between fault steps (25; 8)")
    parser.add_argument("--kills", type=int, help="adapter SIGKILLs per round (6; quick 2)")
    parser.add_argument("--rest", action="store_true", help="submit by REST instead of NATS")
    parser.add_argument("--keep", metavar="DIR", help="run under DIR and keep it (logs, store)")
    args = parser.parse_args()
    payload = asyncio.run(soak(args))
    write_results("soak", payload)


if __name__ == "__main__":
    main()
