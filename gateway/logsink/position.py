"""Where in the EVENTS stream a starting sink reads from.

The index records how far into the stream it holds every event (store.py), and the sink starts
just after that. An index that does not know its position (new, rebuilt, made by an older
build, or of a stream made anew under the same name) starts where the consumer had
acknowledged, everything acknowledged being stored; what came after and is in the index
already is told by its seq (store.py).
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


def settle_position(store: LogStore, state: StreamState) -> int:
    """Set the store's `upto`, record it as the index's position, and return it.

    Runs on the sink's writer thread.
    """
    upto = store.index.position(state.stream, state.created)
    if upto is None:
        upto = state.acked
        if state.delivered > upto:
            log.warning(
                "the index does not know its place in %s: reading from %d, after what the "
                "sink's consumer had acknowledged",
                state.stream,
                upto + 1,
            )
    store.index.set_position(state.stream, state.created, upto)
    store.upto = upto
    return upto
