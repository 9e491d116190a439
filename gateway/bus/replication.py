"""How each stream, bucket and object store of the system is replicated right now.

For `/health` and `/metrics`: a resource is current when it has a leader and every copy it is
configured with is online and caught up. A node that died leaves its copies offline; one that
came back (or lost its disk) lags until it has caught up from its peers.
"""

from __future__ import annotations

import asyncio

import msgspec
import nats.errors
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from gateway.bus.connection import resource_streams
from gateway.bus.contract import Subjects

_ASK_S = 2.0
# A copy behind that its leader has not heard from for this long (or ever, for a leader
# elected since) is away: JetStream marks a dead node `offline` only later, or not at all for
# the streams it led, and meanwhile shows it as merely not current.
_UNSEEN_NS = 5_000_000_000


def _unheard(active_ns: int | None) -> bool:
    return not active_ns or active_ns > _UNSEEN_NS


class Replication(msgspec.Struct, frozen=True, kw_only=True):
    """One resource's copies: configured, with a leader, and which of them are behind."""

    resource: str  # the stream's name (KV_<bucket> for a bucket, OBJ_<bucket> for the store)
    replicas: int  # copies configured (0: the resource does not exist)
    leader: str | None  # the node leading it; None while it has none (an election, an outage)
    current: bool  # a leader, and every configured copy online and caught up
    lagging: list[str] = msgspec.field(default_factory=list)  # nodes still catching up
    offline: list[str] = msgspec.field(default_factory=list)  # nodes not answering
    problem: str | None = None  # why the state could not be read, when it could not


async def replication_status(js: JetStreamContext, subjects: Subjects) -> list[Replication]:
    """The replication of every resource of the system, each asked of JetStream at once."""
    return list(await asyncio.gather(*(_one(js, name) for name in resource_streams(subjects))))


async def _one(js: JetStreamContext, name: str) -> Replication:
    try:
        async with asyncio.timeout(_ASK_S):
            info = await js.stream_info(name)
    except NotFoundError:
        return Replication(resource=name, replicas=0, leader=None, current=False, problem="missing")
    except (nats.errors.Error, TimeoutError) as exc:
        # No answer within the time: the stream (or JetStream) has no leader right now.
        return Replication(
            resource=name, replicas=0, leader=None, current=False, problem=type(exc).__name__
        )
    replicas = info.config.num_replicas or 1
    cluster = info.cluster
    if cluster is None:  # a broker that is not clustered: its one copy is the leader
        return Replication(resource=name, replicas=replicas, leader=None, current=True)
    peers = cluster.replicas or []
    away = {p.name or "?" for p in peers if p.offline or (not p.current and _unheard(p.active))}
    offline = sorted(away)
    lagging = sorted(p.name or "?" for p in peers if p.name not in away and not p.current)
    missing = replicas - 1 - len(peers)
    current = cluster.leader is not None and not offline and not lagging and missing <= 0
    return Replication(
        resource=name,
        replicas=replicas,
        leader=cluster.leader,
        current=current,
        lagging=lagging,
        offline=offline,
    )
