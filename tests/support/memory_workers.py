"""Rank-side body of the recompute / sequence-parallel / lean log-prob tests, and a measured peak.

`peak_bytes` is a measurement, not a model: torch's profiler receives every allocation and free of the
CPU allocator (`profile_memory=True`); the peak is the running maximum of their sum over `fn`.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import torch
import torch.distributed as dist


def peak_bytes(fn) -> int:
    """Peak of the bytes allocated while `fn()` runs, above what was allocated before it."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    return max(itertools.accumulate((e.nbytes() for e in events), initial=0))


# ---------------------------------------------------------------------------------------------- log-probs


def _logit_shard(full: torch.Tensor, tp_rank: int, tp: int) -> torch.Tensor:
    width = full.shape[-1] // tp
    return full[..., tp_rank * width : (tp_rank + 1) * width].clone().requires_grad_(True)


def _logprobs_and_grad(shard, labels, weights, vocab_size, chunk_tokens):
    from megatron_oapl.learner.logprobs import vocab_parallel_token_logprobs

    shard.grad = None
    logp = vocab_parallel_token_logprobs(shard, labels, 0.7, vocab_size, chunk_tokens=chunk_tokens)
    (logp * weights).sum().backward()
    return logp.detach(), shard.grad.clone()


def _chunked_vs_whole(tp_rank: int, tp: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    vocab_size, padded = 50, 52  # 2 Megatron padding columns on the last TP rank
    full = torch.randn(2, 45, padded, generator=gen) * 3
    labels = torch.randint(0, vocab_size, (2, 45), generator=gen)
    weights = torch.randn(2, 45, generator=gen)
    shard = _logit_shard(full, tp_rank, tp)
    whole, whole_grad = _logprobs_and_grad(shard, labels, weights, vocab_size, 0)
    chunked, chunked_grad = _logprobs_and_grad(shard, labels, weights, vocab_size, 16)  # 90 = 5x16 + 10
    reference = (full[..., :vocab_size].double() / 0.7).log_softmax(-1).gather(-1, labels[..., None])[..., 0]
    with torch.no_grad():
        no_grad = _logprobs_no_grad(shard, labels, vocab_size)
    return {"whole": whole, "chunked": chunked, "whole_grad": whole_grad, "chunked_grad": chunked_grad,
            "reference": reference, "no_grad": no_grad}


def _logprobs_no_grad(shard, labels, vocab_size):
    from megatron_oapl.learner.logprobs import vocab_parallel_token_logprobs

    return vocab_parallel_token_logprobs(shard, labels, 0.7, vocab_size, chunk_tokens=16)


def _logprob_peaks(tp: int) -> dict:
    """Measured peak of forward + backward of bf16 logits [4096 tokens, 2048 columns per rank]."""
    gen = torch.Generator().manual_seed(1)
    shard = (torch.randn(4096, 2048, generator=gen) * 3).bfloat16().requires_grad_(True)
    labels = torch.randint(0, 2048 * tp, (4096,), generator=gen)
    peaks = {}
    for chunk in (0, 512):
        run = lambda: _logprobs_and_grad(shard, labels, 1.0, None, chunk)  # noqa: E731
        run()  # warm-up: lazy one-off allocations are not the step's
        peaks[chunk] = peak_bytes(run)
    return {"input_bytes": shard.numel() * shard.element_size(), "whole": peaks[0], "chunked": peaks[512]}


# ------------------------------------------------------------------------------- recompute / sequence parallel


def _policy_with_weights(cfg, ctx, ref_state: dict):
    from megatron_oapl.learner.model import build_policy
    from megatron_oapl.models.hf_mapping import HFMapping
    from megatron_oapl.weights.reshard import load_hf_tensors

    policy = build_policy(cfg, ctx)
    load_hf_tensors(policy.model, HFMapping.for_config(cfg.model), ref_state.__getitem__)
    policy.optimizer.reload_model_params()
    return policy


def _step_loss_grads_peak(cfg, ctx, ref_state: dict, batch) -> dict:
    """One learner step from the reference weights: loss, gradients (HF names) and measured peak."""
    from megatron_oapl.learner.step import train_step
    from megatron_oapl.models.hf_mapping import HFMapping
    from megatron_oapl.weights.reshard import iter_hf_tensors

    policy = _policy_with_weights(cfg, ctx, ref_state)
    box = {}
    peak = peak_bytes(lambda: box.update(result=train_step(policy, batch, cfg, ctx, 0)))
    grads = {k: v.clone() for k, v in iter_hf_tensors(policy.model, HFMapping.for_config(cfg.model), grads=True)}
    return {"loss": box["result"].loss, "skipped": box["result"].skipped, "grads": grads, "peak": peak}


def recompute_sp_checks(variants: dict, ref_state_path: str, batch_path: str, out_dir: str) -> None:
    """On 2 gloo ranks: one step per named config of `variants` {layout: {name: cfg_dict}} (every config
    of a layout has the same TP/PP), saving each rank's results (pipeline stages hold different
    gradients). Ends with the lean log-prob checks, so one spawn serves the whole test module."""
    from megatron.core import parallel_state

    from megatron_oapl.config import from_dict
    from megatron_oapl.learner.distributed import destroy_distributed, init_distributed
    from tests.support.learner_workers import batch_from_dict

    ref_state = torch.load(ref_state_path)
    batch = batch_from_dict(torch.load(batch_path))
    results = {}
    try:
        for layout, configs in variants.items():
            ctx = None
            for name, cfg_dict in configs.items():
                cfg = from_dict(cfg_dict)
                ctx = ctx or init_distributed(cfg)  # the world group is kept; Megatron's groups per layout
                results[name] = _step_loss_grads_peak(cfg, ctx, ref_state, batch)
            parallel_state.destroy_model_parallel()
        rank = dist.get_rank()
        for tp in (2, 1):
            parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
            tp_rank = parallel_state.get_tensor_model_parallel_rank()
            results[f"logprobs_tp{tp}"] = {**_chunked_vs_whole(tp_rank, tp), "peaks": _logprob_peaks(tp)}
            parallel_state.destroy_model_parallel()
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        destroy_distributed()
