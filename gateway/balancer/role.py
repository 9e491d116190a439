"""The balancer: answers `comfy.submit` and, while it holds the lease, dispatches jobs.

It runs inside the gateway process by default (`comfyautomate gateway` and `up`), or alone as
`comfyautomate balancer`; any number of replicas may run against one NATS.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket

from nats.aio.client import Client

from gateway.balancer.admission import Admission
from gateway.balancer.backlogview import BacklogView
from gateway.balancer.dispatcher import Dispatcher
from gateway.balancer.fleet import FleetView
from gateway.balancer.idempotency import open_keys
from gateway.balancer.shares import shares_of
from gateway.balancer.submit import Submitter, UsedBefore
from gateway.bus.contract import Subjects, new_id
from gateway.bus.events import EventPublisher
from gateway.bus.lease import hold_lease
from gateway.bus.retry import through_election
from gateway.lifecycle import stop_tasks
from gateway.settings import Settings
from gateway.webhooks.policy import WebhookPolicy

log = logging.getLogger(__name__)

# How long a balancer waits for the server registry before it competes for the lead: the
# registry says which servers are draining. Past it, it competes anyway (and says so), rather
# than leave the fleet without a leader.
_REGISTRY_WAIT_S = 30.0


class Balancer:
    """Submit service plus (when leading) the dispatcher, over one NATS connection."""

    def __init__(
        self,
        nc: Client,
        fleet: FleetView,
        settings: Settings,
        *,
        used_before: UsedBefore | None = None,
    ) -> None:
        self._nc = nc
        self._used_before = used_before
        self._fleet = fleet
        self._settings = settings
        self._subjects = Subjects(settings.subject_prefix)
        self.holder = f"{socket.gethostname()}-{os.getpid()}-{new_id()[:8]}"
        self.dispatcher: Dispatcher | None = None
        self.submitter: Submitter | None = None
        self.leads = False
        self.ready = asyncio.Event()  # set once comfy.submit is answered
        self._webhooks = WebhookPolicy(settings)  # SettingsError now, not once running
        self._shares = shares_of(settings)
        self.backlog = BacklogView(nc, self._subjects)  # the leader's queue, for admission

    def _admission(self) -> Admission:
        """The submit path's bounds, following the leader's backlog."""
        view = self.backlog
        admission = Admission(self._shares, lambda: view.latest)
        view.on_backlog(admission.on_backlog)
        return admission

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set; then stop taking submissions and give up the lease."""
        js = self._nc.jetstream()
        jobs_kv = await through_election(
            lambda: js.key_value(self._subjects.jobs_bucket), "finding the jobs bucket"
        )
        lease_kv = await through_election(
            lambda: js.key_value(self._subjects.balancer_bucket), "finding the lease bucket"
        )
        publisher = EventPublisher(js, self._subjects)
        await self.backlog.start()
        self.submitter = Submitter(
            jobs_kv,
            self._subjects,
            self._fleet.table,
            publisher,
            await open_keys(js, self._subjects, self._settings.idempotency_ttl_s),
            js,
            webhooks=self._webhooks,
            used_before=self._used_before,
            admission=self._admission(),
        )
        dispatcher = self.dispatcher = Dispatcher(
            self._nc,
            js,
            jobs_kv,
            self._subjects,
            self._fleet.table,
            publisher,
            records_retention_s=self._settings.job_records_retention_s,
            shares=self._shares,
        )
        self._fleet.on_change(lambda _server_id: dispatcher.wake())
        subscription = await self.submitter.serve(self._nc)
        await self._nc.flush()  # the subscription is known to the server from here on
        self.ready.set()

        async def lead() -> None:
            self.leads = True
            try:
                await dispatcher.run()
            finally:
                self.leads = False

        try:
            await self._registry_read(stop)
            await hold_lease(lease_kv, self.holder, lead, stop)
        finally:
            await subscription.unsubscribe()
            await self.backlog.stop()

    async def _registry_read(self, stop: asyncio.Event) -> None:
        """Wait (boundedly) until the fleet view holds the registry, or until told to stop."""
        waits = {
            asyncio.create_task(self._fleet.registry_read.wait()),
            asyncio.create_task(stop.wait()),
        }
        try:
            done, _ = await asyncio.wait(
                waits, timeout=_REGISTRY_WAIT_S, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            await stop_tasks(*waits)
        if not done:
            log.warning(
                "competing for the lead without the server registry read after %.0f s: "
                "a draining server may get jobs until it is",
                _REGISTRY_WAIT_S,
            )
