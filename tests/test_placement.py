from __future__ import annotations

from gateway.balancer.placement import Candidate, Pending, left_idle, missing, plan, requirements
from gateway.bus.contract import Capabilities, JobRequest

SD = {
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd15.safetensors"}},
    "5": {
        "class_type": "LoraLoader",
        "inputs": {"lora_name": "ink.safetensors", "model": ["4", 0]},
    },
    "9": {"class_type": "SaveImage", "inputs": {"images": ["5", 0]}},
}


def test_requirements_name_node_types_and_model_files() -> None:
    need = requirements(JobRequest(workflow=SD, server="gpu1", labels={"tier": "a"}))
    assert need.node_types == {"CheckpointLoaderSimple", "LoraLoader", "SaveImage"}
    assert need.models == {("ckpt_name", "sd15.safetensors"), ("lora_name", "ink.safetensors")}
    assert need.server == "gpu1"
    assert need.labels == (("tier", "a"),)


def test_missing_names_what_a_server_lacks() -> None:
    need = requirements(JobRequest(workflow=SD, labels={"tier": "a"}))
    caps = Capabilities(
        node_types=["CheckpointLoaderSimple", "SaveImage"],
        models={"checkpoints": ["sd15.safetensors"]},
    )
    lack = missing(need, caps, {"tier": "b"})
    assert lack.node_types == ("LoraLoader",)
    assert lack.models == ("ink.safetensors (loras)",)
    assert lack.labels == ("tier=a",)
    assert "LoraLoader" in lack.describe() and "ink.safetensors" in lack.describe()
    full = Capabilities(
        node_types=list(need.node_types),
        models={"checkpoints": ["sd15.safetensors"], "loras": ["ink.safetensors"]},
    )
    assert not missing(need, full, {"tier": "a"})


def _jobs(n: int, eligible: set[str]) -> list[Pending]:
    return [Pending(job_id=f"j{i}", eligible=frozenset(eligible)) for i in range(n)]


def test_plan_fills_free_slots_and_never_exceeds_capacity() -> None:
    servers = [
        Candidate(server_id="a", capacity=2, bound=0, seconds_per_job=1.0),
        Candidate(server_id="b", capacity=2, bound=1, seconds_per_job=1.0),
    ]
    bindings = plan(_jobs(10, {"a", "b"}), servers)
    per_server = {s: sum(1 for _, t in bindings if t == s) for s in "ab"}
    assert per_server == {"a": 2, "b": 1}
    assert [j for j, _ in bindings] == ["j0", "j1", "j2"]  # queue order kept


def test_a_job_waits_for_a_fast_busy_server_rather_than_take_a_slow_idle_one() -> None:
    fast = Candidate(server_id="fast", capacity=2, bound=2, seconds_per_job=1.0)
    slow = Candidate(server_id="slow", capacity=2, bound=0, seconds_per_job=10.0)
    assert plan(_jobs(1, {"fast", "slow"}), [fast, slow]) == []
    # With a long queue the slow server is worth using too, for the jobs further back.
    bindings = plan(_jobs(20, {"fast", "slow"}), [fast, slow])
    assert [s for _, s in bindings] == ["slow"]
    assert bindings[0][0] not in ("j0", "j1")


def test_plan_respects_eligibility() -> None:
    servers = [
        Candidate(server_id="a", capacity=2, bound=0, seconds_per_job=1.0),
        Candidate(server_id="b", capacity=2, bound=0, seconds_per_job=1.0),
    ]
    pending = [Pending(job_id="pinned", eligible=frozenset({"b"})), *_jobs(1, set())]
    assert plan(pending, servers) == [("pinned", "b")]
    assert plan(pending, []) == []


def test_a_server_kept_idle_while_it_could_work_is_named() -> None:
    # An estimate of 5 s against 0.05 s: a window of ten jobs all go to the fast server.
    fast = Candidate(server_id="fast", capacity=2, bound=0, seconds_per_job=0.05)
    slow = Candidate(server_id="slow", capacity=2, bound=0, seconds_per_job=5.0)
    pinned = Candidate(server_id="pinned", capacity=2, bound=0, seconds_per_job=5.0)
    pending = [Pending(job_id=f"j{i}", eligible=frozenset({"fast", "slow"})) for i in range(10)]
    bindings = plan(pending, [fast, slow, pinned])
    assert {server for _, server in bindings} == {"fast"}
    # "pinned" may run none of the waiting jobs: idle, but not passed over.
    assert left_idle(pending, [fast, slow, pinned], bindings) == {"slow"}
    # A server that holds work, or gets some, is not idle.
    busy = Candidate(server_id="slow", capacity=2, bound=1, seconds_per_job=5.0)
    assert left_idle(pending, [fast, busy], plan(pending, [fast, busy])) == set()
    # Nothing left waiting: nobody was passed over.
    assert left_idle(pending[:2], [fast, slow], plan(pending[:2], [fast, slow])) == set()
