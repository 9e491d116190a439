"""Tenancy as a state space: three keys (an admin, a named user, an unnamed user) acting in a
seeded random order on one real system, each answer checked against who owns what.

Every step is one caller doing one thing on one surface: submitting (sometimes with an input
given by storage key, its own or another's), reading a job's status, result, events (SSE and
websocket), log or outputs, cancelling it, or reading it through the ComfyUI-compatible API.
A user key must see and touch exactly its own jobs and files, and find another's answered as
if it did not exist (404); the admin sees everything. After every step the owners' views are
checked again, so a refused action that still did something shows. A failure prints the seed
and the steps; `TENANCY_SEED=<seed>` replays them, `TENANCY_STEPS=<n>` runs longer.
"""

from __future__ import annotations

import base64
import json
import os
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import msgspec
import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

from gateway.api.auth import hash_key
from gateway.settings import Settings
from plugins.simulator.png import encode_solid
from tests.e2e.conftest import System, running_system, tiny
from tests.helpers import poll_until

STEPS = int(os.environ.get("TENANCY_STEPS", "30"))
KEYS = {"root": "root-key-5d1e0c", "alice": "alice-key-83b7f2", "bob": "bob-key-0c44aa"}
ENTRIES = [
    f"admin@plain:{KEYS['root']}",
    f"user/alice@plain:{KEYS['alice']}",
    # No name: its caller id is an HMAC of the key under the gateway's secret.
    f"user@{hash_key(KEYS['bob'])}",
]
ADMINS = {"root"}
SURFACES = ("status", "result", "events", "ws", "logs", "cancel", "native_history", "images")


def _load(workflow: dict[str, Any]) -> None:
    """Make the workflow invert a loaded `in.png` instead of an empty image."""
    workflow["9"] = {"class_type": "LoadImage", "inputs": {"image": "in.png"}}
    workflow["2"]["inputs"]["image"] = ["9", 0]


async def _done(reply: httpx.Response) -> httpx.Response:
    return reply


def auth(who: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[who]}"}


@pytest.fixture
async def keyed(settings: Settings) -> AsyncIterator[System]:
    keyed_settings = msgspec.structs.replace(settings, api_keys=ENTRIES)
    async with running_system(keyed_settings, headers=auth("root")) as system:
        await system.add_server("t1")
        await system.add_server("t2")
        yield system


@dataclass
class Model:
    owner: dict[str, str] = field(default_factory=dict)  # job id -> who submitted it
    cancelled: set[str] = field(default_factory=set)
    outputs: dict[str, list[str]] = field(default_factory=dict)  # job id -> its output keys
    steps: list[str] = field(default_factory=list)

    def may(self, who: str, job_id: str) -> bool:
        return who in ADMINS or self.owner[job_id] == who


class Run:
    def __init__(self, system: System, rng: random.Random) -> None:
        self.system = system
        self.rng = rng
        self.model = Model()
        self.clients = {
            who: httpx.AsyncClient(base_url=system.url, headers=auth(who), timeout=60)
            for who in KEYS
        }

    async def close(self) -> None:
        for client in self.clients.values():
            await client.aclose()

    # ---- actions

    async def submit(self, who: str) -> None:
        body: dict[str, Any] = {"workflow": tiny(self.rng.randrange(1 << 24), prefix="ten")}
        expect = 202
        known = [(job, key) for job, keys in self.model.outputs.items() for key in keys]
        if known and self.rng.random() < 0.4:
            job, key = self.rng.choice(known)
            _load(body["workflow"])
            body["inputs"] = [{"name": "in.png", "source": "key", "value": key}]
            expect = 202 if self.model.may(who, job) else 404
            self.note(f"{who} submits with the output {key} of {self.model.owner[job]}")
        elif self.rng.random() < 0.3:
            _load(body["workflow"])
            png = base64.b64encode(encode_solid(8, 8, (1, 2, 3))).decode()
            body["inputs"] = [{"name": "in.png", "source": "base64", "value": png}]
            self.note(f"{who} submits with a base64 input")
        else:
            self.note(f"{who} submits")
        reply = await self.clients[who].post("/workflow/submit", json=body)
        assert reply.status_code == expect, reply.text
        if expect == 202:
            self.model.owner[reply.json()["job_id"]] = who
        else:
            assert key not in reply.text or "nothing is stored" in reply.text

    async def touch(self, who: str, job_id: str, surface: str) -> None:
        self.note(f"{who} reads {surface} of {self.model.owner[job_id]}'s {job_id}")
        client = self.clients[who]
        allowed = self.model.may(who, job_id)
        if surface == "status":
            await self._expect(client.get(f"/workflow/status/{job_id}"), allowed)
        elif surface == "result":
            await self._expect(client.get(f"/workflow/result/{job_id}"), allowed)
        elif surface == "logs":
            await self._expect(client.get(f"/workflow/logs/{job_id}"), allowed)
        elif surface == "events":
            async with client.stream("GET", f"/workflow/events/{job_id}") as stream:
                assert (stream.status_code == 200) == allowed, stream.status_code
                if not allowed:
                    assert stream.status_code == 404
        elif surface == "ws":
            url = self.system.url.replace("http", "ws", 1) + f"/workflow/events/{job_id}/ws"
            async with ws_connect(url, additional_headers=auth(who)) as socket:
                if allowed:
                    assert json.loads(await socket.recv())["job_id"] == job_id
                else:
                    with pytest.raises(ConnectionClosed):
                        await socket.recv()
                    assert socket.close_code == 4404
        elif surface == "native_history":
            reply = await client.get(f"/history/{job_id}")
            assert reply.status_code == 200
            # The ComfyUI-compatible API is per caller for everyone: admins included.
            if self.model.owner[job_id] != who:
                assert reply.json() == {}
        elif surface == "cancel":
            reply = await client.post(f"/workflow/cancel/{job_id}")
            if allowed:
                assert reply.status_code in (200, 409), reply.text
                if reply.status_code == 200:
                    self.model.cancelled.add(job_id)
            else:
                assert reply.status_code == 404, reply.text
                assert reply.json()["code"] == "unknown_job"
        elif surface == "images":
            for key in self.model.outputs.get(job_id, []):
                reply = await client.get(f"/images/{key}")
                await self._expect(_done(reply), allowed)
                if allowed:  # one caller's file: no shared cache may keep it for another
                    assert reply.headers["cache-control"].startswith("private"), reply.headers
                    assert "Authorization" in reply.headers["vary"]

    async def _expect(self, call: Any, allowed: bool) -> None:
        reply = await call
        if allowed:
            assert reply.status_code == 200, reply.text
        else:
            assert reply.status_code == 404, reply.text
            assert reply.json()["code"] in ("unknown_job", "not_found")

    def note(self, step: str) -> None:
        self.model.steps.append(step)

    # ---- invariants

    async def check(self) -> None:
        """Each owner (and the admin) still sees its jobs as it left them; outputs are learnt."""
        for job_id, who in self.model.owner.items():
            for reader in {who, "root"}:
                reply = await self.clients[reader].get(f"/workflow/status/{job_id}")
                assert reply.status_code == 200, reply.text
                status = reply.json()
            if status["status"] == "succeeded":
                self.model.outputs[job_id] = [o["key"] for o in status["outputs"]]
            if status["status"] == "cancelled":
                assert job_id in self.model.cancelled, f"{job_id} cancelled by someone else"

    async def check_index(self, *, whole: bool) -> None:
        """Each key's job list and SQL show only its jobs (all of them, once `whole`)."""
        for who, client in self.clients.items():
            mine = {j for j, owner in self.model.owner.items() if self.model.may(who, j)}
            listed = await client.get("/workflow/jobs", params={"limit": 1000})
            assert listed.status_code == 200, listed.text
            # A client may not widen its own scope by naming another caller in the body.
            queried = await client.post(
                "/logs/query",
                json={"sql": "SELECT DISTINCT job_id FROM events", "caller": "alice"},
            )
            assert queried.status_code == 200, queried.text
            rows = queried.json()["rows"]
            for seen in ({j["job_id"] for j in listed.json()}, {row[0] for row in rows}):
                assert seen <= mine, f"{who} sees {seen - mine}"
                if whole:
                    assert seen == mine, f"{who} misses {mine - seen}"

    async def step(self) -> None:
        who = self.rng.choice(list(KEYS))
        if not self.model.owner or self.rng.random() < 0.3:
            await self.submit(who)
        else:
            job_id = self.rng.choice(list(self.model.owner))
            await self.touch(who, job_id, self.rng.choice(SURFACES))
        await self.check()


async def test_each_key_sees_exactly_its_own(keyed: System) -> None:
    seed = int(os.environ.get("TENANCY_SEED", random.randrange(1 << 30)))
    run = Run(keyed, random.Random(seed))
    try:
        for _ in range(STEPS):
            await run.step()
        # Every job ends; each owner can then read all of its own, and nobody else's.
        for job_id in run.model.owner:
            reply = await run.clients["root"].get(f"/workflow/result/{job_id}?wait=60")
            assert reply.json()["status"] in ("succeeded", "cancelled"), reply.text
        await run.check()
        await run.check_index(whole=True)
        for job_id in run.model.owner:
            for who in KEYS:
                await run.touch(who, job_id, "images")
                await run.touch(who, job_id, "logs")
    except Exception as exc:
        trail = "\n  ".join(run.model.steps)
        raise AssertionError(
            f"TENANCY_SEED={seed} TENANCY_STEPS={STEPS} replays this; steps:\n  {trail}\n{exc!r}"
        ) from exc
    finally:
        await run.close()


async def test_the_recorded_caller_tells_nothing_of_the_key(keyed: System) -> None:
    async with httpx.AsyncClient(base_url=keyed.url, timeout=60) as client:
        for who in ("alice", "bob"):
            reply = await client.post(
                "/workflow/execute", json={"workflow": tiny(7)}, headers=auth(who)
            )
            assert reply.status_code == 200, reply.text
            job_id = reply.json()["job_id"]
            log = (await client.get(f"/workflow/logs/{job_id}", headers=auth(who))).json()
            queued = next(e for e in log["entries"] if e["type"] == "queued")
            caller = queued["data"]["request"]["caller"]
            assert caller == "alice" if who == "alice" else caller.startswith("key-")
            digest = hash_key(KEYS[who])
            text = json.dumps(log)
            assert not any(digest[i : i + 8] in text for i in range(0, 57))


async def test_a_user_key_cannot_change_the_fleet(keyed: System) -> None:
    async with httpx.AsyncClient(base_url=keyed.url, timeout=30) as client:
        sim = keyed.sims["t1"]
        body = {"name": "x", "address": sim.address, "server_id": "x"}
        for who in ("alice", "bob"):
            reply = await client.post("/servers", json=body, headers=auth(who))
            assert reply.status_code == 403, reply.text
            assert reply.json()["code"] == "admin_only"
            reply = await client.delete("/servers/t1", headers=auth(who))
            assert reply.status_code == 403, reply.text
            for verb in ("drain", "undrain"):
                reply = await client.post(f"/servers/t1/{verb}", headers=auth(who))
                assert (reply.status_code, reply.json()["code"]) == (403, "admin_only"), verb
        await poll_until(lambda: _still_there(client), "t1 still registered")
        assert not (await client.get("/servers", headers=auth("root"))).json()[0]["draining"]
        # Users see the fleet's state, not its network: addresses are for admins.
        for who, sees in (("alice", None), ("bob", None), ("root", sim.address)):
            for path in ("/servers", "/servers/health"):
                reply = (await client.get(path, headers=auth(who))).json()
                servers = reply if path == "/servers" else reply["servers"]
                assert {s["server_id"]: s["address"] for s in servers}["t1"] == sees, (who, path)


async def _still_there(client: httpx.AsyncClient) -> bool:
    servers = (await client.get("/servers", headers=auth("root"))).json()
    return any(s["server_id"] == "t1" for s in servers)
