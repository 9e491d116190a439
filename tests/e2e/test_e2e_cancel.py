"""Cancel is final at every moment of a job's life, over the real system.

Jobs are cancelled at moments drawn from a seeded random generator, from right after the
submit to after the end, while other jobs run beside them; then every job's log, record,
outputs and the fake servers' histories must agree. A failure names the seed:
`CANCEL_SEED=<seed> uv run pytest tests/e2e/test_e2e_cancel.py` replays the same moments.
"""

from __future__ import annotations

import asyncio
import os
import random
from typing import Any

import httpx

from gateway.bus.connection import connect
from gateway.bus.contract import (
    TERMINAL_EVENTS,
    Cancelled,
    Event,
    Subjects,
    event_type,
)
from plugins.simulator import SimulatorConfig
from tests.chaos.ledger import read_events, sink_caught_up
from tests.e2e.conftest import System, tiny
from tests.helpers import poll_until

JOBS = 16
# Each node takes this long, so a job runs for about half a second: the moments below fall
# before the dispatch, while it waits on ComfyUI, between its nodes and after its end.
NODE_S = 0.12
SLOW = SimulatorConfig(
    class_seconds={"EmptyImage": NODE_S, "ImageInvert": NODE_S, "SaveImage": NODE_S}
)


async def _idle(client: httpx.AsyncClient) -> bool:
    servers = (await client.get("/servers")).json()
    return all(s["in_flight"] == 0 and s["queue_running"] == 0 for s in servers)


async def test_a_cancel_that_answers_200_is_final_whenever_it_comes(system: System) -> None:
    seed = int(os.environ.get("CANCEL_SEED", random.randrange(2**32)))
    rng = random.Random(seed)
    replay = f"replay with CANCEL_SEED={seed}"
    for name in ("gpu1", "gpu2"):
        await system.add_server(name, SLOW)
    answers: dict[str, tuple[int, dict[str, Any]]] = {}
    moments: dict[str, str] = {}

    async def one(client: httpx.AsyncClient, index: int) -> None:
        reply = await client.post("/workflow/submit", json={"workflow": tiny(1000 + index)})
        assert reply.status_code == 202, reply.text
        job_id = reply.json()["job_id"]
        # The moment: at once, on an event of the job's (running, its first node), after its
        # end, or after a random pause; events make the moments independent of the machine's
        # speed, the pause lands anywhere between them.
        moment = rng.choice(("at once", "running", "node", "ended", "pause", "pause"))
        if moment in ("running", "node", "ended"):
            await _until(client, job_id, moment)
        elif moment == "pause":
            await asyncio.sleep(rng.uniform(0, 8 * NODE_S))
        cancel = await client.post(f"/workflow/cancel/{job_id}")
        answers[job_id] = (cancel.status_code, cancel.json())
        moments[job_id] = moment

    async with httpx.AsyncClient(base_url=system.url, timeout=60) as client:
        await asyncio.gather(*(one(client, i) for i in range(JOBS)))
        for job_id in answers:
            result = await client.get(f"/workflow/result/{job_id}", params={"wait": 30})
            assert result.json()["status"] in ("succeeded", "cancelled"), (result.text, replay)
        # Whatever an adapter still does for a cancelled job (stopping its prompt, deleting
        # what it stored) is done once the servers are idle.
        await poll_until(lambda: _idle(client), "servers idle", within=30)
        records = {
            job_id: (await client.get(f"/workflow/status/{job_id}")).json() for job_id in answers
        }

    nc = await connect(system.settings.nats_url, "test")
    try:
        subjects = Subjects(system.settings.subject_prefix)
        await poll_until(lambda: sink_caught_up(nc, subjects), "log sink caught up", within=30)
        events = await read_events(nc, subjects)
    finally:
        await nc.close()
    outputs = system.settings.data_path / "outputs"

    problems = []
    cancelled = 0
    for job_id, (status, body) in answers.items():
        trail: list[Event] = events[job_id]
        kinds = [event_type(e) for e in trail]
        ends = [i for i, e in enumerate(trail) if isinstance(e, TERMINAL_EVENTS)]
        if len(ends) != 1 or ends[0] != len(trail) - 1:
            problems.append(f"{job_id}: not exactly one end, last: {kinds}")
            continue
        end = trail[-1]
        if status == 200:
            cancelled += 1
            if not isinstance(end, Cancelled) or records[job_id]["status"] != "cancelled":
                problems.append(
                    f"{job_id}: cancelled (200) but {kinds}, {records[job_id]['status']}"
                )
            if (outputs / job_id).exists() and any((outputs / job_id).iterdir()):
                problems.append(f"{job_id}: cancelled, yet outputs are kept")
        elif status == 409:
            said = (body.get("details") or {}).get("status")
            if said != event_type(end) or isinstance(end, Cancelled):
                problems.append(f"{job_id}: 409 {body} but the log ends {kinds}")
        else:
            problems.append(f"{job_id}: cancel answered {status} {body}")
    assert not problems, "\n".join([replay, *problems])
    # A cancel after the end is a 409, whatever the machine's speed.
    late = [job_id for job_id, moment in moments.items() if moment == "ended"]
    assert all(answers[job_id][0] == 409 for job_id in late), replay


async def _until(client: httpx.AsyncClient, job_id: str, moment: str) -> None:
    """Follow the job's events until `moment`: it runs, its first node starts, or it ended."""
    wanted = {"running": "running", "node": "node_started"}.get(moment)
    async with client.stream("GET", f"/workflow/events/{job_id}") as stream:
        async for line in stream.aiter_lines():
            if line.startswith("data:") and wanted is not None and f'"{wanted}"' in line:
                return
    # The stream ends with the job: its end has come (or the moment never came).
