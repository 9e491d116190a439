"""The circuit breaker's states, on a clock the test moves (plugins/comfyui/breaker.py)."""

from __future__ import annotations

from plugins.comfyui.breaker import Breaker


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_it_trips_after_faults_in_a_row_and_a_success_resets_the_count() -> None:
    clock = Clock()
    breaker = Breaker(trip_after=3, cooldown_s=30, clock=clock)
    breaker.server_fault("500 on /prompt")
    breaker.server_fault("500 on /prompt")
    breaker.succeeded()
    breaker.server_fault("500 on /prompt")
    breaker.server_fault("500 on /prompt")
    assert breaker.reason() is None
    breaker.server_fault("disk full")
    reason = breaker.reason()
    assert reason is not None and "disk full" in reason and "30 s" in reason


def test_after_the_cooldown_one_job_probes_and_a_fault_doubles_the_wait() -> None:
    clock = Clock()
    breaker = Breaker(trip_after=1, cooldown_s=30, clock=clock)
    breaker.server_fault("unreachable")
    clock.now += 29
    assert breaker.reason() is not None  # answering health checks meanwhile changes nothing
    clock.now += 1
    assert breaker.reason() is None  # probing: the next job may go there
    breaker.server_fault("unreachable")
    assert breaker.reason() is not None
    clock.now += 59
    assert breaker.reason() is not None
    clock.now += 1
    assert breaker.reason() is None
    breaker.succeeded()
    breaker.server_fault("unreachable")  # closed again, with the first cooldown
    clock.now += 30
    assert breaker.reason() is None
