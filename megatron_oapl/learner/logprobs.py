"""Per-token log-probs from vocab-parallel logits (each TP rank holds a slice of the vocabulary).

The plain-logits version is `megatron_oapl.algo.token_logprobs`; this one is its tensor-parallel twin,
built on Megatron's `vocab_parallel_cross_entropy` so the full vocabulary is never gathered.
"""

from __future__ import annotations

import torch


def vocab_parallel_token_logprobs(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float, vocab_size: int | None = None
) -> torch.Tensor:
    """log softmax(logits / T)[label] for logits [..., V/TP] sharded over the TP group -> [...] fp32.

    `vocab_size` (the true vocabulary) masks Megatron's padding columns, which the engines do not have:
    leaving them in would put mass on tokens that cannot be sampled and bias every log-prob.
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    # Divide before the cross entropy (the sampler's temperature); the division also gives a fresh
    # fp32 tensor, which matters because vocab_parallel_cross_entropy overwrites fp32 logits in place.
    scaled = logits.float() / temperature
    if vocab_size is not None:
        shard = scaled.shape[-1]
        start = parallel_state.get_tensor_model_parallel_rank() * shard
        if start + shard > vocab_size:
            column = torch.arange(start, start + shard, device=scaled.device)
            scaled = scaled.masked_fill(column >= vocab_size, float("-inf"))
    return -vocab_parallel_cross_entropy(scaled, labels)
