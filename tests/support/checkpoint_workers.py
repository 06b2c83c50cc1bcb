"""Rank-side bodies of the checkpoint and conversion tests (module level so spawn can import them)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from megatron_oapl.checkpoint import CheckpointManager
from megatron_oapl.config import from_dict
from megatron_oapl.learner.distributed import destroy_distributed, init_distributed
from megatron_oapl.learner.model import build_policy
from megatron_oapl.learner.step import train_step
from megatron_oapl.models.hf_mapping import HFMapping
from megatron_oapl.models.presets import get_architecture
from megatron_oapl.weights.reshard import iter_hf_tensors, load_hf_tensors
from tests.support.learner_workers import batch_from_dict


def rng_probe() -> dict:
    """Draws from every RNG a checkpoint restores (python, numpy, torch CPU, Megatron's TP tracker)."""
    import random

    import numpy as np
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    with get_cuda_rng_tracker().fork():
        tracker = torch.rand(3)
    return {"python": random.random(), "numpy": float(np.random.rand()), "torch": torch.rand(3), "tracker": tracker}


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def checkpoint_script(ref_state_path: str, batch_path: str, out_dir: str, phases: list[dict]) -> None:
    """Learner lives on the fixed batch, one per phase, in this process. Each phase
    ({"name", "cfg", "actions"}) gets fresh Megatron model-parallel groups for its config's layout (the
    gloo world stays), a freshly built policy holding the reference weights, and runs `actions`:

    - {"op": "load_latest", "run_dir": D}: `CheckpointManager(D).load_latest`; records the returned
      state, the refusal messages and an `rng_probe()` right after the load;
    - {"op": "train", "tag": T, "first": a, "last": b, "save_dir": D, "save_at": [...], "keep_last": k}:
      optimizer steps a..b, saving after the steps in `save_at`; records the losses, the weights after
      step b (HF names, this stage's part), and after every save the checkpoint directory listing and
      an `rng_probe()`.

    So nothing but the files on disk carries state from one phase to the next. Every (TP rank 0,
    DP rank 0) rank writes `<name>.rank<R>.pt` per phase."""
    from megatron.core import parallel_state

    collect = _Collect()
    logging.getLogger("oapl.checkpoint").addHandler(collect)
    try:
        for phase in phases:
            cfg = from_dict(phase["cfg"])
            if parallel_state.model_parallel_is_initialized():
                parallel_state.destroy_model_parallel()
            ctx = init_distributed(cfg)
            collect.messages = []
            record = _phase(cfg, ctx, ref_state_path, batch_path, phase["actions"])
            record["warnings"] = collect.messages
            if ctx.tp_rank == 0 and ctx.dp_rank == 0:
                torch.save(record, Path(out_dir) / f"{phase['name']}.rank{ctx.rank}.pt")
    finally:
        destroy_distributed()


def _phase(cfg, ctx, ref_state_path: str, batch_path: str, actions: list[dict]) -> dict:
    policy = build_policy(cfg, ctx)
    mapping = HFMapping.from_model_config(get_architecture(cfg.model.preset), cfg.model)
    load_hf_tensors(policy.model, mapping, torch.load(ref_state_path).__getitem__)
    policy.optimizer.reload_model_params()
    batch = batch_from_dict(torch.load(batch_path))
    record: dict = {"loads": [], "train": {}}
    for action in actions:
        if action["op"] == "load_latest":
            manager = CheckpointManager(action["run_dir"])
            state = manager.load_latest(policy, ctx)
            record["loads"].append({"state": state, "refused": list(manager.refused), "rng": rng_probe()})
            continue
        saver = None
        if action.get("save_dir"):
            saver = CheckpointManager(action["save_dir"], keep_last=action.get("keep_last", 2), config=cfg)
        losses, listings = {}, {}
        for step in range(action["first"], action["last"] + 1):
            losses[step] = train_step(policy, batch, cfg, ctx, step).loss
            if saver is not None and step in action.get("save_at", ()):
                saver.save(step, policy, ctx, {"step": step, "policy_version": step // 2,
                                               "guard": {"consecutive": 0, "total": 0}})
                # No dropout: drawing here changes nothing the following steps compute.
                listings[step] = {"entries": sorted(os.listdir(saver.root)),
                                  "latest": (saver.root / "latest").read_text().strip(), "rng": rng_probe()}
        weights = {k: v.detach().clone() for k, v in iter_hf_tensors(policy.model, mapping)}
        record["train"][action["tag"]] = {
            "losses": losses, "weights": weights, "listings": listings,
            "lr": policy.optimizer.param_groups[0]["lr"], "scheduler_steps": policy.scheduler.num_steps,
        }
    return record


def _tp_gathered_logits(model_chunk, tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Full-vocabulary logits [b, s, V] of a one-stage model on every TP rank."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    with torch.no_grad():
        local = model_chunk(tokens, positions, None).contiguous()  # [b, s, V_padded / TP]
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp > 1:
        parts = [torch.empty_like(local) for _ in range(tp)]
        dist.all_gather(parts, local, group=parallel_state.get_tensor_model_parallel_group())
        local = torch.cat(parts, dim=-1)
    return local[..., :vocab_size].float()


def _switch_layout(cfg):
    """Fresh Megatron model-parallel groups for `cfg`'s layout on the existing gloo world."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    return init_distributed(cfg)


def hf_conversions(jobs: list[dict], exports: list[dict], out_dir: str) -> None:
    """On one 2-rank world: for each job, optionally convert its HF directory into a checkpoint with
    the layout of `job["import_cfg"]` (`convert.import_hf_rank`), then load that checkpoint into a full
    policy (model + optimizer) with the layout of `job["cfg"]` (`CheckpointManager.load`) and save the
    Megatron logits of `job["tokens"]` as `<name>.pt` (the model must be a single stage there). Then
    `convert.export_hf_rank` for each of `exports` ({"ckpt", "out"}) on a TP=PP=1 (DP=2) layout."""
    from megatron_oapl.checkpoint.convert import export_config, export_hf_rank, import_hf_rank

    try:
        for job in jobs:
            if job.get("import_cfg"):
                import_cfg = from_dict(job["import_cfg"], check_hardware=False)
                import_hf_rank(import_cfg, _switch_layout(import_cfg), job["hf"], job["ckpt"])
            cfg = from_dict(job["cfg"], check_hardware=False)
            ctx = _switch_layout(cfg)
            policy = build_policy(cfg, ctx)
            state = CheckpointManager(job["ckpt"]).load(job["ckpt"], policy, ctx)
            logits = _tp_gathered_logits(policy.model[0], torch.tensor(job["tokens"]), cfg.model.vocab_size)
            if ctx.rank == 0:
                torch.save({"logits": logits, "state": state}, Path(out_dir) / f"{job['name']}.pt")
        for job in exports:
            cfg = export_config(job["ckpt"])
            export_hf_rank(cfg, _switch_layout(cfg), job["ckpt"], job["out"], torch.float32)
    finally:
        destroy_distributed()
