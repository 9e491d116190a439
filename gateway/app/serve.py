"""`comfyautomate gateway` and `balancer`: the processes around the REST API and the balancer."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

import uvicorn
from nats.aio.client import Client
from nats.js import JetStreamContext

from gateway.api.app import create_app
from gateway.api.services import Services
from gateway.balancer.fleet import FleetView
from gateway.balancer.role import Balancer
from gateway.balancer.submit import UsedBefore
from gateway.bus.connection import session
from gateway.bus.contract import Subjects
from gateway.logsink.client import LogQueryError, has_log
from gateway.settings import Settings, SettingsError
from gateway.storage import Storage
from gateway.webhooks.worker import WebhookWorker
from plugins.storage.registry import create_storage

log = logging.getLogger(__name__)


def storage_for(settings: Settings, js: JetStreamContext) -> Storage:
    """The storage backend the settings name, under this deployment's bucket and URL."""
    return create_storage(
        settings.storage,
        data_dir=settings.data_path,
        js=js,
        bucket=Subjects(settings.subject_prefix).outputs_bucket,
        base_url=settings.public_url or "",
    )


class _Server(uvicorn.Server):
    # The process owns the signals (lifecycle.stop_on_signals); uvicorn must not take them.
    @contextlib.contextmanager
    def capture_signals(self):  # type: ignore[no-untyped-def]
        yield


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket, bound before anything else starts so a taken port fails early."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio turns Nagle off only on sockets that say they are TCP, and
    # with Nagle on every request on a reused connection waited ~40 ms for a delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise SettingsError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc} "
            "(another program has it? choose another with --port)"
        ) from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


async def run_gateway(
    settings: Settings,
    url: str,
    stop: asyncio.Event,
    *,
    with_balancer: bool = True,
    listening: asyncio.Future[str] | None = None,
    sock: socket.socket | None = None,
) -> None:
    """REST API (and, by default, a balancer) on `settings.host:port` until `stop` is set.

    `listening` receives the gateway's base URL once it accepts connections. `sock`, a socket
    already bound and listening, is served instead (and closed at the end).
    """
    sock = sock or bind_socket(settings.host, settings.port)
    with sock:
        await _serve(settings, url, stop, sock, with_balancer, listening)


async def _serve(
    settings: Settings,
    url: str,
    stop: asyncio.Event,
    sock: socket.socket,
    with_balancer: bool,
    listening: asyncio.Future[str] | None,
) -> None:
    subjects = Subjects(settings.subject_prefix)
    async with session(
        url,
        "gateway",
        subjects,
        user=settings.nats_user,
        password=settings.nats_password,
        replicas=settings.nats_replicas,
    ) as nc:
        js = nc.jetstream()
        fleet = FleetView(nc, await js.key_value(subjects.servers_bucket), subjects)
        balancer = (
            Balancer(nc, fleet, settings, used_before=job_ids_used(nc, subjects))
            if with_balancer
            else None
        )
        storage = storage_for(settings, js)
        services = Services(
            nc,
            fleet,
            await js.key_value(subjects.jobs_bucket),
            await js.key_value(subjects.servers_bucket),
            settings,
            storage=storage,
            balancer=balancer,
        )
        await services.start()
        webhooks = WebhookWorker(nc, settings, on_attempt=services.metrics.webhook_attempted)
        server = _Server(
            uvicorn.Config(
                create_app(services), log_level="warning", lifespan="on", access_log=False
            )
        )
        async with storage, asyncio.TaskGroup() as tasks:
            fleet_task = tasks.create_task(fleet.run())
            balancer_task = tasks.create_task(balancer.run(stop)) if balancer else None
            http_task = tasks.create_task(server.serve(sockets=[sock]))
            webhooks_task = tasks.create_task(webhooks.run(stop))
            # The socket already listens: connections made now wait in its backlog until
            # uvicorn accepts them. Ready means jobs can be submitted, so wait for the balancer.
            if balancer is not None:
                await balancer.ready.wait()
            host, port = sock.getsockname()[:2]
            base = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
            log.info("gateway listening on %s", base)
            if listening is not None and not listening.done():
                listening.set_result(base)
            await stop.wait()
            server.should_exit = True
            await http_task
            await webhooks_task
            if balancer_task is not None:
                await balancer_task
            fleet_task.cancel()
            await services.close()


async def run_balancer(settings: Settings, url: str, stop: asyncio.Event) -> None:
    """A balancer alone, for fleets that run it apart from the REST gateway."""
    subjects = Subjects(settings.subject_prefix)
    async with session(
        url,
        "balancer",
        subjects,
        user=settings.nats_user,
        password=settings.nats_password,
        replicas=settings.nats_replicas,
    ) as nc:
        js = nc.jetstream()
        fleet = FleetView(nc, await js.key_value(subjects.servers_bucket), subjects)
        balancer = Balancer(nc, fleet, settings, used_before=job_ids_used(nc, subjects))
        async with asyncio.TaskGroup() as tasks:
            fleet_task = tasks.create_task(fleet.run())
            await balancer.run(stop)
            fleet_task.cancel()


def job_ids_used(nc: Client, subjects: Subjects) -> UsedBefore:
    """Whether a job id chosen by a client was used by a job whose record has expired: asked
    of the log sink, whose index keeps every job's id for the logs' retention."""

    async def used(job_id: str) -> bool:
        try:
            return await has_log(nc, subjects, job_id)
        except LogQueryError as exc:
            # KV still refuses every id whose record is kept; only an expired one may slip by.
            log.warning("job id %s: the log sink cannot tell whether it was used: %s", job_id, exc)
            return False

    return used
