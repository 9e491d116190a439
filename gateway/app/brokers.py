"""`comfyautomate nats-cluster`: a JetStream cluster of nats-server nodes on this machine.

For trying a fleet's broker before building one (docs/DEPLOYMENT.md): three nodes on
consecutive client ports, each with its own store under `<data-dir>/nats-cluster/<node>`, made
from the shipped `nats.conf`. Point the roles at the URL it prints, with `nats_replicas = 3`.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path

from gateway.bus.natscluster import nats_cluster
from gateway.bus.natsserver import DEFAULT_CONF
from gateway.lifecycle import stop_on_signals

log = logging.getLogger(__name__)


async def run_nats_cluster(
    data_dir: Path,
    *,
    nodes: int = 3,
    host: str = "127.0.0.1",
    first_port: int = 4222,
    config: Path | None = DEFAULT_CONF,
) -> None:
    """Run the cluster until SIGINT or SIGTERM; every node stopped on the way out."""
    ports = list(range(first_port, first_port + nodes))
    base = data_dir / "nats-cluster"
    stop = asyncio.Event()
    with stop_on_signals(stop):
        async with nats_cluster(
            base, nodes, host=host, client_ports=ports, include=config
        ) as cluster:
            lines = [
                f"{node.name}: clients {node.url}, routes {node.ports.route}, "
                f"monitoring http://{host}:{node.ports.monitor}, store {node.store}"
                for node in cluster.nodes
            ]
            lines += [
                "",
                "ready; run the roles with",
                f"  COMFYAUTOMATE_NATS_URL={cluster.url} COMFYAUTOMATE_NATS_REPLICAS=3",
                "Ctrl-C stops every node.",
            ]
            # The terminal's output, not a log line: what to copy into the roles' settings.
            sys.stdout.write("\n".join(lines) + "\n")
            sys.stdout.flush()
            await stop.wait()
