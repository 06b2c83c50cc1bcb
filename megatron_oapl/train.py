"""The OAPL main loop, top to bottom.

Every learner rank runs `train`; global rank 0 is also the coordinator: it owns the fleet of engine
processes, the versioned buffer, the lag schedule's bookkeeping, TensorBoard and the progress line.

    per step:   coordinator collects P groups of the current policy version (re-syncing restarted
                engines first) -> control channel -> [recompute logp_lag] -> OAPL step through Megatron
    every L:    version += 1 -> every pipeline stage pushes its layers to every engine -> the buffer
                drops all groups of older versions
    eval:       the fleet also samples the eval sets with the initial weights, with the version pushed
                every eval.every steps and with the final weights; the coordinator logs eval/pass@k
                (and RUN_DIR/eval/history.jsonl, where `oapl train` reads its before / after report)
    offline:    (lag.mode=offline) the groups come from a dataset `oapl generate` wrote, streamed by
                order; no fleet, no pushes: one round as long as the run

Rank 0 and the others run the same loop (`TrainLoop`) against one interface: rank 0's `Coordinator`
decides (after waiting on the fleet as long as it takes) and publishes each answer on the control channel
(learner/distributed.py: a TCPStore, never a pending collective); a `Follower` on every other rank reads
the same answers in the same order. Only real collectives (the step, pushes, checkpoints) run on the
process groups, under parallel.collective_timeout_s.

Launch: `oapl train configs/tiny.yaml` spawns the learner ranks on this machine; under torchrun/srun
(RANK set) `python -m megatron_oapl.train CONFIG` runs one rank.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import torch

from megatron_oapl import metrics as M
from megatron_oapl.algo.shaping import overlong_penalties, shaped_rewards
from megatron_oapl.checkpoint import CheckpointManager, StopRequest, install_signal_handlers
from megatron_oapl.config import from_dict, to_dict
from megatron_oapl.learner.batch import TrainBatch, build_batch
from megatron_oapl.learner.distributed import ControlChannel, destroy_distributed, init_distributed
from megatron_oapl.learner.model import build_model, build_policy
from megatron_oapl.learner.step import NonFiniteGuard, forward_logprobs, train_step
from megatron_oapl.models.hf_config import resolve_model
from megatron_oapl.models.hf_mapping import HFMapping
from megatron_oapl.rollout.fleet import FleetGaveUp, FleetStopped
from megatron_oapl.rollout.orders import all_equal
from megatron_oapl.rollout_sources import DatasetRollouts, FleetRollouts
from megatron_oapl.schedule import LagSchedule
from megatron_oapl.weights.hf_io import hf_tensor_reader
from megatron_oapl.weights.reshard import load_hf_tensors
from megatron_oapl.weights.sync import WeightPusher, stage_rendezvous
from megatron_oapl.weights.transport import Rendezvous

log = logging.getLogger("oapl.train")


# --------------------------------------------------------------------------------------------------
# Rank 0 and the others: the same calls, one decides, the others follow
# --------------------------------------------------------------------------------------------------


class RunStop:
    """Rank 0's view of a stop request: its own signal or deadline, or another rank's (passed on over the
    control channel, so a signal that reaches only some ranks still stops the run at one step)."""

    def __init__(self, own: StopRequest, channel: ControlChannel):
        self.own, self.channel = own, channel

    def __bool__(self) -> bool:
        return bool(self.own) or self.channel.stop_requested()

    @property
    def reason(self) -> str:
        return self.own.reason if self.own else "another rank's stop signal"


class Coordinator:
    """Rank 0's side of the loop: where the groups come from (`rollout_sources`), TensorBoard, the
    progress line, and how long the learner waited. Every answer the other ranks need goes out on the
    control channel as soon as it is decided (`Follower` reads them in the same order)."""

    def __init__(self, cfg, cfg_dict: dict, schedule: LagSchedule, channel: ControlChannel, stop: StopRequest):
        self.cfg, self.cfg_dict, self.schedule, self.channel = cfg, cfg_dict, schedule, channel
        self.stop = RunStop(stop, channel)
        self.writer = M.MetricsWriter(Path(cfg.run_dir) / "tensorboard", cfg.logging.tensorboard)
        self.source = self.progress = None
        self.wait_seconds = self.busy_seconds = 0.0  # run totals (the idle fraction)
        self.step_wait_seconds = 0.0  # this step's wait, reset when the step is logged

    def say(self, text: str) -> None:
        log.info("%s", text)

    def start(self, first_step: int, first_position: int, version: int) -> tuple[str, int] | None:
        """Start the rollout source (a fleet may take many minutes); the weight store's address, or None
        if a stop signal came first."""
        cfg = self.cfg
        try:
            self.source = (DatasetRollouts(cfg, first_step, first_position) if cfg.lag.mode == "offline" else
                           FleetRollouts(cfg, self.cfg_dict, self.schedule, self.writer, first_step, first_position,
                                         self.stop))
            if self.source.pushes:  # after a resume the engines hold version 0: they are
                self.source.buffer.current_version = version  # re-synced before any group counts
            answer = (cfg.fleet.weight_sync.master_addr, self.source.store_port)
        except FleetStopped as err:
            log.warning("%s: exiting before the first step", err)
            answer = None
        self.channel.publish(answer)
        if answer is not None:
            self.progress = _progress(cfg, first_step)
            if first_step == 1:
                self.source.start_eval(version, step=0)  # the initial weights ("before"), at step 0
        return answer

    def next_message(self, step: int | None, version: int) -> dict:
        start = time.perf_counter()
        try:
            message = self.source.next_message(step, version)
        except FleetGaveUp as err:  # every rank saves the last finished step, then the run ends
            message = {"gave_up": str(err)}
        finally:
            waited = time.perf_counter() - start
            self.wait_seconds += waited
            self.step_wait_seconds += waited
        self.channel.publish(message)
        return message

    def sync_targets(self) -> tuple[list[int], int]:
        targets = self.source.sync_targets()
        self.channel.publish(targets)
        return targets

    def request_sync(self, engines: list[int], version: int, rdvs: list[Rendezvous]) -> None:
        self.source.request_sync(engines, version, rdvs)

    def peer_check(self, engines: list[int]):
        return self.source.peer_check(engines)

    def finish_sync(self, engines: list[int], version: int) -> None:
        self.source.finish_sync(engines, version)

    def start_eval(self, version: int, step: int) -> None:
        self.source.start_eval(version, step)

    def agree_stop(self) -> bool:
        """At a step boundary: stop here? (any rank's signal; every rank takes the same branch)"""
        stopping = bool(self.stop)
        self.channel.publish(stopping)
        return stopping

    @property
    def stop_reason(self) -> str:
        return self.stop.reason

    def log_step(self, step, version, groups, result, extra, seconds, guard) -> None:
        values = rollout_metrics(groups, version, self.cfg)
        values.update({M.LOSS_PREFIX + k: v for k, v in result.metrics.items()})
        values.update(result.layout)  # micro-batches per step, padding fraction
        values.update(result.expert_load)  # tokens per expert (MoE policies)
        self.busy_seconds += seconds
        values.update({
            M.LOSS: result.loss, M.GRAD_NORM: result.grad_norm, M.LR: result.lr, M.SKIPPED_STEPS: guard.total,
            **self.source.counters(),
            M.STEP_SECONDS: seconds, M.WAIT_SECONDS: self.step_wait_seconds,
            M.TOKENS_PER_SECOND: result.num_tokens / max(seconds, 1e-9),
            M.IDLE_FRACTION: self.wait_seconds / max(self.busy_seconds, 1e-9),
            **extra,
        })
        self.step_wait_seconds = 0.0
        if step % self.cfg.logging.log_every == 0:
            self.writer.scalars(values, step)
        postfix = {"v": version, "reward": f"{values[M.REWARD_MEAN]:.2f}", "acc": f"{values[M.ACCURACY]:.2f}"}
        if self.source.last_pass_at_1 is not None:  # the latest held-out evaluation (eval.every > 0)
            postfix["pass@1"] = f"{self.source.last_pass_at_1:.3f}"
        self.progress.set_postfix(postfix, tok_s=f"{values[M.TOKENS_PER_SECOND]:.0f}", refresh=False)
        self.progress.update(1)

    def end_of_training(self) -> None:
        if self.progress:
            self.progress.close()

    def close(self) -> None:
        if self.source:
            self.source.close()
        self.writer.close()


class Follower:
    """Every other rank's side: the same calls as `Coordinator`, answered with what rank 0 published, in
    the same order; what only rank 0 does (the fleet, logging) is nothing here."""

    def __init__(self, channel: ControlChannel, stop: StopRequest):
        self.channel, self.stop = channel, stop

    def say(self, text: str) -> None:
        pass

    def start(self, first_step: int, first_position: int, version: int) -> tuple[str, int] | None:
        return self.channel.receive(self.stop)

    def next_message(self, step: int | None, version: int) -> dict:
        return self.channel.receive(self.stop)

    def sync_targets(self) -> tuple[list[int], int]:
        return self.channel.receive(self.stop)

    def request_sync(self, engines: list[int], version: int, rdvs: list[Rendezvous]) -> None:
        pass

    def peer_check(self, engines: list[int]):
        return None

    def finish_sync(self, engines: list[int], version: int) -> None:
        pass

    def start_eval(self, version: int, step: int) -> None:
        pass

    def agree_stop(self) -> bool:
        return self.channel.receive(self.stop)

    @property
    def stop_reason(self) -> str:
        return self.stop.reason if self.stop else "rank 0"

    def log_step(self, step, version, groups, result, extra, seconds, guard) -> None:
        pass

    def end_of_training(self) -> None:
        pass

    def close(self) -> None:
        pass


def rollout_metrics(groups, version: int, cfg) -> dict[str, float]:
    """The step's rollout metrics, over raw scores (before any shaping)."""
    samples = [s for g in groups for s in g.samples]
    rewards = torch.tensor([s.reward or 0.0 for s in samples])
    penalties = overlong_penalties([len(s.token_ids) for s in samples], cfg.fleet.max_new_tokens,
                                   cfg.rewards.overlong_buffer_tokens, cfg.rewards.overlong_penalty)
    return {
        M.GROUPS_TRAINED: sum(not all_equal(g.rewards) for g in groups),
        M.OVERLONG_PENALIZED_FRAC: (penalties != 0).double().mean().item(),
        M.REWARD_MEAN: rewards.mean().item(),
        M.ACCURACY: (rewards == 1.0).float().mean().item(),
        M.RESPONSE_LENGTH: sum(len(s.token_ids) for s in samples) / len(samples),
        M.TRUNCATED_FRACTION: sum(s.finish_reason == "length" for s in samples) / len(samples),
        M.SEQUENCE_ENTROPY: -sum(sum(s.logprobs) for s in samples) / len(samples),
        M.POLICY_VERSION: version,
        M.GROUP_LAG: sum(version - g.policy_version for g in groups) / len(groups),
        M.GROUP_LAG_MAX: max(version - g.policy_version for g in groups),
        M.GROUP_LATENCY_SECONDS: sum(g.generate_seconds for g in groups) / len(groups),
    }


# --------------------------------------------------------------------------------------------------
# Learner side: batches, syncs
# --------------------------------------------------------------------------------------------------


def batch_from_groups(groups, cfg, pad_id: int = 0) -> TrainBatch:
    """The loss inputs of a step: raw scores shaped by the overlong penalty (rewards.overlong_buffer_tokens)
    and, with algo.mask_truncated, truncated samples kept out of the loss sum."""
    rewards = [g.rewards for g in groups]
    if cfg.rewards.overlong_buffer_tokens:
        rewards = shaped_rewards(rewards, [[len(s.token_ids) for s in g.samples] for g in groups],
                                 cfg.fleet.max_new_tokens, cfg.rewards.overlong_buffer_tokens,
                                 cfg.rewards.overlong_penalty)
    keep = ([[s.finish_reason != "length" for s in g.samples] for g in groups] if cfg.algo.mask_truncated
            else None)
    return build_batch(
        [g.prompt.token_ids for g in groups],
        [[s.token_ids for s in g.samples] for g in groups],
        rewards,
        [[s.logprobs for s in g.samples] for g in groups],
        pad_id=pad_id,
        keep=keep,
    )


@dataclasses.dataclass
class SyncState:
    """Learner-side sync bookkeeping, identical on every rank."""

    store_addr: str
    store_port: int
    pusher: WeightPusher
    num_stages: int
    epoch: int = 0
    pushed: bool = False  # a fresh push happened in this process (same on every rank: decides collectives)

    def rendezvous(self, receivers: int, cfg) -> list[Rendezvous]:
        """One weight group per stage for `receivers` engine ranks (an engine takes one per TP worker)."""
        self.epoch += 1
        # auto: NCCL when every member has a GPU of its own, else gloo (weights/transport.choose_backend)
        return stage_rendezvous(self.store_addr, self.store_port, self.epoch, self.num_stages, receivers,
                                cfg.fleet.weight_sync.backend, cfg.fleet.weight_sync.timeout_s)


def push(policy, ctx, rdvs, version, state: SyncState, fresh: bool, check_peers=None) -> None:
    """Every stage pushes its layers as `version`: the current weights (`fresh`), or the last push again.
    `check_peers` (coordinator only) names engines that died, so the push aborts at once for everyone."""
    state.pushed = state.pushed or fresh
    try:
        if fresh:
            state.pusher.push(policy.model, rdvs[ctx.pp_rank], version, check_peers)
        else:
            state.pusher.resend(rdvs[ctx.pp_rank], version, check_peers)
    except RuntimeError as err:
        # An engine died during the push: every member aborted, the live engines kept their weights; the
        # coordinator restarts the dead engine and re-syncs every engine that did not confirm this version.
        log.warning("weight push of version %d (stage %d) failed: %s", version, ctx.pp_rank, err)


def copy_weights(src_chunks, dst_chunks) -> None:
    with torch.no_grad():
        for src, dst in zip(src_chunks, dst_chunks):
            for p_src, p_dst in zip(src.parameters(), dst.parameters()):
                p_dst.copy_(p_src)


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------


class TrainLoop:
    """One rank's run: the policy, the rollouts (rank 0's `Coordinator` or a `Follower`: the loop makes the
    same calls on every rank, so every rank joins the same collectives), the lag schedule, checkpoints."""

    def __init__(self, cfg, cfg_dict: dict, ctx):
        self.cfg, self.ctx = cfg, ctx
        self.policy = build_policy(cfg, ctx)
        self.mapping = HFMapping.for_config(cfg.model)
        load_hf_tensors(self.policy.model, self.mapping, hf_tensor_reader(cfg.model.hf_path))
        self.policy.optimizer.reload_model_params()
        self.offline = cfg.lag.mode == "offline"  # one round on a dataset: no fleet, no pushes, version 0 throughout
        # `recompute`: pi_lag is a frozen copy of the weights the samples came from (memory: one more model):
        # offline the generator (model.hf_path, also after a resume), online the last push (after a resume,
        # the resumed weights, to which the engines are re-synced).
        self.frozen = build_model(cfg, ctx)[0] if cfg.algo.logp_lag_source == "recompute" else None
        if self.frozen is not None and self.offline:
            copy_weights(self.policy.model, self.frozen)
        # Resume: `oapl train` on an existing run directory continues from its `latest` checkpoint.
        self.checkpoints = CheckpointManager(cfg.run_dir, cfg.checkpoint.keep_last, config=cfg)
        resumed = (self.checkpoints.load(cfg.checkpoint.load, self.policy, ctx) if cfg.checkpoint.load
                   else self.checkpoints.load_latest(self.policy, ctx))
        self.stop = install_signal_handlers()  # SIGTERM / SIGUSR1: checkpoint at the next step boundary, exit
        if self.frozen is not None and not self.offline:
            copy_weights(self.policy.model, self.frozen)
        self.schedule = LagSchedule.from_config(cfg.lag)
        self.guard = NonFiniteGuard(cfg.optim.max_consecutive_nonfinite)
        self.version, self.first_step, self.first_position = 0, 1, 0
        if resumed:
            self.first_step = resumed.get("step", 0) + 1
            self.version = resumed.get("policy_version", 0)
            self.first_position = resumed.get("sampler_position", (self.first_step - 1) * cfg.fleet.prompts_per_step)
            self.guard.consecutive = resumed.get("guard_consecutive", 0)
            self.guard.total = resumed.get("guard_total", 0)
        self.last_saved = self.first_step - 1  # the checkpoint this run started from (0: none)
        self.position = self.first_position  # sampler position after the last step trained (what a checkpoint stores)
        self.sync: SyncState | None = None
        self.evaluated_version = -1  # the last version whose evaluation was started
        channel = ControlChannel.of_world()
        # The one place that tells rank 0 from the others.
        self.rollouts = (Coordinator(cfg, cfg_dict, self.schedule, channel, self.stop) if ctx.is_coordinator
                         else Follower(channel, self.stop))
        if resumed:
            self.rollouts.say(f"resuming from {resumed['checkpoint_dir']}: step {self.first_step - 1}, policy "
                              f"version {self.version}, sampler position {self.first_position}")

    def run(self) -> None:
        store = self.rollouts.start(self.first_step, self.first_position, self.version)
        if store is None:
            return  # stopped while the fleet was starting: nothing trained, nothing to save
        pusher = WeightPusher(self.mapping, self.ctx, int(self.cfg.fleet.weight_sync.bucket_mb * 2**20))
        self.sync = SyncState(*store, pusher=pusher, num_stages=self.ctx.pp_size)
        for step in range(self.first_step, self.cfg.optim.train_steps + 1):
            if self.train_one(step):
                return  # a stopped run ends at its checkpoint: no waiting on the fleet, no final export
        self.rollouts.end_of_training()
        if not self.offline:
            self.evaluate_final(self.cfg.optim.train_steps)
        self.receive_groups(None)  # the pending evaluation
        _export_final(self.policy, self.mapping, self.ctx, self.cfg)

    def train_one(self, step: int) -> bool:
        """Step `step`: rollouts, the OAPL step, a push every L steps, a checkpoint when due. True when the
        run stops here (checkpointed)."""
        cfg, ctx = self.cfg, self.ctx
        step_start = time.perf_counter()
        # 1. Rollouts of the current version (re-syncing restarted engines first).
        groups = self.receive_groups(step)
        if groups is None:  # a stop signal arrived while waiting: save the last finished step now
            if step - 1 > self.last_saved:
                self.save(step - 1)
            log.warning("stop requested by %s while waiting for rollouts: checkpointed step %d, exiting",
                        self.rollouts.stop_reason, self.last_saved)
            return True
        consumed_version = self.version
        batch = batch_from_groups(groups, cfg)
        # 2. logp_lag: the engine's, or recomputed with the last pushed weights.
        extra = {}
        if self.frozen is not None:
            engine_logp = batch.logp_lag
            batch.logp_lag = forward_logprobs(_Frozen(self.frozen), batch, cfg, ctx)
            extra[M.LOGP_GAP] = (engine_logp - batch.logp_lag).abs().mean().item()
        # 3. The OAPL step.
        result = train_step(self.policy, batch, cfg, ctx, step)
        self.guard.update(result.skipped, step)
        round_start = step == 1 if self.offline else (step - 1) % self.schedule.sync_every == 0
        if self.frozen is None and round_start and "abs_log_ratio_mean" in result.metrics:
            # First step of a round: pi_theta still equals the pushed weights, so the log-ratio
            # against the engine's log-probs is exactly the engine-learner gap.
            extra[M.LOGP_GAP] = result.metrics["abs_log_ratio_mean"]
        # 4. Every L steps: new version, pushed to every engine; older groups are dropped.
        if not self.offline and self.schedule.sync_after(step):
            extra.update(self.new_version(step))
        self.rollouts.log_step(step, consumed_version, groups, result, extra, time.perf_counter() - step_start,
                               self.guard)
        stopping = self.rollouts.agree_stop()  # every rank stops at the same step
        every = cfg.checkpoint.save_every
        if stopping or step == cfg.optim.train_steps or (every and step % every == 0):
            self.save(step)
        if stopping:
            log.warning("stop requested by %s: checkpointed step %d, exiting", self.rollouts.stop_reason, step)
        return stopping

    def receive_groups(self, step: int | None) -> list | None:
        """The groups of `step` (None: none, only the pending evaluation), re-syncing restarted engines
        first; None if a stop signal arrived while waiting."""
        while True:
            message = self.rollouts.next_message(step, self.version)
            if "stop" in message:
                return None
            if "gave_up" in message:
                self.give_up(message["gave_up"], step)
            if "groups" in message:
                self.position = message.get("position", self.position)  # every rank: the same message
                return message["groups"]
            # Re-syncs resend the last push (the learner has moved on since); before the first push of
            # this process (start, resume) the current weights are this version's.
            self.sync_engines(message["resync"], message["receivers"], fresh=not self.sync.pushed)

    def new_version(self, step: int) -> dict[str, float]:
        """version += 1, pushed to every engine; returns the sync's metrics."""
        self.version += 1
        sync_start = time.perf_counter()
        engines, receivers = self.rollouts.sync_targets()
        self.sync_engines(engines, receivers, fresh=True)
        if self.frozen is not None:
            copy_weights(self.policy.model, self.frozen)
        every, sync_every = self.cfg.eval.every, self.schedule.sync_every
        if every and step // every > (step - sync_every) // every:
            self.start_eval(step)  # this round crossed a multiple of eval.every
        return {M.SYNC_SECONDS: time.perf_counter() - sync_start, M.SYNC_BYTES: self.sync.pusher.last_bytes}

    def start_eval(self, step: int) -> None:
        self.rollouts.start_eval(self.version, step)
        self.evaluated_version = self.version

    def evaluate_final(self, step: int) -> None:
        """The trained weights on every eval set, sampled by the training fleet (`oapl train`'s "after"
        report, and eval/pass@k at the last step): pushed first if the last round ended before its L steps."""
        if not self.schedule.sync_after(step):
            self.version += 1
            self.sync_engines(*self.rollouts.sync_targets(), fresh=True)
        if self.evaluated_version != self.version:
            self.start_eval(step)

    def sync_engines(self, engines: list[int], receivers: int, fresh: bool) -> None:
        """Bring `engines` (holding `receivers` weight-group ranks) to the current version: the coordinator
        asks them to join, every stage pushes (collectives over each stage's TP group), the coordinator
        collects their replies and drops older groups."""
        rdvs = self.sync.rendezvous(receivers, self.cfg)
        self.rollouts.request_sync(engines, self.version, rdvs)
        push(self.policy, self.ctx, rdvs, self.version, self.sync, fresh, check_peers=self.rollouts.peer_check(engines))
        self.rollouts.finish_sync(engines, self.version)

    def give_up(self, reason: str, step: int | None) -> None:
        """The fleet exhausted its restarts: the learners are healthy, so their last finished step is saved
        before the run ends with one line (collective: every rank got the same message)."""
        done = self.cfg.optim.train_steps if step is None else step - 1
        if done > self.last_saved:
            self.save(done)
        kept = (f"the learners checkpointed step {self.last_saved}" if self.last_saved else "no step was trained")
        raise FleetGaveUp(f"{reason}: {kept}; run the same command again to resume once the engines can run")

    def save(self, done: int) -> None:  # collective
        self.checkpoints.save(done, self.policy, self.ctx, {
            "step": done, "policy_version": self.version,
            # The first work order after the last step trained: the prompt stream and sampling seeds
            # continue from here (with dynamic sampling, where that step's refill stopped).
            "sampler_position": self.position,
            "guard_consecutive": self.guard.consecutive, "guard_total": self.guard.total})
        self.last_saved = done


def train(cfg_dict: dict) -> None:
    cfg = resolve_model(from_dict(cfg_dict))
    ctx = init_distributed(cfg)
    loop = None
    try:
        loop = TrainLoop(cfg, to_dict(cfg), ctx)
        loop.run()
    finally:
        if loop is not None:
            loop.rollouts.close()
        destroy_distributed()


class _Frozen:
    """`forward_logprobs` needs only `.model` (the model chunks)."""

    def __init__(self, model_chunks):
        self.model = model_chunks


def _progress(cfg, first_step: int = 1):
    from tqdm import tqdm

    return tqdm(total=cfg.optim.train_steps, initial=first_step - 1, desc="oapl", unit="step", dynamic_ncols=True)


def _export_final(policy, mapping, ctx, cfg) -> None:
    """The final weights as an HF directory (`run_dir/hf`): each stage's sender streams its own shards, rank 0
    merges the index (weights/export.py); collective over the learners."""
    from megatron_oapl.weights.export import export_hf_model

    export_hf_model(policy.model, mapping, ctx, cfg.model.hf_path, Path(cfg.run_dir) / "hf")


def main() -> None:
    import sys

    import os

    from megatron_oapl.config import load_config
    from megatron_oapl.log_setup import setup_logging

    setup_logging(f"rank {os.environ.get('RANK', 0)}")
    cfg = load_config(sys.argv[1], tuple(sys.argv[2:]))
    train(to_dict(cfg))


if __name__ == "__main__":
    main()
