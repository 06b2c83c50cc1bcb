"""Architecture presets: what distinguishes Llama, Qwen2, Qwen3 and Qwen3-MoE inside one decoder family.

All are pre-norm decoders with RMSNorm, SwiGLU MLPs, rotary embeddings (half-rotation, not interleaved) and
grouped-query attention; they differ only in a few switches (Qwen3-MoE: every layer's MLP is a set of routed
SwiGLU experts), so one preset table and one HF mapping (`hf_mapping.py`) serve all of them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Architecture:
    name: str
    hf_model_type: str  # config.json "model_type"
    hf_architecture: str  # config.json "architectures"[0]
    qkv_bias: bool  # Qwen2 has biases on q/k/v projections only
    qk_layernorm: bool  # Qwen3 RMS-normalises each head of q and k before RoPE
    moe: bool = False  # every layer's MLP is routed experts (model.num_experts of them)


ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture("llama", "llama", "LlamaForCausalLM", qkv_bias=False, qk_layernorm=False),
    "qwen2": Architecture("qwen2", "qwen2", "Qwen2ForCausalLM", qkv_bias=True, qk_layernorm=False),
    "qwen3": Architecture("qwen3", "qwen3", "Qwen3ForCausalLM", qkv_bias=False, qk_layernorm=True),
    "qwen3_moe": Architecture("qwen3_moe", "qwen3_moe", "Qwen3MoeForCausalLM", qkv_bias=False, qk_layernorm=True,
                              moe=True),
}


# transformers' Qwen3MoeConfig default for router_aux_loss_coef: the weight of the load-balancing loss when
# neither the config nor the model's config.json names one.
DEFAULT_ROUTER_AUX_LOSS_COEF = 0.001


def router_aux_loss_coeff(model_cfg) -> float:
    """The weight of the router's load-balancing loss for a run's model section."""
    aux = model_cfg.moe_aux_loss_coeff
    return DEFAULT_ROUTER_AUX_LOSS_COEF if aux is None else aux


def get_architecture(name: str) -> Architecture:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise ValueError(
            f"model.preset={name!r} is not a known architecture (allowed: {', '.join(ARCHITECTURES)})"
        ) from None
