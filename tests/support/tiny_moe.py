"""A random tiny Qwen3-MoE Hugging Face model for the MoE tests, saved as the hub lays it out (one tensor per
expert: `mlp.experts.E.gate_proj.weight`, ...), which is what transformers' save_pretrained writes and what
vLLM loads (transformers fuses the experts only in memory)."""

from __future__ import annotations

from pathlib import Path

import torch

# 4 experts, top-2; GQA (4 query heads, 2 KV groups); a head_dim that is not hidden/heads; a vocabulary that
# TP=2 must pad (37 -> 38).
TINY_MOE = dict(vocab_size=37, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2,
                norm_topk_prob=True, max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=1000000.0,
                tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)


def make_tiny_moe(out: Path, seed: int = 0, **overrides) -> Path:
    """Write the model to `out`; every tensor random (no all-ones norms), so each must travel correctly."""
    import transformers

    config = transformers.Qwen3MoeConfig(**{**TINY_MOE, **overrides})
    torch.manual_seed(seed)
    model = transformers.Qwen3MoeForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            # Router weights larger than the rest, so routing is decided by clear margins (no near-ties that
            # a rounding difference could flip).
            scale = 1.0 if name.endswith("mlp.gate.weight") else 0.05
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else scale * torch.randn_like(p))
    model.save_pretrained(out)
    return Path(out)


def hub_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF directory's safetensors files, under the hub's names (a push's stream)."""
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors
