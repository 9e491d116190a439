"""The live server table (gateway/balancer/servers.py): speed estimates, who takes work."""

from __future__ import annotations

from gateway.balancer.servers import ServerTable
from gateway.bus.contract import Heartbeat, ServerRecord


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def beat(server_id: str, weight: float = 1.0) -> Heartbeat:
    return Heartbeat(server_id=server_id, address="h:1", ts=0.0, healthy=True, weight=weight)


def test_one_run_stretched_by_a_crash_does_not_make_a_server_look_slow() -> None:
    table = ServerTable(Clock())
    table.on_heartbeat(beat("a"))
    for seconds in (0.05, 0.06, 12.0, 0.05):  # 12 s: adopted after an adapter restart
        table.observe_run("a", seconds)
    state = table.get("a")
    assert state is not None and state.seconds_per_job is not None
    assert state.seconds_per_job < 0.1
    # Only the last few runs count: a server that truly slowed down shows it.
    for _ in range(5):
        table.observe_run("a", 2.0)
    assert state.seconds_per_job == 2.0


def test_a_forgotten_estimate_is_measured_again_from_the_next_run() -> None:
    table = ServerTable(Clock())
    table.on_heartbeat(beat("a"))
    table.observe_run("a", 9.0)
    state = table.get("a")
    assert state is not None and state.seconds_per_job == 9.0
    table.forget_speed("a")
    assert state.seconds_per_job is None
    table.observe_run("a", 0.5)
    assert state.seconds_per_job == 0.5


def test_the_typical_speed_is_the_median_of_live_measured_servers_per_weight() -> None:
    clock = Clock()
    table = ServerTable(clock)
    assert table.typical_seconds_per_job() is None
    for server_id, weight, seconds in (("a", 1.0, 1.0), ("b", 2.0, 1.0), ("c", 1.0, 4.0)):
        table.on_heartbeat(beat(server_id, weight))
        table.observe_run(server_id, seconds)
    table.on_heartbeat(beat("unmeasured"))
    # Per unit of weight: a 1.0, b 2.0, c 4.0.
    assert table.typical_seconds_per_job() == 2.0
    clock.now += 60  # no heartbeat since: none is live, so none is typical
    assert table.typical_seconds_per_job() is None


def test_silence_while_this_replica_was_cut_off_is_not_staleness() -> None:
    clock = Clock()
    table = ServerTable(clock)
    table.on_heartbeat(beat("a"))  # interval 1 s: stale after 3 s of silence
    state = table.get("a")
    assert state is not None
    clock.now += 5  # the broker was down: no heartbeat reached us
    assert table.is_stale(state)
    table.on_reconnected()
    assert not table.is_stale(state)  # its next beats are on the way
    clock.now += 2.5
    assert not table.is_stale(state)
    clock.now += 1  # 3.5 s since we could hear it, and still silent: dead
    assert table.is_stale(state)


def test_a_draining_server_is_live_but_open_for_no_new_work() -> None:
    table = ServerTable(Clock())
    for server_id in ("a", "b"):
        table.on_registered(
            ServerRecord(
                server_id=server_id,
                name=server_id,
                address="h:1",
                registered_at=0.0,
                draining=server_id == "b",
            ),
            revision=1,
        )
        table.on_heartbeat(beat(server_id))
    assert [s.server_id for s in table.live()] == ["a", "b"]  # its heartbeats count
    assert [s.server_id for s in table.open_for_work()] == ["a"]
    assert not table.finishing("b")  # a removed server's winding down is another thing


def record(server_id: str, address: str = "h:1") -> ServerRecord:
    return ServerRecord(server_id=server_id, name=server_id, address=address, registered_at=0.0)


def test_a_remove_then_register_stands_in_whichever_order_each_copy_arrives() -> None:
    """The gateway that removes and registers a server again applies both to its table at
    once, and the registry's watch brings them later: revisions 7 (remove), 8 (register)."""
    # The gateway's own copies first, then the watch's: the late removal is old news.
    table = ServerTable(Clock())
    table.on_registered(record("a"), revision=5)
    table.on_removed("a", revision=7)
    table.on_registered(record("a", "h:2"), revision=8)
    table.on_removed("a", revision=7)
    state = table.get("a")  # between the watch's two copies: the leader fails pins here
    assert not table.is_removed("a") and state is not None and state.address == "h:2"
    table.on_registered(record("a", "h:2"), revision=8)
    assert not table.is_removed("a") and table.get("a") is state
    # The watch ahead of the gateway: the gateway's copy of the removal comes last.
    table = ServerTable(Clock())
    table.on_registered(record("a"), revision=5)
    table.on_removed("a", revision=7)
    table.on_registered(record("a", "h:2"), revision=8)
    assert not table.on_removed("a", revision=7)  # said: ignored
    assert not table.is_removed("a") and table.get("a") is not None
    # And a registration older than a removal does not bring the server back.
    table.on_removed("a", revision=9)
    table.on_registered(record("a", "h:2"), revision=8)
    assert table.is_removed("a") and table.get("a") is None


def test_a_server_not_yet_seen_evicting_keeps_as_many_models_as_its_fleet_else_one() -> None:
    clock = Clock()
    table = ServerTable(clock)
    table.on_heartbeat(beat("new"))
    assert table.typical_model_slots() == 1  # ComfyUI's default cache: the last prompt's
    for server_id, slots in (("a", 2), ("b", 2), ("c", 3)):
        table.on_heartbeat(
            Heartbeat(server_id=server_id, address="h:1", ts=0.0, healthy=True, model_slots=slots)
        )
    assert table.typical_model_slots() == 2
    clock.now += 60  # none heartbeats any more: none tells
    assert table.typical_model_slots() == 1
