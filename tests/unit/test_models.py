"""Model presets on CPU: TransformerConfig fields from the run config, the FP8 mapping (which can be
constructed but not run here), the recompute mapping, and the clear errors when FP8 is asked for on a
CPU machine or an installed Transformer Engine does not import."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from megatron_oapl.config import CHOICES, ConfigError, from_dict
from megatron_oapl.models.fp8 import fp8_transformer_config_kwargs
from megatron_oapl.models.megatron_model import build_transformer_config, padded_vocab_size

FP8_RECIPES = list(CHOICES["precision.fp8.recipe"])


def fp8_cfg(recipe: str, **fp8):
    return from_dict(
        {"precision": {"params_dtype": "bf16", "fp8": {"enabled": True, "recipe": recipe, "format": "e4m3", **fp8}}},
        check_hardware=False,
    )


@pytest.mark.parametrize("recipe", FP8_RECIPES)
def test_fp8_fields_construct_a_megatron_config(recipe):
    from megatron.core.transformer.transformer_config import TransformerConfig

    cfg = fp8_cfg(recipe, margin=2, amax_history_len=16, amax_compute_algo="most_recent", fp8_param=True)
    kwargs = fp8_transformer_config_kwargs(cfg.precision.fp8)
    tc = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4, bf16=True,
                           params_dtype=torch.bfloat16, **kwargs)
    assert (tc.fp8, tc.fp8_recipe, tc.fp8_param) == ("e4m3", recipe, True)
    if recipe == "delayed":  # margin / amax history exist only for delayed scaling
        assert (tc.fp8_margin, tc.fp8_amax_history_len, tc.fp8_amax_compute_algo) == (2, 16, "most_recent")
    else:
        assert "fp8_margin" not in kwargs


def test_fp8_off_maps_to_none():
    assert fp8_transformer_config_kwargs(from_dict({}).precision.fp8) == {"fp8": None}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_fp8_on_cpu_fails_before_building_with_the_field_name():
    with pytest.raises(ConfigError, match=r"precision\.fp8\.enabled=true needs a CUDA GPU"):
        build_transformer_config(fp8_cfg("tensorwise"))


@pytest.mark.parametrize("preset,qkv_bias,qk_norm", [("llama", False, False), ("qwen2", True, False), ("qwen3", False, True)])
def test_preset_switches(preset, qkv_bias, qk_norm):
    tc = build_transformer_config(from_dict({"model": {"preset": preset, "num_query_groups": 2}}))
    assert (tc.add_qkv_bias, tc.qk_layernorm, tc.num_query_groups) == (qkv_bias, qk_norm, 2)
    assert tc.normalization == "RMSNorm" and tc.gated_linear_unit and not tc.add_bias_linear
    assert tc.calculate_per_token_loss  # global-batch normalisation relies on it


def test_vocab_padding_is_a_multiple_of_tp():
    cfg = from_dict({"model": {"vocab_size": 30, "make_vocab_size_divisible_by": 4}})
    assert padded_vocab_size(cfg.model, 2) == 32 and padded_vocab_size(cfg.model, 1) == 32
    assert padded_vocab_size(from_dict({"model": {"vocab_size": 30}}).model, 4) == 32


@pytest.mark.parametrize("recompute,expected", [
    ("none", (None, None, None)),
    ("full", ("full", "uniform", 2)),
    ("selective", ("selective", None, None)),
])
def test_recompute_maps_to_megatron_fields(recompute, expected):
    cfg = from_dict({"model": {"num_layers": 4}, "parallel": {"recompute": recompute, "recompute_num_layers": 2}})
    tc = build_transformer_config(cfg)
    assert (tc.recompute_granularity, tc.recompute_method, tc.recompute_num_layers) == expected
    if recompute == "selective":
        assert tc.recompute_modules == ["core_attn"]


def test_recompute_bad_values_are_one_line_naming_the_field():
    with pytest.raises(ConfigError, match=r"parallel\.recompute='sometimes' must be one of: none, full, selective"):
        from_dict({"parallel": {"recompute": "sometimes"}})
    with pytest.raises(ConfigError,
                       match=r"parallel\.recompute_num_layers=3 must be <= the layers per pipeline stage, 2"):
        from_dict({"model": {"num_layers": 4}, "parallel": {"recompute": "full", "recompute_num_layers": 3,
                                                             "pipeline_model_parallel_size": 2}})


BROKEN_TE_PROBE = """
import torch
from megatron_oapl.config import CHOICES, ConfigError, from_dict
try:
    from_dict({})
except ConfigError as err:
    print("config:", err)
torch.cuda.is_available = lambda: True  # the GPU path of the model builder (no GPU can exist here)
from megatron_oapl.models.megatron_model import use_transformer_engine
try:
    use_transformer_engine()
except RuntimeError as err:
    print("model:", err)
"""


def test_broken_transformer_engine_is_one_clear_error_at_start(tmp_path):
    """A TE that is installed but does not import (here: a package whose __init__ raises, as a TE built
    against another torch does) is named at config load and by the model builder, instead of failing
    inside `import megatron.core`."""
    package = tmp_path / "transformer_engine"
    package.mkdir()
    (package / "__init__.py").write_text(
        'raise ImportError("transformer_engine_torch.so: undefined symbol: _ZN3c104cuda9SetDeviceEi")\n')
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    proc = subprocess.run([sys.executable, "-c", BROKEN_TE_PROBE], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert [line.split(":", 1)[0] for line in lines] == ["config", "model"], proc.stdout
    for line in lines:
        assert "transformer_engine is installed but fails to import: ImportError: " in line
        assert "undefined symbol: _ZN3c104cuda9SetDeviceEi" in line and "built against this torch" in line
