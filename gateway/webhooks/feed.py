"""From an event to a work item: the leading balancer queues each event a webhook wants.

The leader applies every event once, in order, through its durable consumer, and holds each
open job's record (which names the webhook): the one place that sees every event of a job with
the job's webhook at hand. The item is stored before the event is acknowledged, so a crash
replays the event and the item is queued again; its `Nats-Msg-Id` (the delivery id) makes the
stream keep it once.
"""

from __future__ import annotations

import logging

from nats.js import JetStreamContext
from nats.js.errors import BadRequestError

from gateway.bus.contract import (
    Event,
    JobRecord,
    Subjects,
    WebhookSend,
    delivery_id_for,
    encode,
    event_type,
    now,
)

log = logging.getLogger(__name__)

_PUBLISH_TIMEOUT_S = 5.0


def wanted(record: JobRecord, event: Event) -> bool:
    """Whether the job's webhook asks for this event."""
    return record.webhook is not None and event_type(event) in record.webhook.events


async def feed(
    js: JetStreamContext, subjects: Subjects, record: JobRecord, event: Event, stream_seq: int
) -> None:
    """Queue the delivery of `event` (at `stream_seq` in EVENTS) if the job's webhook wants it.

    A broker that does not answer raises, so that the event is applied again later; a
    refusal that would come again every time is logged and the delivery dropped.
    """
    if record.webhook is None or not wanted(record, event):
        return
    send = WebhookSend(
        delivery_id=delivery_id_for(event.event_id),
        job_id=event.job_id,
        seq=event.seq,
        event_type=event_type(event),
        stream_seq=stream_seq,
        url=record.webhook.url,
        caller=record.caller,
        created_at=now(),
        batch_id=record.batch_id,
    )
    try:
        await js.publish(
            subjects.webhook_sends(event.job_id),
            encode(send),
            timeout=_PUBLISH_TIMEOUT_S,
            headers={"Nats-Msg-Id": send.delivery_id},
        )
    except BadRequestError as exc:
        log.error(
            "job %s: the webhook delivery of event %d was refused by the broker: %s",
            event.job_id,
            event.seq,
            exc,
        )
