"""A JetStream cluster of nats-server processes on this machine, for trying a fleet's broker.

Each node is the shipped `nats.conf` (included) plus its own name, client port, route port,
monitoring port and store folder; every node routes to all three. It is what
`comfyautomate nats-cluster` runs and what the cluster fault test kills node by node. A node
can be stopped and started again on the same ports and store (or with its store emptied, to
catch up from its peers).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import socket
import urllib.request
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import msgspec

from gateway.bus.natsserver import DEFAULT_CONF, NatsServer, NatsServerError, start_nats_server

CLUSTER_NAME = "comfyautomate"


class NodePorts(msgspec.Struct, frozen=True):
    """Where one node listens: clients, the other nodes (routes), HTTP monitoring."""

    client: int
    route: int
    monitor: int


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct ports nobody listens on right now."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((host, 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class Node:
    """One broker of the cluster: its configuration file, its store, its process when running."""

    def __init__(self, name: str, host: str, ports: NodePorts, base: Path) -> None:
        self.name = name
        self.host = host
        self.ports = ports
        self.folder = base / name
        self.server: NatsServer | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.ports.client}"

    @property
    def store(self) -> Path:
        return self.folder / "store"

    @property
    def conf(self) -> Path:
        return self.folder / "nats.conf"

    @property
    def running(self) -> bool:
        return self.server is not None and self.server.process.returncode is None

    def write_conf(self, routes: Iterable[int], include: Path | None) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        lines = []
        if include is not None and include.is_file():
            # The shipped file's limits and (when enabled) users; this node's own lines follow
            # and win where both set a key. nats-server includes only relative paths: a copy.
            shutil.copyfile(include, self.folder / "base.conf")
            lines.append("include base.conf")
        route_urls = ", ".join(f'"nats-route://{self.host}:{port}"' for port in routes)
        lines += [
            f"server_name: {self.name}",
            f"http: {json.dumps(f'{self.host}:{self.ports.monitor}')}",
            "cluster {",
            f"  name: {CLUSTER_NAME}",
            f"  listen: {json.dumps(f'{self.host}:{self.ports.route}')}",
            f"  routes: [{route_urls}]",
            "}",
        ]
        self.conf.write_text("\n".join(lines) + "\n")

    async def start(self) -> None:
        """Start the node on its ports and store (again, after a stop)."""
        self.server = await start_nats_server(
            host=self.host,
            port=self.ports.client,
            store_dir=self.store,
            config=self.conf,
            log_file=self.folder / "nats-server.log",
        )

    async def stop(self, *, kill: bool = False) -> None:
        """Stop the node: SIGTERM (a clean leave), or SIGKILL (a crash) when `kill`."""
        server, self.server = self.server, None
        if server is None:
            return
        if kill:
            with contextlib.suppress(ProcessLookupError):
                server.process.kill()
        await server.stop()

    def wipe_store(self) -> None:
        """Delete the node's JetStream store (a lost disk); only while it is stopped."""
        if self.running:
            raise NatsServerError(f"{self.name} is running: stop it before deleting its store")
        shutil.rmtree(self.store, ignore_errors=True)

    async def jsz(self) -> dict[str, object]:
        """The node's JetStream report from its monitoring port (`/jsz`)."""
        return await asyncio.to_thread(self._read_jsz)

    def _read_jsz(self) -> dict[str, object]:
        url = f"http://{self.host}:{self.ports.monitor}/jsz"
        with urllib.request.urlopen(url, timeout=2) as answer:
            report: dict[str, object] = json.load(answer)
        return report


class NatsCluster:
    """The nodes of a local cluster. Use `nats_cluster` to get a started one."""

    def __init__(
        self,
        base: Path,
        nodes: int = 3,
        *,
        host: str = "127.0.0.1",
        client_ports: list[int] | None = None,
        include: Path | None = DEFAULT_CONF,
    ) -> None:
        if nodes < 1:
            raise ValueError("a cluster has at least one node")
        clients = client_ports or free_ports(nodes, host)
        if len(clients) != nodes:
            raise ValueError(f"{nodes} nodes need {nodes} client ports, not {len(clients)}")
        others = free_ports(2 * nodes, host)
        self.nodes = [
            Node(
                f"nats-{index + 1}",
                host,
                NodePorts(clients[index], others[2 * index], others[2 * index + 1]),
                base,
            )
            for index in range(nodes)
        ]
        routes = [node.ports.route for node in self.nodes]
        for node in self.nodes:
            node.write_conf(routes, include)

    @property
    def url(self) -> str:
        """Every node's client URL, comma-separated: what the roles' `nats_url` is set to."""
        return ",".join(node.url for node in self.nodes)

    def node(self, name: str) -> Node:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(name)

    async def meta_leader(self) -> str | None:
        """The name of the node leading JetStream's metadata, as a running node reports it."""
        for node in self.nodes:
            if not node.running:
                continue
            try:
                meta = (await node.jsz()).get("meta_cluster")
            except OSError:
                continue
            if isinstance(meta, dict) and meta.get("leader"):
                return str(meta["leader"])
        return None

    async def start(self, ready_within: float = 30.0) -> None:
        """Start every node; return once JetStream has a meta leader (it takes API calls)."""
        for node in self.nodes:
            await node.start()
        await self.wait_meta_leader(ready_within)

    async def wait_meta_leader(self, within: float = 30.0) -> str:
        """The meta leader's name, once the running nodes have elected one."""
        try:
            async with asyncio.timeout(within):
                while (leader := await self.meta_leader()) is None:  # noqa: ASYNC110 - paced asks
                    # The election shows only through the nodes' monitoring: ask again shortly.
                    await asyncio.sleep(0.1)
        except TimeoutError:
            raise NatsServerError(f"no JetStream meta leader within {within:.0f} s") from None
        return leader

    async def stop(self) -> None:
        for node in self.nodes:
            await node.stop()


@contextlib.asynccontextmanager
async def nats_cluster(
    base: Path,
    nodes: int = 3,
    *,
    host: str = "127.0.0.1",
    client_ports: list[int] | None = None,
    include: Path | None = DEFAULT_CONF,
) -> AsyncIterator[NatsCluster]:
    """A started local cluster under `base` (a folder per node); every node stopped on exit."""
    cluster = NatsCluster(base, nodes, host=host, client_ports=client_ports, include=include)
    try:
        await cluster.start()
        yield cluster
    finally:
        await cluster.stop()
