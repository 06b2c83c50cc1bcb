"""Per-token log-probs from vocab-parallel logits (each TP rank holds a slice of the vocabulary).

The plain-logits version is `megatron_oapl.algo.token_logprobs`; this one is its tensor-parallel twin,
built on Megatron's `vocab_parallel_cross_entropy` so the full vocabulary is never gathered.

Memory: the cross entropy works on an fp32 copy of its input and keeps an fp32 softmax of it for
backward, i.e. several [tokens, vocab/TP] fp32 tensors (at 16K tokens and a 152K vocabulary, 10 GB
each at TP=1). With `chunk_tokens` the tokens are taken in chunks, each under activation checkpointing:
only the input logits are kept, and a chunk's fp32 copies exist only while that chunk is computed,
in forward and again in backward.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def vocab_parallel_token_logprobs(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float, vocab_size: int | None = None,
    *, chunk_tokens: int = 0,
) -> torch.Tensor:
    """log softmax(logits / T)[label] for logits [..., V/TP] sharded over the TP group -> [...] fp32.

    `vocab_size` (the true vocabulary) masks Megatron's padding columns, which the engines do not have:
    leaving them in would put mass on tokens that cannot be sampled and bias every log-prob.
    `chunk_tokens` > 0 bounds the fp32 working set to that many tokens (0 = all tokens at once); the
    result is the same, row by row.
    """
    shard = logits.shape[-1]
    flat_logits, flat_labels = logits.reshape(-1, shard), labels.reshape(-1)
    if chunk_tokens <= 0 or flat_labels.numel() <= chunk_tokens:
        return _token_logprobs(flat_logits, flat_labels, temperature, vocab_size).view(labels.shape)
    recompute = torch.is_grad_enabled() and logits.requires_grad
    parts = []
    # split (not slicing): its backward concatenates the chunks' gradients once, where slicing would
    # build a zero-filled full-size gradient per chunk.
    for chunk_logits, chunk_labels in zip(flat_logits.split(chunk_tokens), flat_labels.split(chunk_tokens)):
        if recompute:
            part = checkpoint(_token_logprobs, chunk_logits, chunk_labels, temperature, vocab_size,
                              use_reentrant=False, preserve_rng_state=False)
        else:
            part = _token_logprobs(chunk_logits, chunk_labels, temperature, vocab_size)
        parts.append(part)
    return torch.cat(parts).view(labels.shape)


def _token_logprobs(logits: torch.Tensor, labels: torch.Tensor, temperature: float,
                    vocab_size: int | None) -> torch.Tensor:
    """The log-probs of one block of tokens: logits [n, V/TP], labels [n] -> [n] fp32."""
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
