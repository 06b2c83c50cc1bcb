"""Reward shaping applied where groups become loss inputs, after the raw score was recorded (no Megatron).

DAPO's soft overlong penalty: with Lmax = fleet.max_new_tokens and a buffer of B tokens, a completion of
n tokens gets

    penalty(n) = 0                                   n <= Lmax - B
               = -overlong_penalty * (n - (Lmax - B)) / B   otherwise   (-overlong_penalty at n = Lmax)

added to its raw score. The raw score stays on the sample: dynamic sampling's degenerate test, the
rollout metrics and every evaluation read raw scores, so shaping never decides which groups are trained.
"""

from __future__ import annotations

from typing import Sequence

import torch


def overlong_penalties(lengths: Sequence[int] | torch.Tensor, max_new_tokens: int, buffer_tokens: int,
                       penalty: float) -> torch.Tensor:
    """The (<= 0) penalty of each completion length (float64); all zeros when `buffer_tokens` is 0."""
    n = torch.as_tensor(lengths, dtype=torch.float64)
    if buffer_tokens <= 0:
        return torch.zeros_like(n)
    over = (n - (max_new_tokens - buffer_tokens)).clamp(min=0.0)
    return -penalty * over / buffer_tokens


def shaped_rewards(rewards: Sequence[Sequence[float]], lengths: Sequence[Sequence[int]], max_new_tokens: int,
                   buffer_tokens: int, penalty: float) -> torch.Tensor:
    """Raw rewards [P, G] plus each completion's overlong penalty (float32, what the losses read)."""
    raw = torch.as_tensor(rewards, dtype=torch.float64)
    shaped = raw + overlong_penalties(torch.as_tensor(lengths).reshape(raw.shape), max_new_tokens,
                                      buffer_tokens, penalty)
    return shaped.float()
