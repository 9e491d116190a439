"""Per-role NATS users: the block shipped in nats.conf, turned on as its comments say.

The broker runs with exactly that block (uncommented, passwords from the environment). Every role
runs as its own user through real jobs without a single permissions violation; then each
forbidden action of the adapter, log sink and client users is refused by the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import websockets
from nats.aio.client import Client
from nats.errors import Error as NatsError

from gateway.bus.connection import _split_credentials, connect, session
from gateway.bus.contract import JobRequest, Subjects, Succeeded, encode
from gateway.bus.natsserver import DEFAULT_CONF, NatsServer, NatsServerError, start_nats_server
from gateway.logsink.client import query_logs
from gateway.logsink.sink import run_logsink
from gateway.settings import Settings
from plugins.comfyui import run_adapter
from plugins.simulator import Simulator, SimulatorConfig, run_simulator
from plugins.simulator.samples import tiny_workflow
from sdk.nats import NatsClient
from tests.adapter.kit import FAST
from tests.conftest import start_gateway
from tests.helpers import poll_until

BEGIN = "# ---- per-role users: begin ----"
END = "# ---- per-role users: end ----"
ROLES = ("gateway", "balancer", "adapter", "logsink", "client")
SERVER = "gpu-1"


def password_of(role: str) -> str:
    return f"{role}-secret"


def config_with_users(shipped: Path, into: Path) -> Path:
    """nats.conf with its per-role users block uncommented, as DEPLOYMENT.md says to do."""
    lines = shipped.read_text().splitlines()
    assert BEGIN in lines and END in lines, f"{shipped} lost its per-role users markers"
    begin, end = lines.index(BEGIN), lines.index(END)
    block = [line.removeprefix("# ").removeprefix("#") for line in lines[begin + 1 : end]]
    assert any(line.startswith("authorization {") for line in block)
    into.write_text("\n".join(lines[:begin] + block + lines[end + 1 :]) + "\n")
    return into


@pytest.fixture
def passwords(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each role's password in the environment the broker starts with."""
    for role in ROLES:
        monkeypatch.setenv(f"COMFY_{role.upper()}_PASSWORD", password_of(role))


@pytest.fixture
async def broker(tmp_path: Path, passwords: None) -> AsyncIterator[NatsServer]:
    server = await start_nats_server(
        port=0,
        store_dir=tmp_path / "nats",
        config=config_with_users(DEFAULT_CONF, tmp_path / "nats-users.conf"),
        log_file=tmp_path / "nats-server.log",
    )
    try:
        yield server
    finally:
        await server.stop()


def url_as(server: NatsServer, role: str) -> str:
    return f"nats://{role}:{password_of(role)}@{server.host}:{server.port}"


def violations(log_file: Path) -> list[str]:
    return [line for line in log_file.read_text().splitlines() if "Violation" in line]


# ------------------------------------------------------------------------------------------
# The system works with the users on


async def test_anonymous_and_wrong_password_connections_are_refused(broker: NatsServer) -> None:
    for url in (broker.url, f"nats://adapter:wrong@{broker.host}:{broker.port}"):
        with pytest.raises(NatsError):
            await connect(url, "intruder", allow_reconnect=False, max_reconnect_attempts=0)


def test_credentials_in_the_url_serve_every_server_of_the_pool() -> None:
    servers, credentials = _split_credentials("nats://a:p%40ss@n1:4222, nats://a:p%40ss@[::1]:4223")
    assert servers == ["nats://n1:4222", "nats://[::1]:4223"]
    assert credentials == {"user": "a", "password": "p@ss"}
    assert _split_credentials("nats://n1:4222,n2") == (["nats://n1:4222", "n2"], {})
    with pytest.raises(ValueError, match="different credentials"):
        _split_credentials("nats://a:x@n1,nats://b:y@n2")


async def test_a_password_missing_from_the_environment_stops_the_broker(
    tmp_path: Path, passwords: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("COMFY_ADAPTER_PASSWORD")
    with pytest.raises(NatsServerError, match="COMFY_ADAPTER_PASSWORD"):
        await start_nats_server(
            port=0,
            store_dir=tmp_path / "nats",
            config=config_with_users(DEFAULT_CONF, tmp_path / "nats-users.conf"),
        )


@contextlib.asynccontextmanager
async def adapter_as_user(
    broker: NatsServer, settings: Settings, sim: Simulator
) -> AsyncIterator[None]:
    """The adapter of SERVER as `comfyautomate adapter` runs it, connected as `adapter`."""
    stop = asyncio.Event()

    async def role() -> None:
        subjects = Subjects(settings.subject_prefix)
        async with session(url_as(broker, "adapter"), f"adapter-{SERVER}", subjects) as nc:
            await run_adapter(
                nc, settings, stop, server_id=SERVER, address=sim.address, options=FAST
            )

    task = asyncio.create_task(role())
    try:
        yield
    finally:
        stop.set()
        async with asyncio.timeout(20):
            await task


async def _status(client: httpx.AsyncClient, job_id: str) -> str:
    return str((await client.get(f"/workflow/status/{job_id}")).json()["status"])


async def test_every_role_as_its_own_user_runs_jobs_without_a_violation(
    broker: NatsServer, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    base = Settings(data_dir=str(data), port=0, heartbeat_interval_s=0.5, storage="nats")
    # The log sink takes its user from the settings; gateway and adapter from the URL.
    sink_settings = msgspec.structs.replace(
        base, nats_url=broker.url, nats_user="logsink", nats_password=password_of("logsink")
    )
    gateway_settings = msgspec.structs.replace(base, nats_url=url_as(broker, "gateway"))
    stop = asyncio.Event()
    async with contextlib.AsyncExitStack() as stack:
        sim = await stack.enter_async_context(
            run_simulator(SimulatorConfig(base_dir=str(tmp_path / "sim"), node_seconds=0.02))
        )
        gateway_url, gateway = await start_gateway(gateway_settings, stop)
        sink = asyncio.create_task(run_logsink(sink_settings, stop))
        try:
            await stack.enter_async_context(adapter_as_user(broker, base, sim))
            http = await stack.enter_async_context(
                httpx.AsyncClient(base_url=gateway_url, timeout=30)
            )
            await _run_jobs(broker, http, sim)
        finally:
            stop.set()
            async with asyncio.timeout(30):
                await asyncio.gather(gateway, sink)
    await broker.stop()  # every line the broker wrote is in its log now
    assert violations(tmp_path / "nats-server.log") == []


async def _run_jobs(broker: NatsServer, http: httpx.AsyncClient, sim: Simulator) -> None:
    reply = await http.post("/servers", json={"name": SERVER, "address": sim.address})
    assert reply.status_code == 201, reply.text

    async def healthy() -> bool:
        servers = (await http.get("/servers")).json()
        return any(s["status"] == "healthy" and s["node_types"] > 0 for s in servers)

    await poll_until(healthy, "the adapter's server healthy at the gateway")
    # REST: gateway -> balancer -> adapter, output into the object store, served back.
    done = await http.post("/workflow/execute", json={"workflow": tiny_workflow(1)})
    assert done.status_code == 200 and done.json()["status"] == "succeeded", done.text
    image = await http.get(done.json()["images"][0])
    assert image.status_code == 200 and image.content.startswith(b"\x89PNG")
    # A keyed submission and a batch: KV comfy_idempotency (balancer) and comfy_batches (gateway).
    keyed = {"json": {"workflow": tiny_workflow(4)}, "headers": {"Idempotency-Key": "perm"}}
    assert (await http.post("/workflow/submit", **keyed)).status_code == 202
    assert (await http.post("/workflow/submit", **keyed)).status_code == 200
    batch = await http.post(
        "/workflow/batch", json={"workflow": tiny_workflow(5), "overrides": [{}]}
    )
    assert batch.status_code == 202, batch.text
    assert (await http.get(f"/workflow/batch/{batch.json()['batch_id']}")).status_code == 200
    # ComfyUI's own API: its socket follows every job's events and the adapters' previews.
    await _run_native_prompt(http)
    # A client on the bus: submit, follow the events, ask the log sink.
    async with await NatsClient.connect(
        broker.url, user="client", password=password_of("client")
    ) as bus:
        accepted = await bus.submit(tiny_workflow(2))
        assert isinstance(await bus.wait(accepted.job_id), Succeeded)

        async def logged() -> bool:
            sql = f"SELECT count(*) FROM events WHERE job_id = '{accepted.job_id}'"
            rows = (await query_logs(bus.nc, bus.subjects, sql)).rows
            return bool(rows[0][0] >= 1)

        await poll_until(logged, "the client's job in the log index")
    # Cancelling a bound job: the gateway asks the adapter on comfy.control.
    sim.set_hang()  # ComfyUI takes the prompt but does not run it
    job_id = (await http.post("/workflow/submit", json={"workflow": tiny_workflow(3)})).json()[
        "job_id"
    ]

    async def bound() -> bool:
        return await _status(http, job_id) == "dispatched"

    await poll_until(bound, "the job bound to the server")
    cancelled = await http.post(f"/workflow/cancel/{job_id}")
    assert cancelled.json()["status"] == "cancelled", cancelled.text
    # The gateway's log endpoints go to the log sink.
    logs = await http.get(f"/workflow/logs/{done.json()['job_id']}")
    assert logs.status_code == 200 and logs.json()["entry_count"] > 0, logs.text
    assert (await http.get("/workflow/jobs")).status_code == 200


HEAVY = Path(__file__).parent / "data" / "comfyui-protocol" / "workflows" / "heavy.json"


async def _run_native_prompt(http: httpx.AsyncClient) -> None:
    socket_url = str(http.base_url).replace("http", "ws", 1).rstrip("/") + "/ws?clientId=perm"
    flags = {"type": "feature_flags", "data": {"supports_preview_metadata": True}}
    async with websockets.connect(socket_url) as socket:
        await socket.send(json.dumps(flags))
        body = {"prompt": json.loads(HEAVY.read_text()), "client_id": "perm"}
        reply = await http.post("/prompt", json=body)
        assert reply.status_code == 200, reply.text
        prompt_id = reply.json()["prompt_id"]
        previews = 0
        async with asyncio.timeout(30):
            while True:
                frame = await socket.recv()
                if isinstance(frame, bytes):
                    previews += 1
                    continue
                message = json.loads(frame)
                if message["type"] == "executing" and message["data"] == {
                    "node": None,
                    "prompt_id": prompt_id,
                }:
                    break
        assert previews > 0


# ------------------------------------------------------------------------------------------
# Forbidden actions are refused


class User:
    """A connection of one role's user, with the violations the server reported to it."""

    def __init__(self, nc: Client, reported: list[str], news: asyncio.Condition) -> None:
        self.nc = nc
        self.reported = reported
        self._news = news
        self._probes = 0

    async def refused(self, action: Callable[[], Awaitable[Any]], expected: str) -> bool:
        """Whether doing `action` made the server report `expected` (a permissions violation).

        A publish no user may make follows the action; the server reports violations in order,
        so once that one is reported, any report of the action is in too.
        """
        before = len(self.reported)
        await action()
        self._probes += 1
        marker = publish_to(f"probe.{self._probes}")
        await self.nc.publish(f"probe.{self._probes}", b"")
        async with asyncio.timeout(10), self._news:
            await self._news.wait_for(lambda: self._seen(marker, before))
        return self._seen(expected, before)

    def _seen(self, report: str, since: int) -> bool:
        return any(report.lower() in line for line in self.reported[since:])


@contextlib.asynccontextmanager
async def user(broker: NatsServer, role: str) -> AsyncIterator[User]:
    reported: list[str] = []
    news = asyncio.Condition()

    async def on_error(exc: Exception) -> None:
        async with news:
            reported.append(str(exc).lower())
            news.notify_all()

    nc = await connect(url_as(broker, role), f"probe-{role}", error_cb=on_error)
    try:
        yield User(nc, reported, news)
    finally:
        await nc.close()


def publish_to(subject: str) -> str:
    return f'permissions violation for publish to "{subject}"'


def subscription_to(subject: str) -> str:
    return f'permissions violation for subscription to "{subject}"'


@pytest.fixture
async def resources(broker: NatsServer) -> None:
    """Streams and buckets in place, made by the gateway as when it starts first."""
    async with session(url_as(broker, "gateway"), "gateway", Subjects()):
        pass


def _job_request() -> bytes:
    return encode(JobRequest(workflow=tiny_workflow(0)))


async def test_an_adapter_cannot_submit_dispatch_read_logs_or_answer_for_others(
    broker: NatsServer, resources: None
) -> None:
    subjects = Subjects()
    async with user(broker, "gateway") as gateway, user(broker, "adapter") as adapter:
        nc = adapter.nc
        # What it does is allowed: a heartbeat, its server's control requests.
        heartbeat, control = subjects.heartbeat(SERVER), subjects.control(SERVER)
        assert not await adapter.refused(
            lambda: nc.publish(heartbeat, b"{}"), publish_to(heartbeat)
        )
        assert not await adapter.refused(lambda: nc.subscribe(control), subscription_to(control))
        forbidden = {
            "submit a job": subjects.submit,
            "dispatch a job": subjects.jobs("gpu-2"),
            "ask the log sink": subjects.logs_query,
            "write a job record": "$KV.comfy_jobs.j1",
            "delete the jobs stream": "$JS.API.STREAM.DELETE.JOBS",
        }
        for what, subject in forbidden.items():
            assert await adapter.refused(
                lambda subject=subject: nc.publish(subject, b"{}"), publish_to(subject)
            ), what
        # The reply subject of another user's request: the adapter may not answer it.
        theirs = gateway.nc.new_inbox()
        assert theirs.startswith("_INBOX.gateway.")
        assert await adapter.refused(lambda: nc.publish(theirs, b"{}"), publish_to(theirs))
        for subject in (subjects.logs_query, "comfy.logs.>", "_INBOX.>", "_INBOX.gateway.>"):
            assert await adapter.refused(
                lambda subject=subject: nc.subscribe(subject), subscription_to(subject)
            ), subject


async def test_the_log_sink_cannot_dispatch_submit_or_write_events(
    broker: NatsServer, resources: None
) -> None:
    subjects = Subjects()
    async with user(broker, "logsink") as sink:
        nc = sink.nc
        query = subjects.logs_query
        assert not await sink.refused(lambda: nc.subscribe(query), subscription_to(query))
        forbidden = [
            subjects.jobs(SERVER),
            subjects.submit,
            subjects.events("j1"),
            subjects.control(SERVER),
            "$KV.comfy_jobs.j1",
            # Taking events from the balancer's consumer would stall dispatching.
            "$JS.API.CONSUMER.MSG.NEXT.EVENTS.balancer",
            "$JS.API.STREAM.PURGE.JOBS",
        ]
        for subject in forbidden:
            assert await sink.refused(
                lambda subject=subject: nc.publish(subject, b"{}"), publish_to(subject)
            ), subject
        # A JetStream publish is a publish too: refused before it reaches the JOBS stream.
        js = nc.jetstream()
        reported = await sink.refused(
            lambda: _expect_no_ack(js.publish(subjects.jobs(SERVER), b"{}", timeout=0.5)),
            publish_to(subjects.jobs(SERVER)),
        )
        assert reported
        for subject in (subjects.all_heartbeats, subjects.submit, "_INBOX.>"):
            assert await sink.refused(
                lambda subject=subject: nc.subscribe(subject), subscription_to(subject)
            ), subject


async def _expect_no_ack(publish: Awaitable[Any]) -> None:
    with pytest.raises(NatsError):
        await publish


async def test_a_client_cannot_dispatch_write_events_or_read_others_replies(
    broker: NatsServer, resources: None
) -> None:
    subjects = Subjects()
    async with user(broker, "client") as client:
        nc = client.nc
        for subject in (
            subjects.jobs(SERVER),
            subjects.events("j1"),
            subjects.control(SERVER),
            "$KV.comfy_jobs.j1",
            "$JS.API.STREAM.PURGE.EVENTS",
        ):
            assert await client.refused(
                lambda subject=subject: nc.publish(subject, b"{}"), publish_to(subject)
            ), subject
        for subject in (subjects.submit, subjects.all_heartbeats, "_INBOX.gateway.>"):
            assert await client.refused(
                lambda subject=subject: nc.subscribe(subject), subscription_to(subject)
            ), subject
