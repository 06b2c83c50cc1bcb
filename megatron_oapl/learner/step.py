"""One OAPL optimizer step (and a forward-only log-prob pass) through Megatron-Core's own
forward-backward schedule.

Layering, as in torchtitan: `train_step` (guard + optimizer) -> `forward_backward` (Megatron schedule
over micro-batches) -> `_forward_step` / `_loss` (one micro-batch).

Normalisation: every micro-batch loss is a *sum* over its sequences (or tokens, for GRPO) returned
with its count; with `calculate_per_token_loss` Megatron all-reduces the counts over DP and divides the
gradients by the global total. The step therefore minimises the mean over the global batch, whatever
the micro-batch count and DP size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.distributed as dist

from megatron_oapl.algo import grpo_loss, oapl_loss
from megatron_oapl.learner.batch import TrainBatch
from megatron_oapl.learner.logprobs import vocab_parallel_token_logprobs


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
        )


# Reduction of per-micro-batch metrics: counts and sums add up; extremes take min/max.
def _reduce_op(key: str) -> str:
    return "min" if key.endswith("_min") else "max" if key.endswith("_max") else "sum"


def _loss(spec: LossSpec, mb: TrainBatch, logits: torch.Tensor):
    token_logp = vocab_parallel_token_logprobs(logits, mb.labels, spec.temperature, spec.vocab_size)
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
        loss, metrics = oapl_loss(
            seq_logp, mb.logp_lag, mb.rewards, spec.beta1, spec.beta2,
            normalizer=1.0, filter_degenerate=spec.filter_degenerate,
        )
        count = n_seq
    elif spec.loss == "grpo":
        shape = (mb.num_groups, mb.group_size, mb.seq_length)
        count = int(mask.sum().item())
        loss, metrics = grpo_loss(
            token_logp.view(shape), mb.behaviour_logp.view(shape), mask.view(shape), mb.rewards,
            eps_low=spec.eps_low, eps_high=spec.eps_high, normalizer=1.0,
        )
    else:
        raise ValueError(f"algo.loss={spec.loss!r} is not a known loss (allowed: oapl, grpo)")
    # Metrics are means over this micro-batch: weight them by the sequence count to average later.
    record = {k: (v * n_seq if _reduce_op(k) == "sum" else v) for k, v in metrics.items()}
    record.update(
        loss_sum=loss.detach(), loss_count=torch.tensor(float(count)),
        seq_count=torch.tensor(float(n_seq)), seq_logp_sum=seq_logp.detach().sum(),
        response_tokens=mask.sum(),
    )
    return loss, torch.tensor(count, dtype=torch.int), record


def _forward_step(spec: LossSpec, data_iterator, model):
    mb: TrainBatch = next(data_iterator)
    positions = torch.arange(mb.seq_length, device=mb.tokens.device).unsqueeze(0).expand_as(mb.tokens)
    # Causal attention: Megatron builds the mask itself; right padding never leaks into real tokens.
    logits = model(mb.tokens, positions, None)
    return logits, partial(_loss, spec, mb)


def forward_backward(policy, batch: TrainBatch, spec: LossSpec, ctx, micro_batch_groups, forward_only):
    """Run Megatron's schedule over this DP rank's micro-batches; returns per-micro-batch records
    (only on the last pipeline stage; empty elsewhere)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    local = batch.shard(ctx.dp_rank, ctx.dp_size).to(ctx.device)
    micro = local.micro_batches(micro_batch_groups)
    # Every pipeline stage walks the same micro-batches: the first uses the tokens, the last the labels.
    return get_forward_backward_func()(
        forward_step_func=partial(_forward_step, spec),
        data_iterator=iter(micro),
        model=policy.model,
        num_microbatches=len(micro),
        seq_length=local.seq_length,
        micro_batch_size=micro[0].num_sequences,
        forward_only=forward_only,
    )


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


def train_step(policy, batch: TrainBatch, cfg, ctx, step: int = 0) -> StepResult:
    """One optimizer step on a global batch (every rank passes the same batch)."""
    for chunk in policy.model:
        chunk.zero_grad_buffer()
    policy.optimizer.zero_grad()
    spec = LossSpec.from_config(cfg)
    records = forward_backward(policy, batch, spec, ctx, cfg.parallel.micro_batch_groups, False)
    metrics = _reduce_records(records, ctx)
    loss = metrics.pop("loss")

    optimizer = policy.optimizer
    found_inf = optimizer.prepare_grads()
    clip = cfg.optim.clip_grad
    grad_norm = optimizer.clip_grad_norm(clip) if clip > 0 else optimizer.get_grad_norm()
    grad_norm = float(grad_norm)
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
    )


@torch.no_grad()
def forward_logprobs(policy, batch: TrainBatch, cfg, ctx) -> torch.Tensor:
    """Sequence log-probs [P, G] of the whole global batch at the sampling temperature, on every rank
    (used for `recompute` logp_lag and for evaluation)."""
    from megatron.core import parallel_state

    spec = LossSpec.from_config(cfg, loss="logprobs")
    records = forward_backward(policy, batch, spec, ctx, cfg.parallel.micro_batch_groups, True)
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
