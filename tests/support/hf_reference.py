"""`transformers` as the reference for the project's HF <-> Megatron conversions."""

from __future__ import annotations

from pathlib import Path

import torch


def hf_logits(model_dir: Path, tokens: list[list[int]]) -> torch.Tensor:
    """fp32 logits of an HF directory's model on `tokens`, eager attention (no fused kernel's rounding)."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                              attn_implementation="eager")
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.float()
