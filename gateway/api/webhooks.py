"""`POST /webhooks/{delivery_id}/redeliver`: send a job's webhook for one event again."""

from __future__ import annotations

import re
from typing import Any, Final

import msgspec
import nats.errors
from litestar import Request, post
from litestar.params import FromPath

from gateway.api.errors import ApiError, error_responses
from gateway.api.logs import ask_sink, scope_of
from gateway.api.services import ServicesDep
from gateway.bus.contract import WebhookSend, encode, new_id, now
from gateway.logsink.client import query_logs

# Delivery ids are `msg_` and an event id (contract.delivery_id_for); anything else names none.
_DELIVERY_ID: Final = re.compile(r"msg_[A-Za-z0-9]{1,64}")


class Redelivery(msgspec.Struct, kw_only=True):
    delivery_id: str
    job_id: str
    redelivery: str
    """This redelivery's own token: its attempts carry it in `webhook_deliveries.redelivery`."""


@post(
    "/webhooks/{delivery_id:str}/redeliver",
    tags=["webhooks"],
    status_code=202,
    responses=error_responses(404, 503, 504),
)
async def redeliver(
    delivery_id: FromPath[str], services: ServicesDep, request: Request[Any, Any, Any]
) -> Redelivery:
    """Send a webhook delivery again (its owner, or an admin); retried as a new one would be.

    The receiver gets the same `webhook-id`, so it can tell a delivery it already took.
    """
    if _DELIVERY_ID.fullmatch(delivery_id) is None:
        raise _unknown(delivery_id)
    # The id is checked above, so it can stand in the SQL as a literal; the query runs in the
    # caller's scope, so another caller's delivery is not found, as one that does not exist.
    sql = (
        "SELECT d.job_id, d.event_type, d.event_seq, d.stream_seq, d.url, j.caller, j.batch_id "
        "FROM webhook_deliveries d LEFT JOIN jobs j USING (job_id) "
        f"WHERE d.delivery_id = '{delivery_id}' ORDER BY d.ts LIMIT 1"
    )
    found = await ask_sink(
        query_logs(services.nc, services.subjects, sql, caller=scope_of(request))
    )
    if not found.rows:
        raise _unknown(delivery_id)
    job_id, kind, seq, stream_seq, url, caller, batch_id = found.rows[0]
    token = new_id()[:12]
    send = WebhookSend(
        delivery_id=delivery_id,
        job_id=job_id,
        seq=seq,
        event_type=kind,
        stream_seq=stream_seq,
        url=url,
        caller=caller,
        created_at=now(),
        batch_id=batch_id,
        redelivery=token,
    )
    try:
        await services.js.publish(
            services.subjects.webhook_sends(job_id),
            encode(send),
            headers={"Nats-Msg-Id": f"{delivery_id}.{token}"},
        )
    except nats.errors.Error as exc:
        raise ApiError(503, "unavailable", f"the redelivery could not be queued: {exc}") from None
    return Redelivery(delivery_id=delivery_id, job_id=job_id, redelivery=token)


def _unknown(delivery_id: str) -> ApiError:
    return ApiError(404, "unknown_delivery", f"no webhook delivery {delivery_id!r}")
