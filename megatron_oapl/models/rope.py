"""RoPE frequency scaling of HF checkpoints, applied to the inverse frequencies Megatron's rotary embedding
built from `rotary_base`.

Megatron-Core's own switch (`GPTModel(rope_scaling=True, rope_scaling_factor=...)`) fixes the llama3
ramp at low_freq_factor=1, high_freq_factor=4 and a pre-training context of 8192; checkpoints may say
otherwise, so the adjustment is made here from the config's values. Both scalings only change the
frequencies (no attention factor), so replacing `inv_freq` before the first forward is the whole change.
"""

from __future__ import annotations

import math

import torch


def scaled_inv_freq(inv_freq: torch.Tensor, scaling) -> torch.Tensor:
    """The inverse frequencies `inv_freq` [head_dim / 2] under `scaling` (a `RopeScalingConfig`)."""
    if scaling.type == "none":
        return inv_freq
    if scaling.type == "linear":  # position p acts as p / factor
        return inv_freq / scaling.factor
    if scaling.type == "llama3":
        return _llama3(inv_freq, scaling)
    raise ValueError(f"model.rope_scaling.type={scaling.type!r} is not implemented")


def _llama3(inv_freq: torch.Tensor, s) -> torch.Tensor:
    """Llama 3.1's scaling: a component whose wavelength is longer than the pre-training context / low_freq_factor
    is slowed down by `factor` (it never completed a turn in pre-training); one shorter than context /
    high_freq_factor is kept; in between, the frequency is interpolated linearly in (context / wavelength)."""
    context = s.original_max_position_embeddings
    wavelength = 2 * math.pi / inv_freq
    slow = torch.where(wavelength > context / s.low_freq_factor, inv_freq / s.factor, inv_freq)
    ramp = (context / wavelength - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    blended = (1 - ramp) * slow / s.factor + ramp * slow
    in_between = ~(wavelength < context / s.high_freq_factor) & ~(wavelength > context / s.low_freq_factor)
    return torch.where(in_between, blended, slow)


def apply_rope_scaling(gpt_model, scaling) -> None:
    """Replace the rotary embedding's inverse frequencies of a freshly built `GPTModel` (before its first
    forward: Megatron caches the embedding per sequence length)."""
    rotary = gpt_model.rotary_pos_emb
    rotary.inv_freq = scaled_inv_freq(rotary.inv_freq, scaling).to(rotary.inv_freq.device)
