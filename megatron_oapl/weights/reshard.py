"""Megatron shards <-> full HF-named tensors on a live TP x PP learner.

`iter_hf_tensors` gathers one parameter at a time over the TP group (never the whole model on one
rank); each pipeline stage yields only its own layers. `load_hf_tensors` is the inverse: every rank
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


def iter_hf_tensors(
    model_chunks: list, mapping: HFMapping, grads: bool = False
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (hf_name, full tensor) for this pipeline stage's parameters (or, with `grads=True`, their
    DP-reduced gradients; not valid with the distributed optimizer, which keeps only a grad shard).

    Collective over the TP group: every TP rank of the stage must iterate in step; all of them receive
    the gathered tensors. Tensors that need no gather alias the live parameters: copy them (as the
    bucketed sender does) before the next optimizer step.
    """
    from megatron.core import parallel_state

    tp_group = parallel_state.get_tensor_model_parallel_group()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    for chunk in model_chunks:
        offset = layer_offset(chunk)
        for name, param in _named_parameters(chunk):
            rule = mapping.rule(name, offset)
            if rule is None:
                continue
            data = param.main_grad.detach() if grads else full_precision(param).detach()
            if mapping.tp_split_dim(rule[0]) is None or tp_size == 1:
                shards = [data]
            else:
                shards = [torch.empty_like(data) for _ in range(tp_size)]
                dist.all_gather(shards, data.contiguous(), group=tp_group)
            yield from mapping.to_hf(name, shards, offset)


@torch.no_grad()
def load_hf_tensors(model_chunks: list, mapping: HFMapping, get_hf: Callable[[str], torch.Tensor]) -> None:
    """Set every parameter of this rank from full HF tensors (`get_hf(name)`); no communication."""
    from megatron.core import parallel_state

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    for chunk in model_chunks:
        offset = layer_offset(chunk)
        for name, param in _named_parameters(chunk):
            # Vocabulary-parallel tensors: the model's (padded) size decides how much padding to add.
            padded = param.shape[0] * tp_size
            shard = mapping.to_megatron_shard(name, get_hf, tp_rank, tp_size, offset, padded)
            if shard.shape != param.shape:
                raise ValueError(f"{name}: HF source gives shape {tuple(shard.shape)}, model has {tuple(param.shape)}")
            param.copy_(shard.to(param.dtype))
