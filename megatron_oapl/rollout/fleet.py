"""The coordinator-side handle of the fleet: M engine processes (rollout/engine_worker.py) that sample
the groups the coordinator orders (rollout/orders.py), score them and push them, version-tagged, over
ZeroMQ; this class starts, restarts, syncs and deals orders to them.

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

import contextlib
import logging
import multiprocessing as mp
import os
import pickle
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import zmq

from megatron_oapl.rollout.engine_worker import engine_main
from megatron_oapl.rollout.messages import Deal, Died, Hello, Stop, Sync, Synced
from megatron_oapl.rollout.orders import Order, OrderBook
from megatron_oapl.rollout.placement import engine_environments, learner_ranks_on_node
from megatron_oapl.rollout.types import RolloutGroup

log = logging.getLogger(__name__)


def spawn_engine(mp_ctx, engine_id: int, generation: int, cfg_dict: dict, model_dir: str, rollout_addr: str,
                 control_addr: str, daemon: bool = False, env: dict[str, str] | None = None) -> mp.Process:
    """Start `engine_main` in a spawned process (used by the coordinator's local fleet and by fleet_node)
    with `env` (rollout/placement.py: its GPUs, the compile cache) on top of this process's environment."""
    proc = mp_ctx.Process(
        target=engine_main, name=f"oapl-engine-{engine_id}", daemon=daemon,
        args=(engine_id, generation, cfg_dict, model_dir, rollout_addr, control_addr),
    )
    with _environment(env or {}):  # a spawned child takes the environment as it is at start()
        proc.start()
    return proc


@contextlib.contextmanager
def _environment(env: dict[str, str]):
    """`env` set in os.environ for the duration, the previous values restored after."""
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def restart_refusal(cfg, engine_id: int, restarts: int, exitcode: int | None) -> str | None:
    """Why a dead engine must not be restarted (its fleet.max_restarts are used up), or None to restart."""
    if restarts < cfg.fleet.max_restarts:
        return None
    return (f"engine {engine_id} died {restarts + 1} times (exit code {exitcode}); "
            f"fleet.max_restarts={cfg.fleet.max_restarts} reached")


@dataclass
class EngineProcess:
    engine_id: int
    process: mp.Process | None  # None: an external engine (fleet_node on another node) we only hear from
    generation: int
    version: int = -1  # unknown until its hello
    weight_ranks: int = 1  # ranks it takes in a weight group (from its hello)
    restarts: int = 0
    alive: bool = True  # external engines: False once their fleet node reports them dead
    refused_syncs: int = 0  # weight pushes refused in a row (fleet.max_refused_syncs)
    killed_for: str | None = None  # why the coordinator killed it (said again if it may not restart)

    def is_alive(self) -> bool:
        return self.process.is_alive() if self.process is not None else self.alive


COORDINATOR_FILE = "coordinator.json"


class FleetStopped(Exception):
    """A stop signal arrived while the fleet was waiting for engines to start."""


class FleetGaveUp(RuntimeError):
    """An engine died once more than fleet.max_restarts allows; the message names the engine, its exit code
    and the limit (one line: the learners save their last finished step and the run ends)."""


class Fleet:
    """Coordinator-side handle of the engines: local processes it spawns and restarts, or (with
    fleet.external) engines run by `fleet_node` processes elsewhere that restart their own engines and
    report deaths; both kinds say hello on (re)start and are re-synced before they get orders."""

    # Called with restarts_total at every restart, when it happens (not with the next finished step).
    on_restart: Callable[[int], None] = staticmethod(lambda total: None)

    def __init__(self, cfg, cfg_dict: dict, model_dir: str, host: str = "127.0.0.1"):
        self.cfg, self.cfg_dict, self.model_dir = cfg, cfg_dict, model_dir
        self.external = cfg.fleet.external
        # Local engines' GPUs, after the learners' on this node: a plan that does not fit is refused here,
        # before any socket or engine exists. External engines are placed by their fleet node.
        self.engine_env = [] if self.external else engine_environments(cfg, cfg.fleet.num_engines,
                                                                          learner_ranks_on_node())
        bind, advertise = ("*", cfg.fleet.weight_sync.master_addr) if self.external else (host, host)
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
        self._mp = mp.get_context("spawn")
        self.restarts_total = 0
        self.pending_replies: list[Synced] = []
        self._restarted_remotely: list[int] = []
        self._asked: dict[int, int] = {}  # engine id -> generation asked by the last request_sync
        self.should_stop: Callable[[], bool] = lambda: False  # the coordinator's stop signal
        if self.external:
            self.engines = {i: EngineProcess(i, None, generation=-1) for i in range(cfg.fleet.num_engines)}
        else:
            self.engines = {i: self._start(i, generation=0) for i in range(cfg.fleet.num_engines)}

    def publish(self, weight_store: tuple[str, int]) -> Path:
        """Write RUN_DIR/coordinator.json (atomically) for external fleet nodes: where to connect."""
        import json

        path = Path(self.cfg.run_dir) / COORDINATOR_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({
            "rollout_addr": self.rollout_addr, "control_addr": self.control_addr, "weight_store": list(weight_store),
            "job_id": os.environ.get("SLURM_JOB_ID"), "restart": os.environ.get("SLURM_RESTART_COUNT", "0"),
        }))
        os.replace(tmp, path)
        return path

    def _start(self, engine_id: int, generation: int) -> EngineProcess:
        # Daemonic, so it ends with this process; except a TP engine, whose vLLM starts worker processes (a
        # daemonic process may not have children): that one still dies with us through die_with_parent.
        proc = spawn_engine(self._mp, engine_id, generation, self.cfg_dict, self.model_dir, self.rollout_addr,
                            self.control_addr, daemon=self.cfg.fleet.engine_tensor_parallel_size == 1,
                            env=self.engine_env[engine_id])
        return EngineProcess(engine_id, proc, generation)

    def _send(self, engine_id: int, msg: dict) -> None:
        self.control.send_multipart([str(engine_id).encode(), pickle.dumps(msg)])

    def _read_control(self, timeout_ms: int = 0) -> None:
        while self.control.poll(timeout_ms):
            _, payload = self.control.recv_multipart()
            msg = pickle.loads(payload)
            handle = self.engines.get(msg.engine)
            if handle is None:
                log.warning("message from unknown engine %s ignored (fleet.num_engines=%d)", msg.engine,
                            len(self.engines))
            elif isinstance(msg, Hello) and handle.process is None and msg.generation > handle.generation:
                if handle.generation >= 0:  # its fleet node restarted it: weights of version 0 again
                    handle.restarts += 1
                    self.restarts_total += 1
                    self.on_restart(self.restarts_total)
                    self._restarted_remotely.append(handle.engine_id)
                    log.warning("engine %d is back (generation %d, restarted by its fleet node): re-syncing it",
                                handle.engine_id, msg.generation)
                handle.generation, handle.alive = msg.generation, True
                handle.version, handle.weight_ranks = msg.version, msg.weight_ranks
            elif isinstance(msg, Hello) and msg.generation == handle.generation:
                handle.version, handle.weight_ranks = msg.version, msg.weight_ranks
            elif isinstance(msg, Died) and msg.generation == handle.generation:
                log.warning("engine %d died on its fleet node (exit code %s)", handle.engine_id, msg.exitcode)
                # No version until its successor says hello: a dead engine is never "stale", so it is never
                # sent a Sync that nobody receives.
                handle.alive, handle.version = False, -1
            elif isinstance(msg, Synced):
                self.pending_replies.append(msg)
            timeout_ms = 0

    def restart_dead(self) -> list[int]:
        """Restart engines whose process died; returns their ids (they hold version 0 weights). External
        engines are restarted by their fleet node: this returns those that said hello again."""
        if self.external:
            self._read_control(0)
            restarted, self._restarted_remotely = self._restarted_remotely, []
            return restarted
        restarted = []
        for engine_id, handle in list(self.engines.items()):
            if handle.process.is_alive():
                continue
            refusal = restart_refusal(self.cfg, engine_id, handle.restarts, handle.process.exitcode)
            if refusal:
                raise FleetGaveUp(refusal + (f"; it was killed because it {handle.killed_for}"
                                             if handle.killed_for else ""))
            log.warning("engine %d died (exit code %s); restarting", engine_id, handle.process.exitcode)
            new = self._start(engine_id, handle.generation + 1)
            new.restarts = handle.restarts + 1
            self.engines[engine_id] = new
            self.restarts_total += 1
            self.on_restart(self.restarts_total)
            restarted.append(engine_id)
        return restarted

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
        return sorted(i for i, h in self.engines.items() if h.is_alive() and h.version >= 0)

    def dead_among(self, engine_ids: list[int]) -> str | None:
        """A message naming the engines of `engine_ids` that died since the last `request_sync`, or None
        (a weight push polls this to abort instead of waiting for them). A successor started meanwhile
        counts as dead: it was never asked to join."""
        if self.external:
            self._read_control(0)  # deaths and restarts reported by fleet nodes
        dead = [i for i in engine_ids
                if not self.engines[i].is_alive() or self.engines[i].generation != self._asked.get(i)]
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
                    if self.engines[i].is_alive() and self.engines[i].generation == self._asked.get(i)]

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
            handle = self.engines[engine_id]
            handle.refused_syncs = handle.refused_syncs + 1 if msg.error else 0
            if handle.refused_syncs >= self.cfg.fleet.max_refused_syncs:
                self._kill_refusing(handle, msg.error)
                killed.append(engine_id)
        return killed

    def _kill_refusing(self, handle: EngineProcess, error: str) -> None:
        why = (f"refused {handle.refused_syncs} weight pushes in a row (fleet.max_refused_syncs="
               f"{self.cfg.fleet.max_refused_syncs}), the last with: {error}")
        if handle.process is None:  # its fleet node restarts crashes only; a refusal is no crash there
            raise RuntimeError(f"engine {handle.engine_id} (external) {why}")
        log.error("engine %d %s: killing it (it is restarted like a crashed engine)", handle.engine_id, why)
        handle.killed_for, handle.version = why, -1
        handle.process.kill()
        handle.process.join()

    def serve(self, book: OrderBook, version: int, timeout_ms: int = 100) -> tuple[list[int], list[RolloutGroup]]:
        """One turn of dealing: restart dead engines (their open orders go back to the pool), deal open
        orders to the live engines that hold `version`, collect the groups that arrived. Returns (engines
        holding another version, which must be re-synced before anything else, groups)."""
        restarted = self.restart_dead()
        for engine_id, handle in self.engines.items():
            if engine_id in restarted or not handle.is_alive():
                book.release(engine_id)  # its open orders are dealt again
        if restarted:
            self.wait_ready(restarted)  # fleet.start_timeout_s: a restart compiles like a start
        stale = [i for i, h in self.engines.items() if 0 <= h.version != version]
        if stale:
            return stale, []
        current = [i for i, h in self.engines.items() if h.version == version and h.is_alive()]
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
        for engine_id, handle in self.engines.items():
            if handle.is_alive():
                self._send(engine_id, Stop())
        for handle in self.engines.values():
            if handle.process is None:
                continue
            handle.process.join(timeout=10)
            if handle.process.is_alive():
                handle.process.terminate()
                handle.process.join(timeout=5)
            if handle.process.is_alive():  # hung or frozen (SIGSTOP): only SIGKILL ends it
                handle.process.kill()
                handle.process.join()
        self.rollouts.close(0)
        self.control.close(0)
        self.zctx.term()
        if self.external:  # a fleet node started later must not connect to this run's dead addresses
            (Path(self.cfg.run_dir) / COORDINATOR_FILE).unlink(missing_ok=True)
