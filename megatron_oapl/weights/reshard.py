"""Megatron shards <-> full HF-named tensors on a live TP x PP (x EP) learner.

`iter_hf_tensors` gathers one parameter at a time over the TP group (never the whole model on one
rank); each pipeline stage yields only its own layers. An expert's weight is gathered over the expert-TP
group, then over the expert-parallel group, whose other members are other data-parallel ranks: they take
part in the expert gathers only (`gather_role`). `load_hf_tensors` is the inverse: every rank
cuts its own shard out of full HF tensors. FP8 parameters (`precision.fp8.fp8_param`: Transformer
Engine quantized tensors) leave dequantised, so the weight push and the HF export both hand out the
high-precision weights the learner's forward pass actually used.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
import torch.distributed as dist

from megatron_oapl.models.hf_mapping import HFMapping
from megatron_oapl.models.megatron_model import layer_offset


def _named_parameters(model_chunk):
    """(name without DDP wrappers, parameter) of one model chunk, in a fixed order on every rank."""
    from megatron_oapl.models.hf_mapping import strip_wrappers

    for name, param in model_chunk.named_parameters():
        yield strip_wrappers(name), param


def full_precision(tensor: torch.Tensor) -> torch.Tensor:
    """A Transformer Engine FP8 parameter as a plain tensor of its nominal dtype (bf16 for a bf16 run);
    any other tensor unchanged. Its raw bytes are FP8 codes plus a scale kept aside, so gathering,
    re-laying out or packing it as it is would ship garbage."""
    from megatron.core.fp8_utils import dequantize_fp8_tensor, is_float8tensor

    return dequantize_fp8_tensor(tensor) if is_float8tensor(tensor) else tensor


def gather_role(ctx) -> str | None:
    """This rank's part in a push's or export's gathers: "all" on data-parallel rank 0; "experts" on another
    rank of the expert-parallel group of a DP-rank-0 rank (it holds experts that rank lacks); None else."""
    from megatron.core import parallel_state as ps

    if ctx.dp_rank == 0:
        if ps.get_expert_model_parallel_rank() != 0:  # Megatron's rank order puts it there (experts gather to it)
            raise RuntimeError(f"rank {ctx.rank}: data-parallel rank 0 is expert-parallel rank "
                               f"{ps.get_expert_model_parallel_rank()}, not 0; the push gathers experts to EP rank 0")
        return "all"
    if ps.get_expert_model_parallel_world_size() > 1 and ps.get_expert_data_parallel_rank() == 0:
        return "experts"
    return None


def _gather(data: torch.Tensor, group, size: int) -> list[torch.Tensor]:
    if size == 1:
        return [data]
    parts = [torch.empty_like(data) for _ in range(size)]
    dist.all_gather(parts, data.contiguous(), group=group)
    return parts


def _gather_to_first(data: torch.Tensor, group, size: int) -> list[torch.Tensor] | None:
    """Every member's `data` on the group's first rank, None on the others."""
    if size == 1:
        return [data]
    first = dist.get_global_rank(group, 0)
    parts = [torch.empty_like(data) for _ in range(size)] if dist.get_rank() == first else None
    dist.gather(data.contiguous(), parts, dst=first, group=group)
    return parts


def _expert_tensors(mapping: HFMapping, name: str, data: torch.Tensor, offset: int) -> list[tuple[str, torch.Tensor]]:
    """Every EP rank's copy of one local expert slot, as full HF tensors of global experts, on EP rank 0 (the
    DP-rank-0 member, where the sender is: EP ranks are the DP ranks, in order); nothing on the other EP
    ranks, so a push moves each expert once rather than to every EP rank."""
    from megatron.core import parallel_state as ps

    ep_size = ps.get_expert_model_parallel_world_size()
    per_rank = mapping.num_experts // ep_size
    split = mapping.tp_split_dim(mapping.rule(name)[0]) is not None
    etp_size = ps.get_expert_tensor_parallel_world_size() if split else 1
    shards = _gather(data, ps.get_expert_tensor_parallel_group(), etp_size)
    local = [t for _, t in mapping.to_hf(name, shards, offset)]
    by_rank = [_gather_to_first(t, ps.get_expert_model_parallel_group(), ep_size) for t in local]
    if by_rank and by_rank[0] is None:
        return []
    return [(hf_name, by_rank[i][r]) for r in range(ep_size)
            for i, hf_name in enumerate(mapping.rule(name, offset, r * per_rank)[1])]


def iter_hf_tensors(
    model_chunks: list, mapping: HFMapping, grads: bool = False, experts_only: bool = False
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (hf_name, full tensor) for this pipeline stage's parameters (or, with `grads=True`, their
    DP-reduced gradients; not valid with the distributed optimizer, which keeps only a grad shard).

    Collective over the TP group: every TP rank of the stage must iterate in step; all of them receive
    the gathered tensors; with experts, over the expert-parallel group too (its members outside DP rank 0
    iterate with `experts_only` and receive no experts). Tensors that need no gather alias the live parameters: copy them (as the
    bucketed sender does) before the next optimizer step.
    """
    from megatron.core import parallel_state

    tp_group = parallel_state.get_tensor_model_parallel_group()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    for chunk in model_chunks:
        offset = layer_offset(chunk)
        for name, param in _named_parameters(chunk):
            rule = mapping.rule(name, offset)
            expert = mapping.is_expert(name)
            if rule is None or (experts_only and not expert):
                continue
            data = param.main_grad.detach() if grads else full_precision(param).detach()
            if expert:
                yield from _expert_tensors(mapping, name, data, offset)
                continue
            shards = _gather(data, tp_group, 1 if mapping.tp_split_dim(rule[0]) is None else tp_size)
            yield from mapping.to_hf(name, shards, offset)


@torch.no_grad()
def load_hf_tensors(model_chunks: list, mapping: HFMapping, get_hf: Callable[[str], torch.Tensor]) -> None:
    """Set every parameter of this rank from full HF tensors (`get_hf(name)`); no communication."""
    from megatron.core import parallel_state as ps

    dense = (ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size(), 0)
    ep_rank, ep_size = ps.get_expert_model_parallel_rank(), ps.get_expert_model_parallel_world_size()
    experts = (ps.get_expert_tensor_parallel_rank(), ps.get_expert_tensor_parallel_world_size(),
               ep_rank * (mapping.num_experts // ep_size))
    for chunk in model_chunks:
        offset = layer_offset(chunk)
        for name, param in _named_parameters(chunk):
            tp_rank, tp_size, first_expert = experts if mapping.is_expert(name) else dense
            # Vocabulary-parallel tensors: the model's (padded) size decides how much padding to add.
            padded = param.shape[0] * tp_size
            shard = mapping.to_megatron_shard(name, get_hf, tp_rank, tp_size, offset, padded, first_expert)
            if shard.shape != param.shape:
                raise ValueError(f"{name}: HF source gives shape {tuple(shard.shape)}, model has {tuple(param.shape)}")
            param.copy_(shard.to(param.dtype))
