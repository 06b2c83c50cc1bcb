"""Build the policy on this rank: Megatron GPTModel stage, Megatron DDP, optimizer and LR schedule."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_oapl.learner.expert_load import ExpertLoad
from megatron_oapl.models.megatron_model import build_gpt_model, build_transformer_config, params_dtype


@dataclass
class Policy:
    """Everything that trains: the model chunks of this rank (one per virtual stage; VPP is not used,
    so one), the Megatron optimizer and the LR scheduler."""

    model: list  # [DistributedDataParallel]
    optimizer: object  # megatron.core.optimizer.MegatronOptimizer
    scheduler: object  # megatron.core.optimizer_param_scheduler.OptimizerParamScheduler
    config: object  # megatron TransformerConfig
    expert_load: object = None  # learner.expert_load.ExpertLoad of an MoE policy


def optimizer_parts(optimizer) -> list:
    """Megatron's optimizer as a list of its parts: a ChainedOptimizer's (an MoE policy with EP > 1 has one for
    the dense and one for the expert parameters; Megatron may chain one alone too), else the optimizer itself."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def build_model(cfg, ctx) -> tuple[list, object]:
    """The DDP-wrapped model chunks of this pipeline stage, and their TransformerConfig."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    tconfig = build_transformer_config(cfg)
    module = build_gpt_model(cfg, tconfig, pre_process=ctx.is_first_stage, post_process=ctx.is_last_stage)
    module.to(ctx.device)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        # Non-finite steps are detected and skipped by the learner (counted, not raised).
        check_for_nan_in_grad=False,
    )
    model = DistributedDataParallel(config=tconfig, ddp_config=ddp_config, module=module)
    # Without this the schedule never reduces gradients over DP (nor ties embeddings over PP).
    tconfig.finalize_model_grads_func = finalize_model_grads
    tconfig.no_sync_func = model.no_sync
    return [model], tconfig


def build_optimizer(cfg, model_chunks: list) -> tuple[object, object]:
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    opt, dtype = cfg.optim, params_dtype(cfg.precision)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=opt.lr,
            min_lr=opt.min_lr,
            weight_decay=opt.weight_decay,
            adam_beta1=opt.adam_beta1,
            adam_beta2=opt.adam_beta2,
            adam_eps=opt.adam_eps,
            clip_grad=opt.clip_grad,
            bf16=dtype == torch.bfloat16,
            fp16=dtype == torch.float16,
            params_dtype=dtype,
            use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        ),
        model_chunks,
    )
    decay_steps = max(1, opt.train_steps)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if opt.lr_warmup_steps > 0 else opt.lr,
        max_lr=opt.lr,
        min_lr=opt.min_lr,
        lr_warmup_steps=opt.lr_warmup_steps,
        lr_decay_steps=decay_steps,
        lr_decay_style=opt.lr_decay_style,
        start_wd=opt.weight_decay,
        end_wd=opt.weight_decay,
        wd_incr_steps=decay_steps,
        wd_incr_style="constant",
    )
    return optimizer, scheduler


def build_policy(cfg, ctx) -> Policy:
    model, tconfig = build_model(cfg, ctx)
    optimizer, scheduler = build_optimizer(cfg, model)
    # fp16 loss scaling goes through the schedule's grad_scale_func.
    tconfig.grad_scale_func = optimizer.scale_loss
    expert_load = ExpertLoad(model, cfg.parallel.sequence_parallel) if cfg.model.num_experts else None
    return Policy(model=model, optimizer=optimizer, scheduler=scheduler, config=tconfig, expert_load=expert_load)
