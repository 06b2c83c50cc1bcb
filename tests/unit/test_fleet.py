"""The fleet's runtime logic with real engine processes and only the model faked: the dealer
(rollout/fleet.py) over its supervisors (rollout/supervisor.py), the real engine worker loop, reward pool,
ZeroMQ channels and control messages, with `tests/support/fake_engine.py` in place of the model engine.

- an engine killed mid-round is restarted (counted when it happens), its open orders are dealt again, and it
  is re-synced before it gets orders, so every order is answered once, by the current version;
- groups sampled before a push and read after it are dropped by the buffer, never mixed in;
- an engine that refuses fleet.max_refused_syncs pushes in a row is killed and restarted, and the next time
  the run gives up (`FleetGaveUp` naming the engine, its exit code and both limits);
- an external fleet: a fleet node's supervisor restarts a crashed engine and reports it; the coordinator's
  remote supervisor counts the restart from the successor's hello and the dealer re-syncs it.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from megatron_oapl.config import load_config, to_dict
from megatron_oapl.rollout import supervisor
from megatron_oapl.rollout.fleet import Fleet, FleetGaveUp
from megatron_oapl.rollout.fleet_node import FleetNode
from megatron_oapl.rollout.orders import OrderBook, PromptSampler
from megatron_oapl.rollout.supervisor import LocalSupervisor, RemoteSupervisor
from megatron_oapl.schedule import LagSchedule, VersionedBuffer
from tests.support.fake_engine import fake_engine_main

TINY = str(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml")
PER_STEP = 4  # orders per step
WAIT_S = 300  # bound on waits for processes to start (a loaded machine); nothing is timed


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A directory with a tiny tokenizer (the engine worker loads one) and the fake engine's switches."""
    from megatron_oapl.data.tokenizer import train_sentencepiece_tokenizer

    out = tmp_path_factory.mktemp("fake_model")
    train_sentencepiece_tokenizer(["What is 1 + 2?", "What is 4 + 5?", "0 1 2 3 4 5 6 7 8 9"], out)
    return out


@pytest.fixture
def fake_engines(monkeypatch):
    """Supervisors spawn the real engine process with the fake model engine."""
    monkeypatch.setattr(supervisor, "engine_main", fake_engine_main)


def _cfg(tmp_path: Path, *overrides: str):
    prompts = tmp_path / "train.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"What is {i} + 1?", "answer": str(i + 1)}) + "\n"
                               for i in range(8)))
    return load_config(TINY, [f"run_dir={tmp_path / 'run'}", "data.source=jsonl", f"data.path={prompts}",
                              "data.num_train_prompts=8", "fleet.group_size=2", f"fleet.prompts_per_step={PER_STEP}",
                              "rewards.name=tests.support.rewards_for_tests:half_reward", "rewards.num_workers=1",
                              "fleet.start_timeout_s=600", *overrides], check_hardware=False)


def _book(cfg, version: int, steps: int = 1) -> OrderBook:
    book = OrderBook(PromptSampler(cfg.data.num_train_prompts, cfg.data.seed), cfg.seed, PER_STEP, sync_every=steps)
    book.plan_round(1, version)
    return book


def _sync(fleet: Fleet, engines: list[int], version: int) -> dict:
    """A push as the coordinator runs it, with no weights: request, replies, the refusal count."""
    fleet.request_sync(engines, version, rendezvous=[])
    replies = fleet.wait_synced(engines, version, timeout_s=WAIT_S)
    fleet.count_refusals(replies)
    return replies


def _collect(fleet: Fleet, book: OrderBook, version: int, buffer: VersionedBuffer, until) -> list:
    """Serve the fleet as the coordinator does (re-syncing the stale engines it names) until `until()`;
    returns what happened in order: ("resync", engines) and the groups that arrived."""
    events, deadline = [], time.monotonic() + WAIT_S
    while not until():
        assert time.monotonic() < deadline, f"open orders {sorted(book.open)} were never answered"
        stale, arrived = fleet.serve(book, version)
        if stale:
            events.append(("resync", stale))
            _sync(fleet, stale, version)
        for group in arrived:
            events.append(group)
            if buffer.add(group):
                book.delivered(("train", group.order_index))
    return events


def _pid(cfg, engine_id: int) -> int:
    return int((Path(cfg.run_dir) / "engines" / f"engine-{engine_id}.pid").read_text())


def test_an_engine_killed_mid_round_is_restarted_resynced_and_its_orders_dealt_again(tmp_path, model_dir, fake_engines):
    cfg = _cfg(tmp_path, "fleet.num_engines=2", "fleet.max_restarts=1")
    fleet = Fleet(cfg, to_dict(cfg), str(model_dir))
    restarts = []
    fleet.on_restart = restarts.append
    hold = model_dir / "hold-0"
    try:
        assert isinstance(fleet.supervisor, LocalSupervisor)
        fleet.wait_ready([0, 1])
        _sync(fleet, [0, 1], 1)
        buffer = VersionedBuffer(LagSchedule(1), current_version=1)
        book = _book(cfg, version=1)
        hold.touch()  # engine 0 takes its orders and answers none
        first = _collect(fleet, book, 1, buffer, until=lambda: len(book.open) == PER_STEP // 2)
        held = sorted(i for _, i in book.open)
        assert {g.engine_id for g in first} == {1} and len(held) == PER_STEP // 2
        old_pid = _pid(cfg, 0)
        os.kill(old_pid, signal.SIGKILL)
        hold.unlink()  # its successor answers
        rest = _collect(fleet, book, 1, buffer, until=lambda: not book.open)
    finally:
        hold.unlink(missing_ok=True)
        fleet.close()
    assert restarts == [1] and fleet.restarts_total == 1  # counted when it happened
    assert _pid(cfg, 0) != old_pid
    assert rest[0] == ("resync", [0])  # the new engine 0 (version 0) is re-synced before any group counts
    groups = [g for g in rest if not isinstance(g, tuple)]
    assert sorted(g.order_index for g in groups) == held  # the killed engine's orders, dealt again
    assert {g.policy_version for g in first + groups} == {1}
    assert buffer.admitted == PER_STEP and buffer.dropped_stale == 0 and buffer.duplicates == 0


def test_groups_sampled_before_a_push_and_read_after_it_are_dropped(tmp_path, model_dir, fake_engines):
    cfg = _cfg(tmp_path, "fleet.num_engines=1")
    fleet = Fleet(cfg, to_dict(cfg), str(model_dir))
    try:
        fleet.wait_ready([0])
        book = _book(cfg, version=0)
        fleet.serve(book, 0, timeout_ms=0)  # deals the round's orders, reads nothing
        deadline = time.monotonic() + WAIT_S
        while not fleet.rollouts.poll(100):  # a group of version 0 waits on the channel
            assert time.monotonic() < deadline, "engine 0 answered no order"
        buffer = VersionedBuffer(LagSchedule(1))
        _sync(fleet, [0], 1)  # the engine drops the orders it has not answered yet
        buffer.advance(1)
        late = fleet.poll_groups(0)
        admitted = [g for g in late if buffer.add(g)]
        # The next round, at version 1 (a version-0 group still on its way is read meanwhile, and dropped).
        book = _book(cfg, version=1)
        fresh = _collect(fleet, book, 1, buffer, until=lambda: not book.open)
    finally:
        fleet.close()
    assert late and {g.policy_version for g in late} == {0} and admitted == []
    old = [g for g in late + fresh if g.policy_version == 0]
    assert buffer.dropped_stale == len(old)
    assert len([g for g in fresh if g.policy_version == 1]) == PER_STEP == buffer.admitted  # those, and only those


def test_an_engine_that_keeps_refusing_pushes_is_restarted_then_the_run_gives_up(tmp_path, model_dir, fake_engines):
    cfg = _cfg(tmp_path, "fleet.num_engines=1", "fleet.max_refused_syncs=2", "fleet.max_restarts=1")
    fleet = Fleet(cfg, to_dict(cfg), str(model_dir))
    refuse = model_dir / "refuse-sync"
    refuse.touch()
    try:
        fleet.wait_ready([0])
        first_pid = _pid(cfg, 0)
        for version in (1, 2):
            assert _sync(fleet, [0], version)[0].error.startswith("WeightSyncError: injected")
        assert fleet.restart_dead() == [0]  # the second refusal in a row killed it: restarted
        fleet.wait_ready([0])
        assert _pid(cfg, 0) != first_pid and fleet.restarts_total == 1
        assert fleet.engines[0].refused_syncs == 0 and fleet.engines[0].version == 0
        _sync(fleet, [0], 3)
        assert fleet.engines[0].refused_syncs == 1  # one more would kill it, and it may not restart again
        _sync(fleet, [0], 4)
        with pytest.raises(FleetGaveUp) as gave_up:
            fleet.restart_dead()
    finally:
        refuse.unlink(missing_ok=True)
        fleet.close()
    assert str(gave_up.value) == (
        "engine 0 died 2 times (exit code -9); fleet.max_restarts=1 reached; it was killed because it refused 2 "
        "weight pushes in a row (fleet.max_refused_syncs=2), the last with: WeightSyncError: injected: this "
        "engine refuses every push")


def test_a_fleet_node_restarts_a_crashed_engine_and_the_coordinator_resyncs_it(tmp_path, model_dir, fake_engines):
    cfg = _cfg(tmp_path, "fleet.num_engines=1", "fleet.external=true", "fleet.weight_sync.master_addr=127.0.0.1",
               "fleet.max_restarts=1")
    fleet = Fleet(cfg, to_dict(cfg), str(model_dir))
    restarts = []
    fleet.on_restart = restarts.append
    coordinator_file = fleet.publish(("127.0.0.1", 0))
    node = None
    try:
        assert isinstance(fleet.supervisor, RemoteSupervisor)
        cfg.model.hf_path = str(model_dir)  # what a node's engines load
        node = FleetNode(cfg, to_dict(cfg), json.loads(coordinator_file.read_text()), [0], [{}])
        fleet.wait_ready([0])
        _sync(fleet, [0], 1)
        os.kill(_pid(cfg, 0), signal.SIGKILL)
        deadline = time.monotonic() + WAIT_S
        while fleet.is_alive(0):  # the node's `Died` reaches the coordinator
            assert node.step() is None and time.monotonic() < deadline
            fleet.dead_among([0])
        buffer = VersionedBuffer(LagSchedule(1), current_version=1)
        book = _book(cfg, version=1)
        events = _collect(fleet, book, 1, buffer, until=lambda: not book.open)
    finally:
        fleet.close()  # tells the engine to stop: the node is then done, with exit code 0
        code = _node_exit_code(node)
    assert restarts == [1] and fleet.supervisor.restarts[0] == 1
    assert events[0] == ("resync", [0])  # the node's restarted engine holds version 0
    assert buffer.admitted == PER_STEP and {g.policy_version for g in events[1:]} == {1}
    assert code == 0 and not coordinator_file.exists()


def _node_exit_code(node: FleetNode | None) -> int | None:
    """The node's exit code once its engines stopped (None: it never finished), its engines ended either way."""
    if node is None:
        return None
    deadline = time.monotonic() + WAIT_S
    try:
        while (code := node.step()) is None and time.monotonic() < deadline:
            time.sleep(0.1)
        return code
    finally:
        node.stop()
