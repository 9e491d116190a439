"""Where in the EVENTS stream a starting sink reads from, and which events it looks up by id.

The index records how far into the stream it holds every event (store.py). A sink starts from
just after that, and looks up by id only what may be in the index without the position saying
so: the events a crash left in the files (reindexed by `rebuild.reconcile`), up to what the
consumer had delivered. An index that does not know its position (new, rebuilt, made by an
older build, or of a stream made anew under the same name) starts where the consumer had
acknowledged, everything acknowledged being stored, and looks up what came after by id.
"""

from __future__ import annotations

import logging

import msgspec
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from gateway.bus.contract import Subjects
from gateway.logsink.store import LogStore

log = logging.getLogger(__name__)


class StreamState(msgspec.Struct, frozen=True, kw_only=True):
    """The EVENTS stream and the sink's consumer, as a starting sink finds them."""

    stream: str
    created: str
    acked: int  # the consumer's acknowledgement floor (0 without a consumer)
    delivered: int  # the last event it delivered (the stream's last without a consumer)


async def stream_state(js: JetStreamContext, subjects: Subjects, durable: str) -> StreamState:
    """Read the stream's identity and the consumer's progress from the broker."""
    name = subjects.events_stream
    stream = await js.stream_info(name)
    created = stream.created.isoformat() if stream.created is not None else ""
    try:
        consumer = await js.consumer_info(name, durable)
    except NotFoundError:
        acked, delivered = 0, int(stream.state.last_seq)
    else:
        acked, delivered = consumer.ack_floor.stream_seq, consumer.delivered.stream_seq
    return StreamState(stream=name, created=created, acked=acked, delivered=delivered)


def settle_position(store: LogStore, state: StreamState, *, recovered: int) -> int:
    """Set the store's `upto` and `check_upto`, record the position, and return `upto`.

    `recovered`: how many events reconciliation took from the files into the index. Runs on
    the sink's writer thread.
    """
    recorded = store.index.position(state.stream, state.created)
    if recorded is None:
        upto, check_upto = state.acked, max(state.delivered, state.acked)
        if check_upto > upto:
            log.warning(
                "the index does not know its place in %s: reading from %d, and looking up "
                "the events up to %d by id",
                state.stream,
                upto + 1,
                check_upto,
            )
    else:
        # A check window left by the start before stays open until it is passed.
        upto, check_upto = recorded
        if recovered:
            check_upto = max(check_upto, state.delivered)
    check_upto = max(check_upto, upto)
    store.index.set_position(state.stream, state.created, upto, check_upto)
    store.upto, store.check_upto = upto, check_upto
    return upto
