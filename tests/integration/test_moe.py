"""Mixture-of-experts policies (Qwen3-MoE) with expert parallelism, against transformers.

One tiny random Qwen3-MoE (4 experts, top-2, tests/support/tiny_moe.py) goes HF -> Megatron checkpoint with
EP=2 (`oapl convert hf-to-megatron --ep 2`, two ranks each holding two experts) -> Megatron forward at EP=2
-> HF again, both through a live EP=2 export (the training run's path, experts gathered over the EP group)
and `oapl convert megatron-to-hf`. Then the learner trains it at EP=2, checkpoints, and resumes at EP=1.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from megatron_oapl.checkpoint import convert
from megatron_oapl.config import to_dict
from tests.support.checkpoint_workers import checkpoint_script
from tests.support.distributed import run_ranks
from tests.support.hf_reference import hf_logits
from tests.support.moe_workers import PADDED_LENGTHS, load_score_export
from tests.support.oapl_case import run_config
from tests.support.tiny_moe import make_tiny_moe

TOKENS = [[3, 17, 5, 36, 0, 22, 9, 14, 30, 1, 8, 25]]


def _hf_tensors(directory) -> dict[str, torch.Tensor]:
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    tensors = {}
    for file in set(index["weight_map"].values()):
        tensors.update(load_file(directory / file))
    return tensors


def moe_config(hf_dir, ep: int, tp: int = 1) -> dict:
    """The shared tiny case's training settings on the tiny MoE, at TP x EP (DP = EP; SP with TP > 1)."""
    cfg = to_dict(convert.import_config(hf_dir, tp, 1, ep=ep))
    case = run_config()
    for section in ("optim", "algo", "fleet"):
        cfg[section].update(case[section])
    cfg["seed"], cfg["model"]["max_seq_length"] = case["seed"], 16
    cfg["precision"]["params_dtype"] = "fp32"
    return cfg


@pytest.fixture(scope="module")
def hf_moe(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe-hf")
    return {"hf": make_tiny_moe(root / "hf"), "unnormalised": make_tiny_moe(root / "hf-u", seed=3, norm_topk_prob=False)}


# TP=1 x EP=2 on 2 ranks; TP=2 x EP=2 on 4 ranks (experts split over TP too, sequence parallelism).
@pytest.fixture(scope="module", params=[1, 2], ids=["tp1-ep2", "tp2-ep2"])
def converted(request, hf_moe, tmp_path_factory):
    tp, hf = request.param, hf_moe["hf"]
    root = tmp_path_factory.mktemp(f"moe-tp{tp}")
    ckpt = root / "ckpt"
    assert convert.main(["hf-to-megatron", "--hf", str(hf), "--out", str(ckpt), "--tp", str(tp), "--ep", "2"]) == 0
    run_ranks(2 * tp, load_score_export, moe_config(hf, 2, tp), str(ckpt), TOKENS, str(root),
              str(hf_moe["unnormalised"]) if tp == 1 else None)
    return {"hf": hf, "ckpt": ckpt, "root": root, "tp": tp, **hf_moe, **torch.load(root / "logits.pt")}


def test_the_checkpoint_records_the_expert_layout(converted):
    cfg_text = (converted["ckpt"] / "config.yaml").read_text()
    assert "expert_model_parallel_size: 2" in cfg_text and "num_experts: 4" in cfg_text
    assert f"tensor_model_parallel_size: {converted['tp']}" in cfg_text


def test_megatron_forward_at_ep2_equals_transformers(converted):
    reference = hf_logits(converted["hf"], TOKENS)
    torch.testing.assert_close(converted["logits"], reference, rtol=0, atol=1e-4)
    if "unnormalised_logits" in converted:  # norm_topk_prob false: Megatron's pre-softmax routing
        torch.testing.assert_close(converted["unnormalised_logits"], hf_logits(converted["unnormalised"], TOKENS),
                                   rtol=0, atol=1e-4)


def _routed_counts(model, rows: list[list[int]]) -> torch.Tensor:
    """[layers, experts]: how many of these tokens transformers routes to each expert (top-2)."""
    counts = 0
    for row in rows:
        with torch.no_grad():
            routers = model(torch.tensor([row]), output_router_logits=True).router_logits  # per layer [tokens, E]
        counts = counts + torch.stack([torch.bincount(r.topk(2, dim=-1).indices.flatten(), minlength=4)
                                       for r in routers]).double()
    return counts


def test_expert_load_counts_the_tokens_transformers_routes(converted):
    import transformers

    from megatron_oapl import metrics as M

    model = transformers.AutoModelForCausalLM.from_pretrained(converted["hf"], dtype=torch.float32)
    # Two DP ranks each route the tokens (under TP=2 with SP, each TP rank half of them).
    whole = _routed_counts(model, TOKENS) * 2
    # The padded pass: only each row's real tokens count (causal: their routing ignores what follows).
    row, reverse = TOKENS[0], TOKENS[0][::-1]
    padded = _routed_counts(model, [row[: PADDED_LENGTHS[0]], reverse[: PADDED_LENGTHS[1]]]) * 2
    for load, counts in ((converted["load"], whole), (converted["padded_load"], padded)):
        assert counts.min() < counts.max()  # the check can tell min from max
        assert (load[M.EXPERT_TOKENS_MIN], load[M.EXPERT_TOKENS_MAX]) == (counts.min().item(), counts.max().item())
        assert load[M.EXPERT_LOAD_IMBALANCE] == pytest.approx(counts.max().item() / counts.mean().item())
    assert converted["load_without_grad"][M.EXPERT_TOKENS_MAX] == 0


@pytest.mark.parametrize("export", ["live", "back"])
def test_hf_to_megatron_ep2_to_hf_is_exact(converted, export):
    original = load_file(converted["hf"] / "model.safetensors")
    back = _hf_tensors(converted["root"] / export)
    assert set(back) == set(original)  # the hub's per-expert names, every expert once
    assert "model.layers.1.mlp.experts.3.down_proj.weight" in back
    for name, tensor in original.items():
        assert torch.equal(back[name], tensor), name


def test_exported_moe_directory_gives_transformers_logits(converted):
    out = converted["root"] / "back"
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen3_moe" and config["norm_topk_prob"] is True
    diff = (hf_logits(out, TOKENS) - hf_logits(converted["hf"], TOKENS)).abs().max().item()
    assert diff < 1e-5, diff


# --------------------------------------------------------------------------------------------------
# Training at EP=2: checkpoint, resume at EP=2 (bit-exact) and at EP=1 (the experts resharded)
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lives(setup, hf_moe, tmp_path_factory):
    root = tmp_path_factory.mktemp("moe-lives")
    torch.save(load_file(hf_moe["hf"] / "model.safetensors"), root / "ref.pt")
    ep2, ep1 = moe_config(hf_moe["hf"], 2), moe_config(hf_moe["hf"], 1)
    ep2_dist = {**ep2, "parallel": {**ep2["parallel"], "use_distributed_optimizer": True}}
    pp2 = {**ep1, "parallel": {**ep1["parallel"], "pipeline_model_parallel_size": 2}}
    packed = {**ep2, "parallel": {**ep2["parallel"], "micro_batch_tokens": 32, "pack_sequences": True}}

    def life(saved: str) -> tuple[list[dict], list[dict]]:
        return ([{"op": "train", "tag": "straight", "first": 1, "last": 3, "save_dir": saved, "save_at": [2]}],
                [{"op": "load_latest", "run_dir": saved}, {"op": "train", "tag": "resumed", "first": 3, "last": 3}])

    (first, resume), (first_dist, resume_dist) = life(str(root / "run")), life(str(root / "run-dist"))
    phases = [{"name": "A", "cfg": ep2, "actions": first}, {"name": "B", "cfg": ep2, "actions": resume},
              {"name": "C", "cfg": ep1, "actions": resume}, {"name": "F", "cfg": pp2, "actions": resume},
              {"name": "G", "cfg": packed, "actions": resume},
              # the distributed optimizer (the GPU recipes' choice) shards expert state over expert-DP
              {"name": "D", "cfg": ep2_dist, "actions": first_dist},
              {"name": "E", "cfg": ep2_dist, "actions": resume_dist}]
    run_ranks(2, checkpoint_script, str(root / "ref.pt"), str(setup[0] / "batch.pt"), str(root), phases)
    return {**{name: torch.load(root / f"{name}.rank0.pt") for name in "ABCDEG"}, "start": torch.load(root / "ref.pt"),
            "F": [torch.load(root / f"F.rank{rank}.pt") for rank in (0, 1)]}  # one record per pipeline stage


@pytest.mark.parametrize("saved, resumed_in", [("A", "B"), ("D", "E")], ids=["adam", "distributed-adam"])
def test_moe_training_resumes_bit_exact_at_ep2(lives, saved, resumed_in):
    straight, resumed = lives[saved]["train"]["straight"], lives[resumed_in]["train"]["resumed"]
    assert lives[resumed_in]["loads"][0]["state"]["step"] == 2 and not lives[resumed_in]["warnings"]
    assert resumed["losses"][3] == straight["losses"][3]
    assert set(resumed["weights"]) == set(straight["weights"])
    for key, weight in straight["weights"].items():
        assert torch.equal(resumed["weights"][key], weight), key
    # Not vacuous: the router and experts of both EP ranks (expert 0 on rank 0, 3 on rank 1) moved.
    for key in ("model.layers.0.mlp.experts.0.gate_proj.weight", "model.layers.1.mlp.experts.3.down_proj.weight",
                "model.layers.1.mlp.gate.weight"):
        assert (straight["weights"][key] - lives["start"][key]).abs().max() > 1e-4, key


def test_an_ep2_checkpoint_resumes_at_ep1_with_the_experts_resharded(lives):
    """The weights reshard (the step-3 loss is a function of the step-2 weights only); the optimizer state
    does not (Megatron keeps expert state in a separate part only with EP > 1), and the log says so."""
    straight, resumed = lives["A"]["train"]["straight"], lives["C"]["train"]["resumed"]
    assert resumed["losses"][3] == pytest.approx(straight["losses"][3], rel=1e-6)
    assert any("optimizer state is not restored" in w and "expert_model_parallel_size" in w
               for w in lives["C"]["warnings"])


def test_an_ep2_checkpoint_resumes_on_two_pipeline_stages(lives):
    """PP=2: each stage holds one layer's router and experts, named with their global layer index."""
    straight = lives["A"]["train"]["straight"]
    stages = [record["train"]["resumed"] for record in lives["F"]]
    for stage in stages:  # the loss reaches both stages
        assert stage["losses"][3] == pytest.approx(straight["losses"][3], rel=1e-6)
    names = [set(stage["weights"]) for stage in stages]
    assert not names[0] & names[1] and names[0] | names[1] == set(straight["weights"])
    assert "model.layers.1.mlp.experts.3.down_proj.weight" in names[1] and "model.layers.1.mlp.gate.weight" in names[1]


def test_packed_token_budget_micro_batches_give_the_same_moe_step(lives):
    """Sequences packed into 32-token rows (the recipes' layout): the same step-3 loss as whole groups."""
    straight, packed = lives["A"]["train"]["straight"], lives["G"]["train"]["resumed"]
    assert lives["G"]["loads"][0]["state"]["step"] == 2 and not lives["G"]["warnings"]
    assert packed["losses"][3] == pytest.approx(straight["losses"][3], rel=1e-5)
