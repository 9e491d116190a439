"""`comfyautomate up`: the whole system on one machine, embedded NATS included.

One process runs every role (gateway with its balancer, log sink, an adapter per registered
server) around a nats-server child; `--simulate N` adds N fake ComfyUI servers so the system can
be seen working without a GPU. Ctrl-C or SIGTERM stops the roles in reverse order, the broker
last, and nothing is left running.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any, Final

import msgspec
from nats.aio.client import Client
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

from gateway.api.auth import check_settings
from gateway.app.adapterhost import AdapterHost
from gateway.app.occupied import roles_running
from gateway.app.serve import run_gateway, storage_for
from gateway.bus.connection import session, shown_url
from gateway.bus.contract import ContractError, ServerRecord, Subjects, decode, encode, now
from gateway.bus.natsserver import DEFAULT_CONF, answers, embedded_nats
from gateway.lifecycle import stop_on_signals
from gateway.logsink.sink import run_logsink
from gateway.settings import Settings, SettingsError
from plugins.simulator import SimulatorConfig, run_simulator

log = logging.getLogger(__name__)


def _server_id(address: str) -> str:
    return "comfyui-" + re.sub(r"[^A-Za-z0-9]+", "-", address).strip("-")


# Another writer of the record between our read and our write (an admin's drain through a
# gateway that joined the broker) makes us read again; this many times at most.
_WRITE_TRIES: Final = 5


async def register_server(
    nc: Client, subjects: Subjects, server_id: str, name: str, address: str
) -> ServerRecord:
    """Register a server `up` was told of, or bring its record up to date; the record stored.

    A server registered before (by an earlier `up`) keeps what an admin set since through the
    API: its name, weight, capacity, labels and `draining`; only its address is the one given
    now (a simulator's port changes with every start).
    """
    kv = await nc.jetstream().key_value(subjects.servers_bucket)
    for _ in range(_WRITE_TRIES):
        try:
            entry = await kv.get(server_id)
        except KeyNotFoundError:
            record = ServerRecord(
                server_id=server_id, name=name, address=address, registered_at=now()
            )
            try:
                await kv.create(server_id, encode(record))
            except KeyWrongLastSequenceError:
                continue  # registered meanwhile: keep what that registration set
            return record
        try:
            stored = decode(entry.value or b"", ServerRecord)
        except ContractError as exc:
            log.warning("replacing the unreadable record of server %s: %s", server_id, exc)
            stored = ServerRecord(server_id=server_id, name=name, address="", registered_at=now())
        if stored.address == address:
            return stored
        record = msgspec.structs.replace(stored, address=address)
        try:
            await kv.update(server_id, encode(record), last=entry.revision)
        except KeyWrongLastSequenceError:
            continue
        return record
    raise SettingsError(f"the record of server {server_id!r} kept changing while up wrote it")


async def run_up(
    settings: Settings,
    *,
    comfyui: Sequence[str] = (),
    simulate: int = 0,
    simulator_config: SimulatorConfig | None = None,
    join: bool = False,
) -> int:
    """Run everything until SIGINT or SIGTERM; return the exit code.

    A broker that already serves a system under this prefix is refused (SettingsError)
    unless `join`: two systems on one broker would take each other's events and jobs.
    """
    check_settings(settings)  # refuse an unsafe setup before anything starts
    stop = asyncio.Event()
    subjects = Subjects(settings.subject_prefix)
    with stop_on_signals(stop):
        async with AsyncExitStack() as stack:
            url = settings.nats_url
            found_broker = await answers(url)
            if settings.embedded_nats:
                conf = Path(settings.nats_conf) if settings.nats_conf else DEFAULT_CONF
                url = await stack.enter_async_context(
                    embedded_nats(url, settings.data_path, config=conf)
                )
            servers: list[tuple[str, str, str]] = [
                (_server_id(address), address, address) for address in comfyui
            ]
            for index in range(simulate):
                config = simulator_config or SimulatorConfig()
                sim_dir = settings.data_path / "simulators" / f"sim-{index + 1}"
                sim = await stack.enter_async_context(
                    run_simulator(_with_dir(config, sim_dir), host="127.0.0.1", port=0)
                )
                servers.append((f"sim-{index + 1}", f"Simulated ComfyUI {index + 1}", sim.address))
            nc = await stack.enter_async_context(
                session(
                    url,
                    "up",
                    subjects,
                    user=settings.nats_user,
                    password=settings.nats_password,
                    replicas=settings.nats_replicas,
                )
            )
            if found_broker and not join:
                running = await roles_running(nc, subjects)
                if running:
                    raise SettingsError(
                        f"the NATS server at {shown_url(url)} already serves a ComfyAutomate "
                        f"system under the prefix {subjects.prefix!r} ({', '.join(running)}). "
                        "Run beside it with another prefix (--prefix) or broker (--nats-url), "
                        "or join it on purpose: `up --join`, or the separate roles "
                        "(comfyautomate gateway | adapter | logsink)"
                    )
            for server_id, name, address in servers:
                await register_server(nc, subjects, server_id, name, address)
            storage = storage_for(settings, nc.jetstream())
            await stack.enter_async_context(storage)
            listening: asyncio.Future[str] = asyncio.get_running_loop().create_future()
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(run_logsink(settings, stop, nc=nc))
                tasks.create_task(AdapterHost(nc, settings, storage).run(stop))
                gateway = tasks.create_task(run_gateway(settings, url, stop, listening=listening))
                started: set[asyncio.Future[Any]] = {listening, gateway}
                await asyncio.wait(started, return_when=asyncio.FIRST_COMPLETED)
                if listening.done():
                    _announce(listening.result(), url, settings, servers)
    return 0


def _with_dir(config: SimulatorConfig, directory: Path) -> SimulatorConfig:
    return msgspec.structs.replace(config, base_dir=str(directory))


def _announce(
    base: str,
    url: str,
    settings: Settings,
    servers: list[tuple[str, str, str]],
) -> None:
    lines = [
        f"ComfyAutomate is up at {base}",
        f"  dashboard: {base}/",
        f"  API docs:  {base}/schema/swagger",
        f"  NATS:      {shown_url(url)}",
        f"  data:      {settings.data_path.resolve()}",
    ]
    lines += [f"  server:    {sid} at {address}" for sid, _, address in servers]
    lines.append("Press Ctrl-C to stop.")
    print("\n".join(lines), flush=True)  # noqa: T201 - what a person starting it waits for


def up(
    settings: Settings,
    *,
    comfyui: Sequence[str] = (),
    simulate: int = 0,
    join: bool = False,
) -> int:
    """Synchronous entry point for the CLI."""
    return asyncio.run(run_up(settings, comfyui=comfyui, simulate=simulate, join=join))
