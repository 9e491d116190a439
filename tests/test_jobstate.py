from __future__ import annotations

from typing import Any

import pytest

from gateway.bus import contract as c
from gateway.bus.jobstate import apply_event, attempts_left, ends_attempt

REQUEST = c.JobRequest(
    workflow={"1": {"class_type": "X", "inputs": {}}}, priority=3, max_attempts=2
)


def ev(kind: type[Any], seq: int, data: Any, ts: float = 0.0, server_id: str | None = None) -> Any:
    return kind(
        event_id=f"e{seq}", job_id="j", seq=seq, ts=ts or float(seq), data=data, server_id=server_id
    )


def queued() -> c.JobRecord:
    record = apply_event(None, ev(c.Queued, 1, c.QueuedData(request=REQUEST, log_file_path="p")))
    assert record is not None
    return record


def test_a_queued_event_creates_the_record() -> None:
    record = queued()
    assert (record.status, record.priority, record.max_attempts) == ("queued", 3, 2)
    assert record.log_file_path == "p"
    assert apply_event(None, ev(c.Running, 2, c.RunningData(attempt=1, prompt_id="p"))) is None


def test_the_happy_path() -> None:
    r = queued()
    r = apply_event(r, ev(c.Dispatched, 2, c.DispatchedData(server_id="s", attempt=1)))
    assert r is not None and (r.status, r.server_id, r.attempt) == ("dispatched", "s", 1)
    r = apply_event(r, ev(c.Running, 3, c.RunningData(attempt=1, prompt_id="p"), ts=10))
    assert r is not None and (r.status, r.runs, r.started_at) == ("running", 1, 10)
    # Node events are the log's business; they leave the record alone.
    assert (
        apply_event(r, ev(c.NodeProgress, 4, c.NodeProgressData(node_id="1", value=1, max=2)))
        is None
    )
    r = apply_event(r, ev(c.Succeeded, 5, c.SucceededData(attempt=1, outputs=[]), ts=12))
    assert r is not None and (r.status, r.finished_at, r.last_seq) == ("succeeded", 12, 5)
    # Nothing moves a finished job.
    assert apply_event(r, ev(c.Failed, 6, c.FailedData(code="x", message="m"))) is None


def test_an_event_seen_twice_changes_nothing() -> None:
    r = apply_event(queued(), ev(c.Dispatched, 2, c.DispatchedData(server_id="s", attempt=1)))
    assert r is not None
    assert apply_event(r, ev(c.Dispatched, 2, c.DispatchedData(server_id="t", attempt=1))) is None


def test_a_late_event_of_a_superseded_attempt_is_ignored_but_its_end_ends_the_job() -> None:
    r: Any = queued()
    r = apply_event(r, ev(c.Dispatched, 2, c.DispatchedData(server_id="a", attempt=1)))
    r = apply_event(r, ev(c.Running, 3, c.RunningData(attempt=1, prompt_id="p")))
    r = apply_event(r, ev(c.Retried, 4, c.RetriedData(attempt=1, reason="server a died")))
    assert (r.status, r.server_id, r.runs) == ("queued", None, 1)
    assert attempts_left(r)
    handed_back = r
    r = apply_event(r, ev(c.Dispatched, 5, c.DispatchedData(server_id="b", attempt=2)))
    # Server a comes back and reports the old attempt's progress: too late.
    assert apply_event(r, ev(c.Running, 6, c.RunningData(attempt=1, prompt_id="p"))) is None
    assert apply_event(r, ev(c.Retried, 6, c.RetriedData(attempt=1, reason="again"))) is None
    # Its success, if the log took it (it takes one end, whoever writes it), is the result.
    output = c.OutputFile(
        node_id="3", filename="a.png", key="j/a.png", size=1, content_type="image/png", url="u"
    )
    late = c.SucceededData(attempt=1, outputs=[output])
    done = apply_event(r, ev(c.Succeeded, 6, late, server_id="a"))
    # The record names the run that ended it, on server a, not the attempt bound since.
    assert (done.status, done.attempt, done.server_id, done.outputs) == (
        "succeeded",
        1,
        "a",
        [output],
    )
    # And so when it ends the job while it waits for its next attempt.
    failed = c.FailedData(code="execution_error", message="m", attempt=1)
    ended = apply_event(handed_back, ev(c.Failed, 5, failed, server_id="a"))
    assert (ended.status, ended.attempt, ended.server_id) == ("failed", 1, "a")
    r = apply_event(r, ev(c.Running, 6, c.RunningData(attempt=2, prompt_id="q")))
    assert (r.status, r.runs) == ("running", 2)
    assert not attempts_left(r)


@pytest.mark.parametrize(
    ("event", "status"),
    [
        (ev(c.Cancelled, 3, c.CancelledData()), "cancelled"),
        (ev(c.Failed, 3, c.FailedData(code="unschedulable", message="m")), "failed"),
    ],
)
def test_a_job_can_end_before_it_is_dispatched(event: Any, status: str) -> None:
    r = apply_event(queued(), event)
    assert r is not None and r.status == status


def test_a_try_that_failed_before_running_counts_and_a_stopping_adapter_does_not() -> None:
    r: Any = apply_event(queued(), ev(c.Dispatched, 2, c.DispatchedData(server_id="a", attempt=1)))
    r = apply_event(r, ev(c.Retried, 3, c.RetriedData(attempt=1, reason="500", started=False)))
    assert (r.status, r.runs) == ("queued", 1)
    r = apply_event(r, ev(c.Dispatched, 4, c.DispatchedData(server_id="b", attempt=2)))
    stopping = c.RetriedData(
        attempt=2, reason="the adapter is stopping", started=False, counts=False
    )
    r = apply_event(r, ev(c.Retried, 5, stopping))
    assert (r.status, r.runs) == ("queued", 1)
    r = apply_event(r, ev(c.Dispatched, 6, c.DispatchedData(server_id="b", attempt=3)))
    r = apply_event(r, ev(c.Running, 7, c.RunningData(attempt=3, prompt_id="p")))
    r = apply_event(r, ev(c.Retried, 8, c.RetriedData(attempt=3, reason="died", started=True)))
    assert (r.status, r.runs) == ("queued", 2)  # a started try counted once, at running


def test_an_attempt_ends_with_its_terminal_event_or_its_hand_back() -> None:
    done = ev(c.Succeeded, 5, c.SucceededData(attempt=2))
    back = ev(c.Retried, 5, c.RetriedData(attempt=2, reason="gone", started=True))
    running = ev(c.Running, 4, c.RunningData(attempt=2, prompt_id="p"))
    assert ends_attempt(done, 2) and ends_attempt(back, 2)
    assert not ends_attempt(done, 3)  # an earlier attempt's end says nothing of this one
    assert not ends_attempt(running, 2)
