"""Token-budget micro-batches and sequence packing on real gloo ranks: one OAPL step gives the same
loss, gradients and sequence log-probs as the whole-group micro-batch of the same layout.

Each spawned world (TP=2, PP=2, DP=2) builds one policy per variant from the same reference weights:
whole groups (the reference), a small token budget (padded rows, several micro-batches of varying
row counts), packing (several sequences per row under a block-diagonal mask) and both. DP=2 with an odd
micro-batch count also runs an empty (padding-only) micro-batch on one rank. Tolerance (fp32): loss
rel 1e-5; gradients rtol 1e-5 + atol 1e-7 and log-probs atol 1e-5 (only the reduction order differs).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.support.distributed import run_ranks
from tests.support.oapl_case import run_config

# (micro_batch_tokens, pack_sequences). Lengths are 3..11 tokens, rows pad to 16 (lcm(TP, 16)):
# 48 tokens = 3 padded rows per micro-batch (6 micro-batches, the last of 1 row); packed rows of at
# most 32 or 64 tokens hold several sequences each.
# (micro_batch_tokens, pack_sequences, algo.loss); each variant is compared with "<loss>-whole" ("whole" for OAPL).
VARIANTS = {"whole": (0, False, "oapl"), "budget48": (48, False, "oapl"), "pack64": (64, True, "oapl"),
            "pack32": (32, True, "oapl")}
GRPO_VARIANTS = {"grpo-whole": (0, False, "grpo"), "grpo-pack32": (32, True, "grpo")}  # per-token normalisation
DP_VARIANTS = {"whole": (0, False, "oapl"), "budget96": (96, False, "oapl"), "pack32": (32, True, "oapl")}  # 3 over 2 ranks


def variants_worker(cfg_dict: dict, variants: dict, ref_path: str, batch_path: str, out_dir: str) -> None:
    """One learner world, one policy per variant (same weights): a forward log-prob pass, one step;
    saves loss, gradients (HF names) and log-probs per variant from one rank per pipeline stage."""
    from megatron_oapl.config import from_dict
    from megatron_oapl.learner.distributed import destroy_distributed, init_distributed
    from megatron_oapl.learner.model import build_policy
    from megatron_oapl.learner.step import forward_logprobs, train_step
    from megatron_oapl.models.hf_mapping import HFMapping
    from megatron_oapl.weights.reshard import iter_hf_tensors, load_hf_tensors
    from tests.support.learner_workers import batch_from_dict

    ctx = init_distributed(from_dict(cfg_dict))
    try:
        batch = batch_from_dict(torch.load(batch_path))
        out = {}
        for name, (tokens, pack, loss) in variants.items():
            parallel = {**cfg_dict["parallel"], "micro_batch_tokens": tokens, "pack_sequences": pack}
            cfg = from_dict({**cfg_dict, "parallel": parallel, "algo": {**cfg_dict["algo"], "loss": loss}})
            policy = build_policy(cfg, ctx)
            mapping = HFMapping.for_config(cfg.model)
            load_hf_tensors(policy.model, mapping, torch.load(ref_path).__getitem__)
            policy.optimizer.reload_model_params()
            logp = forward_logprobs(policy, batch, cfg, ctx)
            result = train_step(policy, batch, cfg, ctx)
            grads = {k: v.clone() for k, v in iter_hf_tensors(policy.model, mapping, grads=True)}
            out[name] = {"loss": result.loss, "logp": logp, "grads": grads, "layout": result.layout,
                         "metrics": result.metrics}
        if ctx.tp_rank == 0 and ctx.dp_rank == 0:
            torch.save(out, Path(out_dir) / f"rank{ctx.rank}.pt")
    finally:
        destroy_distributed()


def run_variants(setup, name: str, variants: dict, **layout) -> dict:
    root, _ = setup
    out = root / f"microbatch-{name}"
    out.mkdir()
    run_ranks(2, variants_worker, run_config(**layout), variants, str(root / "ref.pt"), str(root / "batch.pt"), str(out))
    merged: dict = {}
    for path in sorted(out.glob("rank*.pt")):  # one file per pipeline stage: merge the gradients
        for variant, part in torch.load(path).items():
            entry = merged.setdefault(variant, {**part, "grads": {}})
            entry["grads"].update(part["grads"])
    return merged


def assert_matches_whole_groups(runs: dict) -> None:
    for name, got in runs.items():
        want = runs["grpo-whole" if name.startswith("grpo") else "whole"]
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5), name
        torch.testing.assert_close(got["logp"], want["logp"], rtol=0, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
        assert set(got["grads"]) == set(want["grads"]) and got["grads"]
        for key, grad in want["grads"].items():
            torch.testing.assert_close(got["grads"][key], grad, rtol=1e-5, atol=1e-7,
                                       msg=lambda m, n=name, k=key: f"{n}, gradient of {k}: {m}")
        # (advantage_std is left out: the whole-group path averages per-micro-batch stds, the token-budget
        # path takes the std over the whole step.)
        keys = ("clip_frac", "approx_kl", "abs_log_ratio_mean") if name.startswith("grpo") else (
            "residual_abs_mean", "log_ratio_mean", "v_star_mean", "kept_seq_frac")
        for key in keys:
            assert got["metrics"][key] == pytest.approx(want["metrics"][key], rel=1e-5), (name, key)


@pytest.mark.parametrize("name,layout,extra", [("tp2", dict(tp=2), GRPO_VARIANTS), ("pp2", dict(pp=2), {})])
def test_token_budget_and_packing_match_whole_groups(setup, name, layout, extra):
    runs = run_variants(setup, name, {**VARIANTS, **extra}, **layout)
    assert_matches_whole_groups(runs)
    # The layouts really differ: several micro-batches, and packing pads less than padded rows.
    assert runs["whole"]["layout"]["perf/micro_batches_per_step"] == 1
    assert runs["budget48"]["layout"]["perf/micro_batches_per_step"] == 6
    assert runs["pack32"]["layout"]["perf/micro_batches_per_step"] > runs["pack64"]["layout"]["perf/micro_batches_per_step"] > 1
    assert runs["pack64"]["layout"]["perf/padding_frac"] < runs["budget48"]["layout"]["perf/padding_frac"]


def test_data_parallel_ranks_run_equal_micro_batch_counts(setup):
    runs = run_variants(setup, "dp2", DP_VARIANTS)
    assert_matches_whole_groups(runs)
    assert runs["budget96"]["layout"]["perf/micro_batches_per_step"] == 2  # 3 over 2 ranks: one is empty
