"""What the parts of one leadership share: the bus handles, the book of open jobs, the servers."""

from __future__ import annotations

from dataclasses import dataclass

from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from gateway.balancer.book import JobBook
from gateway.balancer.joblog import JobLog
from gateway.balancer.servers import ServerTable
from gateway.bus.contract import Subjects
from gateway.bus.events import EventPublisher


@dataclass(frozen=True)
class Lead:
    """Handed to each part of the dispatcher (recording, binding, recovery)."""

    nc: Client
    js: JetStreamContext
    jobs_kv: KeyValue
    subjects: Subjects
    book: JobBook
    servers: ServerTable
    publisher: EventPublisher
    joblog: JobLog
