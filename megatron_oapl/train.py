"""The OAPL main loop, top to bottom.

Every learner rank runs `train`; global rank 0 is also the coordinator: it owns the fleet of engine
processes, the versioned buffer, the lag schedule's bookkeeping, TensorBoard and the progress line.

    per step:   coordinator collects P groups of the current policy version (re-syncing restarted
                engines first) -> broadcast -> [recompute logp_lag] -> OAPL step through Megatron
    every L:    version += 1 -> every pipeline stage pushes its layers to every engine -> the buffer
                drops all groups of older versions
    eval.every: the fleet also samples the held-out prompts with the version just pushed; the
                coordinator logs eval/pass@k before the next push
    offline:    (lag.mode=offline) the groups come from a dataset `oapl generate` wrote, in order; no
                fleet, no pushes: one round as long as the run

Launch: `oapl train configs/tiny.yaml` spawns the learner ranks on this machine; under torchrun/srun
(RANK set) `python -m megatron_oapl.train CONFIG` runs one rank.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_oapl import metrics as M
from megatron_oapl.checkpoint import CheckpointManager, StopRequest, install_signal_handlers
from megatron_oapl.config import from_dict, to_dict
from megatron_oapl.learner.batch import TrainBatch, build_batch
from megatron_oapl.learner.distributed import destroy_distributed, init_distributed
from megatron_oapl.learner.model import build_model, build_policy
from megatron_oapl.learner.step import NonFiniteGuard, forward_logprobs, train_step
from megatron_oapl.models.hf_config import resolve_model
from megatron_oapl.models.hf_mapping import HFMapping
from megatron_oapl.rollout.fleet import FleetStopped
from megatron_oapl.rollout.orders import step_orders
from megatron_oapl.rollout_sources import DatasetRollouts, FleetRollouts
from megatron_oapl.schedule import LagSchedule
from megatron_oapl.weights.hf_io import hf_tensor_reader, save_hf_model
from megatron_oapl.weights.reshard import iter_hf_tensors, load_hf_tensors
from megatron_oapl.weights.sync import WeightPusher, is_stage_sender, stage_rendezvous
from megatron_oapl.weights.transport import Rendezvous

log = logging.getLogger("oapl.train")


# --------------------------------------------------------------------------------------------------
# Coordinator (global rank 0): fleet, buffer, metrics
# --------------------------------------------------------------------------------------------------


class Coordinator:
    """Rank 0's side of the loop: where the groups come from (`rollout_sources`), TensorBoard, the
    progress line, and how long the learner waited."""

    def __init__(self, cfg, cfg_dict: dict, schedule: LagSchedule, start_step: int = 1, start_position: int = 0,
                 stop: StopRequest | None = None):
        self.cfg = cfg
        self.writer = M.MetricsWriter(Path(cfg.run_dir) / "tensorboard", cfg.logging.tensorboard)
        try:
            self.source = (DatasetRollouts(cfg, start_step, start_position) if cfg.lag.mode == "offline" else
                           FleetRollouts(cfg, cfg_dict, schedule, self.writer, start_step, start_position, stop))
        except BaseException:
            self.writer.close()
            raise
        self.wait_seconds = self.busy_seconds = 0.0  # run totals (the idle fraction)
        self.step_wait_seconds = 0.0  # this step's wait, reset when the step is logged

    def next_message(self, step: int | None, version: int) -> dict:
        start = time.perf_counter()
        try:
            return self.source.next_message(step, version)
        finally:
            waited = time.perf_counter() - start
            self.wait_seconds += waited
            self.step_wait_seconds += waited

    def close(self) -> None:
        self.source.close()
        self.writer.close()


def rollout_metrics(groups, version: int) -> dict[str, float]:
    samples = [s for g in groups for s in g.samples]
    rewards = torch.tensor([s.reward or 0.0 for s in samples])
    return {
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


def batch_from_groups(groups, pad_id: int) -> TrainBatch:
    return build_batch(
        [g.prompt.token_ids for g in groups],
        [[s.token_ids for s in g.samples] for g in groups],
        [g.rewards for g in groups],
        [[s.logprobs for s in g.samples] for g in groups],
        pad_id=pad_id,
    )


def broadcast_from_coordinator(obj):
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


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


def receive_groups(coordinator, step: int | None, version: int, policy, ctx, cfg, state: SyncState) -> list:
    """The groups of `step` (None: none, only the pending evaluation), re-syncing restarted engines first;
    None if a stop signal arrived while waiting. Every rank calls it (re-syncs are collectives); the
    coordinator decides what happens."""
    while True:
        message = broadcast_from_coordinator(coordinator.next_message(step, version) if coordinator else None)
        if "stop" in message:
            return None
        if "groups" in message:
            return message["groups"]
        # Re-syncs resend the last push (the learner has moved on since); before the first push of
        # this process (start, resume) the current weights are this version's.
        sync_engines(coordinator, message["resync"], message["receivers"], version, policy, ctx, cfg, state,
                     fresh=not state.pushed)


def sync_engines(coordinator, engines: list[int], receivers: int, version: int, policy, ctx, cfg,
                 state: SyncState, fresh: bool) -> None:
    """Bring `engines` (holding `receivers` weight-group ranks) to `version`: the coordinator asks them to
    join, every stage pushes, the coordinator collects their replies and drops older groups. Every rank
    calls it (the pushes are collectives over each stage's TP group)."""
    rdvs = state.rendezvous(receivers, cfg)
    if coordinator:
        coordinator.source.request_sync(engines, version, rdvs)
    push(policy, ctx, rdvs, version, state, fresh,
         check_peers=coordinator.source.peer_check(engines) if coordinator else None)
    if coordinator:
        coordinator.source.finish_sync(engines, version)


def copy_weights(src_chunks, dst_chunks) -> None:
    with torch.no_grad():
        for src, dst in zip(src_chunks, dst_chunks):
            for p_src, p_dst in zip(src.parameters(), dst.parameters()):
                p_dst.copy_(p_src)


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------


def train(cfg_dict: dict) -> None:
    cfg = resolve_model(from_dict(cfg_dict))
    cfg_dict = to_dict(cfg)
    ctx = init_distributed(cfg)
    coordinator = None
    try:
        policy = build_policy(cfg, ctx)
        mapping = HFMapping.for_config(cfg.model)
        load_hf_tensors(policy.model, mapping, hf_tensor_reader(cfg.model.hf_path))
        policy.optimizer.reload_model_params()
        # Resume: `oapl train` on an existing run directory continues from its `latest` checkpoint.
        checkpoints = CheckpointManager(cfg.run_dir, cfg.checkpoint.keep_last, config=cfg)
        resumed = (checkpoints.load(cfg.checkpoint.load, policy, ctx) if cfg.checkpoint.load
                   else checkpoints.load_latest(policy, ctx))
        stop = install_signal_handlers()  # SIGTERM / SIGUSR1: checkpoint at the next step boundary, exit
        # `recompute`: pi_lag is a frozen copy of the weights last pushed (memory: one more model).
        frozen = build_model(cfg, ctx)[0] if cfg.algo.logp_lag_source == "recompute" else None
        if frozen is not None:
            copy_weights(policy.model, frozen)
        schedule = LagSchedule.from_config(cfg.lag)
        guard = NonFiniteGuard(cfg.optim.max_consecutive_nonfinite)
        pad_id = 0
        version, first_step, first_position = 0, 1, 0
        if resumed:
            first_step = resumed.get("step", 0) + 1
            version = resumed.get("policy_version", 0)
            first_position = resumed.get("sampler_position", (first_step - 1) * cfg.fleet.prompts_per_step)
            guard.consecutive, guard.total = resumed.get("guard_consecutive", 0), resumed.get("guard_total", 0)
            if ctx.is_coordinator:
                print(f"[oapl] resuming from {resumed['checkpoint_dir']}: step {first_step - 1}, policy version "
                      f"{version}, sampler position {first_position}", flush=True)
        if ctx.is_coordinator:
            try:
                coordinator = Coordinator(cfg, cfg_dict, schedule, first_step, first_position, stop)
                if coordinator.source.pushes:  # after a resume the engines hold version 0: they are
                    coordinator.source.buffer.current_version = version  # re-synced before any group counts
            except FleetStopped as err:
                log.warning("%s: exiting before the first step", err)
        if not broadcast_from_coordinator(coordinator is not None if ctx.is_coordinator else None):
            return  # stopped while the fleet was starting: nothing trained, nothing to save
        offline = cfg.lag.mode == "offline"  # one round on a dataset: no fleet, no pushes, version 0 throughout
        addr_port = broadcast_from_coordinator(
            (cfg.fleet.weight_sync.master_addr, coordinator.source.store_port) if coordinator else None)
        pusher = WeightPusher(mapping, ctx, int(cfg.fleet.weight_sync.bucket_mb * 2**20))
        state = SyncState(*addr_port, pusher=pusher, num_stages=ctx.pp_size)
        progress = _progress(cfg, first_step) if coordinator else None
        if coordinator and first_step == 1:
            coordinator.source.start_eval(version, step=0)  # eval.every > 0: the initial weights, at step 0
        stopping = False
        last_saved = first_step - 1  # the checkpoint this run started from (0: none)

        def save(done: int) -> None:  # collective
            nonlocal last_saved
            checkpoints.save(done, policy, ctx, {
                "step": done, "policy_version": version,
                # Work orders issued so far: the prompt stream and sampling seeds continue from here.
                "sampler_position": step_orders(done, cfg.fleet.prompts_per_step, first_step, first_position).stop,
                "guard_consecutive": guard.consecutive, "guard_total": guard.total})
            last_saved = done

        for step in range(first_step, cfg.optim.train_steps + 1):
            step_start = time.perf_counter()
            # 1. Rollouts of the current version (re-syncing restarted engines first).
            groups = receive_groups(coordinator, step, version, policy, ctx, cfg, state)
            if groups is None:  # a stop signal arrived while waiting: save the last finished step now
                stopping = True
                if step - 1 > last_saved:
                    save(step - 1)
                log.warning("stop requested by %s while waiting for rollouts: checkpointed step %d, "
                            "exiting", stop.reason, last_saved)
                break
            consumed_version = version
            batch = batch_from_groups(groups, pad_id)
            # 2. logp_lag: the engine's, or recomputed with the last pushed weights.
            extra = {}
            if frozen is not None:
                engine_logp = batch.logp_lag
                batch.logp_lag = forward_logprobs(_Frozen(frozen), batch, cfg, ctx)
                extra[M.LOGP_GAP] = (engine_logp - batch.logp_lag).abs().mean().item()
            # 3. The OAPL step.
            result = train_step(policy, batch, cfg, ctx, step)
            guard.update(result.skipped, step)
            round_start = step == 1 if offline else (step - 1) % schedule.sync_every == 0
            if frozen is None and round_start and "abs_log_ratio_mean" in result.metrics:
                # First step of a round: pi_theta still equals the pushed weights, so the log-ratio
                # against the engine's log-probs is exactly the engine-learner gap.
                extra[M.LOGP_GAP] = result.metrics["abs_log_ratio_mean"]
            # 4. Every L steps: new version, pushed to every engine; older groups are dropped.
            if not offline and schedule.sync_after(step):
                version += 1
                sync_start = time.perf_counter()
                engines, receivers = broadcast_from_coordinator(
                    coordinator.source.sync_targets() if coordinator else None)
                sync_engines(coordinator, engines, receivers, version, policy, ctx, cfg, state, fresh=True)
                if frozen is not None:
                    copy_weights(policy.model, frozen)
                if coordinator:
                    extra[M.SYNC_SECONDS] = time.perf_counter() - sync_start
                    extra[M.SYNC_BYTES] = state.pusher.last_bytes
                    if cfg.eval.every and step // cfg.eval.every > (step - schedule.sync_every) // cfg.eval.every:
                        coordinator.source.start_eval(version, step)  # this round crossed a multiple of eval.every
            if coordinator:
                _log_step(coordinator, progress, step, consumed_version, groups, result, extra,
                          time.perf_counter() - step_start, guard)
            stopping = stop.agreed()  # collective: every rank stops at the same step
            every = cfg.checkpoint.save_every
            if stopping or step == cfg.optim.train_steps or (every and step % every == 0):
                save(step)
            if stopping:
                log.warning("stop requested by %s: checkpointed step %d, exiting", stop.reason, step)
                break
        if progress:
            progress.close()
        if not stopping:  # a stopped run ends at its checkpoint: no waiting on the fleet, no final export
            receive_groups(coordinator, None, version, policy, ctx, cfg, state)  # a pending evaluation
            _export_final(policy, mapping, ctx, cfg)
    finally:
        if coordinator:
            coordinator.close()
        destroy_distributed()


class _Frozen:
    """`forward_logprobs` needs only `.model` (the model chunks)."""

    def __init__(self, model_chunks):
        self.model = model_chunks


def _progress(cfg, first_step: int = 1):
    from tqdm import tqdm

    return tqdm(total=cfg.optim.train_steps, initial=first_step - 1, desc="oapl", unit="step", dynamic_ncols=True)


def _log_step(coord: Coordinator, progress, step, version, groups, result, extra, seconds, guard) -> None:
    values = rollout_metrics(groups, version)
    values.update({M.LOSS_PREFIX + k: v for k, v in result.metrics.items()})
    coord.busy_seconds += seconds
    values.update({
        M.LOSS: result.loss, M.GRAD_NORM: result.grad_norm, M.LR: result.lr, M.SKIPPED_STEPS: guard.total,
        **coord.source.counters(),
        M.STEP_SECONDS: seconds, M.WAIT_SECONDS: coord.step_wait_seconds,
        M.TOKENS_PER_SECOND: result.num_tokens / max(seconds, 1e-9),
        M.IDLE_FRACTION: coord.wait_seconds / max(coord.busy_seconds, 1e-9),
        **extra,
    })
    coord.step_wait_seconds = 0.0
    if step % coord.cfg.logging.log_every == 0:
        coord.writer.scalars(values, step)
    postfix = {"v": version, "reward": f"{values[M.REWARD_MEAN]:.2f}", "acc": f"{values[M.ACCURACY]:.2f}"}
    if coord.source.last_pass_at_1 is not None:  # the latest held-out evaluation (eval.every > 0)
        postfix["pass@1"] = f"{coord.source.last_pass_at_1:.3f}"
    progress.set_postfix(postfix, tok_s=f"{values[M.TOKENS_PER_SECOND]:.0f}", refresh=False)
    progress.update(1)


def _export_final(policy, mapping, ctx, cfg) -> None:
    """The final weights as an HF directory (`run_dir/hf`), written by the coordinator."""
    tensors = []
    if ctx.dp_rank == 0:
        tensors = [(n, t.detach().clone().cpu()) for n, t in iter_hf_tensors(policy.model, mapping)]
    gathered = [None] * ctx.world_size if ctx.is_coordinator else None
    dist.gather_object(tensors if is_stage_sender(ctx) else [], gathered, dst=0)
    if ctx.is_coordinator:
        merged = [item for part in gathered for item in part]
        save_hf_model(merged, cfg.model.hf_path, Path(cfg.run_dir) / "hf")


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
