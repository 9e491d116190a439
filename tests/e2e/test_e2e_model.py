"""A job's life as a state space: seeded random interleavings of every action with every fault,
over the real system (NATS, gateway and balancer, log sink, adapters, fake ComfyUIs).

Each step is one action: submit (pinned or not, with a budget of tries), cancel, a server's
ComfyUI failing every prompt, hanging its queue or dying (and recovering, a dead one with its
queue and history lost), a server removed from the registry or registered again (which stops
and starts its adapter), the log sink restarted, or time passing. After every step the
invariants that must hold at every moment are checked against the event log and the API; once
the faults stop, every job must end, and records, logs, outputs and the fakes' histories must
agree. A failure prints the seed and the steps; `MODEL_SEED=<seed>` replays them, and
`MODEL_STEPS=<n>` runs longer (the default run takes a few dozen steps).
"""

from __future__ import annotations

import asyncio
import os
import random
from dataclasses import dataclass, field
from typing import Any

import httpx
from nats.aio.client import Client

from gateway.bus.contract import (
    TERMINAL_EVENTS,
    Cancelled,
    Event,
    Retried,
    Running,
    Subjects,
    event_type,
    prompt_id_for,
)
from plugins.simulator import Simulator, SimulatorConfig
from tests.chaos.ledger import read_events, sink_caught_up
from tests.e2e.conftest import System, tiny
from tests.helpers import poll_until

STEPS = int(os.environ.get("MODEL_STEPS", "40"))
SERVERS = ("m1", "m2", "m3")
NODES = {"EmptyImage": 0.08, "ImageInvert": 0.08, "SaveImage": 0.02}


@dataclass
class Model:
    """What the test did and was told: the truth the system must agree with."""

    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)  # job id -> what we asked
    cancels: dict[str, tuple[int, dict[str, Any]]] = field(default_factory=dict)
    registered: set[str] = field(default_factory=lambda: set(SERVERS))
    failing: set[str] = field(default_factory=set)
    hanging: set[str] = field(default_factory=set)
    dead: set[str] = field(default_factory=set)
    steps: list[str] = field(default_factory=list)


class Run:
    def __init__(self, system: System, client: httpx.AsyncClient, rng: random.Random) -> None:
        self.system = system
        self.client = client
        self.rng = rng
        self.model = Model()
        self.sims: dict[str, Simulator] = dict(system.sims)
        self.lost_histories: list[dict[str, Any]] = []

    # -- actions ------------------------------------------------------------------------------

    async def submit(self) -> str:
        body: dict[str, Any] = {"workflow": tiny(self.rng.randrange(1_000_000), "model")}
        body["max_attempts"] = self.rng.randint(1, 3)
        if self.rng.random() < 0.25:
            body["server"] = self.rng.choice(SERVERS)
        reply = await self.client.post("/workflow/submit", json=body)
        if reply.status_code == 202:
            self.model.jobs[reply.json()["job_id"]] = body
            return f"submit {body.get('server', '-')} x{body['max_attempts']}: 202"
        # Refused at once: pinned to a server that is not registered (now).
        assert reply.status_code == 404, reply.text
        assert body.get("server") not in self.model.registered, reply.text
        return f"submit pinned to {body['server']}: {reply.status_code}"

    async def cancel(self) -> str:
        open_jobs = [job for job in self.model.jobs if job not in self.model.cancels]
        if not open_jobs:
            return "cancel: nothing to cancel"
        job_id = self.rng.choice(open_jobs)
        reply = await self.client.post(f"/workflow/cancel/{job_id}")
        assert reply.status_code in (200, 409), reply.text
        self.model.cancels[job_id] = (reply.status_code, reply.json())
        return f"cancel {job_id[:8]}: {reply.status_code}"

    async def fault(self) -> str:
        server_id = self.rng.choice(SERVERS)
        if server_id in self.model.dead:
            self.sims[server_id] = await self.system.revive_server(server_id)
            self.model.dead.discard(server_id)
            self.model.failing.discard(server_id)
            self.model.hanging.discard(server_id)
            return f"{server_id} back from the dead"
        sim = self.sims[server_id]
        kind = self.rng.choice(("fail", "hang", "die"))
        if kind == "die":
            self.lost_histories.append(await _history(sim))  # what dies with it
            sim.crash()
            self.model.dead.add(server_id)
            return f"{server_id} dies"
        if kind == "fail":
            on = server_id not in self.model.failing
            sim.set_fail_prompt(on)
            (self.model.failing.add if on else self.model.failing.discard)(server_id)
        else:
            on = server_id not in self.model.hanging
            sim.set_hang(on)
            (self.model.hanging.add if on else self.model.hanging.discard)(server_id)
        return f"{kind} {server_id} {'on' if on else 'off'}"

    async def registry(self) -> str:
        server_id = self.rng.choice(SERVERS)
        if server_id in self.model.registered:
            reply = await self.client.delete(f"/servers/{server_id}")
            assert reply.status_code == 204, reply.text
            self.model.registered.discard(server_id)
            return f"remove {server_id}"
        body = {"name": server_id, "server_id": server_id, "address": self.sims[server_id].address}
        reply = await self.client.post("/servers", json=body)
        if server_id in self.model.dead:  # nothing answers there: refused, as it must be
            assert (reply.status_code, reply.json()["code"]) == (422, "unreachable"), reply.text
            return f"register dead {server_id}: 422"
        assert reply.status_code == 201, reply.text
        self.model.registered.add(server_id)
        return f"register {server_id} again"

    async def restart_sink(self) -> str:
        await self.system.stop_log_sink()
        self.system.start_log_sink()
        return "restart the log sink"

    async def wait(self) -> str:
        pause = self.rng.uniform(0, 0.6)
        await asyncio.sleep(pause)  # time passing is an action here, not a synchronisation
        return f"wait {pause:.2f} s"

    async def step(self) -> None:
        action = self.rng.choices(
            [self.submit, self.cancel, self.fault, self.registry, self.restart_sink, self.wait],
            weights=[40, 18, 12, 8, 4, 18],
        )[0]
        self.model.steps.append(await action())

    # -- what must hold at every moment -------------------------------------------------------

    async def check_now(self, nc: Client) -> None:
        events = await read_events(nc, Subjects(self.system.settings.subject_prefix))
        for job_id, body in self.model.jobs.items():
            check_log(job_id, body, events.get(job_id, []), self.model.cancels.get(job_id))
        listed = {s["server_id"] for s in (await self.client.get("/servers")).json()}
        assert listed == self.model.registered, (listed, self.model.registered)

    # -- once the faults stop -----------------------------------------------------------------

    async def heal(self) -> None:
        for server_id in sorted(self.model.dead):
            self.sims[server_id] = await self.system.revive_server(server_id)
        self.model.dead.clear()
        for server_id in SERVERS:
            self.sims[server_id].set_fail_prompt(False)
            self.sims[server_id].set_hang(False)
        self.model.failing.clear()
        self.model.hanging.clear()

    async def check_end(self, nc: Client) -> None:
        subjects = Subjects(self.system.settings.subject_prefix)
        records = {}
        for job_id in self.model.jobs:
            reply = await self.client.get(f"/workflow/result/{job_id}", params={"wait": 60})
            records[job_id] = reply.json()
            assert records[job_id]["status"] in ("succeeded", "failed", "cancelled"), reply.text
        await poll_until(lambda: sink_caught_up(nc, subjects), "the log sink caught up", within=60)
        events = await read_events(nc, subjects)
        histories = [await _history(sim) for sim in self.sims.values()] + self.lost_histories
        outputs = self.system.settings.data_path / "outputs"
        for job_id, body in self.model.jobs.items():
            trail = events[job_id]
            check_log(job_id, body, trail, self.model.cancels.get(job_id))
            record = records[job_id]
            end = trail[-1]
            assert isinstance(end, TERMINAL_EVENTS), (job_id, [event_type(e) for e in trail])
            assert record["status"] == event_type(end), (job_id, record["status"], end)
            log = (await self.client.get(f"/workflow/logs/{job_id}")).json()
            assert log["complete"] and log["entry_count"] == len(trail), (job_id, log["complete"])
            stored = outputs / job_id
            files = sorted(p.name for p in stored.iterdir()) if stored.is_dir() else []
            if record["status"] == "succeeded":
                assert files == sorted(o["key"].split("/", 1)[1] for o in record["outputs"])
                assert files, job_id
                prompt = end.data.attempt  # type: ignore[union-attr]
                assert any(_succeeded_in(h, job_id, prompt) for h in histories), (
                    f"{job_id}: no fake ran its prompt to success"
                )
            else:
                assert files == [], (job_id, record["status"], files)


def check_log(
    job_id: str,
    body: dict[str, Any],
    trail: list[Event],
    cancel: tuple[int, dict[str, Any]] | None,
) -> None:
    """What a job's log must show at every moment."""
    kinds = [event_type(e) for e in trail]
    assert [e.seq for e in trail] == list(range(1, len(trail) + 1)), (job_id, kinds)
    ends = [i for i, e in enumerate(trail) if isinstance(e, TERMINAL_EVENTS)]
    assert len(ends) <= 1 and (not ends or ends[0] == len(trail) - 1), (job_id, kinds)
    runs = sum(isinstance(e, Running) for e in trail)
    unstarted = sum(isinstance(e, Retried) and e.data.counts and not e.data.started for e in trail)
    assert runs + unstarted <= body["max_attempts"], (job_id, body["max_attempts"], kinds)
    if cancel is not None and ends:
        status, answer = cancel
        end = trail[-1]
        if status == 200:
            assert isinstance(end, Cancelled), (job_id, "cancelled (200), yet", kinds)
        else:
            assert answer["details"]["status"] == event_type(end), (job_id, answer, kinds)


async def _history(sim: Simulator) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=30) as client:
        history: dict[str, Any] = (await client.get(f"{sim.url}/history")).json()
        return history


def _succeeded_in(history: dict[str, Any], job_id: str, attempt: int) -> bool:
    entry = history.get(prompt_id_for(job_id, attempt))
    return entry is not None and entry["status"]["status_str"] == "success"


async def test_every_interleaving_of_actions_and_faults_keeps_the_invariants(
    system: System,
) -> None:
    seed = int(os.environ.get("MODEL_SEED", random.randrange(2**32)))
    rng = random.Random(seed)
    config = SimulatorConfig(class_seconds=NODES)
    for server_id in SERVERS:
        await system.add_server(server_id, config)
    nc = system.nc
    assert nc is not None
    async with httpx.AsyncClient(base_url=system.url, timeout=90) as client:
        run = Run(system, client, rng)
        try:
            for _ in range(STEPS):
                await run.step()
                await run.check_now(nc)
            await run.heal()
            for server_id in SERVERS:  # every server back, so that nothing waits for ever
                if server_id not in run.model.registered:
                    run.model.steps.append(await _register(run, server_id))
            await run.check_end(nc)
        except BaseException as exc:
            trail = "\n  ".join(run.model.steps)
            raise AssertionError(
                f"MODEL_SEED={seed} MODEL_STEPS={STEPS} replays this; steps:\n  {trail}\n{exc!r}"
            ) from exc


async def _register(run: Run, server_id: str) -> str:
    body = {"name": server_id, "server_id": server_id, "address": run.sims[server_id].address}
    reply = await run.client.post("/servers", json=body)
    assert reply.status_code == 201, reply.text
    run.model.registered.add(server_id)
    return f"register {server_id} again"
