"""Distributed initialisation of the learner ranks (gloo on CPU, NCCL on GPU).

This is the one place that activates the platform layer: on a machine without a GPU it installs the
CPU compatibility layer before Megatron-Core touches CUDA.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_oapl import platform
from megatron_oapl.config import ConfigError, check_world_size


@dataclass(frozen=True)
class ParallelContext:
    rank: int
    world_size: int
    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    dp_rank: int
    dp_size: int
    device: torch.device

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def is_coordinator(self) -> bool:
        """Global rank 0 receives rollouts, owns the lag schedule, logs and checkpoints."""
        return self.rank == 0


def resolve_backend(requested: str, device_type: str) -> str:
    if requested == "auto":
        return "nccl" if device_type == "cuda" else "gloo"
    if requested == "nccl" and device_type != "cuda":
        raise ConfigError("parallel.backend='nccl' needs CUDA GPUs; use 'gloo' or 'auto' on CPU")
    return requested


def init_distributed(cfg, timeout_s: float = 600.0) -> ParallelContext:
    """Join the learner world (torchrun-style env: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) and
    build Megatron's TP/PP/DP groups and RNG streams."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    device_type = platform.activate()
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group(
            backend=resolve_backend(cfg.parallel.backend, device_type),
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    world_size = dist.get_world_size()
    dp_size = check_world_size(cfg, world_size)
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=cfg.parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=cfg.parallel.pipeline_model_parallel_size,
    )
    # Same seed on every rank: Megatron derives the per-TP-rank streams from it.
    model_parallel_cuda_manual_seed(cfg.seed)
    return ParallelContext(
        rank=dist.get_rank(),
        world_size=world_size,
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        tp_size=parallel_state.get_tensor_model_parallel_world_size(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        pp_size=parallel_state.get_pipeline_model_parallel_world_size(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        dp_size=dp_size,
        device=platform.device(),
    )


def destroy_distributed() -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
