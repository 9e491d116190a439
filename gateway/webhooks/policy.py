"""What a submission may ask of webhooks, checked where jobs are accepted (REST and NATS)."""

from __future__ import annotations

import asyncio

import msgspec

from gateway.bus.contract import WEBHOOK_EVENT_TYPES, JobRequest
from gateway.comfyui.addresses import Allowlist
from gateway.settings import Settings, SettingsError
from gateway.webhooks.keys import SigningKeys
from gateway.webhooks.target import TargetRefused, checked_addresses, parse_url

# A submission waits this long at most for its webhook host to resolve.
RESOLVE_WITHIN_S = 5.0


class WebhookRefused(ValueError):
    """A submission's webhook cannot be taken; the message says what to change."""


def event_problems(events: list[str]) -> list[str]:
    """Why a list of webhook event types is not usable; empty when it is."""
    if not events:
        return ["webhook_events is empty: name at least one event type"]
    unknown = sorted(set(events) - WEBHOOK_EVENT_TYPES)
    if unknown:
        return [
            f"webhook_events: {', '.join(map(repr, unknown))} cannot be sent; the event types "
            f"are {', '.join(sorted(WEBHOOK_EVENT_TYPES))}"
        ]
    return []


def check_settings(settings: Settings) -> None:
    """Refuse webhook settings that could not work (SettingsError naming the setting)."""
    for name in ("webhook_timeout_s", "webhook_retry_base_s", "webhook_retry_max_s"):
        value = getattr(settings, name)
        if not 0 < value <= 24 * 3600:
            raise SettingsError(f"{name} must be over 0 and at most a day, not {value!r}")
    if not 0 <= settings.webhook_retry_window_s <= 30 * 24 * 3600:
        raise SettingsError("webhook_retry_window_s must be between 0 and 30 days")
    if settings.webhook_concurrency < 1:
        raise SettingsError("webhook_concurrency must be 1 or more")
    problems = event_problems(list(settings.webhook_events))
    if problems:
        raise SettingsError(problems[0])


class WebhookPolicy:
    """Fills in a request's webhook from the settings' defaults, and checks it."""

    def __init__(self, settings: Settings) -> None:
        self._default_url = settings.webhook_url or None
        self._default_events = list(settings.webhook_events)
        self._allowlist = Allowlist(settings.webhook_allowlist)
        self.keys = SigningKeys(settings)
        check_settings(settings)
        if self._default_url is not None:
            try:
                parse_url(self._default_url)
            except TargetRefused as exc:
                raise SettingsError(f"webhook_url: {exc}") from None

    async def resolved(self, request: JobRequest) -> JobRequest:
        """`request` with its webhook as it will be kept; WebhookRefused if it cannot be."""
        url = self._default_url if request.webhook_url is None else request.webhook_url
        if not url:
            return msgspec.structs.replace(request, webhook_url=None, webhook_events=None)
        events = self._default_events if request.webhook_events is None else request.webhook_events
        problems = event_problems(events)
        if problems:
            raise WebhookRefused(problems[0])
        if self.keys.for_caller(request.caller) is None:
            raise WebhookRefused(
                "webhooks are signed, and no secret is set: the gateway's webhook_secret "
                "(or the API key's) is needed before a job can have a webhook_url"
            )
        try:
            parsed = parse_url(url)
            async with asyncio.timeout(RESOLVE_WITHIN_S):
                await checked_addresses(parsed, self._allowlist)
        except TargetRefused as exc:
            raise WebhookRefused(str(exc)) from None
        except TimeoutError:
            raise WebhookRefused(f"the webhook host of {url!r} did not resolve in time") from None
        return msgspec.structs.replace(request, webhook_url=url, webhook_events=sorted(set(events)))
