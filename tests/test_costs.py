"""What a job costs where: job shapes, learnt run and load times, and placement on them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import pytest

from gateway.api.servers import health_of
from gateway.balancer.book import JobBook
from gateway.balancer.costs import DEFAULT_LOAD_S, CostModel, Estimate, ServerCosts
from gateway.balancer.estimates import RoundCosts, bound_work
from gateway.balancer.loadclock import LoadClock
from gateway.balancer.placement import Candidate, Pending, hold, schedule
from gateway.balancer.servers import ServerState, ServerTable
from gateway.bus.contract import JobRecord, JobStatus
from gateway.comfyui.shape import JobShape, shape_of

RECORDINGS = Path(__file__).resolve().parent / "data" / "comfyui-protocol"


def sd(checkpoint: str, steps: int = 20, size: int = 512, batch: int = 1) -> dict[str, Any]:
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "5": {
            "class_type": "EmptyLatentImage",
            "inputs": {"width": size, "height": size, "batch_size": batch},
        },
        "3": {
            "class_type": "KSampler",
            "inputs": {"steps": steps, "model": ["4", 0], "latent_image": ["5", 0]},
        },
        "9": {"class_type": "SaveImage", "inputs": {"images": ["3", 0]}},
    }


def test_a_shape_names_models_loaders_and_size() -> None:
    shape = shape_of(sd("a.ckpt", steps=20, size=1024, batch=2))
    assert shape.models == ("a.ckpt",)
    assert shape.loaders == (("4", ("a.ckpt",)),)
    assert (shape.steps, shape.pixels, shape.frames) == (20, 1024 * 1024 * 2, 1)
    assert shape.units == 20 * 8
    assert shape_of(sd("a.ckpt")).key != shape_of(sd("b.ckpt")).key
    assert shape_of(sd("a.ckpt")).key == shape_of(sd("a.ckpt")).key
    assert shape_of({"x": "not a node", "y": {"inputs": "nor this"}}).units > 0


def test_run_times_are_learnt_per_shape_and_scaled_to_other_servers_and_sizes() -> None:
    costs = CostModel()
    small, big = shape_of(sd("a", steps=10)), shape_of(sd("a", steps=40))
    assert costs.run_seconds("fast", small, fallback_per_unit=0.5) == Estimate(5.0, "fallback")
    for _ in range(3):
        costs.observe_load("fast", "a", 2.0)
        costs.observe_run("fast", small, 3.0, {"a": 2.0})  # 1 s of sampling, 2 s of loading
        costs.observe_run("slow", small, 4.0, {})
    assert costs.run_seconds("fast", small, 9.9) == Estimate(1.0, "learnt")
    assert costs.seconds_per_unit("fast") == pytest.approx(0.1)
    assert costs.run_seconds("fast", big, 9.9) == Estimate(pytest.approx(4.0), "by_size")
    costs.observe_run("slow", big, 16.0, {})
    # The big shape ran on the slow server only: four times slower than the fast one per unit.
    assert costs.run_seconds("fast", big, 9.9) == Estimate(pytest.approx(4.0), "scaled")
    assert costs.load_seconds("fast", "a") == 2.0
    assert costs.load_seconds("slow", "a") == 2.0  # as loaded elsewhere
    assert costs.load_seconds("slow", "never") == 2.0  # as the longest load seen
    assert CostModel().load_seconds("x", "never") == DEFAULT_LOAD_S
    costs.forget("fast")
    assert costs.run_seconds("fast", small, 0.5).source == "fallback"
    assert costs.describe("slow").shapes == 2


def test_loads_are_scaled_between_servers_and_an_unknown_model_costs_the_longest_seen() -> None:
    costs = CostModel()
    costs.observe_load("fast", "a", 1.0)
    costs.observe_load("fast", "c", 3.0)
    costs.observe_load("slow", "a", 4.0)
    # c loads three times as long as a on the fast server, which loads a four times faster.
    assert costs.load_seconds("slow", "c") == 12.0
    assert costs.load_seconds("fast", "new") == 3.0
    assert costs.load_seconds("slow", "new") == 12.0
    assert costs.load_seconds("other", "c") == 3.0  # nothing loaded there to compare


def test_a_loaders_time_runs_until_the_next_node_starts_or_the_job_ends() -> None:
    shape = shape_of({**sd("a"), "7": {"class_type": "LoraLoader", "inputs": {"lora_name": "l"}}})
    clock = LoadClock()
    assert clock.node_started("j", shape, "4", 10.0) == {}
    assert clock.node_started("j", shape, "5", 12.5) == {"a": 2.5}  # known before the job ends
    assert clock.node_started("j", shape, "7", 13.0) == {}
    assert clock.ended("j", 13.5) == ({"l": 0.5}, {"a": 2.5, "l": 0.5})
    assert clock.ended("j", 20.0) == ({}, {})


def test_hold_keeps_the_most_recent_models_within_the_slots() -> None:
    resident = ["a", "b"]
    hold(resident, ("c",), 2)
    assert resident == ["c", "a"]
    hold(resident, ("a",), None)
    assert resident == ["a", "c"]


class Table:
    """Costs given outright: run seconds per (server, model), loads per model."""

    def __init__(self, runs: dict[str, float], loads: dict[str, float]) -> None:
        self.runs, self.loads = runs, loads

    def run_seconds(self, server_id: str, shape: JobShape) -> Estimate:
        return Estimate(self.runs[server_id], "learnt")

    def load_seconds(self, server_id: str, model: str) -> float:
        return self.loads[model]


def _pending(jobs: list[tuple[str, str]], servers: set[str]) -> list[Pending]:
    return [
        Pending(job_id=job_id, eligible=frozenset(servers), shape=shape_of(sd(model)))
        for job_id, model in jobs
    ]


def test_jobs_go_where_their_model_is_held_while_waiting_beats_loading() -> None:
    costs = Table({"a": 1.0, "b": 1.0}, {"m": 5.0, "n": 5.0})
    servers = [
        Candidate(server_id="a", capacity=2, bound=0, seconds_per_job=1.0, resident=("m",)),
        Candidate(server_id="b", capacity=2, bound=0, seconds_per_job=1.0, resident=("n",)),
    ]
    # Without costs both servers look alike and the jobs are split; with them, each model
    # waits for its holder, as loading it elsewhere takes longer than the queue there.
    jobs = [("m1", "m"), ("m2", "m"), ("m3", "m"), ("n1", "n")]
    bindings = schedule(_pending(jobs, {"a", "b"}), servers, costs)
    assert [(b.job_id, b.server_id) for b in bindings] == [("m1", "a"), ("m2", "a"), ("n1", "b")]
    first = bindings[0].reason
    assert first.held == ["m"] and first.loads == [] and first.load_s == 0
    assert first.next_best == "b" and first.next_best_finish_s == 6.0
    assert bindings[1].reason.queued_s == 1.0 and bindings[1].reason.finish_s == 2.0


def test_a_model_is_loaded_elsewhere_once_its_holders_queue_is_longer_than_a_load() -> None:
    costs = Table({"a": 1.0, "b": 1.0}, {"m": 2.5})
    servers = [
        Candidate(server_id="a", capacity=10, bound=0, seconds_per_job=1.0, resident=("m",)),
        Candidate(server_id="b", capacity=10, bound=0, seconds_per_job=1.0),
    ]
    bindings = schedule(_pending([(f"j{i}", "m") for i in range(8)], {"a", "b"}), servers, costs)
    placed = [b.server_id for b in bindings]
    # b would finish a first job at 3.5 (load and run): a is free sooner for three of them.
    assert placed == ["a", "a", "a", "b", "a", "b", "a", "b"]
    assert bindings[3].reason.loads == ["m"] and bindings[3].reason.load_s == 2.5
    assert bindings[5].reason.loads == []  # planned to hold it by then


def test_held_models_follow_the_jobs_planned_and_the_oldest_leaves() -> None:
    costs = Table({"a": 1.0}, {"m": 1.0, "n": 1.0, "o": 1.0})
    a = Candidate(
        server_id="a", capacity=4, bound=0, seconds_per_job=1.0, resident=("m",), model_slots=2
    )
    jobs = [("1", "n"), ("2", "o"), ("3", "m")]
    reasons = [b.reason for b in schedule(_pending(jobs, {"a"}), [a], costs)]
    assert [r.loads for r in reasons] == [["n"], ["o"], ["m"]]  # m left when o came
    assert [r.held for r in reasons] == [[], [], []]
    again = schedule(_pending([("4", "m")], {"a"}), [a], costs)[0].reason
    assert again.held == ["m"] and again.loads == []


def test_a_load_that_pushes_out_a_model_waiting_jobs_need_counts_its_reload() -> None:
    costs = Table({"a": 1.0, "b": 2.0}, {"m": 4.0, "n": 4.0})
    servers = [
        Candidate(
            server_id="a", capacity=2, bound=0, seconds_per_job=1.0, resident=("m",), model_slots=1
        ),
        Candidate(server_id="b", capacity=2, bound=0, seconds_per_job=2.0, model_slots=1),
    ]
    # n finishes first on the fast server (5 s against 6 s), but loading it there pushes out m,
    # which the next job needs: 5 + 4 s of reloading m against 6 s on b.
    jobs = [("n1", "n"), ("m1", "m")]
    bindings = schedule(_pending(jobs, {"a", "b"}), servers, costs)
    assert [(b.job_id, b.server_id) for b in bindings] == [("n1", "b"), ("m1", "a")]
    first = bindings[0].reason
    assert (first.finish_s, first.evicts_s) == (6.0, 0.0)
    assert (first.next_best, first.next_best_finish_s, first.next_best_evicts_s) == ("a", 5.0, 4.0)
    # With nothing waiting for m, it may go: the earliest finish wins again.
    alone = schedule(_pending(jobs[:1], {"a", "b"}), servers, costs)
    assert [(b.server_id, b.reason.evicts_s) for b in alone] == [("a", 0.0)]


def test_a_running_jobs_work_ahead_is_what_is_left_of_it() -> None:
    book = JobBook(None, None)  # type: ignore[arg-type]  # only its indexes are read
    shapes = {"m": shape_of(sd("m")), "n": shape_of(sd("n"))}
    for job_id, model, status in (
        ("run", "m", JobStatus.RUNNING),
        ("next", "n", JobStatus.DISPATCHED),
    ):
        record = JobRecord(
            job_id=job_id,
            status=status,
            server_id="a",
            submitted_at=0.0,
            updated_at=1.0 if job_id == "next" else 0.0,
            log_file_path="",
        )
        book.keep(record)
        book.shapes[job_id] = shapes[model]
    book.started_at["run"] = 100.0
    table = ServerTable()
    for model, shape in shapes.items():
        table.costs.observe_run("a", shape, 10.0, {})
        table.costs.observe_load("a", model, 3.0)
    costs = RoundCosts(table, 0.1)
    state = ServerState(server_id="a", resident=["m", "x"])

    def work(at: float, slots: int) -> tuple[float, list[str]]:
        return bound_work(book, state, costs, seconds_per_job=1.0, slots=slots, at=at)

    # 6 s left of the running job, then n loaded and run.
    assert work(104.0, slots=2) == (6.0 + 3.0 + 10.0, ["n", "m"])
    # Past its estimate, it still holds its server a little.
    assert work(130.0, slots=1) == (1.0 + 3.0 + 10.0, ["n"])


def test_health_shows_what_others_loaded_to_admin_keys_only() -> None:
    state = ServerState(server_id="a", resident=["m"], model_slots=2)
    learnt = ServerCosts(seconds_per_unit=0.1, shapes=1, load_seconds={"m": 2.0})
    admin = health_of(state, 0.0, admin=True, costs=learnt)
    assert (admin.resident_models, admin.load_seconds) == (["m"], {"m": 2.0})
    user = health_of(state, 0.0, admin=False, costs=learnt)
    assert (user.resident_models, user.load_seconds) == ([], {})
    assert (user.seconds_per_unit, user.shapes_learnt, user.model_slots) == (0.1, 1, 2)


def test_node_times_read_from_a_real_servers_messages_as_they_arrived() -> None:
    # The recording of a real ComfyUI holds no model loader (it ran on a CPU, model-free), so
    # its slowest node stands for one: the clock times a node from its `executing` to the
    # next, stamped on arrival as the adapter stamps `node_started`.
    recording = RECORDINGS / "ws_heavy.jsonl"
    started = [
        (str(item["msg"]["data"]["node"]), float(item["t"]))
        for item in map(json.loads, recording.read_text().splitlines())
        if isinstance(item.get("msg"), dict)
        and item["msg"]["type"] == "executing"
        and item["msg"]["data"].get("node") is not None
    ]
    workflow = json.loads((RECORDINGS / "workflows" / "heavy.json").read_text())
    blur = next(n for n, node in workflow.items() if node["class_type"] == "ImageBlur")
    shape = msgspec.structs.replace(shape_of(workflow), loaders=((blur, ("blur",)),))
    clock = LoadClock()
    for node_id, t in started:
        clock.node_started("heavy", shape, node_id, t)
    _, loads = clock.ended("heavy", started[-1][1])
    after = next(t for n, t in started if int(n) == int(blur) + 1)
    assert loads == {"blur": pytest.approx(after - dict(started)[blur])}
    assert loads["blur"] > 1.0  # ImageBlur(15) on 2048 x 2048 took seconds on that CPU
