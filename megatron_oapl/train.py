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
from megatron_oapl.evaluation import EvalRound
from megatron_oapl.learner.batch import TrainBatch, build_batch
from megatron_oapl.learner.distributed import destroy_distributed, init_distributed
from megatron_oapl.learner.model import build_model, build_policy
from megatron_oapl.learner.step import NonFiniteGuard, forward_logprobs, train_step
from megatron_oapl.models.hf_config import resolve_model
from megatron_oapl.models.hf_mapping import HFMapping
from megatron_oapl.rollout.dataset import read_groups
from megatron_oapl.rollout.fleet import Fleet, FleetStopped
from megatron_oapl.rollout.orders import OrderBook, PromptSampler, step_orders
from megatron_oapl.rollout.types import RolloutGroup
from megatron_oapl.schedule import LagSchedule, VersionedBuffer
from megatron_oapl.weights.hf_io import hf_tensor_reader, save_hf_model
from megatron_oapl.weights.reshard import iter_hf_tensors, load_hf_tensors
from megatron_oapl.weights.sync import is_stage_sender, stage_rendezvous
from megatron_oapl.weights.transport import Rendezvous, WeightGroup, WeightStoreServer, send_weights

log = logging.getLogger("oapl.train")


# --------------------------------------------------------------------------------------------------
# Coordinator (global rank 0): fleet, buffer, metrics
# --------------------------------------------------------------------------------------------------


class Coordinator:
    def __init__(self, cfg, cfg_dict: dict, schedule: LagSchedule, start_step: int = 1, start_position: int = 0,
                 stop: StopRequest | None = None):
        from megatron_oapl.data.prompts import load_prompts

        self.cfg, self.schedule, self.stop = cfg, schedule, stop
        sampler = PromptSampler(len(load_prompts(cfg.data, "train")), cfg.data.seed)
        self.orders = OrderBook(sampler, cfg.seed, cfg.fleet.prompts_per_step, schedule.sync_every,
                                start_step, start_position)
        self.replay: list[RolloutGroup] | None = None  # lag.mode=offline: a dataset stands in for the fleet
        self.store = self.fleet = None
        if cfg.lag.mode == "offline":
            self.replay = read_groups(cfg.lag.offline_dataset, cfg.fleet)
            steps = len(self.replay) // cfg.fleet.prompts_per_step
            print(f"[oapl] offline round: {len(self.replay)} groups from {cfg.lag.offline_dataset} ({steps} steps; "
                  "later steps reuse them in the same order), no weight pushes", flush=True)
        else:
            self.store = WeightStoreServer(cfg.fleet.weight_sync.master_addr, cfg.fleet.weight_sync.master_port,
                                           cfg.fleet.weight_sync.timeout_s)
            self.fleet = Fleet(cfg, cfg_dict, cfg.model.hf_path)
            if cfg.fleet.external:  # fleet nodes elsewhere find the channels and the weight store here
                self.fleet.publish((cfg.fleet.weight_sync.master_addr, self.store.port))
        self.buffer = VersionedBuffer(schedule)
        self.writer = M.MetricsWriter(Path(cfg.run_dir) / "tensorboard", cfg.logging.tensorboard)
        # eval.every > 0: the fleet evaluates pushed versions (one eval order per held-out prompt).
        self.eval_prompts = len(load_prompts(cfg.data, "eval")) if cfg.eval.every else 0
        self.eval_round: EvalRound | None = None
        self.last_pass_at_1: float | None = None
        self.wait_seconds = self.busy_seconds = 0.0  # run totals (the idle fraction)
        self.step_wait_seconds = 0.0  # this step's wait, reset when the step is logged
        self.resyncs = 0
        if self.fleet:
            self.fleet.should_stop = lambda: bool(stop)
            try:
                self.fleet.wait_ready(list(self.fleet.engines), timeout_s=cfg.fleet.weight_sync.timeout_s)
            except BaseException:
                self.close()
                raise

    def start_eval(self, version: int, step: int) -> None:
        """Have the fleet evaluate `version` (pushed after `step`; 0: the initial weights)."""
        if self.eval_prompts:
            self.orders.plan_eval(version, self.eval_prompts)
            self.eval_round = EvalRound(version, step, self.eval_prompts, self.cfg.eval.num_samples)

    def _eval_group(self, group: RolloutGroup) -> None:
        if self.eval_round is None or group.policy_version != self.eval_round.version:
            raise RuntimeError(f"eval group of version {group.policy_version} for prompt {group.order_index}, but "
                               f"the pending evaluation is {self.eval_round}: an eval order outlived its version")
        if self.orders.delivered(("eval", group.order_index)):
            self.eval_round.add(group)
        if self.eval_round.done:
            report = self.eval_round.report()
            self.writer.scalars({M.pass_at(k): v for k, v in report.pass_at_k.items()}, self.eval_round.step)
            self.last_pass_at_1, self.eval_round = report.pass_at_k[1], None

    def next_message(self, step: int | None, version: int) -> dict:
        """Engines to re-sync (restarted ones), or the groups of this step's work orders (step None: none),
        or `stop` when a stop signal arrived meanwhile (a preempted job's fleet may be going down with it:
        waiting on it, or restarting its engines, would outlast the grace period before SIGKILL). Before
        the step that ends a lag round, and with step None, the pending evaluation must be complete too:
        the next push replaces the weights it samples."""
        if self.replay is not None:  # offline: order i is line i % N of the dataset
            indices = [] if step is None else self.orders.indices(step)
            return {"groups": [self.replay[i % len(self.replay)] for i in indices]}
        start = time.perf_counter()
        if step is not None:
            self.orders.plan_round(step, version)
        finish_eval = step is None or self.schedule.sync_after(step)
        try:
            while True:
                if self.stop:
                    return {"stop": True}
                try:
                    stale, arrived = self.fleet.serve(self.orders, version)
                except FleetStopped:  # while a restarted engine was starting
                    return {"stop": True}
                if stale:  # restarted engines (version 0 weights): re-synced before they get orders
                    self.resyncs += len(stale)
                    return {"resync": stale}
                for group in arrived:
                    if group.split == "eval":
                        self._eval_group(group)
                    elif self.buffer.add(group):
                        self.orders.delivered(("train", group.order_index))
                if finish_eval and self.eval_round is not None:
                    continue
                groups = [] if step is None else self.buffer.take(self.orders.indices(step))
                if groups is not None:
                    return {"groups": groups}
        finally:
            waited = time.perf_counter() - start
            self.wait_seconds += waited
            self.step_wait_seconds += waited

    def request_sync(self, engine_ids: list[int], version: int, rdvs: list[Rendezvous]) -> None:
        self.fleet.request_sync(engine_ids, version, [r.to_dict() for r in rdvs])

    def peer_check(self, engine_ids: list[int]):
        return lambda: self.fleet.dead_among(engine_ids)

    def finish_sync(self, engine_ids: list[int], version: int) -> dict:
        replies = self.fleet.wait_synced(engine_ids, version, self.cfg.fleet.weight_sync.timeout_s)
        refused = {i: r["error"] for i, r in replies.items() if r["error"]}
        if refused:
            log.error("engines refused version %d: %s", version, refused)
        evicted = self.buffer.advance(version)
        return {"evicted": evicted, "seconds": max((r.get("seconds", 0.0) for r in replies.values()), default=0.0)}

    def close(self) -> None:
        if self.fleet:
            self.fleet.close()
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
        M.GENERATION_SECONDS: sum(g.generate_seconds for g in groups),
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
    num_stages: int
    epoch: int = 0
    pushed: bool = False  # a fresh push happened in this process (same on every rank: decides collectives)
    last_push: list | None = None  # this stage sender's last pushed tensors, for re-syncs

    def rendezvous(self, num_engines: int, cfg) -> list[Rendezvous]:
        self.epoch += 1
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        return stage_rendezvous(self.store_addr, self.store_port, self.epoch, self.num_stages, num_engines,
                                backend, cfg.fleet.weight_sync.timeout_s)


def push(policy, mapping, ctx, rdvs, version, cfg, state: SyncState, from_cache: bool, check_peers=None) -> None:
    """Every stage's sender streams its tensors (the fresh weights, or the cached last push).
    `check_peers` (coordinator only) names engines that died, so the push aborts at once for everyone."""
    if not from_cache:
        if ctx.dp_rank == 0:  # the TP gathers are collectives: every rank of the stage takes part
            tensors = [(n, t.detach().clone().cpu()) for n, t in iter_hf_tensors(policy.model, mapping)]
            if is_stage_sender(ctx):
                state.last_push = tensors
        state.pushed = True
    if not is_stage_sender(ctx):
        return
    try:
        send_weights(WeightGroup(rdvs[ctx.pp_rank], 0, check_peers), state.last_push, version,
                     int(cfg.fleet.weight_sync.bucket_mb * 2**20))
    except RuntimeError as err:
        # An engine died during the push: every member aborted, the live engines kept their weights; the
        # coordinator restarts the dead engine and re-syncs every engine that did not confirm this version.
        log.warning("weight push of version %d (stage %d) failed: %s", version, ctx.pp_rank, err)


def receive_groups(coordinator, step: int | None, version: int, policy, mapping, ctx, cfg, state: SyncState) -> list:
    """The groups of `step` (None: none, only the pending evaluation), re-syncing restarted engines first;
    None if a stop signal arrived while waiting. Every rank calls it (re-syncs are collectives); the
    coordinator decides what happens."""
    while True:
        message = broadcast_from_coordinator(coordinator.next_message(step, version) if coordinator else None)
        if "stop" in message:
            return None
        if "groups" in message:
            return message["groups"]
        rdvs = state.rendezvous(len(message["resync"]), cfg)
        if coordinator:
            coordinator.request_sync(message["resync"], version, rdvs)
        # Re-syncs resend the last push (the learner has moved on since); before the first push of
        # this process (start, resume) the current weights are this version's.
        push(policy, mapping, ctx, rdvs, version, cfg, state, from_cache=state.pushed,
             check_peers=coordinator.peer_check(message["resync"]) if coordinator else None)
        if coordinator:
            coordinator.finish_sync(message["resync"], version)


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
                # After a resume the engines hold version 0: they are re-synced before any group is admitted.
                coordinator.buffer.current_version = version
            except FleetStopped as err:
                log.warning("%s: exiting before the first step", err)
        if not broadcast_from_coordinator(coordinator is not None if ctx.is_coordinator else None):
            return  # stopped while the fleet was starting: nothing trained, nothing to save
        offline = cfg.lag.mode == "offline"  # one round on a dataset: no fleet, no pushes, version 0 throughout
        addr_port = broadcast_from_coordinator(
            (cfg.fleet.weight_sync.master_addr, coordinator.store.port if coordinator.store else 0)
            if coordinator else None)
        state = SyncState(*addr_port, num_stages=ctx.pp_size)
        progress = _progress(cfg, first_step) if coordinator else None
        if coordinator and first_step == 1:
            coordinator.start_eval(version, step=0)  # eval.every > 0: the initial weights, logged at step 0
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
            groups = receive_groups(coordinator, step, version, policy, mapping, ctx, cfg, state)
            if groups is None:  # a stop signal arrived while waiting: save the last finished step now
                stopping = True
                if step - 1 > last_saved:
                    save(step - 1)
                log.warning("stop requested by signal %s while waiting for rollouts: checkpointed step %d, "
                            "exiting", stop.signum, last_saved)
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
                engines = coordinator.fleet.ready_engines() if coordinator else None
                engines = broadcast_from_coordinator(engines)
                rdvs = state.rendezvous(len(engines), cfg)
                if coordinator:
                    coordinator.request_sync(engines, version, rdvs)
                push(policy, mapping, ctx, rdvs, version, cfg, state, from_cache=False,
                     check_peers=coordinator.peer_check(engines) if coordinator else None)
                if frozen is not None:
                    copy_weights(policy.model, frozen)
                if coordinator:
                    coordinator.finish_sync(engines, version)
                    extra[M.SYNC_SECONDS] = time.perf_counter() - sync_start
                    extra[M.SYNC_BYTES] = sum(t.numel() * t.element_size() for _, t in state.last_push or [])
                    if cfg.eval.every and step // cfg.eval.every > (step - schedule.sync_every) // cfg.eval.every:
                        coordinator.start_eval(version, step)  # this round crossed a multiple of eval.every
            if coordinator:
                _log_step(coordinator, progress, step, consumed_version, groups, result, extra,
                          time.perf_counter() - step_start, guard)
            stopping = stop.agreed()  # collective: every rank stops at the same step
            every = cfg.checkpoint.save_every
            if stopping or step == cfg.optim.train_steps or (every and step % every == 0):
                save(step)
            if stopping:
                log.warning("stop requested by signal %s: checkpointed step %d, exiting", stop.signum, step)
                break
        if progress:
            progress.close()
        if not stopping:  # a stopped run ends at its checkpoint: no waiting on the fleet, no final export
            receive_groups(coordinator, None, version, policy, mapping, ctx, cfg, state)  # a pending evaluation
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
        M.DROPPED_STALE: coord.buffer.dropped_stale,
        M.ENGINE_RESTARTS: coord.fleet.restarts_total if coord.fleet else 0,
        M.ENGINE_RESYNCS: coord.resyncs,
        M.STEP_SECONDS: seconds, M.WAIT_SECONDS: coord.step_wait_seconds,
        M.TOKENS_PER_SECOND: result.num_tokens / max(seconds, 1e-9),
        M.IDLE_FRACTION: coord.wait_seconds / max(coord.busy_seconds, 1e-9),
        **extra,
    })
    coord.step_wait_seconds = 0.0
    if step % coord.cfg.logging.log_every == 0:
        coord.writer.scalars(values, step)
    postfix = {"v": version, "reward": f"{values[M.REWARD_MEAN]:.2f}", "acc": f"{values[M.ACCURACY]:.2f}"}
    if coord.last_pass_at_1 is not None:  # the latest held-out evaluation (eval.every > 0)
        postfix["pass@1"] = f"{coord.last_pass_at_1:.3f}"
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

    from megatron_oapl.config import load_config

    cfg = load_config(sys.argv[1], tuple(sys.argv[2:]))
    train(to_dict(cfg))


if __name__ == "__main__":
    main()
