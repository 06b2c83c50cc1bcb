"""One OAPL optimizer step (and a forward-only log-prob pass) through Megatron-Core's own
forward-backward schedule.

Layering, as in torchtitan: `train_step` (guard + optimizer) -> `forward_backward` (Megatron schedule
over micro-batches) -> `_forward_step` / `_loss` (one micro-batch).

Normalisation: every micro-batch loss is a *sum* over its sequences (or tokens, for GRPO) returned
with its count; with `calculate_per_token_loss` Megatron all-reduces the counts over DP and divides the
gradients by the global total. The step therefore minimises the mean over the global batch, whatever
the micro-batch count and DP size.

Two micro-batch layouts:
- whole groups (`parallel.micro_batch_tokens = 0`): slices of `micro_batch_groups` groups of the rank's
  DP shard, every row padded to the step's longest sequence;
- token budget (`micro_batch_tokens > 0`, `batch.plan_micro_batches`): V* (GRPO: the normalised
  advantage) is computed per group for the whole step first (`SequenceTargets`), then whole sequences
  are dealt into micro-batches (optionally packed into one row) and the loss is a sum over each
  micro-batch's sequences. Per-sequence log-prob sums are scattered back by global sequence index.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.distributed as dist

from megatron_oapl import metrics as M
from megatron_oapl.algo import grpo_loss, oapl_loss
from megatron_oapl.algo.grpo import clipped_surrogate, group_normalized_advantages
from megatron_oapl.algo.oapl import degenerate_groups, residuals, v_star
from megatron_oapl.config import CHOICES, ConfigError
from megatron_oapl.learner.batch import (
    SequenceMicroBatch,
    TrainBatch,
    layout,
    pad_multiple,
    plan_micro_batches,
    whole_group_padding,
)
from megatron_oapl.learner.logprobs import vocab_parallel_token_logprobs
from megatron_oapl.learner.model import optimizer_parts


class TrainingDiverged(RuntimeError):
    pass


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    skipped: bool
    lr: float
    num_tokens: int
    metrics: dict[str, float] = field(default_factory=dict)
    layout: dict[str, float] = field(default_factory=dict)  # metric name -> value (micro-batches, padding)
    expert_load: dict[str, float] = field(default_factory=dict)  # metric name -> value (MoE policies only)


@dataclass
class NonFiniteGuard:
    """Counts skipped (non-finite) steps; `limit` in a row stop the run."""

    limit: int
    consecutive: int = 0
    total: int = 0

    def update(self, skipped: bool, step: int) -> None:
        if not skipped:
            self.consecutive = 0
            return
        self.consecutive += 1
        self.total += 1
        if self.consecutive >= self.limit:
            raise TrainingDiverged(
                f"{self.consecutive} optimizer steps in a row had a non-finite loss or gradient norm "
                f"(last at step {step}); stopping (optim.max_consecutive_nonfinite={self.limit}). "
                "Lower optim.lr, check the rewards for NaN/inf, or raise algo.beta2."
            )


@dataclass(frozen=True)
class LossSpec:
    """What the loss function needs from the config, resolved once."""

    loss: str  # "oapl" | "grpo" | "logprobs" (forward only)
    temperature: float
    vocab_size: int
    beta1: float = 1.0
    beta2: float = 1.0
    length_normalize: bool = False
    filter_degenerate: bool = False
    eps_low: float = 0.2
    eps_high: float = 0.2
    logprob_chunk_tokens: int = 0  # tokens per fp32 log-prob chunk (0 = all at once)

    @classmethod
    def from_config(cls, cfg, loss: str | None = None) -> "LossSpec":
        return cls(
            loss=loss or cfg.algo.loss,
            temperature=cfg.fleet.temperature,
            vocab_size=cfg.model.vocab_size,
            beta1=cfg.algo.beta1,
            beta2=cfg.algo.beta2,
            length_normalize=cfg.algo.length_normalize,
            filter_degenerate=cfg.algo.filter_degenerate_groups,
            eps_low=cfg.algo.grpo_eps_low,
            eps_high=cfg.algo.grpo_eps_high,
            logprob_chunk_tokens=cfg.parallel.logprob_chunk_tokens,
        )


# Reduction of per-micro-batch metrics: counts and sums add up; extremes take min/max.
def _reduce_op(key: str) -> str:
    return "min" if key.endswith("_min") else "max" if key.endswith("_max") else "sum"


def _loss(spec: LossSpec, mb: TrainBatch, logits: torch.Tensor):
    token_logp = vocab_parallel_token_logprobs(logits, mb.labels, spec.temperature, spec.vocab_size,
                                               chunk_tokens=spec.logprob_chunk_tokens)
    mask = mb.loss_mask
    seq_logp = (token_logp * mask).sum(-1)
    if spec.length_normalize:
        seq_logp = seq_logp / mask.sum(-1).clamp(min=1)
    seq_logp = seq_logp.view(mb.num_groups, mb.group_size)
    n_seq = mb.num_sequences
    if spec.loss == "logprobs":
        zero = (seq_logp * 0).sum()
        return zero, torch.tensor(n_seq, dtype=torch.int), {"seq_logp": seq_logp.detach()}
    if spec.loss == "oapl":
        # Masked sequences (mb.keep) leave the loss sum, not the divisor: as filter_degenerate_groups.
        loss, metrics = oapl_loss(
            seq_logp, mb.logp_lag, mb.rewards, spec.beta1, spec.beta2,
            normalizer=1.0, filter_degenerate=spec.filter_degenerate, keep=mb.keep,
        )
        count = n_seq
    elif spec.loss == "grpo":
        shape = (mb.num_groups, mb.group_size, mb.seq_length)
        # Masked sequences' tokens leave the token mean; their rewards still set the group's baseline.
        loss_mask = mask if mb.keep is None else mask * mb.keep.flatten()[:, None].to(mask.dtype)
        count = int(loss_mask.sum().item())
        loss, metrics = grpo_loss(
            token_logp.view(shape), mb.behaviour_logp.view(shape), loss_mask.view(shape), mb.rewards,
            eps_low=spec.eps_low, eps_high=spec.eps_high, normalizer=1.0,
        )
    else:
        raise ValueError(f"algo.loss={spec.loss!r} is not a known loss (allowed: {', '.join(CHOICES['algo.loss'])})")
    # Metrics are means over this micro-batch: weight them by the sequence count to average later.
    record = {k: (v * n_seq if _reduce_op(k) == "sum" else v) for k, v in metrics.items()}
    record.update(
        loss_sum=loss.detach(), loss_count=torch.tensor(float(count)),
        seq_count=torch.tensor(float(n_seq)), seq_logp_sum=seq_logp.detach().sum(),
        response_tokens=mask.sum(),
    )
    return loss, torch.tensor(count, dtype=torch.int), record


def moe_padding(model, padding: torch.Tensor) -> dict:
    """`padding_mask` for Megatron's MoE layers ({} for a dense model): their routers leave padding out of the
    load-balancing and z losses (and learner.expert_load out of its counts). `padding` is [rows, length], True
    on padding. Under sequence parallelism Megatron splits it over the TP ranks on the first pipeline stage
    only, so a later stage gets its own slice here."""
    from megatron.core import parallel_state
    from megatron.core.utils import get_attr_wrapped_model

    config = get_attr_wrapped_model(model, "config")
    if not config.num_moe_experts:
        return {}
    if config.sequence_parallel and not get_attr_wrapped_model(model, "pre_process"):
        tp = parallel_state.get_tensor_model_parallel_world_size()
        padding = padding.chunk(tp, dim=1)[parallel_state.get_tensor_model_parallel_rank()]
    return {"padding_mask": padding}


def _forward_step(spec: LossSpec, data_iterator, model):
    mb: TrainBatch = next(data_iterator)
    positions = torch.arange(mb.seq_length, device=mb.tokens.device).unsqueeze(0).expand_as(mb.tokens)
    # Causal attention: Megatron builds the mask itself; right padding never leaks into real tokens.
    logits = model(mb.tokens, positions, None, **moe_padding(model, mb.padding()))
    return logits, partial(_loss, spec, mb)


def forward_backward(policy, batch: TrainBatch, spec: LossSpec, ctx, parallel, forward_only):
    """Run Megatron's schedule over this DP rank's micro-batches (`parallel` is the config's section);
    returns (per-micro-batch records, only on the last pipeline stage, empty elsewhere; layout metrics)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if parallel.micro_batch_tokens > 0:
        return _token_budget_forward_backward(policy, batch, spec, ctx, parallel, forward_only)
    local = batch.shard(ctx.dp_rank, ctx.dp_size).to(ctx.device)
    if parallel.sequence_parallel:  # Megatron splits the sequence over the TP ranks: they must divide it
        local = local.padded_to_multiple(pad_multiple(ctx.tp_size))
    micro = local.micro_batches(parallel.micro_batch_groups)
    # Every pipeline stage walks the same micro-batches: the first uses the tokens, the last the labels.
    records = get_forward_backward_func()(
        forward_step_func=partial(_forward_step, spec),
        data_iterator=iter(micro),
        model=policy.model,
        num_microbatches=len(micro),
        seq_length=local.seq_length,
        micro_batch_size=micro[0].num_sequences,
        forward_only=forward_only,
    )
    return records, {M.MICRO_BATCHES: float(len(micro)), M.PADDING_FRACTION: whole_group_padding(batch)}


# --------------------------------------------------------------------------------------------------
# Token-budget micro-batches (and packing)
# --------------------------------------------------------------------------------------------------


@dataclass
class SequenceTargets:
    """Per-sequence constants of the whole step, flat over the global batch [P*G]: what a micro-batch of
    arbitrary sequences needs from their groups (V* depends on the whole group's rewards only)."""

    logp_lag: torch.Tensor
    advantage: torch.Tensor  # OAPL: r - V*(x); GRPO: the group-normalised advantage
    keep: torch.Tensor  # bool: the sequence enters the loss sum (algo.filter_degenerate_groups, mask_truncated)
    token_weight: float  # global sequences / global masked tokens (token means through the seq divisor)

    @classmethod
    def of(cls, spec: LossSpec, batch: TrainBatch, device) -> "SequenceTargets":
        rewards = batch.rewards.float()
        if spec.loss == "grpo":
            advantage = group_normalized_advantages(rewards)
        else:
            advantage = rewards - v_star(rewards, spec.beta1)[:, None]
        keep = torch.ones_like(rewards, dtype=torch.bool)
        if spec.loss == "oapl" and spec.filter_degenerate:
            keep = (~degenerate_groups(rewards))[:, None].expand_as(rewards)
        if batch.keep is not None:
            keep = keep & batch.keep
        weight = batch.num_sequences / max(float(batch.loss_mask.sum()), 1.0)
        return cls(batch.logp_lag.float().flatten().to(device), advantage.flatten().to(device),
                   keep.flatten().to(device), weight)


def packing_attention_problem(tconfig, transformer_engine: bool) -> str | None:
    """Why packed rows would leak attention across sequences with this model's attention, or None.
    Transformer Engine takes the THD path (cu_seqlens); Megatron's local attention takes an explicit
    block-diagonal mask, which its unfused softmax honours but its fused causal kernel and a sliding
    window replace."""
    if transformer_engine:
        return None
    if tconfig.masked_softmax_fusion:
        return ("parallel.pack_sequences=true needs attention that honours a block-diagonal mask; the local "
                "layers' fused causal softmax (masked_softmax_fusion) ignores it (allowed here: false)")
    if getattr(tconfig, "window_size", None) is not None:
        return ("parallel.pack_sequences=true cannot be combined with sliding-window attention "
                f"(window_size={tconfig.window_size}), whose mask replaces the packing mask (allowed: false)")
    return None


def _token_budget_forward_backward(policy, batch, spec, ctx, parallel, forward_only):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_oapl.models.megatron_model import use_transformer_engine

    te = use_transformer_engine()
    if parallel.pack_sequences:
        problem = packing_attention_problem(policy.config, te)
        if problem:
            raise ConfigError(problem)
    multiple = pad_multiple(ctx.tp_size)
    plan = plan_micro_batches(batch, parallel.micro_batch_tokens, multiple, parallel.pack_sequences, ctx.dp_size)
    micro = [layout(batch, ids, multiple, parallel.pack_sequences).to(ctx.device)
             for ids in plan.per_rank[ctx.dp_rank]]
    targets = SequenceTargets.of(spec, batch, ctx.device)
    # Shapes vary per micro-batch: the pipeline exchanges them first (TransformerConfig.variable_seq_lengths),
    # so seq_length / micro_batch_size below only matter to schedules that ignore them.
    records = get_forward_backward_func()(
        forward_step_func=partial(_sequence_forward_step, spec, targets, te and parallel.pack_sequences),
        data_iterator=iter(micro),
        model=policy.model,
        num_microbatches=len(micro),
        seq_length=max(m.seq_length for m in micro),
        micro_batch_size=max(m.num_rows for m in micro),
        forward_only=forward_only,
    )
    return records, {M.MICRO_BATCHES: float(plan.micro_batches_per_rank), M.PADDING_FRACTION: plan.padding_fraction}


def _packed_seq_params(mb: SequenceMicroBatch):
    """Transformer Engine's THD description of a packed row (GPU; unverified here, no GPU)."""
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = mb.cu_seqlens.to(mb.tokens.device, torch.int32)
    longest = int((cu[1:] - cu[:-1]).max())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                           max_seqlen_q=longest, max_seqlen_kv=longest)


def _sequence_forward_step(spec, targets, thd: bool, data_iterator, model):
    mb: SequenceMicroBatch = next(data_iterator)
    packed = mb.cu_seqlens.numel() > 1
    padding = moe_padding(model, mb.padding())
    if thd:  # TE: one packed row as THD, sequences delimited by cu_seqlens (RoPE restarts there too)
        logits = model(mb.tokens, mb.position_ids, None, packed_seq_params=_packed_seq_params(mb), **padding)
    else:  # local attention: padded rows are causal as usual; a packed row gets the block-diagonal mask
        logits = model(mb.tokens, mb.position_ids, mb.block_causal_mask() if packed else None, **padding)
    return logits, partial(_sequence_loss, spec, targets, mb)


def _per_sequence(values: torch.Tensor, mb: SequenceMicroBatch) -> torch.Tensor:
    """Sum `values[R, L]` over each sequence's positions -> [n] (padding goes to a dropped slot)."""
    sums = torch.zeros(mb.num_sequences + 1, dtype=values.dtype, device=values.device)
    return sums.index_add(0, (mb.segments + 1).flatten(), values.flatten())[1:]


def _sequence_loss(spec: LossSpec, targets: SequenceTargets, mb: SequenceMicroBatch, logits: torch.Tensor):
    token_logp = vocab_parallel_token_logprobs(logits, mb.labels, spec.temperature, spec.vocab_size,
                                               chunk_tokens=spec.logprob_chunk_tokens)
    mask = mb.loss_mask
    masked = torch.where(mask != 0, token_logp * mask, torch.zeros_like(token_logp))
    seq_logp = _per_sequence(masked, mb)
    if spec.length_normalize:
        seq_logp = seq_logp / _per_sequence(mask, mb).clamp(min=1)
    # An empty micro-batch (DP ranks padded to the same count) still needs a graph to the logits.
    anchor = masked.sum() * 0.0
    n_seq = mb.num_sequences
    idx = mb.seq_index
    if spec.loss == "logprobs":
        return anchor, torch.tensor(n_seq, dtype=torch.int), {"seq_logp": seq_logp.detach(), "seq_index": idx}
    keep = targets.keep[idx]
    if spec.loss == "oapl":
        log_ratio = seq_logp - targets.logp_lag[idx]
        residual = residuals(seq_logp, targets.logp_lag[idx], targets.advantage[idx], spec.beta2)
        loss = torch.where(keep, residual.square(), torch.zeros_like(residual)).sum() + anchor
        count = n_seq
        res, lr = residual.detach(), log_ratio.detach()
        record = {"residual_mean": res.sum(), "residual_abs_mean": res.abs().sum(),
                  "log_ratio_mean": lr.sum(), "abs_log_ratio_mean": lr.abs().sum(),
                  "kept_seq_frac": keep.float().sum()}
    elif spec.loss == "grpo":
        token_adv = torch.cat([targets.advantage.new_zeros(1), targets.advantage[idx]])[mb.segments + 1]
        token_keep = torch.cat([keep.new_zeros(1), keep])[mb.segments + 1]
        log_ratio = token_logp - mb.behaviour_logp
        per_token, ratio, clipped = clipped_surrogate(log_ratio, token_adv, spec.eps_low, spec.eps_high)
        on = (mask != 0) & token_keep
        loss = torch.where(on, per_token * mask, torch.zeros_like(per_token)).sum() + anchor
        count = int(on.sum().item())
        zero = torch.zeros_like(token_logp)
        lr, w = log_ratio.detach(), targets.token_weight
        record = {"clip_frac": (clipped & on).float().sum() * w,
                  "ratio_mean": torch.where(on, ratio.detach(), zero).sum() * w,
                  "approx_kl": torch.where(on, ratio.detach() - 1.0 - lr, zero).sum() * w,
                  "abs_log_ratio_mean": _per_sequence(torch.where(on, lr, zero), mb).abs().sum()}
    else:
        raise ValueError(f"algo.loss={spec.loss!r} is not a known loss (allowed: {', '.join(CHOICES['algo.loss'])})")
    # Sums over sequences (token sums scaled by token_weight): the reduction divides by the global count.
    record.update(
        loss_sum=loss.detach(), loss_count=torch.tensor(float(count)),
        seq_count=torch.tensor(float(n_seq)), seq_logp_sum=seq_logp.detach().sum(),
        response_tokens=mask.sum(),
    )
    return loss, torch.tensor(count, dtype=torch.int), record


_REWARD_ONLY_METRICS = ("advantage_mean", "advantage_std", "advantage_min", "advantage_max",
                        "v_star_mean", "degenerate_group_frac")


def _reward_metrics(spec: LossSpec, batch: TrainBatch) -> dict[str, float]:
    """The metrics that depend on the rewards alone, over the whole step (a micro-batch of arbitrary
    sequences holds partial groups): the algo functions' own, with log-probs that do not matter here."""
    lag = batch.logp_lag.float()
    if spec.loss == "grpo":
        zeros = lag[:, :, None] * 0
        _, metrics = grpo_loss(zeros, zeros, torch.ones_like(zeros), batch.rewards)
    else:
        _, metrics = oapl_loss(lag, lag, batch.rewards, spec.beta1, spec.beta2)
    return {k: float(v) for k, v in metrics.items() if k in _REWARD_ONLY_METRICS}


def _reduce_records(records: list[dict], ctx) -> dict[str, float]:
    """Combine micro-batch records over micro-batches and DP ranks, and hand the result from the last
    pipeline stage to every rank (so all ranks take the same skip decision and rank 0 can log)."""
    from megatron.core import parallel_state

    result = None
    if ctx.is_last_stage:
        keys = sorted(records[0])
        ops = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
        combined = {}
        for key in keys:
            values = torch.stack([r[key].float().reshape(()) for r in records])
            op = _reduce_op(key)
            value = values.sum() if op == "sum" else values.min() if op == "min" else values.max()
            if ctx.dp_size > 1:
                value = value.to(ctx.device)
                dist.all_reduce(value, op=ops[op], group=parallel_state.get_data_parallel_group())
            combined[key] = value.item()
        seqs = combined.pop("seq_count")
        result = {"loss": combined.pop("loss_sum") / max(combined.pop("loss_count"), 1.0)}
        result.update({k: (v / seqs if _reduce_op(k) == "sum" and k != "response_tokens" else v)
                       for k, v in combined.items()})
        result["seq_logp_mean"] = result.pop("seq_logp_sum")
    if ctx.pp_size > 1:
        box = [result]
        last = parallel_state.get_pipeline_model_parallel_last_rank()
        dist.broadcast_object_list(box, src=last, group=parallel_state.get_pipeline_model_parallel_group())
        result = box[0]
    return result


def _grad_norm_and_clip(optimizer, clip: float):
    """The global gradient norm, after clipping every gradient by it to at most `clip` (0: no clipping).

    An MoE policy's optimizer is Megatron's ChainedOptimizer of two parts (dense parameters, reduced over DP;
    expert parameters, reduced over expert-DP), which has no `clip_grad_norm`: the norm is taken over both
    parts and each part is clipped by that one total, as Megatron's own `ChainedOptimizer.step` does."""
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    parts = optimizer_parts(optimizer)
    if len(parts) == 1:
        return optimizer.clip_grad_norm(clip) if clip > 0 else optimizer.get_grad_norm()
    grad_norm = optimizer.get_grad_norm()
    for part in parts if clip > 0 else ():
        params = part.get_parameters()
        if params:
            decoupled = part.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8
            clip_grad_by_total_norm_fp32(params, clip, grad_norm, decoupled)
    return grad_norm


def train_step(policy, batch: TrainBatch, cfg, ctx, step: int = 0) -> StepResult:
    """One optimizer step on a global batch (every rank passes the same batch)."""
    for chunk in policy.model:
        chunk.zero_grad_buffer()
    policy.optimizer.zero_grad()
    spec = LossSpec.from_config(cfg)
    records, layout_metrics = forward_backward(policy, batch, spec, ctx, cfg.parallel, False)
    metrics = _reduce_records(records, ctx)
    if cfg.parallel.micro_batch_tokens > 0:
        metrics.update(_reward_metrics(spec, batch))
    loss = metrics.pop("loss")
    expert_load = policy.expert_load.take() if policy.expert_load is not None else {}

    optimizer = policy.optimizer
    found_inf = optimizer.prepare_grads()
    clip = cfg.optim.clip_grad
    grad_norm = float(_grad_norm_and_clip(optimizer, clip))
    # The loss is identical on all ranks (broadcast above) and the grad norm is all-reduced over the
    # model-parallel group, so every rank takes the same decision.
    skipped = bool(found_inf) or not (math.isfinite(loss) and math.isfinite(grad_norm))
    if not skipped:
        optimizer.step_with_ready_grads()
        policy.scheduler.step(increment=1)
    return StepResult(
        loss=loss,
        grad_norm=grad_norm,
        skipped=skipped,
        lr=optimizer.param_groups[0]["lr"],
        num_tokens=int(batch.tokens.numel()),
        metrics=metrics,
        layout=layout_metrics,
        expert_load=expert_load,
    )


@torch.no_grad()
def forward_logprobs(policy, batch: TrainBatch, cfg, ctx) -> torch.Tensor:
    """Sequence log-probs [P, G] of the whole global batch at the sampling temperature, on every rank
    (used for `recompute` logp_lag and for evaluation)."""
    from megatron.core import parallel_state

    spec = LossSpec.from_config(cfg, loss="logprobs")
    records, _ = forward_backward(policy, batch, spec, ctx, cfg.parallel, True)
    if cfg.parallel.micro_batch_tokens > 0:
        return _scatter_sequence_logprobs(records, batch, ctx)
    local_groups = batch.num_groups // ctx.dp_size
    out = torch.empty(batch.num_groups, batch.group_size, device=ctx.device)
    if ctx.is_last_stage:
        local = torch.cat([r["seq_logp"] for r in records]).to(ctx.device)
        if ctx.dp_size > 1:
            parts = [torch.empty_like(local) for _ in range(ctx.dp_size)]
            dist.all_gather(parts, local, group=parallel_state.get_data_parallel_group())
            local = torch.cat(parts)
        out.copy_(local.reshape(batch.num_groups, batch.group_size))
    assert out.shape[0] == local_groups * ctx.dp_size
    if ctx.pp_size > 1:
        dist.broadcast(out, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                       group=parallel_state.get_pipeline_model_parallel_group())
    return out.cpu()


def _scatter_sequence_logprobs(records: list[dict], batch: TrainBatch, ctx) -> torch.Tensor:
    """[P, G] from token-budget micro-batches: each sequence's sum lands at its global index on the one
    DP rank that ran it, zeros elsewhere, so a sum over DP ranks assembles the batch."""
    from megatron.core import parallel_state

    flat = torch.zeros(batch.num_sequences, device=ctx.device)
    if ctx.is_last_stage:
        for record in records:
            flat[record["seq_index"].to(ctx.device)] = record["seq_logp"].to(ctx.device, flat.dtype)
        if ctx.dp_size > 1:
            dist.all_reduce(flat, group=parallel_state.get_data_parallel_group())
    if ctx.pp_size > 1:
        dist.broadcast(flat, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                       group=parallel_state.get_pipeline_model_parallel_group())
    return flat.reshape(batch.num_groups, batch.group_size).cpu()
