"""Rank-side bodies of the MoE tests (module level so spawn can import them)."""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_oapl.checkpoint import CheckpointManager
from megatron_oapl.checkpoint.convert import export_config, export_hf_rank
from megatron_oapl.config import from_dict
from megatron_oapl.learner.distributed import destroy_distributed, init_distributed
from megatron_oapl.learner.model import build_policy
from megatron_oapl.models.hf_mapping import HFMapping
from megatron_oapl.weights.export import export_hf_model


def _fresh_layout(cfg):
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    return init_distributed(cfg)


def load_score_export(cfg_dict: dict, ckpt: str, tokens: list[list[int]], out_dir: str) -> None:
    """On a 2-rank world: load checkpoint `ckpt` into a policy of `cfg_dict`'s layout (EP=2: each rank
    holds half the experts), save its fp32 logits of `tokens` and the expert load of a forward without and
with gradients on every rank (`logits.pt`, rank 0), export the live
    model through the training run's export path (`live/`: experts gathered over the EP group), then export
    the checkpoint through `oapl convert megatron-to-hf`'s rank-side path on an EP=1 layout (`back/`)."""
    try:
        cfg = from_dict(cfg_dict, check_hardware=False)
        ctx = _fresh_layout(cfg)
        policy = build_policy(cfg, ctx)
        CheckpointManager(ckpt).load(ckpt, policy, ctx)
        tokens_t = torch.tensor(tokens)
        positions = torch.arange(tokens_t.shape[1]).unsqueeze(0).expand_as(tokens_t)
        with torch.no_grad():
            logits = policy.model[0](tokens_t, positions, None)[..., : cfg.model.vocab_size].float()
            load_without_grad = policy.expert_load.take()  # log-prob passes do not count
        policy.model[0](tokens_t, positions, None).sum().backward()  # a training pass: counts once per rank
        load = policy.expert_load.take()
        with torch.no_grad():
            export_hf_model(policy.model, HFMapping.for_config(cfg.model), ctx, None, Path(out_dir) / "live",
                            dtype=torch.float32)
        if ctx.rank == 0:
            torch.save({"logits": logits, "load": load, "load_without_grad": load_without_grad},
                       Path(out_dir) / "logits.pt")
        back_cfg = export_config(ckpt)
        export_hf_rank(back_cfg, _fresh_layout(back_cfg), ckpt, Path(out_dir) / "back", torch.float32)
    finally:
        destroy_distributed()
