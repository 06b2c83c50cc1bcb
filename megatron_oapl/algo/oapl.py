"""OAPL objective (arXiv 2602.19362, Eqs. 2-3).

Shapes: ``P`` prompts per (micro-)batch, ``G`` completions per prompt. Every input
is *sequence-level* (one number per completion): ``logp`` is the sum of per-token
log-probs of the completion under ``pi_theta`` (see :mod:`.logprobs`), ``logp_lag``
the same under the lagged inference policy, both at the sampling temperature.

    V*(x)    = beta1 * (logsumexp_i(r_i / beta1) - ln G)               (Eq. 2)
    residual = beta2 * (logp - logp_lag) - (r - V*(x))
    loss     = sum(residual**2) / normalizer                           (Eq. 3)

Metric keys returned by :func:`oapl_loss` (all detached float32 scalars, computed
over *every* sequence of the batch, also when ``filter_degenerate=True``):

- ``residual_mean``          mean of the residual
- ``residual_abs_mean``      mean of ``|residual|``
- ``log_ratio_mean``         mean of ``logp - logp_lag`` (nats per sequence)
- ``abs_log_ratio_mean``     mean of ``|logp - logp_lag|``
- ``advantage_mean``         mean of ``r - V*`` (<= 0: V* >= group mean for beta1 > 0)
- ``advantage_std``          population std (unbiased=False) of ``r - V*``
- ``advantage_min``          min of ``r - V*``
- ``advantage_max``          max of ``r - V*``
- ``v_star_mean``            mean of V* over the prompts
- ``degenerate_group_frac``  fraction of groups whose rewards are all exactly equal
- ``kept_seq_frac``          fraction of sequences that enter the loss sum
                             (1.0 unless ``filter_degenerate=True`` or a ``keep`` mask drops some)

A ``keep`` mask (e.g. truncated samples, ``algo.mask_truncated``) removes a sequence's own squared
residual from the sum, never its reward from V*: the group's value estimate still sees every sample the
policy drew, so the other members' advantages are what they would be without the mask.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple, Union

import torch

Normalizer = Union[int, float, torch.Tensor]

__all__ = ["v_star", "oapl_loss", "degenerate_groups", "residuals"]


def _check_positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {name}={value!r}")


def v_star(rewards: torch.Tensor, beta1: float) -> torch.Tensor:
    """Soft value estimate V*(x) of each prompt, Eq. 2.

    Args:
        rewards: float tensor ``[P, G]`` (rewards of the G completions of each prompt).
        beta1: temperature of the soft-max, > 0. ``beta1 -> 0`` gives the group max,
            ``beta1 -> inf`` the group mean.

    Returns:
        float tensor ``[P]`` (float32, or float64 if ``rewards`` is float64).
    """
    _check_positive("beta1", beta1)
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [P, G], got shape {tuple(rewards.shape)}")
    # Upcast: bf16/fp16 rewards / a small beta1 lose all precision (and fp16 overflows).
    r = rewards.detach()
    if r.dtype != torch.float64:
        r = r.float()
    # The stable logsumexp form, never log(mean(exp(r / beta1))) on raw rewards: the released
    # code does the latter and overflows to inf for small beta1 or large rewards (exp(1e4)).
    # Shifting by the group max m first keeps every exponent <= 0 (the max term is exp(0) = 1,
    # so the mean is >= 1/G and the log finite), avoids the float32 rounding of a huge
    # logsumexp(r / beta1) that beta1 would then multiply back, and gives V* = r exactly for
    # an all-equal group (mean of ones is 1, log 1 = 0).
    m = r.max(dim=-1).values
    return m + beta1 * torch.log(torch.exp((r - m[:, None]) / beta1).mean(dim=-1))


def residuals(logp: torch.Tensor, logp_lag: torch.Tensor, advantage: torch.Tensor, beta2: float) -> torch.Tensor:
    """The term Eq. 3 squares, elementwise: ``beta2 * (logp - logp_lag) - advantage`` with
    ``advantage = r - V*(x)``. Any shape: a token-budget micro-batch passes its sequences flat, with
    V* computed beforehand from each whole group."""
    return beta2 * (logp - logp_lag.detach()) - advantage


def degenerate_groups(rewards: torch.Tensor) -> torch.Tensor:
    """Bool ``[P]``: True where every reward of the group equals the first one exactly.

    Such a group has advantage 0 for all members (its loss only anchors pi_theta to pi_lag).
    """
    return (rewards == rewards[:, :1]).all(dim=-1)


def oapl_loss(
    logp: torch.Tensor,
    logp_lag: torch.Tensor,
    rewards: torch.Tensor,
    beta1: float,
    beta2: float,
    *,
    normalizer: Optional[Normalizer] = None,
    filter_degenerate: bool = False,
    keep: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """OAPL squared-residual loss, Eq. 3.

    Args:
        logp: ``[P, G]`` sequence log-probs under pi_theta (carries the gradient).
        logp_lag: ``[P, G]`` sequence log-probs under pi_lag (treated as a constant).
        rewards: ``[P, G]`` rewards (treated as a constant). Each row must be a *whole*
            group: V* is computed from the row, so a group must never be split across
            micro-batches.
        beta1: V* temperature (> 0), paper default 1.0.
        beta2: scale of the log-ratio (> 0); acts as the trust region.
        normalizer: the loss is ``sum(residual**2) / normalizer``. Default ``P * G``
            (the mean over this batch). When this call sees a slice of the global batch,
            pass the GLOBAL number of sequences so that summing the micro-batch losses
            over micro-batches and data-parallel ranks gives the global mean.
        filter_degenerate: if True, groups whose rewards are all equal are masked out
            of the loss sum. An explicit ``normalizer`` is used unchanged; with
            ``normalizer=None`` the divisor is the number of kept sequences (if none is
            kept the loss is an exact 0 that still has a graph to ``logp``).
        keep: optional bool ``[P, G]``: sequences whose squared residual enters the sum
            (combined with ``filter_degenerate``; the divisor rule is the same). V* is
            still computed from every reward of the group.

    Returns:
        ``(loss, metrics)``: a float32 scalar with grad, and detached float32 scalars
        (keys listed in the module docstring). ``d loss / d logp = 2*beta2*residual/normalizer``.
    """
    _check_positive("beta2", beta2)
    if logp.dim() != 2 or logp.shape != logp_lag.shape or logp.shape != rewards.shape:
        raise ValueError(
            "logp, logp_lag and rewards must all be [P, G]; got "
            f"{tuple(logp.shape)}, {tuple(logp_lag.shape)}, {tuple(rewards.shape)}"
        )
    num_prompts, group = logp.shape

    # float32 at least: beta2 * log-ratio of a bf16 sum would be mostly rounding error.
    dtype = torch.float64 if logp.dtype == torch.float64 else torch.float32
    r = rewards.detach().to(dtype)
    lp = logp.to(dtype)
    lp_lag = logp_lag.detach().to(dtype)

    vs = v_star(r, beta1).to(dtype)  # [P]
    advantage = r - vs[:, None]  # [P, G]
    log_ratio = lp - lp_lag
    residual = residuals(lp, lp_lag, advantage, beta2)
    sq = residual.square()

    degenerate = degenerate_groups(r)  # [P]
    default_norm: Normalizer
    if keep is not None:
        if keep.shape != logp.shape:
            raise ValueError(f"keep must be [P, G] like logp, got {tuple(keep.shape)}")
        keep = keep.detach().to(device=sq.device, dtype=torch.bool)
    if filter_degenerate:
        kept_groups = (~degenerate)[:, None].expand(num_prompts, group)
        keep = kept_groups if keep is None else keep & kept_groups
    if keep is not None:
        # where (not multiply) so that no gradient at all reaches the dropped sequences.
        sq = torch.where(keep, sq, torch.zeros_like(sq))
        # a tensor, not .item(): no host sync on GPU.
        default_norm = keep.sum().clamp(min=1).to(dtype)
    else:
        default_norm = num_prompts * group

    if normalizer is None:
        normalizer = default_norm
    elif not isinstance(normalizer, torch.Tensor):
        _check_positive("normalizer", normalizer)
    loss = sq.sum() / normalizer

    with torch.no_grad():
        res = residual.detach().float()
        lr = log_ratio.detach().float()
        adv = advantage.float()
        metrics: Dict[str, torch.Tensor] = {
            "residual_mean": res.mean(),
            "residual_abs_mean": res.abs().mean(),
            "log_ratio_mean": lr.mean(),
            "abs_log_ratio_mean": lr.abs().mean(),
            "advantage_mean": adv.mean(),
            "advantage_std": adv.std(unbiased=False),
            "advantage_min": adv.min(),
            "advantage_max": adv.max(),
            "v_star_mean": vs.float().mean(),
            "degenerate_group_frac": degenerate.float().mean(),
            "kept_seq_frac": (
                keep.float().mean() if keep is not None else torch.ones((), dtype=torch.float32)
            ),
        }
    return loss, metrics
