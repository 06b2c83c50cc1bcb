"""The run config: YAML + inherit + overrides -> typed tree, validation messages, round trip."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from megatron_oapl import config as C
from megatron_oapl.config import ConfigError, RunConfig, check_world_size, load_config, to_yaml

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
TINY = ROOT / "configs" / "tiny.yaml"


def test_tiny_loads_and_validates():
    cfg = load_config(TINY)
    assert isinstance(cfg, RunConfig)
    assert cfg.model.preset == "llama" and cfg.model.hidden_size == 128
    assert cfg.parallel.tensor_model_parallel_size == 2
    assert cfg.algo.loss == "oapl" and cfg.algo.beta2 == 0.5
    assert isinstance(cfg.optim.lr, float) and cfg.optim.lr == pytest.approx(1e-4)
    assert cfg.data.task_kwargs["max_digits"] == 1 and cfg.data.task_kwargs["allow_negation"] is False
    assert cfg.precision.fp8.enabled is False


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads(path):
    cfg = load_config(path, check_hardware=False)
    assert C.to_dict(cfg)["run_dir"] == cfg.run_dir


def test_defaults_validate():
    assert load_config(None) == RunConfig()


def test_shipped_configs_exist():
    assert TINY in CONFIGS and len(CONFIGS) >= 2


def test_qwen3_recipe_inherits_and_overrides():
    cfg = load_config(ROOT / "configs" / "qwen3_4b_math.yaml", check_hardware=False)
    assert cfg.model.preset == "qwen3" and cfg.model.kv_channels == 128
    assert cfg.precision.fp8.enabled and cfg.precision.fp8.recipe == "tensorwise"
    assert cfg.algo.beta2 == pytest.approx(1e-3) and cfg.lag.sync_every == 50
    assert cfg.fleet.engine == "vllm" and cfg.fleet.max_new_tokens == 16384
    assert cfg.data.task_kwargs == {}  # mappings are replaced, not merged, on inherit
    assert cfg.rewards.binarize is True  # untouched values come from tiny.yaml / defaults


def test_overrides_parse_types():
    cfg = load_config(TINY, [
        "algo.beta2=1e-3",
        "parallel.tensor_model_parallel_size=4",
        "model.hf_path=null",
        "algo.length_normalize=true",
        "logging.tensorboard=false",
        "optim.lr=3",
        "data.task_kwargs.min_terms=3",
        "run_dir=runs/x",
    ])
    assert cfg.algo.beta2 == 0.001 and type(cfg.algo.beta2) is float
    assert cfg.parallel.tensor_model_parallel_size == 4 and type(cfg.parallel.tensor_model_parallel_size) is int
    assert cfg.model.hf_path is None
    assert cfg.algo.length_normalize is True and cfg.logging.tensorboard is False
    assert cfg.optim.lr == 3.0 and type(cfg.optim.lr) is float
    assert cfg.data.task_kwargs["min_terms"] == 3 and cfg.data.task_kwargs["max_terms"] == 3
    assert cfg.run_dir == "runs/x"
    cfg = load_config(TINY, ["model.hf_path=/models/x", "parallel.data_parallel_size=1"])
    assert cfg.model.hf_path == "/models/x" and cfg.parallel.data_parallel_size == 1


def test_yaml_string_floats_are_coerced(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("optim: {lr: 1e-5, min_lr: 0}\nalgo: {beta2: 5e-2}\n")
    cfg = load_config(p)
    assert cfg.optim.lr == 1e-5 and cfg.algo.beta2 == 0.05 and type(cfg.optim.min_lr) is float


def test_bad_type_names_field():
    with pytest.raises(ConfigError, match=r"model\.num_layers='four' must be an integer"):
        load_config(None, ["model.num_layers=four"])
    with pytest.raises(ConfigError, match=r"optim\.train_steps=null"):
        load_config(None, ["optim.train_steps=null"])
    with pytest.raises(ConfigError, match=r"fleet.weight_sync=3 must be a mapping"):
        load_config(None, ["fleet.weight_sync=3"])


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="section.field=value"):
        load_config(None, ["algo.beta2"])


def test_unknown_key_names_dotted_key_and_suggests():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["model.hiden_size=64"])
    msg = str(e.value)
    assert "model.hiden_size" in msg and "did you mean model.hidden_size" in msg
    assert "num_attention_heads" in msg  # lists the section's valid keys
    with pytest.raises(ConfigError, match=r"fleet\.weight_sync\.bucket_md.*bucket_mb"):
        load_config(None, ["fleet.weight_sync.bucket_md=1"])
    with pytest.raises(ConfigError, match=r"unknown key algoo.*did you mean algo"):
        load_config(None, ["algoo.beta2=1"])


@pytest.mark.parametrize("overrides, needles", [
    (["parallel.tensor_model_parallel_size=3"],
     ["parallel.tensor_model_parallel_size=3", "model.num_attention_heads=4", "allowed: 1, 2, 4"]),
    (["parallel.pipeline_model_parallel_size=3"],
     ["parallel.pipeline_model_parallel_size=3", "model.num_layers=4"]),
    (["algo.beta2=0"], ["algo.beta2=0.0 must be > 0"]),
    (["algo.beta2=-1e-3"], ["algo.beta2=-0.001"]),
    (["algo.beta1=0"], ["algo.beta1=0.0"]),
    (["fleet.group_size=1"], ["fleet.group_size=1 must be >= 2"]),
    (["fleet.temperature=0"], ["fleet.temperature=0.0"]),
    (["fleet.top_p=1.5"], ["fleet.top_p=1.5"]),
    (["lag.sync_every=0"], ["lag.sync_every=0"]),
    (["algo.loss=ppo"], ["algo.loss='ppo'", "oapl, grpo"]),
    (["model.num_query_groups=3"], ["model.num_query_groups=3", "model.num_attention_heads=4"]),
    (["model.num_query_groups=1"], ["parallel.tensor_model_parallel_size=2", "model.num_query_groups=1"]),
    (["model.ffn_hidden_size=255"], ["model.ffn_hidden_size=255"]),
    (["model.hidden_size=130"], ["model.hidden_size=130", "model.kv_channels"]),
    (["parallel.tensor_model_parallel_size=1", "parallel.sequence_parallel=true"],
     ["parallel.sequence_parallel=true"]),
    (["lag.mode=offline"], ["lag.offline_dataset", "offline"]),
    (["data.source=jsonl"], ["data.path", "jsonl"]),
    (["fleet.max_new_tokens=64"], ["fleet.max_new_tokens=64", "model.max_seq_length=64"]),
    (["precision.fp8.enabled=true", "precision.fp8.first_last_layers_bf16=true"],
     ["precision.fp8.first_last_layers_bf16=true", "delayed"]),
    (["fleet.engine_tensor_parallel_size=0"], ["fleet.engine_tensor_parallel_size=0"]),
    (["parallel.data_parallel_size=3"], ["fleet.prompts_per_step=16", "3"]),
])
def test_validation_errors_name_field_and_value(overrides, needles):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, overrides, check_hardware=False)
    for needle in needles:
        assert needle in str(e.value)


def test_top_p_below_one_needs_recomputed_logp_lag():
    """Review W1: the engine's log-probs are top-p-renormalised, the learner's are not."""
    with pytest.raises(ConfigError) as e:
        load_config(TINY, ["fleet.top_p=0.9"], check_hardware=False)
    assert e.value.errors == ["fleet.top_p=0.9 needs algo.logp_lag_source='recompute' (or fleet.top_p=1): the "
                              "engine's log-probs are top-p-renormalised, the learner's temperature-only"]
    assert load_config(TINY, ["fleet.top_p=0.9", "algo.logp_lag_source=recompute"]).fleet.top_p == 0.9
    assert load_config(TINY, ["fleet.top_p=1.0"]).algo.logp_lag_source == "engine"


def test_errors_are_collected():
    with pytest.raises(ConfigError) as e:
        load_config(TINY, ["algo.beta1=0", "algo.beta2=0"])
    assert len(e.value.errors) == 2


def test_fp8_on_cpu_is_rejected_unless_hardware_check_is_off(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    fp8 = ["precision.params_dtype=bf16", "precision.fp8.enabled=true"]
    with pytest.raises(ConfigError) as e:
        load_config(TINY, fp8)
    assert "precision.fp8.enabled=true" in str(e.value) and "no GPU" in str(e.value)
    cfg = load_config(TINY, fp8 + ["precision.fp8.recipe=tensorwise",
                                   "precision.fp8.first_last_layers_bf16=true"], check_hardware=False)
    assert cfg.precision.fp8.first_last_layers_bf16
    with pytest.raises(ConfigError, match=r"parallel.backend='nccl'"):
        load_config(TINY, ["parallel.backend=nccl"])


def test_vllm_engine_is_fine_on_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert load_config(TINY, ["fleet.engine=vllm"]).fleet.engine == "vllm"


def test_inherit_merges_sections(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "base.yaml").write_text(
        "run_dir: runs/base\nmodel: {num_layers: 8, hidden_size: 256}\n"
        "data: {task_kwargs: {min_terms: 2, max_terms: 3}}\nfleet: {weight_sync: {bucket_mb: 8}}\n")
    (tmp_path / "sub" / "mid.yaml").write_text(
        "inherit: ../base.yaml\nmodel: {hidden_size: 64}\nfleet: {group_size: 4}\n")
    (tmp_path / "sub" / "leaf.yaml").write_text(
        "inherit: mid.yaml\nrun_dir: runs/leaf\ndata: {task_kwargs: {min_terms: 5}}\n"
        "fleet: {weight_sync: {timeout_s: 9}}\n")
    cfg = load_config(tmp_path / "sub" / "leaf.yaml")
    assert cfg.run_dir == "runs/leaf"
    assert cfg.model.num_layers == 8 and cfg.model.hidden_size == 64
    assert cfg.fleet.group_size == 4
    assert cfg.fleet.weight_sync.bucket_mb == 8 and cfg.fleet.weight_sync.timeout_s == 9
    assert cfg.data.task_kwargs == {"min_terms": 5}  # a mapping value is replaced whole


def test_inherit_errors(tmp_path):
    (tmp_path / "a.yaml").write_text("inherit: b.yaml\n")
    (tmp_path / "b.yaml").write_text("inherit: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("inherit: missing.yaml\n")
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_config(tmp_path / "c.yaml")


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_round_trip(tmp_path, path):
    cfg = load_config(path, check_hardware=False)
    for docs in (False, True):
        out = tmp_path / f"resolved_{docs}.yaml"
        out.write_text(to_yaml(cfg, docs=docs))
        assert load_config(out, check_hardware=False) == cfg


def test_field_docs_cover_every_field():
    for cls in (RunConfig, C.ModelConfig, C.ParallelConfig, C.PrecisionConfig, C.FP8Config, C.OptimConfig,
                C.AlgoConfig, C.LagConfig, C.FleetConfig, C.WeightSyncConfig, C.DataConfig, C.RewardsConfig,
                C.CheckpointConfig, C.LoggingConfig, C.EvalConfig):
        docs = C.field_docs(cls)
        missing = {f.name for f in dataclasses.fields(cls)} - set(docs)
        assert not missing, f"{cls.__name__} fields without docs: {missing}"
    assert "trust region" in C.field_docs(C.AlgoConfig)["beta2"]


def test_choices_match_fields():
    cfg = RunConfig()
    for name, allowed in C.CHOICES.items():
        assert C._get(cfg, name) in allowed


def test_check_world_size():
    cfg = load_config(TINY)  # TP=2, PP=1, 16 prompts per step
    assert check_world_size(cfg, 2) == 1
    assert check_world_size(cfg, 8) == 4
    with pytest.raises(ConfigError, match=r"world_size=3 must be a multiple"):
        check_world_size(cfg, 3)
    with pytest.raises(ConfigError, match=r"fleet.prompts_per_step=16"):
        check_world_size(cfg, 6)  # DP=3 does not split 16 groups
    cfg = load_config(TINY, ["parallel.data_parallel_size=2"])
    assert check_world_size(cfg, 4) == 2
    with pytest.raises(ConfigError, match=r"parallel.data_parallel_size=2 does not match world_size=8"):
        check_world_size(cfg, 8)
    cfg = load_config(TINY, ["parallel.micro_batch_groups=4"])
    assert check_world_size(cfg, 4) == 2
    with pytest.raises(ConfigError, match=r"parallel.micro_batch_groups=4"):
        check_world_size(cfg, 16)  # 2 groups per rank


def test_cli_takes_overrides_before_and_after_options(monkeypatch):
    from megatron_oapl import cli

    seen = {}
    monkeypatch.setattr(cli, "_eval", lambda args: seen.update(vars(args)) or 0)
    cli.main(["eval", str(ROOT / "configs" / "tiny.yaml"), "eval.num_samples=4", "--model", "m", "data.seed=3"])
    assert seen["overrides"] == ["eval.num_samples=4", "data.seed=3"] and seen["model"] == "m"
    with pytest.raises(SystemExit):
        cli.main(["eval", str(ROOT / "configs" / "tiny.yaml"), "--model", "m", "--bogus"])
