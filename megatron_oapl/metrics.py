"""Every metric name in one place, and the TensorBoard writer (coordinator only).

Names are `section/name`; the loss-side diagnostics returned by `algo/` keep their own keys and are
logged under `loss/`. `MetricsWriter` is a no-op on every rank but the coordinator, so the loop never
checks ranks.
"""

from __future__ import annotations

from pathlib import Path

# Loss and its diagnostics.
LOSS = "loss/total"
LOSS_PREFIX = "loss/"  # + algo metric keys (residual_mean, abs_log_ratio_mean, advantage_*, ...)
GRAD_NORM = "optim/grad_norm"
LR = "optim/lr"
SKIPPED_STEPS = "optim/skipped_nonfinite_total"

# Rollouts.
REWARD_MEAN = "rollout/reward_mean"
ACCURACY = "rollout/accuracy"  # fraction of samples with reward 1
RESPONSE_LENGTH = "rollout/response_length_mean"
TRUNCATED_FRACTION = "rollout/truncated_frac"  # finish_reason == "length"
SEQUENCE_ENTROPY = "rollout/sequence_entropy"  # -mean sequence log-prob under the behaviour policy
REWARD_ERRORS = "rollout/reward_errors_total"
REWARD_TIMEOUTS = "rollout/reward_timeouts_total"
GROUPS_TRAINED = "rollout/groups_trained"  # the step's groups whose raw scores differ (fleet.prompts_per_step
#   with dynamic sampling unless capped; without it, the groups that carry a ranking signal)
DEGENERATE_DROPPED = "rollout/degenerate_groups_dropped"  # dynamic sampling: all-equal groups the step skipped
EXTRA_ORDERS = "rollout/extra_orders"  # dynamic sampling: orders the step looked at beyond prompts_per_step
DYNAMIC_SAMPLING_CAPPED = "rollout/dynamic_sampling_capped_total"  # steps that reached the order limit
OVERLONG_PENALIZED_FRAC = "rollout/overlong_penalized_frac"  # samples with a nonzero overlong penalty

# Lag schedule and versions.
POLICY_VERSION = "lag/policy_version"
GROUP_LAG = "lag/consumed_group_lag_mean"  # version at consumption - group version, over consumed groups
GROUP_LAG_MAX = "lag/consumed_group_lag_max"
DROPPED_STALE = "lag/dropped_stale_total"
DUPLICATE_GROUPS = "lag/duplicate_groups_total"  # a second group for an answered order (refused)
LOGP_GAP = "lag/engine_learner_logp_gap"  # mean |logp_engine - logp_learner| per sequence (recompute)

# Weight sync.
SYNC_SECONDS = "sync/seconds"
SYNC_BYTES = "sync/bytes"
ENGINE_RESTARTS = "fleet/engine_restarts_total"
ENGINE_RESYNCS = "fleet/engine_resyncs_total"  # restarted engines brought to the current version

# Throughput and timers.
STEP_SECONDS = "time/step_seconds"
GROUP_LATENCY_SECONDS = "time/group_latency_seconds"  # mean over the step's groups: order taken -> last sample scored
WAIT_SECONDS = "time/wait_for_rollouts_seconds"  # this step's learner idle time, waiting on the fleet
TOKENS_PER_SECOND = "perf/tokens_per_second"
MICRO_BATCHES = "perf/micro_batches_per_step"  # per data-parallel rank (all ranks run the same number)
PADDING_FRACTION = "perf/padding_frac"  # of the tokens the learner step computed, the share that is padding
IDLE_FRACTION = "perf/learner_idle_frac"  # run so far: time waiting on the fleet / time in steps

# Mixture of experts (written only for MoE policies): tokens routed to one expert of one layer in the step's
# training forward passes, over all learner ranks (each token counts once per expert it is routed to).
EXPERT_TOKENS_MIN = "moe/expert_tokens_min"  # the least-loaded (layer, expert)
EXPERT_TOKENS_MAX = "moe/expert_tokens_max"  # the most-loaded (layer, expert)
EXPERT_LOAD_IMBALANCE = "moe/expert_load_max_over_mean"  # 1 = perfectly balanced

# Evaluation: the data section's held-out prompts (no eval.sets) keep the names without a set.
PASS_AT_K = "eval/pass@{k}"
AVG_AT_K = "eval/avg@{k}"  # mean reward of the k = eval.num_samples samples per prompt
SET_PASS_AT_K = "eval/{set}/pass@{k}"  # eval.sets.<set>
SET_AVG_AT_K = "eval/{set}/avg@{k}"
DEFAULT_EVAL_SET = "heldout"  # evaluation.DEFAULT_SET


def pass_at(k: int) -> str:
    return PASS_AT_K.format(k=k)


def eval_pass_at(set_name: str, k: int) -> str:
    return pass_at(k) if set_name == DEFAULT_EVAL_SET else SET_PASS_AT_K.format(set=set_name, k=k)


def eval_avg_at(set_name: str, k: int) -> str:
    return AVG_AT_K.format(k=k) if set_name == DEFAULT_EVAL_SET else SET_AVG_AT_K.format(set=set_name, k=k)


class MetricsWriter:
    def __init__(self, log_dir: str | Path | None, enabled: bool = True):
        self._writer = None
        if enabled and log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            # Flushed every 10 s (SummaryWriter's default is 120 s): a live TensorBoard stays current and a
            # crash loses at most the last few seconds of scalars.
            self._writer = SummaryWriter(str(log_dir), flush_secs=10)

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self._writer is None:
            return
        for name, value in values.items():
            self._writer.add_scalar(name, float(value), step)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
