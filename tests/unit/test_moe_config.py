"""Qwen3-MoE in the run config: the expert fields read from config.json (hub and transformers 5 spellings),
the layouts refused with one line naming the field, and the EP split checks. Parity of what is read is
checked on real ranks in tests/integration/test_moe.py."""

from __future__ import annotations

import json

import pytest

from megatron_oapl.config import ConfigError, ModelConfig, check_world_size, load_config
from megatron_oapl.models.hf_config import model_config_from_hf, resolve_model

MOE = {"model_type": "qwen3_moe", "vocab_size": 37, "hidden_size": 32, "intermediate_size": 64,
       "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
       "max_position_embeddings": 64, "moe_intermediate_size": 16, "num_experts_per_tok": 2,
       "norm_topk_prob": True, "router_aux_loss_coef": 0.002, "decoder_sparse_step": 1, "mlp_only_layers": []}


def write(tmp_path, **fields):
    (tmp_path / "config.json").write_text(json.dumps({**MOE, **fields}))
    return tmp_path


@pytest.mark.parametrize("spelling", ["num_experts", "num_local_experts"])
def test_expert_fields_are_read_from_either_spelling(tmp_path, spelling):
    model = model_config_from_hf(ModelConfig(), write(tmp_path, **{spelling: 8}))
    assert (model.preset, model.num_experts, model.moe_ffn_hidden_size, model.moe_router_topk) == \
        ("qwen3_moe", 8, 16, 2)
    assert model.moe_norm_topk_prob is True and model.moe_aux_loss_coeff == 0.002


def test_a_set_aux_loss_weight_wins_over_the_file(tmp_path):
    model = model_config_from_hf(ModelConfig(moe_aux_loss_coeff=0.0), write(tmp_path, num_experts=8))
    assert model.moe_aux_loss_coeff == 0.0


@pytest.mark.parametrize("fields, named", [
    ({"mlp_only_layers": [1]}, "mlp_only_layers=[1]"),
    ({"decoder_sparse_step": 2}, "decoder_sparse_step=2"),
    ({"shared_expert_intermediate_size": 64}, "shared_expert_intermediate_size=64"),
])
def test_unmapped_layer_patterns_are_one_line_naming_the_field(tmp_path, fields, named):
    with pytest.raises(ConfigError) as err:
        model_config_from_hf(ModelConfig(), write(tmp_path, num_experts=8, **fields))
    assert named in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("overrides, named", [
    (["parallel.expert_model_parallel_size=3"], "parallel.expert_model_parallel_size=3 must divide model.num_experts=8"),
    (["parallel.tensor_model_parallel_size=2"], "needs parallel.sequence_parallel=true"),
    (["parallel.data_parallel_size=3", "parallel.expert_model_parallel_size=2", "fleet.prompts_per_step=6"],
     "parallel.expert_model_parallel_size=2 must divide parallel.data_parallel_size=3"),
])
def test_expert_split_errors_name_the_field_once_the_model_is_read(tmp_path, overrides, named):
    cfg = load_config(None, [f"model.hf_path={write(tmp_path, num_experts=8)}", *overrides], check_hardware=False)
    with pytest.raises(ConfigError, match=named.replace("(", r"\(").replace(".", r"\.")):
        resolve_model(cfg)


def test_expert_parallel_ranks_must_divide_the_data_parallel_ranks(tmp_path):
    cfg = resolve_model(load_config(None, [f"model.hf_path={write(tmp_path, num_experts=8)}",
                                           "parallel.expert_model_parallel_size=4"], check_hardware=False))
    assert check_world_size(cfg, 8) == 8
    with pytest.raises(ConfigError, match="must divide the data-parallel size 6"):
        check_world_size(cfg, 6)


@pytest.mark.parametrize("overrides, named", [
    (["parallel.expert_model_parallel_size=2"], "needs an MoE model (model.num_experts=0"),
    (["model.num_experts=4"], "model.preset='llama' is dense"),
    (["model.preset=qwen3_moe"], "model.num_experts=0: model.preset='qwen3_moe' needs routed experts"),
    (["model.preset=qwen3_moe", "model.num_experts=8", "model.moe_router_topk=9"],
     "model.moe_router_topk=9 must be <= model.num_experts=8"),
])
def test_experts_without_an_moe_preset_or_the_reverse_are_refused(overrides, named):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides, check_hardware=False)
    assert named in str(err.value)
