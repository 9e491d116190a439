"""The gateway's Prometheus metrics: one registry per app, its instruments, and the scrape.

The registry is not prometheus_client's global one, so several gateways in one process (tests,
`up`) each count their own. Counters and histograms are set as things happen; gauges are read
at each scrape from async sources (`add_gauges`), which is how a new gauge joins.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Final, Literal, get_args

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from gateway.bus.contract import WebhookOutcome

log = logging.getLogger(__name__)

# What a gauge source gives at each scrape: metric families (GaugeMetricFamily, ...).
GaugeSource = Callable[[], Awaitable[Iterable[Metric]]]
AddedRoute = Literal["submit", "execute"]

# From a dispatch round to an hour on a GPU: seconds a job waits, runs, or shows its first node.
JOB_BUCKETS: Final = (
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
)  # fmt: skip
# The gateway's own handling: a millisecond or so when all is well.
ADDED_BUCKETS: Final = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
WEBHOOK_OUTCOMES: Final[tuple[WebhookOutcome, ...]] = get_args(WebhookOutcome)
# The bounds a submission can be refused by (gateway/balancer/admission.py).
REFUSAL_REASONS: Final = ("max_pending_per_caller", "max_pending")


class _Gauges(Collector):
    """The families the gauge sources gave at the last scrape."""

    def __init__(self) -> None:
        self.families: list[Metric] = []

    def collect(self) -> Iterable[Metric]:
        return list(self.families)

    def describe(self) -> Iterable[Metric]:
        # Names are not known before the first scrape; an empty description keeps the registry
        # from calling collect() at registration.
        return []


class Metrics:
    """The instruments of one gateway, and its Prometheus text (`scrape`)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.submitted = Counter(
            "comfyautomate_jobs_submitted", "Jobs accepted (their queued event).", registry=r
        )
        self.finished = Counter(
            "comfyautomate_jobs_finished",
            "Jobs ended, by outcome (succeeded, failed, cancelled), the server of their last "
            "try, and for failures the error code.",
            ["outcome", "server", "reason"],
            registry=r,
        )
        self.retried = Counter(
            "comfyautomate_jobs_retried",
            "Tries handed back to the queue, by the server that had them and why: "
            "after_start, before_start, stopping (the adapter stopped; the try does not count).",
            ["server", "reason"],
            registry=r,
        )
        self.queue_wait = Histogram(
            "comfyautomate_job_queue_wait_seconds",
            "From a job entering the queue (queued, or retried) to ComfyUI starting it.",
            ["server"],
            buckets=JOB_BUCKETS,
            registry=r,
        )
        self.run_time = Histogram(
            "comfyautomate_job_run_seconds",
            "From ComfyUI starting a job to its end, by server and outcome.",
            ["server", "outcome"],
            buckets=JOB_BUCKETS,
            registry=r,
        )
        self.first_event = Histogram(
            "comfyautomate_job_first_event_seconds",
            "From a job's submission to its first node event (the first sign of work).",
            ["server"],
            buckets=JOB_BUCKETS,
            registry=r,
        )
        self.added = Histogram(
            "comfyautomate_gateway_added_seconds",
            "This gateway's own time on a request: a whole submit; an execute's time beyond "
            "the job's run on ComfyUI.",
            ["route"],
            buckets=ADDED_BUCKETS,
            registry=r,
        )
        self.webhook_deliveries = Counter(
            "comfyautomate_webhook_deliveries",
            "Webhook delivery attempts by outcome: delivered, failed (retried later), "
            "abandoned (retries spent).",
            ["outcome"],
            registry=r,
        )
        for outcome in WEBHOOK_OUTCOMES:
            self.webhook_deliveries.labels(outcome=outcome)  # shown at 0 from the start
        self.refusals = Counter(
            "comfyautomate_jobs_refused",
            "Submissions this gateway answered with 429 queue_full, by the bound that refused "
            "them: max_pending_per_caller or max_pending.",
            ["reason"],
            registry=r,
        )
        for reason in REFUSAL_REASONS:
            self.refusals.labels(reason=reason)
        self._gauges = _Gauges()
        r.register(self._gauges)
        self._sources: list[tuple[str, GaugeSource]] = []
        self._scraping = asyncio.Lock()

    def add_gauges(self, name: str, source: GaugeSource) -> None:
        """Read `source` at every scrape; `name` says which in the log when it fails."""
        self._sources.append((name, source))

    def webhook_attempted(self, outcome: WebhookOutcome) -> None:
        """Count one webhook delivery attempt by what it came to."""
        self.webhook_deliveries.labels(outcome=outcome).inc()

    def refused(self, details: object) -> None:
        """Count a submission refused because the queue was full (`details` of the refusal)."""
        reason = details.get("reason") if isinstance(details, dict) else None
        self.refusals.labels(reason=reason if reason in REFUSAL_REASONS else "other").inc()

    def gateway_added(self, route: AddedRoute, seconds: float) -> None:
        """Note the gateway's own time on one request of `route`."""
        self.added.labels(route=route).observe(max(0.0, seconds))

    async def scrape(self) -> bytes:
        """Every metric in Prometheus's text format, gauges read now.

        A source that fails leaves its gauges out of this scrape (and says why in the log):
        the counters are worth having while NATS is away.
        """
        async with self._scraping:
            families: list[Metric] = []
            for name, source in self._sources:
                try:
                    families.extend(await source())
                except Exception:
                    log.warning("metrics: gauges %r left out of this scrape", name, exc_info=True)
            self._gauges.families = families
            return generate_latest(self.registry)
