"""Rank-side bodies of the MoE tests (module level so spawn can import them)."""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_oapl.checkpoint import CheckpointManager
from megatron_oapl.checkpoint.convert import export_config, export_hf_rank
from megatron_oapl.config import from_dict
from megatron_oapl.learner.distributed import destroy_distributed, init_distributed
from megatron_oapl.learner.model import build_policy
from megatron_oapl.learner.step import moe_padding
from megatron_oapl.models.hf_mapping import HFMapping
from megatron_oapl.weights.export import export_hf_model
from megatron_oapl.weights.hf_io import hf_tensor_reader
from megatron_oapl.weights.reshard import load_hf_tensors


def _fresh_layout(cfg):
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    return init_distributed(cfg)


PADDED_LENGTHS = (8, 5)  # real tokens of the two rows of the padded pass


def _logits(policy, cfg, tokens: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary fp32 logits [b, s, V] on every rank (gathered over TP)."""
    from tests.support.checkpoint_workers import _tp_gathered_logits

    return _tp_gathered_logits(policy.model[0], tokens, cfg.model.vocab_size)


def load_score_export(cfg_dict: dict, ckpt: str, tokens: list[list[int]], out_dir: str,
                      unnormalised_hf: str | None = None) -> None:
    """On a TP x EP world (DP = EP): load checkpoint `ckpt` into a policy of `cfg_dict`'s layout (each EP rank
    holds its share of the experts, each split over TP), save its fp32 logits of `tokens` and the expert
    load of a forward without and with gradients on every rank (`logits.pt`, rank 0), export the live
    model through the training run's export path (`live/`: experts gathered over the EP group), then export
    the checkpoint through `oapl convert megatron-to-hf`'s rank-side path on an EP=1 layout (`back/`).
    `unnormalised_hf`: also the logits of that HF model (norm_topk_prob false) loaded into the same layout."""
    import dataclasses

    try:
        cfg = from_dict(cfg_dict, check_hardware=False)
        ctx = _fresh_layout(cfg)
        policy = build_policy(cfg, ctx)
        CheckpointManager(ckpt).load(ckpt, policy, ctx)
        tokens_t = torch.tensor(tokens)
        record = {"logits": _logits(policy, cfg, tokens_t), "load_without_grad": policy.expert_load.take()}
        positions = torch.arange(tokens_t.shape[1]).unsqueeze(0).expand_as(tokens_t)
        policy.model[0](tokens_t, positions, None).sum().backward()  # a training pass: counts once per rank
        record["load"] = policy.expert_load.take()
        # Two rows of different lengths, right-padded as the learner pads them: padding is routed, not counted.
        rows = torch.tensor([tokens[0], tokens[0][::-1]])
        padding = torch.arange(rows.shape[1])[None, :] >= torch.tensor(PADDED_LENGTHS)[:, None]
        policy.model[0](rows, positions.expand_as(rows), None, **moe_padding(policy.model[0], padding)).sum().backward()
        record["padded_load"] = policy.expert_load.take()
        with torch.no_grad():
            export_hf_model(policy.model, HFMapping.for_config(cfg.model), ctx, None, Path(out_dir) / "live",
                            dtype=torch.float32)
        if unnormalised_hf:
            cfg2 = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, moe_norm_topk_prob=False))
            policy2 = build_policy(cfg2, ctx)
            load_hf_tensors(policy2.model, HFMapping.for_config(cfg2.model), hf_tensor_reader(unnormalised_hf))
            record["unnormalised_logits"] = _logits(policy2, cfg2, tokens_t)
        if ctx.rank == 0:
            torch.save(record, Path(out_dir) / "logits.pt")
        back_cfg = export_config(ckpt)
        export_hf_rank(back_cfg, _fresh_layout(back_cfg), ckpt, Path(out_dir) / "back", torch.float32)
    finally:
        destroy_distributed()
