"""config.json fields that change the math: carried into the model section, or refused at load with one
line naming the field and its value (`models.hf_config`). Logit parity of the carried ones is checked on
real ranks in tests/integration/test_rope_scaling.py (rope scaling, llama head_dim) and
test_checkpoint.py (head_dim, rms_norm_eps, theta, tied embeddings, Qwen2 biases, Qwen3 q/k norms)."""

from __future__ import annotations

import json

import pytest

from megatron_oapl.config import ConfigError, ModelConfig, RopeScalingConfig, load_config
from megatron_oapl.models.hf_config import model_config_from_hf, resolve_model

BASE = {"vocab_size": 37, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}


def read(tmp_path, model_type="llama", **fields):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type, **BASE, **fields}))
    return model_config_from_hf(ModelConfig(max_seq_length=4096), tmp_path)


# (model_type, config.json fields, the field and value the message must name)
REFUSED = [
    ("llama", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling.rope_type='yarn'"),
    ("llama", {"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_scaling.rope_type='dynamic'"),
    ("qwen2", {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e6}},
     "rope_parameters.rope_type='longrope'"),
    ("llama", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
     "rope_parameters.partial_rotary_factor=0.5"),
    ("llama", {"partial_rotary_factor": 0.25}, "partial_rotary_factor=0.25"),
    ("llama", {"rope_parameters": {"full_attention": {"rope_type": "default"}}},
     "rope_parameters=['full_attention']"),
    ("llama", {"rope_scaling": {**LLAMA3, "high_freq_factor": 1.0}}, "rope_scaling.high_freq_factor=1.0"),
    ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling.low_freq_factor=None"),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 1}, "use_sliding_window=True"),
    ("qwen3", {"use_sliding_window": True, "sliding_window": 16,
               "layer_types": ["full_attention", "sliding_attention"]}, "use_sliding_window=True"),
    ("qwen3", {"layer_types": ["full_attention", "chunked_attention"]}, "layer_types='chunked_attention'"),
    ("llama", {"attention_bias": True}, "attention_bias=True"),
    ("qwen3", {"attention_bias": True}, "attention_bias=True"),
    ("llama", {"mlp_bias": True}, "mlp_bias=True"),
    ("llama", {"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ("qwen2", {"quantization_config": {"quant_method": "awq", "bits": 4}}, "quantization_config.quant_method='awq'"),
]


@pytest.mark.parametrize("model_type, fields, named", REFUSED, ids=[r[2] for r in REFUSED])
def test_fields_that_change_the_math_are_refused_naming_field_and_value(tmp_path, model_type, fields, named):
    with pytest.raises(ConfigError) as err:
        read(tmp_path, model_type, **fields)
    message = str(err.value)
    assert named in message and "not supported" in message and "\n" not in message
    assert f"model.hf_path={str(tmp_path)!r}" in message


def test_llama3_rope_scaling_is_read_from_either_spelling(tmp_path):
    """transformers 4 files: `rope_scaling` + top-level `rope_theta`; transformers 5: `rope_parameters`."""
    old = read(tmp_path, rope_theta=500000.0, rope_scaling=LLAMA3)
    new = read(tmp_path, rope_parameters={**LLAMA3, "rope_theta": 500000.0})
    assert old == new
    assert new.rotary_base == 500000.0
    assert new.rope_scaling == RopeScalingConfig(type="llama3", factor=8.0, low_freq_factor=1.0,
                                                 high_freq_factor=4.0, original_max_position_embeddings=8192)


def test_llama3_context_falls_back_like_transformers(tmp_path):
    """No original_max_position_embeddings in the rope dict: transformers takes a top-level one, else
    max_position_embeddings."""
    scaling = {k: v for k, v in LLAMA3.items() if k != "original_max_position_embeddings"}
    assert read(tmp_path, rope_scaling=scaling).rope_scaling.original_max_position_embeddings == 256
    top = read(tmp_path, rope_scaling=LLAMA3, original_max_position_embeddings=512)
    assert top.rope_scaling.original_max_position_embeddings == 512


def test_accepted_fields_reach_the_model_section(tmp_path):
    cfg = read(tmp_path, "qwen3", head_dim=32, rms_norm_eps=3e-6, tie_word_embeddings=True, hidden_act="silu",
               rope_parameters={"rope_type": "default", "rope_theta": 1e6}, attention_bias=False,
               use_sliding_window=False, sliding_window=16, attention_dropout=0.1)
    assert (cfg.preset, cfg.kv_channels, cfg.norm_epsilon, cfg.tie_word_embeddings) == ("qwen3", 32, 3e-6, True)
    assert cfg.rotary_base == 1e6 and cfg.rope_scaling.type == "none"
    # transformers' defaults when a field is left out (not the run config's).
    bare = read(tmp_path)
    assert (bare.norm_epsilon, bare.rotary_base, bare.tie_word_embeddings, bare.kv_channels) == (1e-6, 1e4, False, None)


def test_qwen_sliding_window_flag_without_sliding_layers_is_accepted(tmp_path):
    """transformers slides only from max_window_layers on: with it >= num_hidden_layers every layer is full."""
    cfg = read(tmp_path, "qwen2", use_sliding_window=True, sliding_window=16, max_window_layers=2)
    assert cfg.preset == "qwen2"


def test_qwen2_attention_bias_flag_is_the_presets_own(tmp_path):
    """Qwen2 always has q/k/v biases (transformers ignores `attention_bias` there); the preset builds them."""
    assert read(tmp_path, "qwen2", attention_bias=True).preset == "qwen2"


def test_resolve_model_refuses_through_the_run_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", **BASE, "mlp_bias": True}))
    with pytest.raises(ConfigError, match="mlp_bias=True"):
        resolve_model(load_config(None, [f"model.hf_path={tmp_path}"], check_hardware=False))


def test_llama3_needs_high_above_low_in_the_run_config():
    with pytest.raises(ConfigError, match=r"model.rope_scaling.high_freq_factor=1.0 must be >"):
        load_config(None, ["model.rope_scaling.type=llama3", "model.rope_scaling.high_freq_factor=1.0"])


@pytest.mark.parametrize("rope", [LLAMA3, {**LLAMA3, "factor": 32.0}, {"rope_type": "linear", "factor": 4.0}],
                         ids=["llama-3.1", "llama-3.2", "linear"])
def test_scaled_frequencies_equal_transformers_at_real_sizes(tmp_path, rope):
    """Llama 3.1/3.2's own parameters (head_dim 128, theta 5e5, context 8192): the inverse frequencies the
    Megatron model uses are transformers' exactly."""
    import torch
    import transformers
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from megatron_oapl.models.rope import scaled_inv_freq

    sizes = dict(hidden_size=4096, num_attention_heads=32, max_position_embeddings=131072, rope_theta=500000.0)
    model = read(tmp_path, **{**sizes, "rope_scaling": rope})
    dim = model.hidden_size // model.num_attention_heads
    megatron_default = RotaryEmbedding(kv_channels=dim, rotary_percent=1.0, rotary_base=model.rotary_base,
                                       use_cpu_initialization=True).inv_freq
    reference, attention_factor = ROPE_INIT_FUNCTIONS[rope["rope_type"]](
        transformers.LlamaConfig(**sizes, rope_scaling=dict(rope)), "cpu")
    assert attention_factor == 1.0  # only the frequencies change
    assert torch.equal(scaled_inv_freq(megatron_default, model.rope_scaling), reference)
    assert not torch.equal(megatron_default, reference)
