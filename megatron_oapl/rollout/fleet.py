"""The coordinator-side handle of the fleet: M engine processes (rollout/engine_worker.py) that sample
the groups the coordinator orders (rollout/orders.py), score them and push them, version-tagged, over
ZeroMQ. `Fleet` is the dealer: it deals orders to the engines and keeps the sync bookkeeping (who holds
which version, who was asked to join a push, refused pushes); a supervisor (rollout/supervisor.py) keeps
the engine processes running: `LocalSupervisor` spawns and restarts them beside the coordinator,
`RemoteSupervisor` follows the engines fleet nodes run elsewhere (fleet.external). The choice is made once,
when the fleet is built; the dealer asks either one the same questions.

Channels (both ZeroMQ, both opened by the coordinator):
- rollouts: engines PUSH pickled `RolloutGroup`s -> coordinator PULL; engines send without blocking so
  that they keep answering control messages.
- control: coordinator ROUTER <-> engine DEALER (identity = engine id), carrying the messages of
  rollout/messages.py: `Hello`, `Deal`, `Sync`, `Synced`, `Stop` (and `Died` from fleet nodes).

An engine process that dies is restarted (up to `fleet.max_restarts` times each) from the initial
weights at version 0; its open orders go to the pool again, and the coordinator re-syncs it to the current
version before it gets new orders (groups of an old version are dropped and counted by the buffer, never
mixed).

Placement (rollout/placement.py): local engine i starts with its own CUDA_VISIBLE_DEVICES slice of
fleet.engine_tensor_parallel_size GPUs after the GPUs of this node's learner ranks, and with VLLM_CACHE_ROOT
= fleet.compile_cache_dir (default RUN_DIR/vllm_cache); a plan that needs more GPUs than the node shows is
refused before anything starts. Start-up and restart waits use fleet.start_timeout_s.
"""

from __future__ import annotations

import logging
import pickle
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import zmq

from megatron_oapl.rollout.messages import Deal, Died, Hello, Stop, Sync, Synced
from megatron_oapl.rollout.orders import Order, OrderBook
from megatron_oapl.rollout.placement import engine_environments, learner_ranks_on_node
from megatron_oapl.rollout.supervisor import COORDINATOR_FILE, FleetGaveUp, LocalSupervisor, RemoteSupervisor
from megatron_oapl.rollout.types import RolloutGroup

log = logging.getLogger(__name__)

__all__ = ["COORDINATOR_FILE", "EngineState", "Fleet", "FleetGaveUp", "FleetStopped"]


@dataclass
class EngineState:
    """What the dealer knows of one engine process (one generation of an engine id)."""

    generation: int  # -1: an external engine not heard from yet
    version: int = -1  # unknown until its hello
    weight_ranks: int = 1  # ranks it takes in a weight group (from its hello)
    refused_syncs: int = 0  # weight pushes refused in a row (fleet.max_refused_syncs)


class FleetStopped(Exception):
    """A stop signal arrived while the fleet was waiting for engines to start."""


def _supervisor(cfg, cfg_dict: dict, model_dir: str, rollout_addr: str, control_addr: str,
                envs: list[dict[str, str]] | None):
    """Local engine processes, or (fleet.external) the engines of fleet nodes elsewhere."""
    engine_ids = list(range(cfg.fleet.num_engines))
    if envs is None:
        return RemoteSupervisor(cfg, engine_ids)
    return LocalSupervisor(cfg, cfg_dict, model_dir, rollout_addr, control_addr, dict(zip(engine_ids, envs)),
                           daemon=cfg.fleet.engine_tensor_parallel_size == 1)


class Fleet:
    """The dealer over the engines: deals work orders to those that hold the current version, asks the
    others to re-sync first, and keeps who was asked to join a push and who refused. Whether the engines
    are local processes or run by fleet nodes is its supervisor's business; both kinds say hello on
    (re)start and are re-synced before they get orders."""

    # Called with restarts_total at every restart, when it happens (not with the next finished step).
    on_restart: Callable[[int], None] = staticmethod(lambda total: None)

    def __init__(self, cfg, cfg_dict: dict, model_dir: str, host: str = "127.0.0.1"):
        self.cfg = cfg
        external = cfg.fleet.external
        # Local engines' GPUs, after the learners' on this node: a plan that does not fit is refused here,
        # before any socket or engine exists. External engines are placed by their fleet node.
        envs = None if external else engine_environments(cfg, cfg.fleet.num_engines, learner_ranks_on_node())
        bind, advertise = ("*", cfg.fleet.weight_sync.master_addr) if external else (host, host)
        self.zctx = zmq.Context()
        self.rollouts = self.zctx.socket(zmq.PULL)
        self.rollouts.setsockopt(zmq.RCVHWM, 64)
        port = self.rollouts.bind_to_random_port(f"tcp://{bind}")
        self.rollout_addr = f"tcp://{advertise}:{port}"
        self.control = self.zctx.socket(zmq.ROUTER)
        # A restarted engine reconnects under its old identity, possibly before this socket has noticed the
        # old connection close (a busy or frozen coordinator; a node gone without a FIN). Without handover
        # the ROUTER refuses the newcomer and every message to that engine is silently dropped.
        self.control.setsockopt(zmq.ROUTER_HANDOVER, 1)
        port = self.control.bind_to_random_port(f"tcp://{bind}")
        self.control_addr = f"tcp://{advertise}:{port}"
        self.pending_replies: list[Synced] = []
        self._asked: dict[int, int] = {}  # engine id -> generation asked by the last request_sync
        self.should_stop: Callable[[], bool] = lambda: False  # the coordinator's stop signal
        self.supervisor = _supervisor(cfg, cfg_dict, model_dir, self.rollout_addr, self.control_addr, envs)
        self.engines = {i: EngineState(g) for i, g in self.supervisor.generation.items()}
        self.supervisor.on_start = self._engine_started
        self.supervisor.on_restart = lambda total: self.on_restart(total)
        self.supervisor.start()

    @property
    def restarts_total(self) -> int:
        return self.supervisor.restarts_total

    def _engine_started(self, engine_id: int, generation: int) -> None:
        self.engines[engine_id] = EngineState(generation)  # a new process: nothing known until its hello

    def publish(self, weight_store: tuple[str, int]) -> Path:
        """Write RUN_DIR/coordinator.json for external fleet nodes: where to connect."""
        return self.supervisor.publish(self.rollout_addr, self.control_addr, weight_store)

    def _send(self, engine_id: int, msg) -> None:
        self.control.send_multipart([str(engine_id).encode(), pickle.dumps(msg)])

    def _read_control(self, timeout_ms: int = 0) -> None:
        while self.control.poll(timeout_ms):
            _, payload = self.control.recv_multipart()
            msg = pickle.loads(payload)
            if msg.engine not in self.engines:
                log.warning("message from unknown engine %s ignored (fleet.num_engines=%d)", msg.engine,
                            len(self.engines))
                continue
            if isinstance(msg, (Hello, Died)):
                self.supervisor.heard(msg)  # a remote engine's newer hello is a restart (a fresh state)
            state = self.engines[msg.engine]
            if isinstance(msg, Hello) and msg.generation == state.generation:
                state.version, state.weight_ranks = msg.version, msg.weight_ranks
            elif isinstance(msg, Died) and msg.generation == state.generation:
                # No version until its successor says hello: a dead engine is never "stale", so it is never
                # sent a Sync that nobody receives.
                state.version = -1
            elif isinstance(msg, Synced):
                self.pending_replies.append(msg)
            timeout_ms = 0

    def restart_dead(self) -> list[int]:
        """Engines restarted since the last call (they hold version 0 weights): the local supervisor
        restarts dead processes here; fleet nodes restart theirs and say so with a hello."""
        self._read_control(0)
        return self.supervisor.restart_dead()

    def is_alive(self, engine_id: int) -> bool:
        return self.supervisor.is_alive(engine_id)

    def wait_ready(self, engine_ids, timeout_s: float | None = None) -> None:
        """Block until the given engines said hello (they are then ready to join a weight group); one that
        dies while starting is restarted like any other (within fleet.max_restarts). Raises `FleetStopped`
        once `should_stop()` is true (a large engine can take minutes to start). Default timeout:
        fleet.start_timeout_s (a cold vLLM start compiles for minutes)."""
        timeout_s = self.cfg.fleet.start_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        while any(self.engines[i].version < 0 for i in engine_ids):
            if self.should_stop():
                raise FleetStopped(f"stop requested while engines {list(engine_ids)} were starting")
            if time.monotonic() > deadline:
                raise TimeoutError(f"engines {list(engine_ids)} did not start within {timeout_s:.0f} s "
                                   "(fleet.start_timeout_s)")
            self.restart_dead()
            self._read_control(200)

    def ready_engines(self) -> list[int]:
        """Engines alive and past start-up: the members of the next weight group (a restarted engine
        that is still starting joins through a re-sync instead)."""
        self._read_control(0)
        return sorted(i for i, state in self.engines.items() if self.is_alive(i) and state.version >= 0)

    def dead_among(self, engine_ids: list[int]) -> str | None:
        """A message naming the engines of `engine_ids` that died since the last `request_sync`, or None
        (a weight push polls this to abort instead of waiting for them). A successor started meanwhile
        counts as dead: it was never asked to join."""
        self._read_control(0)  # deaths and restarts reported by fleet nodes
        dead = [i for i in engine_ids if not self.is_alive(i) or self.engines[i].generation != self._asked.get(i)]
        return f"engine(s) {dead} died" if dead else None

    def send_orders(self, engine_id: int, orders: list[Order]) -> None:
        self._send(engine_id, Deal(orders))

    def weight_ranks(self, engine_ids: list[int]) -> int:
        """Receiving ranks of a weight group joining these engines (each takes one per receiving worker)."""
        return sum(self.engines[i].weight_ranks for i in engine_ids)

    def request_sync(self, engine_ids: list[int], version: int, rendezvous: list[dict]) -> None:
        """Tell engines to join the weight groups: the sender is rank 0, then each engine's workers in
        the order of `engine_ids`."""
        self._asked = {i: self.engines[i].generation for i in engine_ids}  # who can answer this request
        first_rank = 1
        for engine_id in engine_ids:
            self._send(engine_id, Sync(version, rendezvous, first_rank))
            first_rank += self.engines[engine_id].weight_ranks

    def wait_synced(self, engine_ids: list[int], version: int, timeout_s: float) -> dict[int, Synced]:
        """Replies of the engines that confirmed (or refused) `version`; an engine that died meanwhile is
        left out (it is restarted and re-synced before any of its groups can be admitted). So is an engine
        restarted meanwhile (a fleet node restarts its engines on its own): the new one was never asked."""
        deadline, replies = time.monotonic() + timeout_s, {}

        def still_expected() -> list[int]:
            return [i for i in engine_ids
                    if self.is_alive(i) and self.engines[i].generation == self._asked.get(i)]

        while len(replies) < len(still_expected()):
            self._read_control(100)
            for msg in list(self.pending_replies):
                if msg.version == version and msg.engine in engine_ids:
                    replies[msg.engine] = msg
                    self.pending_replies.remove(msg)
            if time.monotonic() > deadline:
                raise TimeoutError(f"engines {sorted(set(engine_ids) - set(replies))} did not confirm version {version}")
        for engine_id, msg in replies.items():
            if msg.error is None and self.engines[engine_id].generation == self._asked.get(engine_id):
                self.engines[engine_id].version = version
        return replies

    def count_refusals(self, replies: dict[int, Synced]) -> list[int]:
        """Count each engine's refused pushes in a row (an accepted one resets it). An engine that refused
        fleet.max_refused_syncs in a row is treated as dead: a re-sync would only fail again (an engine that
        runs out of memory on every push), so it is killed here and `restart_dead` restarts it within
        fleet.max_restarts, then fails the run with a clear error. Returns the engines killed."""
        killed = []
        for engine_id, msg in replies.items():
            state = self.engines[engine_id]
            state.refused_syncs = state.refused_syncs + 1 if msg.error else 0
            if state.refused_syncs >= self.cfg.fleet.max_refused_syncs:
                state.version = -1
                self.supervisor.kill(engine_id, f"refused {state.refused_syncs} weight pushes in a row "
                                     f"(fleet.max_refused_syncs={self.cfg.fleet.max_refused_syncs}), the last "
                                     f"with: {msg.error}")
                killed.append(engine_id)
        return killed

    def serve(self, book: OrderBook, version: int, timeout_ms: int = 100) -> tuple[list[int], list[RolloutGroup]]:
        """One turn of dealing: restart dead engines (their open orders go back to the pool), deal open
        orders to the live engines that hold `version`, collect the groups that arrived. Returns (engines
        holding another version, which must be re-synced before anything else, groups)."""
        restarted = self.restart_dead()
        for engine_id in self.engines:
            if engine_id in restarted or not self.is_alive(engine_id):
                book.release(engine_id)  # its open orders are dealt again
        if restarted:
            self.wait_ready(restarted)  # fleet.start_timeout_s: a restart compiles like a start
        stale = [i for i, state in self.engines.items() if 0 <= state.version != version]
        if stale:
            return stale, []
        current = [i for i, state in self.engines.items() if state.version == version and self.is_alive(i)]
        for engine_id, orders in book.assign(current).items():
            self.send_orders(engine_id, orders)
        return [], self.poll_groups(timeout_ms)

    def poll_groups(self, timeout_ms: int) -> list[RolloutGroup]:
        groups = []
        if self.rollouts.poll(timeout_ms):
            while True:
                try:
                    groups.append(pickle.loads(self.rollouts.recv(zmq.NOBLOCK)))
                except zmq.Again:
                    break
        self._read_control(0)
        return groups

    def close(self) -> None:
        for engine_id in self.engines:
            if self.is_alive(engine_id):
                self._send(engine_id, Stop())
        self.supervisor.stop()  # local engines: told to stop, then SIGTERM, then SIGKILL
        self.rollouts.close(0)
        self.control.close(0)
        self.zctx.term()
