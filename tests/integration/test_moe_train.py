"""`oapl train` on a Qwen3-MoE policy at EP=2: the learners (TP=1, DP=2, each holding two of the four experts)
train it, push it to the engine every step, and the engine's log-probs of what it sampled after a push agree
with the learners' recomputed ones; the expert load reaches TensorBoard."""

from __future__ import annotations

import json
import shutil

import pytest

from megatron_oapl import metrics as M
from megatron_oapl.weights.hf_io import SIDE_FILES
from tests.integration.test_train_e2e import finish, oapl_train, scalars
from tests.support.tiny_moe import make_tiny_moe


@pytest.fixture(scope="module")
def moe_model(tiny_model, tmp_path_factory):
    """A random tiny Qwen3-MoE that speaks the tiny default's tokenizer (its vocabulary and special tokens)."""
    out = tmp_path_factory.mktemp("moe") / "model"
    dense = json.loads((tiny_model / "config.json").read_text())
    make_tiny_moe(out, vocab_size=dense["vocab_size"], bos_token_id=dense.get("bos_token_id"),
                  eos_token_id=dense.get("eos_token_id"), pad_token_id=dense.get("pad_token_id"))
    for name in SIDE_FILES:
        if name != "config.json" and (tiny_model / name).is_file():
            shutil.copy(tiny_model / name, out / name)
    return out


def test_moe_policy_trains_at_ep2_and_the_engine_agrees_after_each_push(moe_model, tmp_path):
    run_dir = tmp_path / "run"
    out = finish(oapl_train(moe_model, run_dir, "optim.train_steps=4", "lag.sync_every=1",
                            "algo.logp_lag_source=recompute", "parallel.tensor_model_parallel_size=1",
                            "parallel.expert_model_parallel_size=2", "eval.every=0",
                            "data.num_eval_prompts=8", "eval.num_samples=1",
                            "rewards.name=tests.support.rewards_for_tests:length_reward"), 600)
    assert out.strip().splitlines()[-1].startswith("pass@1: ")
    tb = scalars(run_dir)
    assert tb[M.POLICY_VERSION] == {1: 0, 2: 1, 3: 2, 4: 3}  # steps 2-4 sampled after a push
    assert sorted(tb[M.SYNC_SECONDS]) == [1, 2, 3, 4]
    gaps = tb[M.LOGP_GAP]
    assert all(gaps[step] < 1e-3 for step in (2, 3, 4)), gaps
    # 4 prompts x 8 samples x (prompt + up to 8 new tokens), top-2 of 4 experts: every step routes tokens.
    for step in (1, 2, 3, 4):
        low, high = tb[M.EXPERT_TOKENS_MIN][step], tb[M.EXPERT_TOKENS_MAX][step]
        assert 0 <= low <= high and high > 0 and tb[M.EXPERT_LOAD_IMBALANCE][step] >= 1
    assert all(abs(tb[M.LOSS][step]) > 0 for step in (1, 2, 3, 4))  # the length reward ranks every group
    # The final export holds every expert in the hub's names, moved by training on both EP ranks' experts.
    from safetensors import safe_open

    exported = json.loads((run_dir / "hf" / "model.safetensors.index.json").read_text())["weight_map"]
    start = safe_open(str(moe_model / "model.safetensors"), framework="pt")
    for expert in range(4):
        name = f"model.layers.1.mlp.experts.{expert}.up_proj.weight"
        with safe_open(str(run_dir / "hf" / exported[name]), framework="pt") as final:
            assert (final.get_tensor(name) - start.get_tensor(name)).abs().max() > 0, name
