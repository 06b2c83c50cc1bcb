"""Per-token and per-sequence log-probabilities.

Both OAPL log-probs (learner and lagged policy) must be taken at the SAMPLING
temperature, i.e. under ``softmax(logits / T)`` with the T the engine used.
"""

from __future__ import annotations

import math

import torch

__all__ = ["token_logprobs", "sequence_logprobs"]


def token_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Log-prob of each token under ``softmax(logits / temperature)``.

    Args:
        logits: ``[..., V]`` float (bf16/fp16 allowed; computed in float32).
        tokens: ``[...]`` long, same leading shape as ``logits``.
        temperature: sampling temperature, > 0.

    Returns:
        ``[...]`` float32 (float64 for float64 logits), differentiable wrt ``logits``.
    """
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got temperature={temperature!r}")
    if tokens.shape != logits.shape[:-1]:
        raise ValueError(
            f"tokens shape {tuple(tokens.shape)} must equal logits.shape[:-1] "
            f"{tuple(logits.shape[:-1])}"
        )
    # float32: a bf16 log-softmax over a 100k+ vocab loses ~2-3 significant digits,
    # which the sequence sum then multiplies by the length.
    x = logits if logits.dtype == torch.float64 else logits.float()
    if temperature != 1.0:
        x = x / temperature
    logp = torch.log_softmax(x, dim=-1)
    return logp.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)


def sequence_logprobs(token_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sequence log-prob: ``sum(token_logp * mask, -1)`` (prompt/padding tokens masked out).

    Args:
        token_logp: ``[..., T]`` per-token log-probs.
        mask: ``[..., T]`` bool/int/float (broadcastable), non-zero on completion tokens.

    Returns:
        ``[...]`` in ``token_logp``'s dtype.
    """
    weight = mask.to(token_logp.dtype)
    # where, not a bare product: masked positions may hold -inf/nan (0 * -inf = nan).
    masked = torch.where(mask != 0, token_logp * weight, torch.zeros_like(token_logp))
    return masked.sum(dim=-1)
