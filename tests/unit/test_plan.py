"""`oapl plan`: the memory arithmetic against hand-computed figures, the one-line verdict naming the field
to change (whose suggested value then fits), the same check before `oapl train` and `oapl launch slurm`
(`--force` overrides), and the shipped recipes fitting 80 GB GPUs."""

from __future__ import annotations

import re
from argparse import Namespace
from pathlib import Path

import pytest

from launch import slurm
from megatron_oapl import cli
from megatron_oapl.config import ConfigError, from_dict, load_config
from megatron_oapl.plan import (GB, LEARNER_RESERVE_GB, ModelDims, data_parallel_size, make_memory_plan,
                                 sender_host_bytes, stage_param_split, stage_params)
from tests.support.tiny_moe import TINY_MOE

ROOT = Path(__file__).resolve().parents[2]
QWEN4B = str(ROOT / "configs" / "qwen3_4b_math.yaml")
QWEN30B_A3B = str(ROOT / "configs" / "qwen3_30b_a3b_math.yaml")
RECIPES = [ROOT / "configs" / name for name in ("qwen3_4b_math.yaml", "r1_distill_qwen14b_code.yaml",
                                               "qwen3_30b_a3b_math.yaml")]
# Both overrides restore the whole-group, no-recompute learner the recipes had before (364 GB per GPU).
WHOLE_GROUPS = ["parallel.micro_batch_tokens=0", "parallel.pack_sequences=false", "parallel.recompute=none",
                "parallel.micro_batch_groups=1"]


def _small():
    """2 layers, h 64, f 128, 4 heads of 16 with 2 KV groups, vocab 100 (padded to 112 at TP 2), bf16, TP 2
    with sequence parallelism, 1024-token micro-batches, 256-token log-prob chunks, vLLM engines."""
    return from_dict({
        "model": {"num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 128, "num_attention_heads": 4,
                  "num_query_groups": 2, "kv_channels": 16, "vocab_size": 100, "make_vocab_size_divisible_by": 8,
                  "tie_word_embeddings": False, "max_seq_length": 256},
        "parallel": {"tensor_model_parallel_size": 2, "sequence_parallel": True, "use_distributed_optimizer": True,
                     "micro_batch_tokens": 1024, "logprob_chunk_tokens": 256},
        "precision": {"params_dtype": "bf16"},
        "fleet": {"engine": "vllm", "max_new_tokens": 128, "vllm_gpu_memory_utilization": 0.5,
                  "weight_sync": {"bucket_mb": 64}},
    }, check_hardware=False)


def test_learner_figures_match_the_hand_computation():
    cfg = _small()
    # Per layer: QKV 64 x (4 + 2 x 2) x 16 = 8192, proj 4096, MLP 3 x 64 x 128 = 24576 -> 36864 / TP 2, plus
    # two norms of 64: 18560 per GPU; 2 layers + embedding and output layer 112 / 2 x 64 each + final norm.
    assert ModelDims.of(cfg.model).padded_vocab(2) == 112
    assert stage_params(ModelDims.of(cfg.model), 2, 1) == 2 * 18560 + 2 * 3584 + 64 == 44352
    learner = make_memory_plan(cfg, 80, dp=2).learner
    assert (learner.weights, learner.grads, learner.optimizer) == (2 * 44352, 4 * 44352, 12 * 44352 / 2)
    assert learner.tokens == 1024 and learner.row == 256
    # Per token per layer (bytes, e = 2): norms 4 x 64 / 2 (SP) = 128; attention (QKV 128 + q 64 + k 32 + out
    # 64) / 2 = 144; SwiGLU 3 x 128 / 2 = 192; RoPE 4 x 16 = 64 -> 528 x 2 = 1056, + flash lse 4 x 4 / 2 = 8.
    per_layer = 1064 * 1024
    final_norm = 2 * 2 * 64 // 2 * 1024
    assert learner.activations["none"] == 2 * per_layer + final_norm
    assert learner.activations["selective"] == 2 * (per_layer - 8 * 1024) + final_norm
    assert learner.activations["full"] == 2 * (2 * 64 // 2 * 1024) + per_layer + final_norm
    # Logits and their gradient in bf16 for 1024 tokens + three fp32 copies of a 256-token chunk, V/TP = 56.
    assert learner.logprob == 56 * (2 * 2 * 1024 + 3 * 4 * 256)
    assert learner.total == pytest.approx(learner.static + learner.activations["none"] + learner.logprob
                                          + LEARNER_RESERVE_GB * GB)
    unchunked = make_memory_plan(_small_with(logprob_chunk_tokens=0), 80, dp=2).learner
    assert unchunked.logprob == 56 * (2 * 2 * 1024 + 3 * 4 * 1024)


def _small_with(**parallel):
    cfg = _small()
    for key, value in parallel.items():
        setattr(cfg.parallel, key, value)
    return cfg


def test_micro_batch_tokens_follow_the_budget_or_whole_groups():
    # A budget below the longest sequence: that sequence forms its own micro-batch.
    assert make_memory_plan(_small_with(micro_batch_tokens=100), 80, 1).learner.tokens == 256
    # No budget: micro_batch_groups x group_size (8) x the padded max_seq_length; null = the DP rank's groups.
    assert make_memory_plan(_small_with(micro_batch_tokens=0, micro_batch_groups=2), 80, 1).learner.tokens == 4096
    assert make_memory_plan(_small_with(micro_batch_tokens=0), 80, 4).learner.tokens == 16 // 4 * 8 * 256
    packed = make_memory_plan(_small_with(pack_sequences=True), 80, 1).learner
    assert packed.row == 1024  # one packed row may be the whole budget


def test_engine_figures_match_the_hand_computation():
    engine = make_memory_plan(_small(), 80, 1).engine
    # HF parameters: 2 x (36864 + 128) + 2 x 100 x 64 + 64 = 86848, bf16 on one GPU.
    assert engine.weights == 2 * 86848
    assert engine.kv_per_token == 2 * 2 * 2 * 16 * 2  # K and V x layers x KV heads x head dim x bf16
    assert engine.kv == 0.5 * 80 * GB - 2 * 86848 - 3 * GB
    assert engine.full_sequences == engine.kv_tokens // 256
    assert engine.push == 2 * 64 * 2**20 + 1 * GB and engine.outside == 0.5 * 80 * GB


def _small_moe(**parallel):
    """_small's attention (q/k norms: qwen3_moe), 4 experts of width 32, top-2, at TP 2 x EP 2, DP 4."""
    cfg = _small()
    cfg.model.preset, cfg.model.num_experts, cfg.model.moe_ffn_hidden_size = "qwen3_moe", 4, 32
    cfg.model.moe_router_topk = 2
    cfg.parallel.expert_model_parallel_size, cfg.parallel.data_parallel_size = 2, 4
    for key, value in parallel.items():
        setattr(cfg.parallel, key, value)
    return cfg


def test_moe_learner_figures_match_the_hand_computation():
    cfg = _small_moe()
    # Per layer: attention 8192 + 4096 = 12288 / TP 2 = 6144, plus norms 2 x 64 + q/k norms 2 x 16 and the
    # router 64 x 4, whole: 6560; experts 4 x 3 x 64 x 32 = 24576 / (EP 2 x TP 2) = 6144. Two layers, the
    # embedding and output layer (112 / 2 x 64 each) and the final norm: dense 20352, experts 12288.
    assert stage_param_split(ModelDims.of(cfg.model), 2, 1, 2) == (2 * 6560 + 2 * 3584 + 64, 2 * 6144)
    learner = make_memory_plan(cfg, 80, dp=4).learner
    assert learner.params == 20352 + 12288 and learner.expert_params == 12288
    assert (learner.weights, learner.grads) == (2 * 32640, 4 * 32640)
    # Adam: dense state over DP 4, expert state over DP / EP = 2 (the ranks holding the same experts).
    assert learner.optimizer == 12 * (20352 / 4 + 12288 / 2)
    # Per token per layer (bytes, e = 2): norms 128, attention 144, RoPE 64 -> 2 x 336 = 672; the MoE MLP: 2
    # routed copies, each the gathered input (64) and SwiGLU 3 x 32 / 2 = 48: 2 x 2 x 112 = 448, router
    # 9 x 4 / 2 = 18; flash lse 8. Total 1146 (a dense SwiGLU of width 128 would be 192 x 2 = 384).
    final_norm = 2 * 2 * 64 // 2 * 1024
    assert learner.activations["none"] == 2 * 1146 * 1024 + final_norm
    assert learner.activations["full"] == 2 * (2 * 64 // 2 * 1024) + 1146 * 1024 + final_norm
    # Dispatch buffers: 1024 tokens x 2 copies x 64 x (permuted + all-to-all output 2 x 2 / 2, the expert
    # output 2, its fp32 copy for the TP reduce-scatter 4).
    assert learner.dispatch == 1024 * 2 * 64 * 8
    assert learner.total == pytest.approx(learner.static + learner.activations["none"] + learner.logprob
                                          + learner.dispatch + LEARNER_RESERVE_GB * GB)
    # The engine holds every expert: 2 x (12288 + 160 + 256 + 24576) + 2 x 100 x 64 + 64 = 87424 parameters.
    assert make_memory_plan(cfg, 80, dp=4).engine.weights == 2 * 87424
    # Without the distributed optimizer nothing is sharded; at DP = EP the expert state is whole on each GPU.
    assert make_memory_plan(_small_moe(use_distributed_optimizer=False), 80, 4).learner.optimizer == 12 * 32640
    assert make_memory_plan(cfg, 80, dp=2).learner.optimizer == 12 * (20352 / 2 + 12288)


def test_moe_parameters_match_a_real_transformers_model_per_part():
    """The plan's counts against transformers' Qwen3-MoE (the tiny test model's shape), part by part."""
    import transformers

    model = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**TINY_MOE))
    parts = {"experts": 0, "router": 0, "embeddings": 0, "rest": 0}
    for name, p in model.named_parameters():
        part = ("experts" if ".mlp.experts." in name else "router" if name.endswith(".mlp.gate.weight") else
                "embeddings" if name in ("model.embed_tokens.weight", "lm_head.weight") else "rest")
        parts[part] += p.numel()
    cfg = from_dict({"model": {"preset": "qwen3_moe", "num_layers": TINY_MOE["num_hidden_layers"],
                               "hidden_size": TINY_MOE["hidden_size"], "ffn_hidden_size": TINY_MOE["intermediate_size"],
                               "num_attention_heads": TINY_MOE["num_attention_heads"],
                               "num_query_groups": TINY_MOE["num_key_value_heads"], "kv_channels": TINY_MOE["head_dim"],
                               "vocab_size": TINY_MOE["vocab_size"], "tie_word_embeddings": False,
                               "max_seq_length": 64, "num_experts": TINY_MOE["num_experts"],
                               "moe_ffn_hidden_size": TINY_MOE["moe_intermediate_size"],
                               "moe_router_topk": TINY_MOE["num_experts_per_tok"]}}, check_hardware=False)
    dims = ModelDims.of(cfg.model)
    assert dims.total_params() == sum(parts.values()) == sum(p.numel() for p in model.parameters())
    assert dims.layers * dims.layer_expert_params() == parts["experts"] == 2 * 4 * 3 * 32 * 16
    # Per GPU at TP 2 x EP 2: a quarter of the experts; the router and norms whole; attention halved; the
    # vocabulary 37 padded to 38 and halved, for the embedding and the output layer.
    dense, experts = stage_param_split(dims, 2, 1, 2)
    assert experts == parts["experts"] // 4
    attention = dims.layers * dims.layer_matrix_params()
    norms = parts["rest"] - attention  # every norm, the final one included
    assert dense == attention // 2 + norms + parts["router"] + 2 * 19 * TINY_MOE["hidden_size"]
    # The push sender's host copy: the whole model (one stage), every expert, fp32 here.
    assert sender_host_bytes(cfg) == 4 * sum(p.numel() for p in model.parameters())


def test_moe_smallest_learner_is_dp_equal_to_ep_and_a_learner_without_ep_names_it(capsys):
    cfg = load_config(QWEN30B_A3B, check_hardware=False)
    assert data_parallel_size(cfg, None) == 8 == data_parallel_size(cfg, 16)  # DP 1 could not run EP 8
    code, err, _ = _plan_exit(capsys, QWEN30B_A3B, "parallel.expert_model_parallel_size=1", "--gpu-memory-gb", "80",
                              "--learner-gpus", "16")
    assert code == 1 and len(err) == 1 and "raise parallel.tensor_model_parallel_size (now 2), " \
        "parallel.expert_model_parallel_size (now 1)" in err[0], err


def _plan_exit(capsys, *argv) -> tuple[int, list[str], str]:
    code = cli.main(["plan", *argv])
    out, err = capsys.readouterr()
    return code, [line for line in err.splitlines() if line.strip()], out


def test_whole_groups_do_not_fit_and_the_named_value_does(capsys):
    code, err, out = _plan_exit(capsys, QWEN4B, *WHOLE_GROUPS, "--gpu-memory-gb", "80", "--learner-gpus", "16")
    assert code == 1 and len(err) == 1, err
    assert "DOES NOT FIT" in out and "activations, recompute=none" in out
    line = err[0]
    assert line.startswith("does not fit: learner needs 364 GB of 80 GB per GPU"), line
    budget = re.search(r"set parallel\.micro_batch_tokens <= (\d+) \(now 0: whole groups of 147456 tokens\)", line)
    assert budget, line
    # The suggested budget fits (with the rest unchanged), and one padding step more does not.
    fixed = [*WHOLE_GROUPS, f"parallel.micro_batch_tokens={budget.group(1)}"]
    assert _plan_exit(capsys, QWEN4B, *fixed, "--gpu-memory-gb", "80", "--learner-gpus", "16")[0] == 0
    over = [*WHOLE_GROUPS, f"parallel.micro_batch_tokens={int(budget.group(1)) + 16}"]
    assert _plan_exit(capsys, QWEN4B, *over, "--gpu-memory-gb", "80", "--learner-gpus", "16")[0] == 1


def test_recompute_is_named_when_it_alone_fits(capsys):
    code, err, _ = _plan_exit(capsys, QWEN4B, "parallel.recompute=none", "--gpu-memory-gb", "80",
                              "--learner-gpus", "16")
    assert code == 1 and len(err) == 1
    assert "set parallel.recompute=full (now none)" in err[0] and "parallel.micro_batch_tokens <=" in err[0]


def test_a_gpu_too_small_for_one_sequence_names_the_parallel_layout(capsys):
    code, err, _ = _plan_exit(capsys, QWEN4B, "--gpu-memory-gb", "24", "--learner-gpus", "2")
    assert code == 1 and len(err) == 1
    assert "raise parallel.tensor_model_parallel_size (now 2)" in err[0], err[0]


@pytest.mark.parametrize("util, field", [(0.1, "raise fleet.vllm_gpu_memory_utilization (now 0.1)"),
                                         (0.99, "lower fleet.vllm_gpu_memory_utilization (now 0.99)")])
def test_engine_that_does_not_fit_names_its_field(capsys, util, field):
    code, err, _ = _plan_exit(capsys, QWEN4B, f"fleet.vllm_gpu_memory_utilization={util}", "--gpu-memory-gb", "80")
    assert code == 1 and len(err) == 1 and field in err[0], err


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
@pytest.mark.parametrize("learner_gpus", ["16", None], ids=["16-gpus", "one-replica"])
def test_recipes_fit_80_gb_gpus(capsys, path, learner_gpus):
    gpus = ["--learner-gpus", learner_gpus] if learner_gpus else []
    code, err, out = _plan_exit(capsys, str(path), "--gpu-memory-gb", "80", *gpus)
    assert code == 0, err
    assert "<- configured" in out and ": fits" in out and "DOES NOT FIT" not in out


def test_train_refuses_a_run_that_does_not_fit_before_anything_starts(tmp_path, capsys):
    from transformers import LlamaConfig

    model = tmp_path / "model"
    LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                max_position_embeddings=64, tie_word_embeddings=True).save_pretrained(model)
    run_dir = tmp_path / "run"
    argv = ["train", str(ROOT / "configs" / "tiny.yaml"), f"model.hf_path={model}", f"run_dir={run_dir}"]
    assert cli.main([*argv, "--gpu-memory-gb", "1"]) == 2  # the 2.5 GB reserve alone exceeds 1 GB
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: does not fit: learner needs"), err
    assert "--force starts anyway" in err[0] and not run_dir.exists()  # nothing started
    # --force: a warning, and the run would go on (checked on the hook itself: no training here).
    cfg = load_config(str(ROOT / "configs" / "tiny.yaml"), [f"model.hf_path={model}"], check_hardware=False)
    cli._check_memory_before_start(cfg, Namespace(gpu_memory_gb=1.0, force=True))
    assert "starting anyway: --force" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="does not fit"):
        cli._check_memory_before_start(cfg, Namespace(gpu_memory_gb=1.0, force=False))
    cli._check_memory_before_start(cfg, Namespace(gpu_memory_gb=None, force=False))  # CPU: not checked


def _launch(capsys, *extra) -> tuple[int, str]:
    argv = [QWEN4B, "run_dir=/shared/runs/plan", "--learner-nodes", "2", "--learner-gpus-per-node", "8",
            "--fleet-gpus-per-node", "8", "--dry-run", "--no-cluster-check", "--allow-local-paths", *extra]
    code = slurm.main(argv)
    return code, capsys.readouterr().err


def test_launch_slurm_checks_the_plan_of_gpu_learners(capsys):
    code, err = _launch(capsys, "--gpu-memory-gb", "80")
    assert code == 0 and "memory plan" not in err, err
    code, err = _launch(capsys, *WHOLE_GROUPS, "--gpu-memory-gb", "80")
    assert code == 2 and "nothing was submitted" in err
    assert "error: does not fit: learner needs 364 GB" in err and "parallel.micro_batch_tokens <=" in err
    code, err = _launch(capsys, *WHOLE_GROUPS, "--gpu-memory-gb", "80", "--force")
    assert code == 0 and "warning: does not fit" in err
    code, err = _launch(capsys, *WHOLE_GROUPS)  # GPU memory unknown: said, not guessed
    assert code == 0 and "the memory plan was not checked: pass --gpu-memory-gb" in err
