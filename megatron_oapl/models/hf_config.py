"""Read a Hugging Face model directory's `config.json` into the run config's model section, so an HF
model (the tiny default included) defines the architecture the learner builds."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from megatron_oapl.config import ConfigError
from megatron_oapl.models.presets import ARCHITECTURES


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
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    return dataclasses.replace(
        model_cfg,
        preset=presets[model_type],
        num_layers=hf["num_hidden_layers"],
        hidden_size=hf["hidden_size"],
        ffn_hidden_size=hf["intermediate_size"],
        num_attention_heads=heads,
        num_query_groups=hf.get("num_key_value_heads") or heads,
        kv_channels=None if head_dim * heads == hf["hidden_size"] else head_dim,
        vocab_size=hf["vocab_size"],
        max_seq_length=min(model_cfg.max_seq_length, hf.get("max_position_embeddings", model_cfg.max_seq_length)),
        rotary_base=float(hf.get("rope_theta", (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0))),
        norm_epsilon=hf.get("rms_norm_eps", model_cfg.norm_epsilon),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )


def resolve_model(cfg):
    """The run config with the model section read from `model.hf_path` when one is given."""
    if not cfg.model.hf_path:
        return cfg
    return dataclasses.replace(cfg, model=model_config_from_hf(cfg.model, cfg.model.hf_path))
