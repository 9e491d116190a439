"""Every gateway sends webhooks: work items from one durable consumer that all of them share.

A work item (WebhookSend) stays in stream WEBHOOKS until an attempt settles it: acknowledged
once delivered, refused for good (410 Gone, a target no longer allowed) or given up (its retry
window is over); otherwise it is handed back with `nak(delay)` and the broker delivers it again
after the backoff, to whichever gateway asks next. So a delivery outlives the gateway that
tried it, and several gateways never send one event twice (short of a gateway dying between a
receiver's answer and the acknowledgement: then the next attempt, after the consumer's ack
wait, sends it again under the same `webhook-id`).

Each attempt is published on `<prefix>.webhooks.attempts.<job_id>` for the log sink, which
writes it into the job's log and the index's `webhook_deliveries`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Final

import httpx
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import api
from nats.js.errors import NotFoundError

from gateway.bus.contract import (
    ContractError,
    Subjects,
    WebhookAttempt,
    WebhookOutcome,
    WebhookSend,
    decode,
    decode_event,
    encode,
    now,
)
from gateway.comfyui.addresses import Allowlist
from gateway.comfyui.tls import tls_context
from gateway.lifecycle import wait_event
from gateway.settings import Settings
from gateway.webhooks.keys import SigningKeys
from gateway.webhooks.policy import check_settings
from gateway.webhooks.retry import retry_delay
from gateway.webhooks.sending import Result, body_of, post

log = logging.getLogger(__name__)

CONSUMER: Final = "webhooks"
# A fetch waits this long for work; a stopping gateway notices within it, so it is short: a
# gateway's stop waits out the fetch under way (and idle fetches cost the broker next to nothing).
_FETCH_WAIT_S: Final = 0.25
# The pause before trying again after the broker refused (restarting, say).
_RETRY_S: Final = 1.0
# Beyond an attempt's own time limit: resolving, reading the event, recording the attempt.
_ACK_WAIT_MARGIN_S: Final = 20.0


def consumer_config(subjects: Subjects, settings: Settings) -> api.ConsumerConfig:
    """The shared durable consumer of work items. No inactivity threshold: it must outlive
    every gateway; no limit on items waiting out their backoff, which would stall the rest."""
    return api.ConsumerConfig(
        durable_name=CONSUMER,
        description="ComfyAutomate gateways: webhook deliveries",
        filter_subject=subjects.all_webhook_sends,
        deliver_policy=api.DeliverPolicy.ALL,
        ack_policy=api.AckPolicy.EXPLICIT,
        ack_wait=settings.webhook_timeout_s + _ACK_WAIT_MARGIN_S,
        max_deliver=-1,
        max_ack_pending=-1,
    )


class WebhookWorker:
    """Takes work items and makes one attempt of each; `run` until told to stop."""

    def __init__(
        self,
        nc: Client,
        settings: Settings,
        on_attempt: Callable[[WebhookOutcome], None] | None = None,
    ) -> None:
        """`on_attempt` hears what each attempt came to (the gateway's metrics count them)."""
        check_settings(settings)
        self._on_attempt = on_attempt
        self._nc = nc
        self._js = nc.jetstream()
        self._settings = settings
        self._subjects = Subjects(settings.subject_prefix)
        self._keys = SigningKeys(settings)
        self._allowlist = Allowlist(settings.webhook_allowlist)
        self._slots = max(1, settings.webhook_concurrency)

    async def run(self, stop: asyncio.Event) -> None:
        """Deliver until `stop` is set; then finish the attempts under way and return."""
        stream = self._subjects.webhooks_stream
        while True:
            try:
                # Created or updated here (pull_subscribe would keep an older definition).
                await self._js.add_consumer(stream, consumer_config(self._subjects, self._settings))
                break
            except nats.errors.Error as exc:
                log.warning("webhooks: cannot create the consumer now (%s); trying again", exc)
                if await wait_event(stop, _RETRY_S):
                    return
        sub = await self._js.pull_subscribe_bind(durable=CONSUMER, stream=stream)
        running: set[asyncio.Task[None]] = set()
        try:
            async with httpx.AsyncClient(
                trust_env=False, follow_redirects=False, verify=tls_context(trust_env=False)
            ) as http:
                while not stop.is_set():
                    free = self._slots - len(running)
                    if free <= 0:
                        await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                        continue
                    try:
                        messages = await sub.fetch(free, timeout=_FETCH_WAIT_S)
                    except TimeoutError:  # nats-py's or asyncio's: nothing to do
                        continue
                    except nats.errors.Error as exc:  # the broker restarting, say
                        log.warning("webhooks: fetching work failed (%s); trying again", exc)
                        await wait_event(stop, _RETRY_S)
                        continue
                    for msg in messages:
                        task = asyncio.create_task(self._attempt(http, msg))
                        running.add(task)
                        task.add_done_callback(running.discard)
                if running:
                    await asyncio.wait(running)
        finally:
            await sub.unsubscribe()

    async def _attempt(self, http: httpx.AsyncClient, msg: Msg) -> None:
        try:
            send = decode(msg.data, WebhookSend)
        except ContractError as exc:
            log.error("dropping a webhook work item that does not decode: %s", exc)
            await msg.term()
            return
        attempt = msg.metadata.num_delivered
        try:
            result = await self._send(http, send)
        except Exception as exc:  # the broker, say: the item is tried again after the backoff
            log.exception("webhook %s of job %s: the attempt failed", send.delivery_id, send.job_id)
            result = Result(error=f"{type(exc).__name__}: {exc}"[:300])
        await self.settle(msg, send, attempt, result)

    async def _send(self, http: httpx.AsyncClient, send: WebhookSend) -> Result:
        key = self._keys.for_caller(send.caller)
        if key is None:
            return Result(final=True, error="no webhook secret is set to sign it with")
        try:
            raw = await self._js.get_msg(self._subjects.events_stream, seq=send.stream_seq)
        except NotFoundError:
            return Result(final=True, error="the event is no longer kept")
        if raw.subject != self._subjects.events(send.job_id) or raw.data is None:
            return Result(final=True, error="the event is no longer kept")
        try:
            event = decode_event(raw.data)
        except ContractError as exc:
            return Result(final=True, error=f"the event cannot be read: {exc}"[:300])
        return await post(
            http,
            send.url,
            msg_id=send.delivery_id,
            body=body_of(send.event_type, event.ts, raw.data, send.batch_id),
            key=key,
            allowlist=self._allowlist,
            timeout_s=self._settings.webhook_timeout_s,
        )

    async def settle(self, msg: Msg, send: WebhookSend, attempt: int, result: Result) -> None:
        """Record what attempt number `attempt` came to, then acknowledge or hand back the item.

        The one place an attempt's outcome is known.
        """
        at = now()
        outcome: WebhookOutcome
        next_at: float | None = None
        if result.delivered:
            outcome = "delivered"
        elif result.final:
            outcome = "failed"
        else:
            settings = self._settings
            delay = retry_delay(
                attempt, settings.webhook_retry_base_s, settings.webhook_retry_max_s
            )
            if at + delay > send.created_at + settings.webhook_retry_window_s:
                outcome = "gave_up"
            else:
                outcome, next_at = "retrying", at + delay
        if self._on_attempt is not None:
            self._on_attempt(outcome)
        record = WebhookAttempt(
            attempt_id=f"{send.delivery_id}.{send.redelivery or 0}.{attempt}",
            delivery_id=send.delivery_id,
            job_id=send.job_id,
            event_type=send.event_type,
            event_seq=send.seq,
            stream_seq=send.stream_seq,
            attempt=attempt,
            redelivery=send.redelivery,
            url=send.url,
            outcome=outcome,
            status_code=result.status_code,
            latency_ms=result.latency_ms,
            error=result.error,
            ts=at,
            next_attempt_at=next_at,
        )
        log.log(
            logging.INFO if outcome in ("delivered", "retrying") else logging.WARNING,
            "webhook %s of job %s, attempt %d: %s%s",
            send.delivery_id,
            send.job_id,
            attempt,
            outcome,
            f" ({result.error})" if result.error else "",
        )
        try:
            await self._js.publish(
                self._subjects.webhook_attempts(send.job_id),
                encode(record),
                headers={"Nats-Msg-Id": record.attempt_id},
            )
        except Exception:  # the delivery itself is settled all the same: never sent twice
            log.exception("the attempt %s could not be recorded", record.attempt_id)
        if next_at is None:
            await msg.ack()
        else:
            await msg.nak(delay=next_at - at)
