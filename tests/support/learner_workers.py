"""Rank-side bodies of the multi-process learner tests (module level so spawn can import them)."""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_oapl.config import from_dict
from megatron_oapl.learner.batch import TrainBatch
from megatron_oapl.learner.distributed import destroy_distributed, init_distributed
from megatron_oapl.learner.model import build_policy
from megatron_oapl.learner.step import forward_logprobs, train_step
from megatron_oapl.models.hf_mapping import HFMapping
from megatron_oapl.weights.reshard import iter_hf_tensors, load_hf_tensors


def batch_to_dict(batch: TrainBatch) -> dict:
    return {k: v for k, v in vars(batch).items()}


def batch_from_dict(d: dict) -> TrainBatch:
    return TrainBatch(**d)


def reference_policy(cfg_dict: dict, ref_state_path: str):
    """Join the learner world and build the policy with the reference weights: (cfg, ctx, policy, mapping).
    The caller must `destroy_distributed()`."""
    cfg = from_dict(cfg_dict)
    ctx = init_distributed(cfg)
    policy = build_policy(cfg, ctx)
    mapping = HFMapping.for_config(cfg.model)
    load_hf_tensors(policy.model, mapping, torch.load(ref_state_path).__getitem__)
    policy.optimizer.reload_model_params()
    return cfg, ctx, policy, mapping


def oapl_steps(cfg_dict: dict, ref_state_path: str, batch_path: str, out_dir: str, steps: int) -> None:
    """Load the reference weights, take `steps` learner steps on one batch, and save (from one rank
    per pipeline stage) the losses, first-step gradients and final weights in HF names."""
    cfg, ctx, policy, mapping = reference_policy(cfg_dict, ref_state_path)
    try:
        batch = batch_from_dict(torch.load(batch_path))
        results, grads = [], {}
        logp_before = forward_logprobs(policy, batch, cfg, ctx)
        for step in range(steps):
            results.append(train_step(policy, batch, cfg, ctx, step))
            if step == 0 and not cfg.parallel.use_distributed_optimizer:
                grads = {k: v.clone() for k, v in iter_hf_tensors(policy.model, mapping, grads=True)}
        logp_after = forward_logprobs(policy, batch, cfg, ctx)
        weights = dict(iter_hf_tensors(policy.model, mapping))
        if ctx.tp_rank == 0 and ctx.dp_rank == 0:
            torch.save(
                {
                    "losses": [r.loss for r in results],
                    "grad_norms": [r.grad_norm for r in results],
                    "skipped": [r.skipped for r in results],
                    "metrics": [r.metrics for r in results],
                    "grads": grads,
                    "weights": weights,
                    "logp_before": logp_before,
                    "logp_after": logp_after,
                },
                Path(out_dir) / f"rank{ctx.rank}.pt",
            )
    finally:
        destroy_distributed()


def nonfinite_steps(cfg_dict: dict, batch_path: str, out_dir: str) -> None:
    """Steps on a good batch, a batch with a NaN reward, a good one, then NaN until the guard stops.
    Saves whether each step was skipped, whether a skipped step left the weights alone, and the
    guard's error message."""
    from megatron_oapl.learner.step import NonFiniteGuard, TrainingDiverged

    cfg = from_dict(cfg_dict)
    ctx = init_distributed(cfg)
    try:
        policy = build_policy(cfg, ctx)
        mapping = HFMapping.for_config(cfg.model)
        good = batch_from_dict(torch.load(batch_path))
        bad = batch_from_dict({**torch.load(batch_path)})
        bad.rewards = bad.rewards.clone()
        bad.rewards[0, 0] = float("nan")
        guard = NonFiniteGuard(cfg.optim.max_consecutive_nonfinite)
        skipped, unchanged, error = [], [], None
        schedule = [good, bad, good] + [bad] * (cfg.optim.max_consecutive_nonfinite + 1)
        try:
            for step, batch in enumerate(schedule):
                before = {k: v.clone() for k, v in iter_hf_tensors(policy.model, mapping)}
                result = train_step(policy, batch, cfg, ctx, step)
                after = dict(iter_hf_tensors(policy.model, mapping))
                skipped.append(result.skipped)
                unchanged.append(all(torch.equal(before[k], after[k]) for k in before))
                guard.update(result.skipped, step)
        except TrainingDiverged as err:
            error = str(err)
        if ctx.rank == 0:
            torch.save({"skipped": skipped, "unchanged": unchanged, "error": error, "total": guard.total},
                       Path(out_dir) / "result.pt")
    finally:
        destroy_distributed()
