"""Guards on what the project declares: every config field is read by the code, every metric name in
`metrics.py` is written, and every shipped recipe's model section resolves against its model's config.json
(a stub with the real model's sizes) and validates. Each reads the source or the shipped files, so a field
nobody reads, a metric nobody writes or a recipe that no longer fits its model fails here."""

from __future__ import annotations

import ast
import collections
import dataclasses
import json
import typing
from pathlib import Path

import pytest
import yaml

from megatron_oapl.config import RunConfig, load_config, validate
from megatron_oapl.models.hf_config import resolve_model

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted(p for package in ("megatron_oapl", "launch") for p in (ROOT / package).rglob("*.py"))


def _trees(skip: set[Path]) -> list[ast.AST]:
    return [ast.parse(p.read_text(), str(p)) for p in SOURCES if p not in skip]


# --- every config field is read --------------------------------------------------------------------------

# "section.field" -> why nothing reads it. Keep it empty: a field nothing reads is a promise the code breaks.
UNREAD_FIELDS: dict[str, str] = {}


def config_fields(cls: type = RunConfig, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every leaf field of the config tree as a path, e.g. ("fleet", "weight_sync", "backend")."""
    hints = typing.get_type_hints(cls)
    fields = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            fields += config_fields(hints[f.name], prefix + (f.name,))
        else:
            fields.append(prefix + (f.name,))
    return fields


def attribute_reads() -> dict[str, set[str]]:
    """Attribute name -> what it is read from, outside config.py: `x.fleet.temperature` -> {"fleet"},
    `fleet_cfg.temperature` -> {"fleet_cfg"}; `getattr(x, "name")` counts as a read from "?"."""
    reads: dict[str, set[str]] = collections.defaultdict(set)
    for tree in _trees({ROOT / "megatron_oapl" / "config.py"}):
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute):
                owner = node.value
                reads[node.attr].add(owner.attr if isinstance(owner, ast.Attribute) else
                                     owner.id if isinstance(owner, ast.Name) else "?")
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr"
                  and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)):
                reads[str(node.args[1].value)].add("?")
    return reads


def unread_fields() -> list[str]:
    """Fields no code outside config.py reads. A name unique in the config tree counts as read wherever it
    is read; a name two sections share (`timeout_s`, `temperature`, `seed`...) only when read from an
    object named after its own section (`cfg.rewards.timeout_s`, `cfg_rewards.timeout_s`)."""
    fields = config_fields()
    shared = {name for name, n in collections.Counter(f[-1] for f in fields).items() if n > 1}
    reads = attribute_reads()
    unread = []
    for path in fields:
        owners = reads.get(path[-1], set())
        if path[-1] in shared:
            section = path[-2] if len(path) > 1 else "cfg"  # a top-level field is read off the run config
            owners = {o for o in owners if section in o}
        if not owners:
            unread.append(".".join(path))
    return unread


def test_every_config_field_is_read():
    unread = [f for f in unread_fields() if f not in UNREAD_FIELDS]
    assert not unread, (f"config fields nothing outside config.py reads: {', '.join(unread)} "
                        "(use them or remove them)")


def test_unread_field_exceptions_are_still_unread():
    assert not set(UNREAD_FIELDS) - set(unread_fields()), "these fields are read now: remove them from UNREAD_FIELDS"


def test_config_field_walk_sees_nested_sections():
    fields = {".".join(f) for f in config_fields()}
    assert {"seed", "fleet.weight_sync.backend", "precision.fp8.recipe", "model.rope_scaling.factor"} <= fields


# --- every metric is written -----------------------------------------------------------------------------

# Modules that read metrics back (from TensorBoard) rather than write them: a name only they use is not written.
METRIC_READERS = {ROOT / "megatron_oapl" / "study_report.py"}


def metric_names() -> dict[str, str]:
    """Module-level string constants of metrics.py that are metric names, templates or prefixes
    (`section/name`), by constant name."""
    tree = ast.parse((ROOT / "megatron_oapl" / "metrics.py").read_text())
    return {node.targets[0].id: node.value.value for node in tree.body
            if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
            and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str) and "/" in node.value.value}


def _builders() -> dict[str, set[str]]:
    """Function of metrics.py -> the names it uses (`pass_at` builds from PASS_AT_K, `eval_pass_at` calls
    `pass_at`)."""
    tree = ast.parse((ROOT / "megatron_oapl" / "metrics.py").read_text())
    return {node.name: {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
            for node in tree.body if isinstance(node, ast.FunctionDef)}


def names_used_outside_metrics() -> set[str]:
    """Names of metrics.py that writers use: `M.NAME` / `metrics.NAME` attributes and `from ... import NAME`."""
    used = set()
    for tree in _trees({ROOT / "megatron_oapl" / "metrics.py"} | METRIC_READERS):
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute):
                used.add(node.attr)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").endswith("metrics"):
                used.update(alias.name for alias in node.names)
    return used


def unwritten_metrics() -> list[str]:
    written = names_used_outside_metrics()
    builders = _builders()
    called = [f for f in builders if f in written]
    while called:  # a name-building function writers call writes what it builds from (other builders too)
        for name in builders[called.pop()] - written:
            written.add(name)
            if name in builders:
                called.append(name)
    return [f"{name} ({value})" for name, value in metric_names().items() if name not in written]


def test_every_metric_is_written():
    unwritten = unwritten_metrics()
    assert not unwritten, f"metrics.py declares metrics nothing writes: {', '.join(unwritten)}"


def test_metric_names_are_found():
    names = metric_names()
    assert {"LOSS", "PASS_AT_K", "LOSS_PREFIX"} <= set(names) and "DEFAULT_EVAL_SET" not in names


# --- every shipped recipe resolves against its model ------------------------------------------------------

_TINY = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 128, "intermediate_size": 256,
         "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 32,
         "vocab_size": 128, "rms_norm_eps": 1e-5, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
         "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}, "tie_word_embeddings": True}
# The config.json of each model a shipped config names, by the last part of model.hf_path: the real model's
# sizes (the tiny ones as tools/make_tiny_model.py writes them, with its default --vocab-size 128).
MODEL_CONFIGS = {
    "tiny-model": {**_TINY, "max_position_embeddings": 64},
    "tiny-scratchpad-model": {**_TINY, "max_position_embeddings": 80},
    "Qwen3-4B-Thinking-2507": {
        "model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "hidden_size": 2560, "intermediate_size": 9728,
        "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
        "vocab_size": 151936, "max_position_embeddings": 262144, "rope_theta": 5000000, "rms_norm_eps": 1e-6,
        "hidden_act": "silu", "attention_bias": False, "tie_word_embeddings": True, "use_sliding_window": False,
        "sliding_window": None, "max_window_layers": 36, "torch_dtype": "bfloat16"},
    "DeepSeek-R1-Distill-Qwen-14B": {
        "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": 5120, "intermediate_size": 13824,
        "num_hidden_layers": 48, "num_attention_heads": 40, "num_key_value_heads": 8, "vocab_size": 152064,
        "max_position_embeddings": 131072, "rope_theta": 1000000.0, "rms_norm_eps": 1e-5, "hidden_act": "silu",
        "tie_word_embeddings": False, "use_sliding_window": False, "sliding_window": 131072,
        "max_window_layers": 48, "torch_dtype": "bfloat16"},
    "Qwen3-30B-A3B": {
        "model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 2048,
        "intermediate_size": 6144, "moe_intermediate_size": 768, "num_hidden_layers": 48, "num_attention_heads": 32,
        "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128, "num_experts_per_tok": 8,
        "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True, "router_aux_loss_coef": 0.001,
        "output_router_logits": False, "vocab_size": 151936, "max_position_embeddings": 40960,
        "rope_scaling": None, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "hidden_act": "silu",
        "attention_bias": False, "attention_dropout": 0.0, "tie_word_embeddings": False,
        "use_sliding_window": False, "sliding_window": None, "max_window_layers": 48, "torch_dtype": "bfloat16"},
}
# (config file, model field) -> why the value written there may differ from the model's config.json.
WRITTEN_MAY_DIFFER = {("tiny.yaml", "vocab_size"): "a placeholder: the tiny tokenizer's size comes from config.json",
                      ("tiny_scratchpad.yaml", "vocab_size"): "inherits tiny.yaml's placeholder"}
RUN_CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.yaml") if p.name != "base_gpu.yaml")  # base: no run


def _written_model_fields(path: Path) -> dict:
    """The model section as the config file and the files it inherits from write it (nearer file wins)."""
    data = yaml.safe_load(path.read_text()) or {}
    written = _written_model_fields(path.parent / data["inherit"]) if data.get("inherit") else {}
    return {**written, **(data.get("model") or {})}


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.name)
def test_shipped_config_resolves_against_its_models_config_json(path, tmp_path):
    cfg = load_config(path, check_hardware=False)
    assert cfg.model.hf_path, f"{path.name}: model.hf_path is not set"
    name = Path(cfg.model.hf_path).name
    assert name in MODEL_CONFIGS, f"{path.name}: no stub config.json for {name!r}; add the model's to MODEL_CONFIGS"
    (tmp_path / "config.json").write_text(json.dumps(MODEL_CONFIGS[name]))
    resolved = resolve_model(load_config(path, [f"model.hf_path={tmp_path}"], check_hardware=False))
    validate(resolved, check_hardware=False)  # TP/PP against the real heads and layers, sequence lengths...
    # The recipe writes the architecture too (`oapl launch` checks TP and PP on a login node without the model):
    # it must be the model's.
    for field, value in _written_model_fields(path).items():
        if field in ("hf_path", "make_vocab_size_divisible_by") or (path.name, field) in WRITTEN_MAY_DIFFER:
            continue
        assert getattr(resolved.model, field) == value, (
            f"{path.name}: model.{field}={value!r}, but {name}'s config.json gives {getattr(resolved.model, field)!r}")


def test_every_stub_is_a_model_a_shipped_config_names():
    named = {Path(load_config(p, check_hardware=False).model.hf_path).name for p in RUN_CONFIGS}
    assert set(MODEL_CONFIGS) == named
