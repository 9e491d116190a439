"""Which requests the SDK sends again after a 503 or 429, and how long it waits: never a
submission that could make a second job, never past its `retry_for`."""

from __future__ import annotations

from datetime import UTC, datetime
from email.utils import format_datetime

import pytest

from sdk._protocol import batch_id_for, submit_headers
from sdk._retry import Retries, repeatable, retry_after_s

NOW = 1_765_000_000.0


def test_only_reads_and_submissions_that_name_their_job_are_sent_again() -> None:
    assert repeatable("GET", "/workflow/status/j1", {})
    assert repeatable("DELETE", "/servers/gpu1", {})
    assert repeatable("POST", "/logs/query", {}, {"sql": "SELECT 1"})
    assert not repeatable("POST", "/workflow/submit", {}, {"workflow": {}})
    assert not repeatable("POST", "/workflow/execute", None, {"workflow": {}, "job_id": None})
    assert not repeatable("POST", "/workflow/batch", {}, {"workflow": {}, "overrides": [{}]})
    assert repeatable("POST", "/workflow/submit", {"Idempotency-Key": "k1"}, {"workflow": {}})
    assert repeatable("POST", "/workflow/execute", {}, {"workflow": {}, "job_id": "j1"})
    assert repeatable("POST", "/workflow/batch", {}, {"workflow": {}, "batch_id": "b1"})
    assert not repeatable("POST", "/servers", {}, {"name": "gpu1", "address": "h:1"})
    assert not repeatable("POST", "/workflow/cancel/j1", {})


def test_a_submission_gets_a_key_of_its_own_only_while_retries_are_on() -> None:
    made = submit_headers(None, {"workflow": {}}, 30.0)["Idempotency-Key"]
    assert made != submit_headers(None, {"workflow": {}}, 30.0)["Idempotency-Key"]
    assert submit_headers("mine", {"workflow": {}}, 30.0) == {"Idempotency-Key": "mine"}
    assert submit_headers(None, {"workflow": {}, "job_id": "j1"}, 30.0) == {}
    assert submit_headers(None, {"workflow": {}}, 0.0) == {}
    # A batch takes a batch id or a key, not both.
    assert batch_id_for(None, None, 30.0) is not None
    assert batch_id_for(None, "key", 30.0) is None
    assert batch_id_for("b1", None, 30.0) == "b1"
    assert batch_id_for(None, None, 0.0) is None


def test_retry_after_in_seconds_or_as_a_date() -> None:
    assert retry_after_s("3") == 3.0
    later = format_datetime(datetime.fromtimestamp(NOW + 10, UTC), usegmt=True)
    assert retry_after_s(later, lambda: NOW) == pytest.approx(10.0)
    assert retry_after_s(later, lambda: NOW + 60) == 0.0  # a date past: at once
    for unusable in (None, "", "soon", "nan"):
        assert retry_after_s(unusable) is None


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_waits_are_jittered_bounded_and_said_when_given_up() -> None:
    clock = Clock()
    retries = Retries(5.0, clock=clock, draw=lambda: 1.0)
    assert retries.wait(429, "1") == pytest.approx(1.25)  # Retry-After, stretched by the jitter
    clock.now += 1.25
    assert retries.wait(429, None) == pytest.approx(0.625)  # backoff: 0.25 s doubling
    clock.now += 0.625
    assert retries.wait(500, None) is None  # not a status that is retried
    assert retries.wait(429, "10") is None  # past the budget: not started
    assert retries.tries == 4
    assert retries.account() == (
        "gave up after 4 tries in 1.9 s: the gateway asked to wait 10 s, past the 5 s that "
        "retry_for allows"
    )
    spent = Retries(1.0, clock=clock, draw=lambda: 0.0)
    clock.now += 0.9
    assert spent.wait(429, None) is None  # a backoff longer than what is left
    assert spent.account() == "gave up after 1 try in 0.9 s (retry_for is 1 s)"
    assert Retries(0.0).account() == "not retried (retry_for is 0)"


def test_a_503_is_retried_only_when_the_gateway_says_when() -> None:
    clock = Clock()
    briefly = Retries(5.0, clock=clock, draw=lambda: 0.0)
    assert briefly.wait(503, "1") == pytest.approx(1.0)  # NATS electing a leader, say
    clock.now += 1.0
    assert briefly.wait(503, "1") == pytest.approx(1.0)
    lasting = Retries(5.0, clock=clock, draw=lambda: 0.0)
    assert lasting.wait(503, None) is None  # no log sink, no storage: raised at once
    assert lasting.account() is None
    assert Retries(0.0).account() == "not retried (retry_for is 0)"
