"""Read a Hugging Face model directory's `config.json` into the run config's model section, so an HF
model (the tiny default included) defines the architecture the learner builds.

Every config.json field that changes what the model computes is either carried into the model section
(sizes, head_dim, rms_norm_eps, rope_theta, rope scaling `linear` / `llama3`, tied embeddings) or refused
here with a one-line error naming the field and its value: other rope types, partial rotary, sliding-window
layers, attention/MLP biases the architecture does not have, activations other than SiLU, quantized
weights. Fields transformers reads but that do not change the function are ignored (token ids, use_cache,
and attention_dropout: the learner trains without dropout).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from megatron_oapl.config import ConfigError, RopeScalingConfig, validate
from megatron_oapl.models.hf_cache import resolve_hf_path
from megatron_oapl.models.presets import ARCHITECTURES, DEFAULT_ROUTER_AUX_LOSS_COEF

# transformers' defaults for fields a config.json may leave out (the same for Llama, Qwen2 and Qwen3).
_DEFAULT_RMS_NORM_EPS = 1e-6
_DEFAULT_ROPE_THETA = 10000.0
_ROPE_TYPES = ("default", "linear", "llama3")


def _refuse(hf_dir, field: str, value, why: str) -> ConfigError:
    return ConfigError(f"model.hf_path={str(hf_dir)!r}: config.json {field}={value!r} is not supported ({why})")


def _rope_scaling(hf: dict, hf_dir) -> tuple[float, RopeScalingConfig]:
    """(theta, scaling) from `rope_scaling` (transformers 4 files) or `rope_parameters` (transformers 5);
    the former wins, as in transformers."""
    key = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    rope = hf.get(key) or {}
    if any(isinstance(v, dict) for v in rope.values()):
        raise _refuse(hf_dir, key, sorted(rope), "RoPE parameters per layer type; allowed: one set for all layers")
    theta = float(rope.get("rope_theta", hf.get("rope_theta", _DEFAULT_ROPE_THETA)))
    for where, partial in ((f"{key}.partial_rotary_factor", rope.get("partial_rotary_factor")),
                           ("partial_rotary_factor", hf.get("partial_rotary_factor"))):
        if partial is not None and float(partial) != 1.0:
            raise _refuse(hf_dir, where, partial, "RoPE on part of each head; allowed: 1.0")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in _ROPE_TYPES:
        raise _refuse(hf_dir, f"{key}.rope_type", rope_type, f"allowed: {', '.join(_ROPE_TYPES)}")
    if rope_type == "default":
        return theta, RopeScalingConfig()
    def number(name: str) -> float:
        if not isinstance(rope.get(name), (int, float)):
            raise _refuse(hf_dir, f"{key}.{name}", rope.get(name), f"rope_type={rope_type!r} needs a number")
        return float(rope[name])

    if rope_type == "linear":
        return theta, RopeScalingConfig(type="linear", factor=number("factor"))
    # transformers takes a top-level original_max_position_embeddings first, then the rope dict's, then
    # max_position_embeddings.
    context = hf.get("original_max_position_embeddings") or rope.get("original_max_position_embeddings") \
        or hf.get("max_position_embeddings")
    scaling = RopeScalingConfig(type="llama3", factor=number("factor"), low_freq_factor=number("low_freq_factor"),
                                high_freq_factor=number("high_freq_factor"),
                                original_max_position_embeddings=int(context))
    if scaling.high_freq_factor <= scaling.low_freq_factor:
        raise _refuse(hf_dir, f"{key}.high_freq_factor", rope["high_freq_factor"],
                      f"must be > low_freq_factor={rope['low_freq_factor']}")
    return theta, scaling


def _sliding_layers(hf: dict) -> int:
    """How many layers Qwen2/Qwen3 would run with sliding-window attention (transformers: only with
    use_sliding_window, on the layers `layer_types` marks, by default those from max_window_layers on)."""
    if not hf.get("use_sliding_window") or hf.get("sliding_window") is None:
        return 0
    layers = hf["num_hidden_layers"]
    types = hf.get("layer_types") or ["sliding_attention" if i >= hf.get("max_window_layers", 28) else
                                      "full_attention" for i in range(layers)]
    return sum(t == "sliding_attention" for t in types)


def check_supported(hf: dict, hf_dir, preset: str) -> None:
    """Raise a ConfigError naming the first field of `hf` (a parsed config.json of `preset`) that would
    make the Megatron model compute something else than transformers does."""
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise _refuse(hf_dir, "hidden_act", act, "the MLP is SwiGLU; allowed: silu")
    if hf.get("quantization_config"):
        method = hf["quantization_config"].get("quant_method", "?")
        raise _refuse(hf_dir, "quantization_config.quant_method", method,
                      "quantized weights; convert to bf16/fp32 safetensors first")
    # Llama and Qwen3 read these two flags; Qwen2 hard-codes q/k/v biases (the preset has them) and
    # ignores both. Megatron's flags cannot give q/k/v/o biases without MLP biases, so both are refused.
    if preset in ("llama", "qwen3") and hf.get("attention_bias"):
        raise _refuse(hf_dir, "attention_bias", hf["attention_bias"], f"{preset} is built without linear biases")
    if preset == "llama" and hf.get("mlp_bias"):
        raise _refuse(hf_dir, "mlp_bias", hf["mlp_bias"], "llama is built without linear biases")
    if preset in ("qwen2", "qwen3") and _sliding_layers(hf):
        raise _refuse(hf_dir, "use_sliding_window", hf["use_sliding_window"],
                      f"sliding_window={hf['sliding_window']} on {_sliding_layers(hf)} layers; only full causal "
                      "attention is built; allowed: false")
    types = [t for t in hf.get("layer_types") or () if t not in ("full_attention", "sliding_attention")]
    if types:
        raise _refuse(hf_dir, "layer_types", types[0], "allowed: full_attention")
    if preset == "qwen3_moe":
        _check_moe_supported(hf, hf_dir)


def _check_moe_supported(hf: dict, hf_dir) -> None:
    """Every layer must be the same routed-experts MLP: Megatron builds one layer spec for all of them."""
    if hf.get("mlp_only_layers"):
        raise _refuse(hf_dir, "mlp_only_layers", hf["mlp_only_layers"],
                      "dense MLP layers among the MoE layers; allowed: []")
    if hf.get("decoder_sparse_step", 1) != 1:
        raise _refuse(hf_dir, "decoder_sparse_step", hf["decoder_sparse_step"],
                      "MoE only on every n-th layer; allowed: 1 (every layer)")
    if hf.get("shared_expert_intermediate_size"):
        raise _refuse(hf_dir, "shared_expert_intermediate_size", hf["shared_expert_intermediate_size"],
                      "shared experts are not built; allowed: 0")


def _moe_fields(hf: dict, model_cfg) -> dict:
    """The model section's MoE fields from a qwen3_moe config.json (the hub writes num_experts, transformers 5
    num_local_experts); a set model.moe_aux_loss_coeff wins over the file's router_aux_loss_coef."""
    aux = model_cfg.moe_aux_loss_coeff
    if aux is None:
        aux = float(hf.get("router_aux_loss_coef", DEFAULT_ROUTER_AUX_LOSS_COEF))
    return dict(num_experts=int(hf.get("num_experts") or hf["num_local_experts"]),
                moe_ffn_hidden_size=int(hf["moe_intermediate_size"]),
                moe_router_topk=int(hf["num_experts_per_tok"]),
                # transformers' Qwen3MoeConfig default is False; the released checkpoints say True
                moe_norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
                moe_aux_loss_coeff=aux)


def model_config_from_hf(model_cfg, hf_dir: str | Path):
    """`model_cfg` with architecture fields replaced by those of `hf_dir/config.json`."""
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"model.hf_path={str(hf_dir)!r} has no config.json (expected an HF model directory)")
    hf = json.loads(path.read_text())
    presets = {a.hf_model_type: name for name, a in ARCHITECTURES.items()}
    model_type = hf.get("model_type")
    if model_type not in presets:
        raise ConfigError(
            f"model.hf_path={str(hf_dir)!r} is a {model_type!r} model; supported: {', '.join(sorted(presets))}"
        )
    preset = presets[model_type]
    check_supported(hf, hf_dir, preset)
    theta, rope_scaling = _rope_scaling(hf, hf_dir)
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    return dataclasses.replace(
        model_cfg,
        preset=preset,
        num_layers=hf["num_hidden_layers"],
        hidden_size=hf["hidden_size"],
        ffn_hidden_size=hf["intermediate_size"],
        num_attention_heads=heads,
        num_query_groups=hf.get("num_key_value_heads") or heads,
        kv_channels=None if head_dim * heads == hf["hidden_size"] else head_dim,
        vocab_size=hf["vocab_size"],
        max_seq_length=min(model_cfg.max_seq_length, hf.get("max_position_embeddings", model_cfg.max_seq_length)),
        rotary_base=theta,
        rope_scaling=rope_scaling,
        norm_epsilon=float(hf.get("rms_norm_eps", _DEFAULT_RMS_NORM_EPS)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        **(_moe_fields(hf, model_cfg) if ARCHITECTURES[preset].moe else dict(num_experts=0)),
    )


def resolve_model(cfg):
    """The run config with `model.hf_path` resolved to a local directory (a hub id through the local
    Hugging Face cache) and the model section read from it, when one is given."""
    if not cfg.model.hf_path:
        return cfg
    local = resolve_hf_path(cfg.model.hf_path)
    model = dataclasses.replace(cfg.model, hf_path=local)
    cfg = dataclasses.replace(cfg, model=model_config_from_hf(model, local))
    validate(cfg, check_hardware=False, model_read=True)  # the checks that needed the real model section
    return cfg
