"""A whole deployment in pieces that can be killed one at a time.

nats-server, the gateway, the log sink and one adapter per server are child processes started
through the `comfyautomate` command (the console script next to this interpreter); the fake
ComfyUI servers run in the caller's event loop so they can crash, hang or cut websockets on
demand. Every child is stopped by its PID when the block exits, also when it fails, and asks
the kernel to be terminated if this process dies first.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg

from gateway.bus.connection import BusResources, connect, ensure_resources
from gateway.bus.contract import Heartbeat, Subjects, decode
from gateway.bus.natscluster import NatsCluster
from gateway.bus.natsserver import NatsServer, start_nats_server
from plugins.simulator import Simulator, SimulatorConfig
from tests.helpers import poll_until

ROOT = Path(__file__).resolve().parents[2]
COMMAND = str(Path(sys.executable).parent / "comfyautomate")
_PR_SET_PDEATHSIG = 1
# CPU seconds used by the children, by role name, summed over restarts (read before each stop).
CPU: dict[str, float] = {}


def free_port() -> int:
    """A port nobody listens on right now (the gateway needs the same one after a restart)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _die_with_parent(parent: int) -> None:
    # Between fork and exec: SIGKILL when the test process dies, so no child outlives it.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)


class Child:
    """One child process of the cluster, its output appended to a log file."""

    def __init__(self, name: str, argv: list[str], log: Path, env: dict[str, str]) -> None:
        self.name = name
        self.argv = argv
        self.log = log
        self.env = env
        self.process: asyncio.subprocess.Process | None = None
        self.started_at = 0.0

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def start(self) -> None:
        parent = os.getpid()
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            out.write(f"--- start {' '.join(self.argv)}\n".encode())
            out.flush()
            self.process = await asyncio.create_subprocess_exec(
                *self.argv,
                cwd=ROOT,
                env=self.env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                preexec_fn=lambda: _die_with_parent(parent),
            )
        self.started_at = time.monotonic()

    def cpu_seconds(self) -> float:
        """User and system CPU time the running process has used so far (0 once it is gone)."""
        if not self.running:
            return 0.0
        try:
            fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    async def stop(self, sig: int = signal.SIGTERM, within: float = 20.0) -> int:
        """Send `sig` (SIGKILL after `within` s if it is still there); the exit code."""
        process = self.process
        if process is None:
            return 0
        CPU[self.name] = CPU.get(self.name, 0.0) + self.cpu_seconds()
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, sig)
            try:
                async with asyncio.timeout(within):
                    await process.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGKILL)
                await process.wait()
        assert process.returncode is not None
        return process.returncode

    def tail(self, chars: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


class Cluster:
    """Handles on every part; see `running_cluster`."""

    def __init__(
        self,
        base: Path,
        server_ids: list[str],
        sim_config: SimulatorConfig,
        *,
        nats_nodes: int = 1,
        storage: str = "local",
    ) -> None:
        self.base = base
        self.data_dir = base / "data"
        self.store_dir = base / "nats"
        self.logs = base / "logs"
        self.server_ids = server_ids
        self.sim_config = sim_config
        self.subjects = Subjects()
        self.nats: NatsServer | None = None
        self.nats_port = 0
        # Several nodes: a JetStream cluster on loopback, every resource with 3 replicas.
        self.broker: NatsCluster | None = None
        if nats_nodes > 1:
            self.broker = NatsCluster(base / "nats-cluster", nats_nodes)
        self.replicas = 3 if nats_nodes >= 3 else 1
        self.storage = storage
        self.gateway_port = free_port()
        self.sims: dict[str, Simulator] = {}
        self.sim_ports: dict[str, int] = {}
        self.adapters: dict[str, Child] = {}
        self.gateway: Child | None = None
        self.sink: Child | None = None
        self.nc: Client | None = None
        # Test-side view of heartbeats: (monotonic receipt time, beat) of the latest per server.
        self.heartbeats: dict[str, tuple[float, Heartbeat]] = {}
        self.nats_restarts = 0
        # Environment of every child: no settings file or variable of the machine leaks in.
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("COMFYAUTOMATE_")}
        self.env["COMFYAUTOMATE_CONFIG"] = str(base / "none.toml")
        # Heartbeats twice a second: a dead adapter is noticed (and a revived fake seen
        # healthy) within about 1.5 s instead of 3.
        self.env["COMFYAUTOMATE_HEARTBEAT_INTERVAL_S"] = "0.5"
        self.env["COMFYAUTOMATE_NATS_REPLICAS"] = str(self.replicas)
        self.env["COMFYAUTOMATE_STORAGE"] = storage
        (base / "none.toml").write_text("")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    @property
    def nats_url(self) -> str:
        if self.broker is not None:
            return self.broker.url
        return f"nats://127.0.0.1:{self.nats_port}"

    def _role(self, *args: str) -> list[str]:
        return [
            COMMAND,
            *args,
            "--nats-url",
            self.nats_url,
            "--data-dir",
            str(self.data_dir),
            "--log-level",
            os.environ.get("CHAOS_LOG_LEVEL", "WARNING"),
        ]

    def _module_role(self, module: str, *args: str) -> list[str]:
        return [sys.executable, "-m", module, *self._role(*args)[1:]]

    # -- nats-server -------------------------------------------------------------------------

    async def start_nats(self) -> None:
        if self.broker is not None:
            await self.broker.start()
            return
        self.nats = await start_nats_server(
            port=self.nats_port,
            store_dir=self.store_dir,
            log_file=self.logs / "nats-server.log",
        )
        self.nats_port = self.nats.port

    async def kill_nats(self) -> None:
        """SIGKILL the broker: what it had written to its store files is all that survives."""
        assert self.nats is not None
        os.kill(self.nats.pid, signal.SIGKILL)
        await self.nats.stop()
        self.nats = None

    async def restart_nats(self) -> None:
        """The broker killed, then started again on the same port and the same JetStream store."""
        await self.kill_nats()
        await self.start_nats()
        self.nats_restarts += 1

    # -- fake ComfyUI servers ----------------------------------------------------------------

    async def start_sim(self, server_id: str, config: SimulatorConfig | None = None) -> Simulator:
        config = config or self.sim_config
        config = msgspec.structs.replace(config, base_dir=str(self.base / "sims" / server_id))
        sim = Simulator(config, port=self.sim_ports.get(server_id, 0))
        await sim.start()
        self.sims[server_id] = sim
        self.sim_ports[server_id] = sim.port
        return sim

    async def crash_sim(self, server_id: str) -> None:
        """The fake dies abruptly (connections cut, port closed, queue and history lost)."""
        sim = self.sims.pop(server_id)
        sim.crash()
        await sim.stop()

    # -- roles as processes ------------------------------------------------------------------

    async def start_gateway(self) -> None:
        self.gateway = Child(
            "gateway",
            self._role("gateway", "--port", str(self.gateway_port)),
            self.logs / "gateway.log",
            self.env,
        )
        await self.gateway.start()
        async with httpx.AsyncClient(base_url=self.url, timeout=5) as client:

            async def answers() -> bool:
                assert self.gateway is not None
                if not self.gateway.running:
                    raise AssertionError(f"the gateway exited:\n{self.gateway.tail()}")
                try:
                    # 503 is an answer too: /health says 503 while the log sink is down (a
                    # fault step may have killed it), and the gateway serves all the same.
                    return (await client.get("/health")).status_code in (200, 503)
                except httpx.TransportError:
                    return False

            await poll_until(answers, "the gateway answers /health", within=30)

    async def restart_gateway(self, sig: int = signal.SIGTERM) -> int:
        assert self.gateway is not None
        code = await self.gateway.stop(sig)
        await self.start_gateway()
        return code

    async def start_sink(self) -> None:
        # `python -m gateway.logsink` is `comfyautomate logsink`, as for the adapter.
        argv = self._module_role("gateway.logsink", "--ack-wait", "1")
        self.sink = Child("logsink", argv, self.logs / "logsink.log", self.env)
        await self.sink.start()

    async def kill_sink(self) -> None:
        assert self.sink is not None
        await self.sink.stop(signal.SIGKILL)

    def adapter_argv(self, server_id: str) -> list[str]:
        # `python -m plugins.comfyui` is `comfyautomate adapter` (same parser and main) without
        # importing every other command first: 0.3 s less CPU per start, and there are several.
        return self._module_role(
            "plugins.comfyui",
            "--server-id",
            server_id,
            "--address",
            f"127.0.0.1:{self.sim_ports[server_id]}",
            "--ack-wait",
            "2",
            "--grace",
            "2",
        )

    async def start_adapter(self, server_id: str, wrap: list[str] | None = None) -> Child:
        """The adapter of `server_id` as a process; `wrap` is put in front of the command."""
        child = Child(
            f"adapter-{server_id}",
            [*(wrap or []), *self.adapter_argv(server_id)],
            self.logs / f"adapter-{server_id}.log",
            self.env,
        )
        await child.start()
        self.adapters[server_id] = child
        return child

    async def kill_adapter(self, server_id: str) -> None:
        await self.adapters[server_id].stop(signal.SIGKILL)

    def adapter_ready(self, server_id: str) -> bool:
        """A healthy heartbeat of `server_id` arrived after its adapter process started."""
        child = self.adapters.get(server_id)
        seen = self.heartbeats.get(server_id)
        return (
            child is not None
            and child.running
            and seen is not None
            and seen[0] > child.started_at
            and seen[1].healthy
        )

    async def wait_adapter_ready(self, server_id: str, within: float = 30.0) -> None:
        async def ready() -> bool:
            child = self.adapters[server_id]
            if not child.running:
                raise AssertionError(f"adapter {server_id} exited:\n{child.tail()}")
            return self.adapter_ready(server_id)

        await poll_until(ready, f"adapter {server_id} heartbeats healthy", within=within)

    async def _on_heartbeat(self, msg: Msg) -> None:
        with contextlib.suppress(ValueError):
            beat = decode(msg.data, Heartbeat)
            self.heartbeats[beat.server_id] = (time.monotonic(), beat)

    # -- the whole ---------------------------------------------------------------------------

    async def start(self) -> None:
        await self.start_nats()
        self.nc = await connect(self.nats_url, "chaos")
        await ensure_resources(
            self.nc.jetstream(), self.subjects, BusResources(replicas=self.replicas)
        )
        await self.nc.subscribe(self.subjects.all_heartbeats, cb=self._on_heartbeat)
        for server_id in self.server_ids:
            await self.start_sim(server_id)
        # The slow starters together: each is a Python process importing the whole project.
        await self.start_sink()
        for server_id in self.server_ids:
            await self.start_adapter(server_id)
        await self.start_gateway()
        async with httpx.AsyncClient(base_url=self.url, timeout=10) as client:
            for server_id in self.server_ids:
                body = {
                    "name": server_id,
                    "server_id": server_id,
                    "address": f"127.0.0.1:{self.sim_ports[server_id]}",
                    "capacity": 2,
                }
                reply = await client.post("/servers", json=body)
                assert reply.status_code == 201, reply.text
        for server_id in self.server_ids:
            await self.wait_adapter_ready(server_id)

    async def stop(self) -> None:
        children = [self.gateway, self.sink, *self.adapters.values()]
        await asyncio.gather(
            *(c.stop(signal.SIGTERM, within=10) for c in children if c is not None),
            return_exceptions=True,
        )
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.close()
        for sim in list(self.sims.values()):
            await sim.stop()
        if self.nats is not None:
            await self.nats.stop()
        if self.broker is not None:
            await self.broker.stop()

    def tails(self) -> str:
        """The end of every child's log, for a failure message."""
        children = [self.gateway, self.sink, *self.adapters.values()]
        return "\n".join(
            f"==== {child.name} ====\n{child.tail(2500)}" for child in children if child is not None
        )


@contextlib.asynccontextmanager
async def running_cluster(
    base: Path,
    server_ids: list[str] | None = None,
    sim_config: SimulatorConfig | None = None,
    *,
    nats_nodes: int = 1,
    storage: str = "local",
) -> AsyncIterator[Cluster]:
    """A started cluster under `base`; every process and fake stopped on exit.

    `nats_nodes` above 1 runs the broker as a JetStream cluster of that many nodes
    (gateway/bus/natscluster.py), with 3 replicas of everything from 3 nodes on.
    """
    cluster = Cluster(
        base,
        server_ids or ["s1", "s2", "s3"],
        sim_config or SimulatorConfig(),
        nats_nodes=nats_nodes,
        storage=storage,
    )
    try:
        await cluster.start()
        yield cluster
    finally:
        await cluster.stop()
