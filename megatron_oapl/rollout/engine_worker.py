"""The body of one engine process: take work orders from the coordinator, keep many of them in flight in
the engine, score finished samples in a reward pool beside it, push each group the moment it is scored.

    orders (Deal) -> pending, by rank: training orders by index, eval orders between them (orders.py)
                  -> engine.submit while fewer than fleet.max_in_flight sequences are in flight
    engine.step() -> finished groups -> one reward call per sample in the RewardPool
    pool results  -> a group whose every sample is scored goes to the coordinator (PUSH, non-blocking)

Nothing blocks the loop: control messages (a `Sync` above all) are read between engine steps, a hung
reward holds one pool worker until its timeout, and a full rollout channel only delays the send.

`fleet.reproducible=true` submits one order at a time (the engine then batches only that group's
samples), so a group's tokens depend only on its prompt, its seed and the weights: a step's groups are
bit-identical whatever the engine timing, restarts or fleet size. Off (the default), orders share the
engine's batches: every order is still answered exactly once with its own prompt, but its logits, and so
possibly its tokens, depend on what it was batched with; vLLM requests then carry no seed (vLLM samples
seeded rows one by one, a Python loop per decode step; the light engine keeps its cheap per-order seeds).
"""

from __future__ import annotations

import logging
import os
import pickle
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import zmq

from megatron_oapl.config import CHOICES

from megatron_oapl.rewards.pool import split_reward
from megatron_oapl.rollout.messages import Deal, Hello, Stop, Sync, Synced
from megatron_oapl.rollout.orders import Order, sampling_params
from megatron_oapl.rollout.types import Prompt, RolloutGroup, Sample, SamplingParams

log = logging.getLogger(__name__)


def seeds_requests(cfg) -> bool:
    """Whether an order's request carries the order's seed. vLLM samples seeded rows one by one in Python
    (review P1), and without fleet.reproducible its batching breaks bit-identity anyway: seeded only when
    reproducible. The light engine always seeds: its per-order generators cost nothing and its request
    stream batches groups by seed."""
    return cfg.fleet.reproducible or cfg.fleet.engine != "vllm"


def request_params(base: SamplingParams, seed: int, seeded: bool) -> SamplingParams:
    """The sampling parameters of one order: `base` with the order's seed, or none (`seeds_requests`)."""
    return replace(base, seed=seed if seeded else None)


def build_engine(cfg, model_dir: str, engine_id: int):
    seed = cfg.seed * 1000 + engine_id
    if cfg.fleet.engine == "torch":
        from megatron_oapl.rollout.torch_engine import TorchEngine

        return TorchEngine(model_dir, seed=seed)
    if cfg.fleet.engine == "vllm":
        from megatron_oapl.rollout.vllm_engine import VLLMEngine

        return VLLMEngine(model_dir, cfg, seed=seed)
    raise ValueError(f"fleet.engine={cfg.fleet.engine!r} is not a known engine (allowed: "
                     f"{', '.join(CHOICES['fleet.engine'])})")


class PromptTable:
    """The prompts of one split an engine serves orders from, tokenised on first use."""

    def __init__(self, cfg, tokenizer, split: str = "train"):
        from megatron_oapl.data.prompts import load_split

        self.cfg, self.tokenizer = cfg, tokenizer
        self.prompts = load_split(cfg, split)  # train, eval or eval/<set>
        self._ids: dict[int, list[int]] = {}

    def get(self, index: int) -> Prompt:
        """The prompt with its token ids (the chat template applied)."""
        from megatron_oapl.data.prompts import prompt_token_ids

        prompt = self.prompts[index]
        if index not in self._ids:
            self._ids[index] = prompt_token_ids(self.tokenizer, self.cfg.data.chat_template, prompt.text)
        return Prompt(prompt.prompt_id, self._ids[index], prompt.text, prompt.answer, prompt.metadata)


@dataclass
class _Group:
    """An order on its way: sampled by the engine, then scored sample by sample."""

    order: Order
    prompt: Prompt
    params: SamplingParams
    started: float
    version: int = -1  # the weights that sampled it, set when the engine returns it
    samples: list[Sample] = field(default_factory=list)
    unscored: int = 0
    reward_errors: int = 0
    reward_timeouts: int = 0


class EngineWorker:
    def __init__(self, engine_id: int, generation: int, cfg, model_dir: str, rollout_addr: str,
                 control_addr: str, build=build_engine):
        from megatron_oapl.data.tokenizer import load_tokenizer, stop_token_ids
        from megatron_oapl.rewards.pool import RewardPool, reward_fields

        self.engine_id, self.cfg = engine_id, cfg
        self.engine = build(cfg, model_dir, engine_id)
        self.tokenizer = load_tokenizer(model_dir)
        self.tables: dict[str, PromptTable] = {}  # by split, loaded on its first order
        self.stops = tuple(stop_token_ids(self.tokenizer))
        self.params: dict[str, SamplingParams] = {}  # by split (orders.sampling_params), on first use
        self.seeded = seeds_requests(cfg)
        self.rewards = RewardPool(cfg.rewards, cfg.rewards.num_workers, reward_fields(cfg))
        self.pending: list[Order] = []  # dealt, not yet submitted to the engine
        # Submitted, not yet sent, by submission number: an order key can come back (eval prompt i at every
        # version), a submission number never does, so a late reward result cannot land in a newer group.
        self.groups: dict[int, _Group] = {}
        self.submissions = 0
        self.outbox: list[bytes] = []  # scored groups the rollout channel could not take yet
        self.zctx = zmq.Context()
        self.control = self.zctx.socket(zmq.DEALER)
        self.control.setsockopt(zmq.IDENTITY, str(engine_id).encode())
        self.control.connect(control_addr)
        self.out = self.zctx.socket(zmq.PUSH)
        self.out.setsockopt(zmq.SNDHWM, 64)
        self.out.connect(rollout_addr)
        self.control.send_pyobj(Hello(engine_id, generation, self.engine.version, self.engine.weight_ranks))

    # ------------------------------------------------------------------------------------ the loop

    def run(self) -> None:
        while self._handle_control():
            self._submit()
            sampled = self.engine.step() if self.engine.in_flight() else []
            for key, samples in sampled:
                self._score(key, samples)
            busy = self.engine.in_flight() > 0
            # Idle engine: wait a little on the rewards instead of spinning.
            for result in self.rewards.poll(0 if busy or not self.rewards.pending() else 0.02):
                self._scored(result)
            self._send()
            if not busy and not self.rewards.pending():  # wait for the coordinator (or the rollout channel)
                self.control.poll(10 if self.outbox else 50)

    def _handle_control(self) -> bool:
        """Process pending control messages; False once told to stop."""
        while self.control.poll(0):
            msg = self.control.recv_pyobj()
            if isinstance(msg, Stop):
                return False
            if isinstance(msg, Deal):
                self.pending.extend(msg.orders)
                # Earlier steps first: the learner's next step must not wait behind later orders; eval
                # orders are ranked between the round's training orders (orders.eval_ranks).
                self.pending.sort(key=lambda o: o.priority)
            elif isinstance(msg, Sync):
                self._sync(msg)
        return True

    def _submit(self) -> None:
        while self.pending:
            order = self.pending[0]
            if order.split not in self.params:
                self.params[order.split] = sampling_params(self.cfg, order.split, self.stops)
            params = request_params(self.params[order.split], order.seed, self.seeded)
            in_flight = self.engine.in_flight()
            # One group at a time when reproducible; else whole groups up to fleet.max_in_flight sequences.
            if in_flight and (self.cfg.fleet.reproducible or in_flight + params.n > self.cfg.fleet.max_in_flight):
                return
            self.pending.pop(0)
            if order.split not in self.tables:
                self.tables[order.split] = PromptTable(self.cfg, self.tokenizer, order.split)
            prompt = self.tables[order.split].get(order.prompt_index)
            self.submissions += 1
            self.groups[self.submissions] = _Group(order, prompt, params, time.perf_counter())
            self.engine.submit(self.submissions, prompt.token_ids, params)

    def _score(self, submission: int, samples: list[Sample]) -> None:
        group = self.groups[submission]
        group.version, group.samples, group.unscored = self.engine.version, samples, len(samples)
        reward = split_reward(self.cfg, group.order.split)  # the order's eval set may bring its own checker
        for i, sample in enumerate(samples):
            self.rewards.submit((submission, i), sample.text, group.prompt, reward)

    def _scored(self, result) -> None:
        submission, i = result.key
        group = self.groups.get(submission)
        if group is None:  # its order was dropped by a sync meanwhile
            return
        group.samples[i].reward = result.value
        group.reward_errors += int(result.error is not None)  # a timeout is counted apart (error None)
        group.reward_timeouts += int(result.timed_out)
        group.unscored -= 1
        if group.unscored == 0:
            del self.groups[submission]
            o = group.order
            self.outbox.append(pickle.dumps(RolloutGroup(
                group.prompt, group.samples, group.version, group.params.temperature, group.params.top_p,
                self.engine_id, o.index, o.split, time.perf_counter() - group.started,
                group.reward_errors, group.reward_timeouts)))

    def _send(self) -> None:
        while self.outbox:
            try:
                self.out.send(self.outbox[0], zmq.NOBLOCK)
            except zmq.Again:  # back-pressure: try again next turn, never block the loop
                return
            self.outbox.pop(0)

    def _sync(self, msg: Sync) -> None:
        """Join the push of `msg.version`. Orders of older versions belong to finished rounds (or were
        dealt again elsewhere): they are dropped, in flight or not, before the weights change."""
        from megatron_oapl.weights.transport import WeightSyncError

        old = [k for k, g in self.groups.items() if g.order.version < msg.version]
        self.engine.abort(old)
        for k in old:
            del self.groups[k]
        self.pending = [o for o in self.pending if o.version >= msg.version]
        # A refused push leaves the weights and version as they were: say so and carry on. Any other error
        # (a failed load) may have left the model half-written: it ends this process, which is restarted.
        error = None
        try:
            self.engine.sync_from(msg.rendezvous, msg.first_rank, msg.version)
        except WeightSyncError as err:
            error = f"{type(err).__name__}: {err}"
        self.control.send_pyobj(Synced(self.engine_id, msg.version, error))

    def close(self) -> None:
        self.rewards.close()
        self.engine.close()
        self.control.close(0)
        self.out.close(0)
        self.zctx.term()


def engine_main(engine_id: int, generation: int, cfg_dict: dict, model_dir: str,
                rollout_addr: str, control_addr: str, build=build_engine) -> None:
    """Entry point of an engine process (spawned by the coordinator's fleet or by a fleet node). `build`
    makes the model engine from (cfg, model_dir, engine_id) (tests: a fake one behind this same loop)."""
    import torch

    from megatron_oapl.config import from_dict
    from megatron_oapl.log_setup import setup_logging
    from megatron_oapl.procs import die_with_parent

    die_with_parent()
    setup_logging(f"engine {engine_id}")
    torch.set_num_threads(1)
    cfg = from_dict(cfg_dict, check_hardware=False)
    # The pid file lets operators (and tests) find this engine among the run's processes.
    pid_file = Path(cfg.run_dir) / "engines" / f"engine-{engine_id}.pid"
    pid_file.parent.mkdir(parents=True, exist_ok=True)
    pid_file.write_text(str(os.getpid()))
    worker = EngineWorker(engine_id, generation, cfg, model_dir, rollout_addr, control_addr, build)
    try:
        worker.run()
    finally:
        worker.close()
