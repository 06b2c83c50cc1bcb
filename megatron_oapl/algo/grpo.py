"""GRPO baseline loss with token-level importance ratio and PPO clipping.

Shapes: ``P`` prompts, ``G`` completions per prompt, ``T`` token positions.

    A_i      = (r_i - mean_group(r)) / (std_group(r) + adv_eps)   population std (unbiased=False)
    ratio    = exp(logp - logp_behaviour)                         per token
    l_t      = -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A)
    loss     = sum(l_t * mask) / normalizer                        default normalizer = mask.sum()

The default normalizer makes the loss a token mean over the whole batch (every token
weighs the same, long completions weigh more). Pass the global masked-token count when a
call sees a slice of the global batch so that summed micro-batch losses give the global mean.

Metric keys returned by :func:`grpo_loss` (detached float32 scalars, over masked tokens
unless stated):

- ``clip_frac``        fraction of tokens where the clipped branch is active (zero gradient):
                       ``A > 0 and ratio > 1 + eps_high`` or ``A < 0 and ratio < 1 - eps_low``
- ``ratio_mean``       mean of ``ratio``
- ``approx_kl``        mean of ``(ratio - 1) - log(ratio)`` (k3 estimator of KL(behaviour || theta))
- ``abs_log_ratio_mean``  over the ``[P, G]`` sequences: mean of ``|sum_t (logp - logp_behaviour)|``,
                       the sequence-level drift OAPL reports under the same key
- ``advantage_mean``   / ``advantage_std`` / ``advantage_min`` / ``advantage_max``:
                       over the ``[P, G]`` sequence advantages (std with unbiased=False)
- ``degenerate_group_frac``  fraction of groups with all-equal rewards (advantage 0)
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple, Union

import torch

Normalizer = Union[int, float, torch.Tensor]

__all__ = ["group_normalized_advantages", "grpo_loss", "clipped_surrogate"]


def group_normalized_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """GRPO advantages ``(r - mean_group) / (std_group + eps)``.

    Args:
        rewards: ``[P, G]`` float.
        eps: added to the std so an all-equal group gives advantage 0, not nan.

    Returns:
        ``[P, G]`` float32 (float64 for float64 input). The std is the population std
        (``unbiased=False``) so a group of 1 is well defined (advantage 0).
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [P, G], got shape {tuple(rewards.shape)}")
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got eps={eps!r}")
    r = rewards.detach()
    r = r if r.dtype == torch.float64 else r.float()
    mean = r.mean(dim=-1, keepdim=True)
    std = r.std(dim=-1, unbiased=False, keepdim=True)
    return (r - mean) / (std + eps)


def clipped_surrogate(
    log_ratio: torch.Tensor, advantage: torch.Tensor, eps_low: float, eps_high: float
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per token (any shape; ``advantage`` broadcast to it): ``(-min(ratio*A, clip(ratio)*A), ratio,
    clipped)`` with ``clipped`` where the clipped branch is active (zero gradient)."""
    ratio = torch.exp(log_ratio)
    bounded = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    per_token = -torch.minimum(ratio * advantage, bounded * advantage)
    with torch.no_grad():
        clipped = ((advantage > 0) & (ratio > 1.0 + eps_high)) | ((advantage < 0) & (ratio < 1.0 - eps_low))
    return per_token, ratio, clipped


def grpo_loss(
    logp_tokens: torch.Tensor,
    logp_behaviour_tokens: torch.Tensor,
    mask: torch.Tensor,
    rewards: torch.Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    normalizer: Optional[Normalizer] = None,
    adv_eps: float = 1e-6,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Clipped GRPO surrogate loss.

    Args:
        logp_tokens: ``[P, G, T]`` per-token log-probs under pi_theta (carries the grad).
        logp_behaviour_tokens: ``[P, G, T]`` per-token log-probs under the policy that
            sampled (constant).
        mask: ``[P, G, T]`` bool/int/float, 1 on completion tokens, 0 on prompt/padding.
        rewards: ``[P, G]`` (constant); each row a whole group.
        eps_low, eps_high: clip range ``[1 - eps_low, 1 + eps_high]``.
        normalizer: divisor of the masked sum; default ``mask.sum()`` (token mean;
            clamped to >= 1 so an all-padding batch gives 0, not nan).
        adv_eps: see :func:`group_normalized_advantages`.

    Returns:
        ``(loss, metrics)``: a float32 scalar with grad and detached scalars (keys in the
        module docstring). On-policy (ratio 1) ``d loss / d logp_t = -A * mask_t / normalizer``.
    """
    if logp_tokens.dim() != 3 or logp_tokens.shape != logp_behaviour_tokens.shape:
        raise ValueError(
            "logp_tokens and logp_behaviour_tokens must both be [P, G, T]; got "
            f"{tuple(logp_tokens.shape)}, {tuple(logp_behaviour_tokens.shape)}"
        )
    if mask.shape != logp_tokens.shape or rewards.shape != logp_tokens.shape[:2]:
        raise ValueError(
            f"mask must be [P, G, T] and rewards [P, G]; got mask {tuple(mask.shape)}, "
            f"rewards {tuple(rewards.shape)} for logp {tuple(logp_tokens.shape)}"
        )
    for name, value in (("eps_low", eps_low), ("eps_high", eps_high)):
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {name}={value!r}")
    if eps_low >= 1:
        raise ValueError(f"eps_low must be < 1 (lower clip bound 1 - eps_low > 0), got eps_low={eps_low!r}")

    dtype = torch.float64 if logp_tokens.dtype == torch.float64 else torch.float32
    lp = logp_tokens.to(dtype)
    lp_b = logp_behaviour_tokens.detach().to(dtype)
    m = mask.detach().to(dtype)
    keep = mask.detach() != 0

    adv_seq = group_normalized_advantages(rewards, adv_eps).to(dtype)  # [P, G]
    adv = adv_seq[:, :, None]  # broadcast over tokens

    log_ratio = lp - lp_b
    per_token, ratio, is_clipped = clipped_surrogate(log_ratio, adv, eps_low, eps_high)
    # where, not only *mask: padding may hold -inf log-probs whose ratio is nan/inf.
    per_token = torch.where(keep, per_token * m, torch.zeros_like(per_token))

    n_tok = keep.sum()
    if normalizer is None:
        normalizer = m.sum().clamp(min=1.0)
    elif not isinstance(normalizer, torch.Tensor):
        if not (math.isfinite(normalizer) and normalizer > 0):
            raise ValueError(f"normalizer must be a finite number > 0, got normalizer={normalizer!r}")
    loss = per_token.sum() / normalizer

    with torch.no_grad():
        denom = n_tok.clamp(min=1).float()
        ratio_d = ratio.detach().float()
        lr_d = log_ratio.detach().float()
        zero = torch.zeros_like(ratio_d)
        kl = torch.where(keep, (ratio_d - 1.0) - lr_d, zero)
        a = adv_seq.float()
        metrics: Dict[str, torch.Tensor] = {
            "clip_frac": (is_clipped & keep).sum().float() / denom,
            "ratio_mean": torch.where(keep, ratio_d, zero).sum() / denom,
            "approx_kl": kl.sum() / denom,
            "abs_log_ratio_mean": torch.where(keep, lr_d, zero).sum(dim=-1).abs().mean(),
            "advantage_mean": a.mean(),
            "advantage_std": a.std(unbiased=False),
            "advantage_min": a.min(),
            "advantage_max": a.max(),
            "degenerate_group_frac": (rewards == rewards[:, :1]).all(dim=-1).float().mean(),
        }
    return loss, metrics
