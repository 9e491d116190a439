"""Callers share the pending queue (gateway/balancer/queue.py): weighted fair queuing, caps.

The model-based test drives one PendingQueue through seeded random interleavings of what the
leader does to it (submissions, floods, cancels, bindings in order and out of it, ends,
hand-backs, caps and weights that change, a new leader rebuilding it from the records) and
checks after every step: no job lost or listed twice; within a caller, priority then age;
across callers, a caller's next job has at most 1 + w_other/w_own jobs of any other caller
ahead of it; a caller at its cap shows no job, one with room for k at most k; and nothing
starves: a caller's first job is bound within a bounded number of bindings made in order.
A failure prints its seed; `QUEUE_SEED=<seed>` replays it, `QUEUE_STEPS=2000` runs longer.
"""

from __future__ import annotations

import math
import os
import random
from collections import Counter
from typing import Final

from gateway.balancer.queue import PendingQueue
from gateway.balancer.shares import Shares, caller_key
from gateway.bus.contract import JobRecord, JobStatus

CALLERS: Final = ("alice", "bob", "carol", "dave", None)
WEIGHTS: Final = (0.25, 0.5, 1.0, 2.0, 4.0)
STEPS: Final = int(os.environ.get("QUEUE_STEPS", "200"))
RUNS: Final = 4
WINDOW: Final = 8
ALL: Final = 10**6


def record(
    job_id: str, submitted_at: float, caller: str | None = None, priority: int = 0
) -> JobRecord:
    return JobRecord(
        job_id=job_id,
        status=JobStatus.QUEUED,
        submitted_at=submitted_at,
        updated_at=submitted_at,
        log_file_path="",
        priority=priority,
        caller=caller,
    )


def flood(queue: PendingQueue, caller: str, jobs: int, start: float = 0.0) -> list[str]:
    ids = [f"{caller}-{k}" for k in range(jobs)]
    for k, job_id in enumerate(ids):
        queue.push(record(job_id, start + k, caller))
    return ids


def bind_first(queue: PendingQueue, times: int) -> list[str]:
    """Bind the head of the queue `times` times: what a fleet of identical servers does."""
    bound = []
    for _ in range(times):
        job_id = queue.head(1)[0]
        queue.bound(job_id)
        bound.append(job_id)
    return bound


def test_a_flood_does_not_delay_another_callers_job() -> None:
    queue = PendingQueue()
    flood(queue, "heavy", 1000)
    bind_first(queue, 10)
    queue.push(record("light-0", 2000.0, "light"))
    assert queue.head(1) == ["light-0"]
    # And a caller that keeps submitting one job at a time alternates with the flood.
    bound = bind_first(queue, 1)
    queue.push(record("light-1", 2001.0, "light"))
    bound += bind_first(queue, 3)
    assert bound[0] == "light-0" and bound.index("light-1") <= 2


def test_weights_share_the_bindings() -> None:
    queue = PendingQueue(Shares(weights={"big": 3.0}))
    flood(queue, "big", 200)
    flood(queue, "small", 200)
    shares = Counter(job_id.split("-")[0] for job_id in bind_first(queue, 80))
    assert abs(shares["big"] - 60) <= 1 and abs(shares["small"] - 20) <= 1, shares


def test_a_light_weight_still_progresses() -> None:
    queue = PendingQueue(Shares(weights={"low": 0.05, "high": 20.0}))
    flood(queue, "high", 2000)
    flood(queue, "low", 10)
    bound = bind_first(queue, 1000)  # its share: 1 job in 401
    assert 2 <= sum(job_id.startswith("low") for job_id in bound) <= 3


def test_priority_orders_jobs_within_a_caller_not_across() -> None:
    queue = PendingQueue()
    flood(queue, "a", 3)
    queue.push(record("a-urgent", 10.0, "a", priority=5))
    queue.push(record("b-0", 5.0, "b"))
    order = queue.head(ALL)
    assert order.index("a-urgent") < order.index("a-0")
    assert order.index("b-0") <= 1  # a's priority does not put b behind all of a's jobs


def test_a_caller_at_its_cap_shows_no_job_and_one_with_room_for_k_at_most_k() -> None:
    queue = PendingQueue()
    flood(queue, "capped", 5)
    flood(queue, "roomy", 5)
    room = {"capped": 0, "roomy": 2}
    window = queue.head(ALL, room=room.get)
    assert window == ["roomy-0", "roomy-1"]
    room["capped"] = 1
    assert sorted(queue.head(ALL, room=room.get)) == ["capped-0", "roomy-0", "roomy-1"]


def test_one_callers_unplaceable_jobs_do_not_push_others_back() -> None:
    queue = PendingQueue()
    flood(queue, "pinned", 500)  # say, all pinned to a server that is busy for long
    flood(queue, "free", 500, start=1000.0)
    for _ in range(100):  # only the free caller's jobs are placeable: bound out of order
        window = queue.head(WINDOW)
        assert window.index("pinned-0") <= 2
        queue.bound(next(job for job in window if job.startswith("free")))
    # When the pinned caller's server frees up, it is owed one job, not a hundred: of the next
    # ten, its share (five) and that one.
    window = queue.head(10)
    assert [job.split("-")[0] for job in window].count("pinned") <= 6, window


def test_a_handed_back_job_is_first_of_its_caller_and_no_more_than_that() -> None:
    queue = PendingQueue()
    flood(queue, "heavy", 100)
    flood(queue, "light", 100, start=500.0)
    bound = bind_first(queue, 10)
    back = next(job for job in bound if job.startswith("heavy"))
    queue.push(record(back, float(back.split("-")[1]), "heavy"))  # its try failed
    order = queue.head(4)
    assert order.index(back) <= 1 and order[:2].count(back) == 1
    assert any(job.startswith("light") for job in order[:2]), order


def test_a_new_leader_interleaves_callers_from_the_records() -> None:
    records = [record(f"heavy-{k}", float(k), "heavy") for k in range(100)]
    records += [record("light-0", 1000.0, "light")]
    queue = PendingQueue()
    for rec in reversed(records):
        queue.push(rec)
    assert queue.head(2)[1] == "light-0" or queue.head(1) == ["light-0"]


# -- the model -------------------------------------------------------------------------------


class Model:
    """The queue under test, and what the leader knows of each job meanwhile."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.shares = self._draw_shares()
        self.queue = PendingQueue(self.shares)
        self.waiting: dict[str, JobRecord] = {}
        self.bound: dict[str, JobRecord] = {}
        self.clock = 0.0
        self.made = 0
        self.steps: list[str] = []
        # Caller -> (its first job in the window, bindings made in order since it was first).
        self.waited: dict[str, tuple[str, int]] = {}

    def _draw_shares(self) -> Shares:
        named = [c for c in CALLERS if c is not None]
        return Shares(
            weights={c: self.rng.choice(WEIGHTS) for c in named if self.rng.random() < 0.7},
            max_running=self.rng.choice((0, 0, 2, 3)),
            caller_max_running={
                c: self.rng.randint(1, 3) for c in named if self.rng.random() < 0.3
            },
        )

    def room(self, caller: str) -> int | None:
        cap = self.shares.cap(caller)
        if cap is None:
            return None
        return cap - sum(1 for r in self.bound.values() if caller_key(r.caller) == caller)

    def weight(self, caller: str) -> float:
        return self.shares.weight(caller)

    # -- actions -----------------------------------------------------------------------------

    def submit(self, caller: str | None, priority: int = 0) -> None:
        self.made += 1
        self.clock += 1.0
        rec = record(f"j{self.made}", self.clock, caller, priority)
        self.waiting[rec.job_id] = rec
        self.queue.push(rec)

    def step(self) -> None:
        rng = self.rng
        roll = rng.random()
        if roll < 0.25 or not self.waiting:
            caller = rng.choice(CALLERS)
            priority = rng.choice((0, 0, 0, 1))
            self.steps.append(f"submit {caller} p{priority}")
            self.submit(caller, priority)
        elif roll < 0.30:
            caller = rng.choice(CALLERS)
            count = rng.randint(3, 15)
            self.steps.append(f"flood {caller} x{count}")
            for _ in range(count):
                self.submit(caller)
        elif roll < 0.37:
            job_id = rng.choice(sorted(self.waiting))
            self.steps.append(f"cancel {job_id}")
            del self.waiting[job_id]
            self.queue.discard(job_id)
        elif roll < 0.62:
            self.bind(in_order=True)
        elif roll < 0.74:
            self.bind(in_order=False)
        elif roll < 0.86 and self.bound:
            job_id = rng.choice(sorted(self.bound))
            self.steps.append(f"end {job_id}")
            del self.bound[job_id]
        elif roll < 0.93 and self.bound:
            job_id = rng.choice(sorted(self.bound))
            self.steps.append(f"hand back {job_id}")
            rec = self.bound.pop(job_id)
            self.waiting[job_id] = rec
            self.queue.push(rec)
        elif roll < 0.96:
            self.shares = self._draw_shares()
            self.steps.append(f"shares {self.shares}")
            self.queue.shares = self.shares
            self.waited.clear()  # the bound follows the weights
        else:
            self.steps.append("new leader")
            self.queue = PendingQueue(self.shares)
            for rec in rng.sample(
                sorted(self.waiting.values(), key=lambda r: r.job_id), len(self.waiting)
            ):
                self.queue.push(rec)
            self.waited.clear()  # a new leader starts every caller equal

    def bind(self, *, in_order: bool) -> None:
        window = self.queue.head(WINDOW, room=self.room)
        if not window:
            self.steps.append("bind: nothing may be bound")
            return
        job_id = window[0] if in_order else self.rng.choice(window)
        self.steps.append(f"bind {job_id}{'' if in_order else ' (out of order)'}")
        self.queue.bound(job_id)
        rec = self.waiting.pop(job_id)
        self.bound[job_id] = rec
        if in_order:
            for caller, (first, since) in list(self.waited.items()):
                if first != job_id:
                    self.waited[caller] = (first, since + 1)

    # -- invariants --------------------------------------------------------------------------

    def check(self) -> None:
        everything = self.queue.head(ALL)
        assert len(everything) == len(set(everything)) == len(self.queue) == len(self.waiting)
        assert set(everything) == set(self.waiting), "a job lost, or one not waiting listed"
        by_caller: dict[str, list[JobRecord]] = {}
        for job_id in everything:
            rec = self.waiting[job_id]
            by_caller.setdefault(caller_key(rec.caller), []).append(rec)
        for caller, recs in by_caller.items():
            keys = [(-r.priority, r.submitted_at) for r in recs]
            assert keys == sorted(keys), f"{caller}'s jobs out of priority and age order"
        window = self.queue.head(ALL, room=self.room)
        listed = Counter(caller_key(self.waiting[j].caller) for j in window)
        for caller, recs in by_caller.items():
            room = self.room(caller)
            expected = len(recs) if room is None else max(0, min(room, len(recs)))
            assert listed[caller] == expected, f"{caller}: {listed[caller]} shown, room {room}"
        firsts: dict[str, int] = {}
        for index, job_id in enumerate(window):
            firsts.setdefault(caller_key(self.waiting[job_id].caller), index)
        for caller, index in firsts.items():
            ahead = Counter(caller_key(self.waiting[j].caller) for j in window[:index])
            for other, count in ahead.items():
                bound = math.floor(1 + self.weight(other) / self.weight(caller) + 1e-9)
                assert count <= bound, (
                    f"{count} jobs of {other!r} (weight {self.weight(other)}) ahead of "
                    f"{caller!r}'s next (weight {self.weight(caller)}); at most {bound}"
                )
        self._check_progress(window, firsts)

    def _check_progress(self, window: list[str], firsts: dict[str, int]) -> None:
        for caller in list(self.waited):
            if caller not in firsts:
                del self.waited[caller]  # nothing of it may be bound now: not waiting its turn
        for caller, index in firsts.items():
            first = window[index]
            seen = self.waited.get(caller)
            if seen is None or seen[0] != first:
                self.waited[caller] = (first, 0)
                continue
            others = {caller_key(c) for c in CALLERS} - {caller}
            limit = sum(2 + math.ceil(self.weight(o) / self.weight(caller)) for o in others)
            assert seen[1] <= limit, (
                f"{caller!r}'s next job {first} passed over by {seen[1]} bindings in order"
            )

    def drain(self) -> None:
        """Bind everything, ending bound jobs when caps leave nothing to bind: all of it goes."""
        for _ in range(20 * (len(self.waiting) + len(self.bound)) + 10):
            if not self.waiting:
                return
            window = self.queue.head(WINDOW, room=self.room)
            if window:
                self.bind(in_order=True)
            else:
                self.bound.pop(min(self.bound))
            self.check()
        raise AssertionError(f"{len(self.waiting)} jobs never bound")


def test_every_interleaving_keeps_the_queue_fair() -> None:
    given = os.environ.get("QUEUE_SEED")
    seeds = [int(given)] if given else [random.randrange(2**32) for _ in range(RUNS)]
    for seed in seeds:
        model = Model(random.Random(seed))
        try:
            for _ in range(STEPS):
                model.step()
                model.check()
            model.drain()
        except AssertionError as exc:
            trail = "\n  ".join(model.steps[-40:])
            raise AssertionError(
                f"QUEUE_SEED={seed} QUEUE_STEPS={STEPS} replays this; last steps:\n  {trail}\n{exc}"
            ) from exc
        assert not model.queue.head(ALL) and len(model.queue) == 0
