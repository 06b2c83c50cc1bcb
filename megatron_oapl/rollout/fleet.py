"""The fleet: M engine processes that sample the groups the coordinator orders (rollout/orders.py), score
them and push them, version-tagged, to the coordinator over ZeroMQ; and the coordinator-side handle that
starts, restarts, syncs and deals orders to them.

Channels (both ZeroMQ, both opened by the coordinator):
- rollouts: engines PUSH pickled `RolloutGroup`s -> coordinator PULL. A small high-water mark gives
  back-pressure; engines send without blocking so that they keep answering control messages.
- control: coordinator ROUTER <-> engine DEALER (identity = engine id): `hello` (engine -> coordinator,
  on start), `orders` (coordinator -> engine: work orders to sample, in order), `sync` (coordinator ->
  engine: rendezvous of the weight groups and the new version), `synced` (engine -> coordinator: applied
  or refused), `stop`.

An engine process that dies is restarted (up to `fleet.max_restarts` times each) from the initial
weights at version 0; its open orders go to the pool again, and the coordinator re-syncs it to the current
version before it gets new orders (groups of an old version are dropped and counted by the buffer, never
mixed).
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing as mp
import os
import pickle
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import zmq

from megatron_oapl.rollout.orders import Order, OrderBook
from megatron_oapl.rollout.types import Prompt, RolloutGroup, SamplingParams

log = logging.getLogger(__name__)


def build_engine(cfg, model_dir: str, engine_id: int):
    if cfg.fleet.engine == "torch":
        from megatron_oapl.rollout.torch_engine import TorchEngine

        return TorchEngine(model_dir, seed=cfg.seed * 1000 + engine_id)
    if cfg.fleet.engine == "vllm":
        from megatron_oapl.rollout.vllm_engine import VLLMEngine

        return VLLMEngine(model_dir, cfg, seed=cfg.seed * 1000 + engine_id)
    raise ValueError(f"fleet.engine={cfg.fleet.engine!r} is not a known engine (allowed: torch, vllm)")


def spawn_engine(mp_ctx, engine_id: int, generation: int, cfg_dict: dict, model_dir: str, rollout_addr: str,
                 control_addr: str, daemon: bool = False) -> mp.Process:
    """Start `engine_main` in a spawned process (used by the coordinator's local fleet and by fleet_node)."""
    proc = mp_ctx.Process(
        target=engine_main, name=f"oapl-engine-{engine_id}", daemon=daemon,
        args=(engine_id, generation, cfg_dict, model_dir, rollout_addr, control_addr),
    )
    proc.start()
    return proc


def restart_refusal(cfg, engine_id: int, restarts: int, exitcode: int | None) -> str | None:
    """Why a dead engine must not be restarted (its fleet.max_restarts are used up), or None to restart."""
    if restarts < cfg.fleet.max_restarts:
        return None
    return (f"engine {engine_id} died {restarts + 1} times (exit code {exitcode}); "
            f"fleet.max_restarts={cfg.fleet.max_restarts} reached")


class PromptTable:
    """The prompts of one split an engine serves orders from, tokenised on first use."""

    def __init__(self, cfg, tokenizer, split: str = "train"):
        from megatron_oapl.data.prompts import load_prompts

        self.cfg, self.tokenizer = cfg, tokenizer
        self.prompts = load_prompts(cfg.data, split)
        self._ids: dict[int, list[int]] = {}

    def get(self, index: int) -> tuple[Prompt, list[int]]:
        from megatron_oapl.data.templates import render_prompt
        from megatron_oapl.data.tokenizer import encode_prompt

        prompt = self.prompts[index]
        if index not in self._ids:
            text = render_prompt(self.tokenizer, self.cfg.data.chat_template, prompt.text)
            self._ids[index] = encode_prompt(self.tokenizer, text)
        return prompt, self._ids[index]


def engine_main(engine_id: int, generation: int, cfg_dict: dict, model_dir: str,
                rollout_addr: str, control_addr: str) -> None:
    """Body of one engine process."""
    import torch

    from megatron_oapl.config import from_dict
    from megatron_oapl.data.tokenizer import load_tokenizer, stop_token_ids
    from megatron_oapl.rewards.registry import RewardScorer
    from megatron_oapl.rollout.weight_receiver import receive_all_stages
    from megatron_oapl.weights.transport import Rendezvous, WeightSyncError

    from megatron_oapl.launcher import die_with_parent

    die_with_parent()
    torch.set_num_threads(1)
    cfg = from_dict(cfg_dict, check_hardware=False)
    # The pid file lets operators (and tests) find this engine among the run's processes.
    pid_file = Path(cfg.run_dir) / "engines" / f"engine-{engine_id}.pid"
    pid_file.parent.mkdir(parents=True, exist_ok=True)
    pid_file.write_text(str(os.getpid()))
    engine = build_engine(cfg, model_dir, engine_id)
    tokenizer = load_tokenizer(model_dir)
    tables = {"train": PromptTable(cfg, tokenizer)}  # the eval table is loaded on the first eval order
    queue: deque[Order] = deque()  # work orders not yet sampled
    scorer = RewardScorer(cfg.rewards)
    stops = tuple(stop_token_ids(tokenizer))
    params = {
        "train": SamplingParams(n=cfg.fleet.group_size, temperature=cfg.fleet.temperature, top_p=cfg.fleet.top_p,
                                max_new_tokens=cfg.fleet.max_new_tokens, stop_token_ids=stops),
        "eval": SamplingParams(n=cfg.eval.num_samples, temperature=cfg.eval.temperature, top_p=cfg.fleet.top_p,
                               max_new_tokens=cfg.fleet.max_new_tokens, stop_token_ids=stops),
    }
    zctx = zmq.Context()
    control = zctx.socket(zmq.DEALER)
    control.setsockopt(zmq.IDENTITY, str(engine_id).encode())
    control.connect(control_addr)
    out = zctx.socket(zmq.PUSH)
    out.setsockopt(zmq.SNDHWM, 4)
    out.connect(rollout_addr)
    control.send_pyobj({"type": "hello", "engine": engine_id, "generation": generation, "version": engine.version})

    def handle_control() -> bool:
        """Process pending control messages; False once told to stop."""
        while control.poll(0):
            msg = control.recv_pyobj()
            if msg["type"] == "stop":
                return False
            if msg["type"] == "orders":
                queue.extend(msg["orders"])
            if msg["type"] == "sync":
                # Orders of older versions belong to finished rounds (or were re-dealt): drop them.
                kept = [o for o in queue if o.version >= msg["version"]]
                queue.clear()
                queue.extend(kept)
                rdvs = [Rendezvous(**r) for r in msg["rendezvous"]]
                reply = {"type": "synced", "engine": engine_id, "version": msg["version"], "error": None}
                try:
                    start = time.perf_counter()
                    if hasattr(engine, "sync_from"):  # vLLM: its workers join the weight groups themselves
                        engine.sync_from(msg["rendezvous"], msg["rank"], msg["version"])
                    else:
                        engine.load_weights(receive_all_stages(rdvs, msg["rank"], msg["version"]), msg["version"])
                    reply["seconds"] = time.perf_counter() - start
                except (WeightSyncError, RuntimeError) as err:  # keep the previous weights and say so
                    reply["error"] = f"{type(err).__name__}: {err}"
                control.send_pyobj(reply)
        return True

    try:
        while handle_control():
            if not queue:
                control.poll(50)  # idle until the coordinator sends orders (or a sync, or stop)
                continue
            order = queue.popleft()
            if order.split not in tables:
                tables[order.split] = PromptTable(cfg, tokenizer, order.split)
            prompt, ids = tables[order.split].get(order.prompt_index)
            sampling = dataclasses.replace(params[order.split], seed=order.seed)
            start = time.perf_counter()
            # One call per order with the order's own seed: the group does not depend on the engine,
            # on batching, or on what the engine sampled before.
            samples = engine.generate([ids], sampling)[0]
            for sample in samples:
                sample.reward = scorer.score(sample.text, prompt)
            group = RolloutGroup(Prompt(prompt.prompt_id, ids, prompt.text, prompt.answer, prompt.metadata),
                                 samples, engine.version, sampling.temperature, sampling.top_p, engine_id,
                                 order.index, order.split, time.perf_counter() - start)
            payload = pickle.dumps(group)
            while True:  # non-blocking send, so a sync request is never stuck behind back-pressure
                try:
                    out.send(payload, zmq.NOBLOCK)
                    break
                except zmq.Again:
                    if not handle_control():
                        return
                    time.sleep(0.01)
    finally:
        engine.close()
        control.close(0)
        out.close(0)
        zctx.term()


@dataclass
class EngineProcess:
    engine_id: int
    process: mp.Process | None  # None: an external engine (fleet_node on another node) we only hear from
    generation: int
    version: int = -1  # unknown until its hello
    restarts: int = 0
    alive: bool = True  # external engines: False once their fleet node reports them dead

    def is_alive(self) -> bool:
        return self.process.is_alive() if self.process is not None else self.alive


COORDINATOR_FILE = "coordinator.json"


class FleetStopped(Exception):
    """A stop signal arrived while the fleet was waiting for engines to start."""


class Fleet:
    """Coordinator-side handle of the engines: local processes it spawns and restarts, or (with
    fleet.external) engines run by `fleet_node` processes elsewhere that restart their own engines and
    report deaths; both kinds say hello on (re)start and are re-synced before they get orders."""

    def __init__(self, cfg, cfg_dict: dict, model_dir: str, host: str = "127.0.0.1"):
        self.cfg, self.cfg_dict, self.model_dir = cfg, cfg_dict, model_dir
        self.external = cfg.fleet.external
        bind, advertise = ("*", cfg.fleet.weight_sync.master_addr) if self.external else (host, host)
        self.zctx = zmq.Context()
        self.rollouts = self.zctx.socket(zmq.PULL)
        self.rollouts.setsockopt(zmq.RCVHWM, 4)
        port = self.rollouts.bind_to_random_port(f"tcp://{bind}")
        self.rollout_addr = f"tcp://{advertise}:{port}"
        self.control = self.zctx.socket(zmq.ROUTER)
        port = self.control.bind_to_random_port(f"tcp://{bind}")
        self.control_addr = f"tcp://{advertise}:{port}"
        self._mp = mp.get_context("spawn")
        self.restarts_total = 0
        self.pending_replies: list[dict] = []
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
        proc = spawn_engine(self._mp, engine_id, generation, self.cfg_dict, self.model_dir, self.rollout_addr,
                            self.control_addr, daemon=True)
        return EngineProcess(engine_id, proc, generation)

    def _send(self, engine_id: int, msg: dict) -> None:
        self.control.send_multipart([str(engine_id).encode(), pickle.dumps(msg)])

    def _read_control(self, timeout_ms: int = 0) -> None:
        while self.control.poll(timeout_ms):
            _, payload = self.control.recv_multipart()
            msg = pickle.loads(payload)
            handle = self.engines.get(msg["engine"])
            if handle is None:
                log.warning("message from unknown engine %s ignored (fleet.num_engines=%d)", msg["engine"],
                            len(self.engines))
            elif msg["type"] == "hello" and handle.process is None and msg["generation"] > handle.generation:
                if handle.generation >= 0:  # its fleet node restarted it: weights of version 0 again
                    handle.restarts += 1
                    self.restarts_total += 1
                    self._restarted_remotely.append(handle.engine_id)
                handle.generation, handle.version, handle.alive = msg["generation"], msg["version"], True
            elif msg["type"] == "hello" and msg["generation"] == handle.generation:
                handle.version = msg["version"]
            elif msg["type"] == "died" and msg["generation"] == handle.generation:
                log.warning("engine %d died on its fleet node (exit code %s)", handle.engine_id, msg["exitcode"])
                handle.alive = False
            elif msg["type"] == "synced":
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
                raise RuntimeError(refusal)
            log.warning("engine %d died (exit code %s); restarting", engine_id, handle.process.exitcode)
            new = self._start(engine_id, handle.generation + 1)
            new.restarts = handle.restarts + 1
            self.engines[engine_id] = new
            self.restarts_total += 1
            restarted.append(engine_id)
        return restarted

    def wait_ready(self, engine_ids, timeout_s: float = 300.0) -> None:
        """Block until the given engines said hello (they are then ready to join a weight group); one that
        dies while starting is restarted like any other (within fleet.max_restarts). Raises `FleetStopped`
        once `should_stop()` is true (a large engine can take minutes to start)."""
        deadline = time.monotonic() + timeout_s
        while any(self.engines[i].version < 0 for i in engine_ids):
            if self.should_stop():
                raise FleetStopped(f"stop requested while engines {list(engine_ids)} were starting")
            if time.monotonic() > deadline:
                raise TimeoutError(f"engines {list(engine_ids)} did not start within {timeout_s:.0f} s")
            self.restart_dead()
            self._read_control(200)

    def ready_engines(self) -> list[int]:
        """Engines alive and past start-up: the members of the next weight group (a restarted engine
        that is still starting joins through a re-sync instead)."""
        self._read_control(0)
        return sorted(i for i, h in self.engines.items() if h.is_alive() and h.version >= 0)

    def dead_among(self, engine_ids: list[int]) -> str | None:
        """A message naming the engines of `engine_ids` whose process has died, or None (a weight push
        polls this to abort instead of waiting for them)."""
        if self.external:
            self._read_control(0)  # deaths reported by fleet nodes
        dead = [i for i in engine_ids if not self.engines[i].is_alive()]
        return f"engine(s) {dead} died" if dead else None

    def send_orders(self, engine_id: int, orders: list[Order]) -> None:
        self._send(engine_id, {"type": "orders", "orders": orders})

    def request_sync(self, engine_ids: list[int], version: int, rendezvous: list[dict]) -> None:
        """Tell engines to join the weight groups (engine k of the list is group rank k + 1)."""
        self._asked = {i: self.engines[i].generation for i in engine_ids}  # who can answer this request
        for rank, engine_id in enumerate(engine_ids, start=1):
            self._send(engine_id, {"type": "sync", "version": version, "rendezvous": rendezvous, "rank": rank})

    def wait_synced(self, engine_ids: list[int], version: int, timeout_s: float) -> dict[int, dict]:
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
                if msg["version"] == version and msg["engine"] in engine_ids:
                    replies[msg["engine"]] = msg
                    self.pending_replies.remove(msg)
            if time.monotonic() > deadline:
                raise TimeoutError(f"engines {sorted(set(engine_ids) - set(replies))} did not confirm version {version}")
        for engine_id, msg in replies.items():
            if msg["error"] is None and self.engines[engine_id].generation == self._asked.get(engine_id):
                self.engines[engine_id].version = version
        return replies

    def serve(self, book: OrderBook, version: int, timeout_ms: int = 100) -> tuple[list[int], list[RolloutGroup]]:
        """One turn of dealing: restart dead engines (their open orders go back to the pool), deal open
        orders to the live engines that hold `version`, collect the groups that arrived. Returns (engines
        holding another version, which must be re-synced before anything else, groups)."""
        restarted = self.restart_dead()
        for engine_id, handle in self.engines.items():
            if engine_id in restarted or not handle.is_alive():
                book.release(engine_id)  # its open orders are dealt again
        if restarted:
            self.wait_ready(restarted, self.cfg.fleet.weight_sync.timeout_s)
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
                self._send(engine_id, {"type": "stop"})
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
