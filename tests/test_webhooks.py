"""Webhook parts without a broker: signatures, secrets, backoff, what a submission may ask."""

from __future__ import annotations

import base64
import hashlib
import hmac

import msgspec
import pytest

from gateway.bus.contract import JobRequest
from gateway.settings import ApiKey, Settings, SettingsError
from gateway.webhooks.keys import SigningKeys
from gateway.webhooks.policy import WebhookPolicy, WebhookRefused
from gateway.webhooks.retry import retry_delay
from gateway.webhooks.signing import SecretError, new_secret, secret_key, signed_headers, verify

SECRET = "whsec_" + base64.b64encode(bytes(range(32))).decode()


def test_a_signature_is_hmac_sha256_of_id_timestamp_and_body() -> None:
    body = b'{"type":"job.succeeded"}'
    headers = signed_headers(secret_key(SECRET), "msg_1", body, timestamp=1_700_000_000)
    digest = hmac.new(bytes(range(32)), b"msg_1.1700000000." + body, hashlib.sha256).digest()
    assert headers == {
        "webhook-id": "msg_1",
        "webhook-timestamp": "1700000000",
        "webhook-signature": "v1," + base64.b64encode(digest).decode(),
    }
    assert verify(SECRET, headers, body, now=1_700_000_100)
    assert not verify(SECRET, headers, body + b" ", now=1_700_000_100)
    assert not verify(SECRET, headers, body, now=1_700_001_000)  # too old: a replay
    assert not verify(new_secret(), headers, body, now=1_700_000_100)


@pytest.mark.parametrize(
    "secret",
    ["", "whsec_", "whsec_not base64!", "secret", "whsec_" + base64.b64encode(b"x").decode()],
)
def test_a_malformed_secret_is_refused(secret: str) -> None:
    with pytest.raises(SecretError):
        secret_key(secret)
    with pytest.raises(SettingsError, match="webhook_secret"):
        SigningKeys(Settings(webhook_secret=secret))


def test_a_key_with_its_own_secret_signs_its_jobs_and_needs_a_name() -> None:
    own = new_secret()
    keys = SigningKeys(
        Settings(
            webhook_secret=SECRET,
            api_keys=[ApiKey(key="plain:k", role="user", name="alice", webhook_secret=own)],
        )
    )
    assert keys.for_caller("alice") == secret_key(own)
    assert keys.for_caller("bob") == keys.for_caller(None) == secret_key(SECRET)
    with pytest.raises(SettingsError, match="no name"):
        SigningKeys(Settings(api_keys=[ApiKey(key="plain:k", webhook_secret=own)]))


def test_the_backoff_doubles_up_to_its_cap_with_jitter() -> None:
    for attempt, ceiling in [(1, 5.0), (2, 10.0), (3, 20.0), (12, 3600.0), (10_000, 3600.0)]:
        delays = [retry_delay(attempt, 5.0, 3600.0) for _ in range(50)]
        assert all(ceiling / 2 <= delay <= ceiling for delay in delays)
        assert len(set(delays)) > 1


async def test_the_settings_defaults_fill_a_request_and_an_empty_url_opts_out() -> None:
    policy = WebhookPolicy(Settings(webhook_secret=SECRET, webhook_url="http://93.184.215.14/all"))
    filled = await policy.resolved(JobRequest(workflow={}))
    assert filled.webhook_url == "http://93.184.215.14/all"
    assert filled.webhook_events == ["cancelled", "failed", "succeeded"]
    none = await policy.resolved(JobRequest(workflow={}, webhook_url=""))
    assert none.webhook_url is None
    without_secret = WebhookPolicy(Settings())
    with pytest.raises(WebhookRefused, match="webhook_secret"):
        await without_secret.resolved(JobRequest(workflow={}, webhook_url="http://93.184.215.14/"))
    with pytest.raises(SettingsError, match="webhook_events"):
        WebhookPolicy(Settings(webhook_events=["history"]))


@pytest.mark.parametrize(
    "setting",
    [
        {"webhook_timeout_s": 0},
        {"webhook_retry_base_s": -1},
        {"webhook_retry_window_s": -5},
        {"webhook_concurrency": 0},
        {"webhook_events": []},
        {"webhook_url": "ftp://example.com/"},
    ],
)
def test_webhook_settings_that_cannot_work_are_refused(setting: dict[str, object]) -> None:
    name = next(iter(setting))
    with pytest.raises(SettingsError, match=name):
        WebhookPolicy(msgspec.convert(setting, Settings))
