"""The light engine (transformers) serves a tiny Qwen3-MoE and takes weight pushes in the hub's per-expert names.

A push carries `model.layers.L.mlp.experts.E.{gate,up,down}_proj.weight` (the safetensors names, what the
learner sends and vLLM loads); transformers holds the experts fused (`experts.gate_up_proj`, `experts.down_proj`).
The engine starts on model A (seed 0) and receives model B's (seed 1) safetensors tensors through
`sync_from`, the fleet's receive path (a weight group over the store, a sender thread). References are
independent of the engine's conversion: transformers' own loading of B (its conversion mapping) for the
weights, and a fp32 full-sequence forward of B (eager attention, eager experts) for the log-probs.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from megatron_oapl.rollout.torch_engine import TorchEngine  # noqa: E402
from megatron_oapl.rollout.types import SamplingParams  # noqa: E402
from megatron_oapl.weights.sync import stage_rendezvous  # noqa: E402
from megatron_oapl.weights.transport import (  # noqa: E402
    WeightGroup,
    WeightStoreServer,
    WeightSyncError,
    send_weights,
)
from tests.support.tiny_moe import hub_tensors, make_tiny_moe  # noqa: E402

LOGP_ATOL = 1e-4  # fp32 KV-cached, left-padded decoding vs one fp32 full-sequence forward, per token
PROMPTS = [[3, 7, 11], [5, 2], [9, 9, 9, 1, 30]]
SAMPLING = SamplingParams(n=4, temperature=0.8, top_p=1.0, max_new_tokens=8, seed=3)
MISSING = "model.layers.1.mlp.experts.3.up_proj.weight"


def _reference(model_dir: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager", experts_implementation="eager").eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_moe")
    return make_tiny_moe(root / "a", seed=0), make_tiny_moe(root / "b", seed=1)


def _push(engine: TorchEngine, tensors: dict[str, torch.Tensor], version: int) -> None:
    """Send `tensors` (sorted by name, 4 KiB buckets) from a learner thread while `engine` receives them
    through `sync_from` as rank 1 of a one-stage weight group; re-raises the engine's error."""
    server = WeightStoreServer()
    rdvs = stage_rendezvous("127.0.0.1", server.port, epoch=version, num_stages=1, num_receivers=1,
                            backend="gloo", timeout_s=60)
    sent: dict[str, BaseException] = {}

    def learner() -> None:
        try:
            send_weights(WeightGroup(rdvs[0], 0), iter(sorted(tensors.items())), version, bucket_bytes=4096)
        except BaseException as err:  # noqa: BLE001 - reported below
            sent["error"] = err

    thread = threading.Thread(target=learner)
    thread.start()
    try:
        engine.sync_from([r.to_dict() for r in rdvs], 1, version)
    finally:
        thread.join(60)
    assert not thread.is_alive() and "error" not in sent, sent


def _logprobs(model, prompt: list[int], completion: list[int], temperature: float) -> torch.Tensor:
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    rows = logits[len(prompt) - 1: len(prompt) + len(completion) - 1] / temperature
    return rows.log_softmax(-1).gather(-1, torch.tensor(completion).unsqueeze(-1)).squeeze(-1)


def test_push_in_hub_names_switches_the_engine_to_the_pushed_moe(models):
    a, b = models
    engine = TorchEngine(str(a))
    hub = hub_tensors(b)
    assert any(".mlp.experts.3.down_proj.weight" in n for n in hub) and not any("gate_up_proj" in n for n in hub)
    _push(engine, hub, version=1)
    assert engine.version == 1
    # The fused in-memory experts are exactly what transformers itself builds from B's files.
    want = transformers.AutoModelForCausalLM.from_pretrained(b, dtype=torch.float32).state_dict()
    got = engine.model.state_dict()
    assert got.keys() == want.keys() and "model.layers.0.mlp.experts.gate_up_proj" in got
    for name, value in want.items():
        assert torch.equal(got[name], value), name

    groups = engine.generate(PROMPTS, SAMPLING)
    ref_b, ref_a = _reference(b), _reference(a)
    engine_lp, b_lp, a_lp = [], [], []
    for prompt, group in zip(PROMPTS, groups):
        for s in group:
            engine_lp.append(torch.tensor(s.logprobs, dtype=torch.float64))
            b_lp.append(_logprobs(ref_b, prompt, s.token_ids, SAMPLING.temperature))
            a_lp.append(_logprobs(ref_a, prompt, s.token_ids, SAMPLING.temperature))
    engine_lp, b_lp, a_lp = torch.cat(engine_lp), torch.cat(b_lp), torch.cat(a_lp)
    assert engine_lp.numel() == len(PROMPTS) * SAMPLING.n * SAMPLING.max_new_tokens
    torch.testing.assert_close(engine_lp, b_lp, rtol=0, atol=LOGP_ATOL)
    assert (engine_lp - a_lp).abs().max() > 100 * LOGP_ATOL  # A's log-probs are far off: the push mattered


def test_push_missing_one_expert_is_refused_and_the_old_weights_stay(models):
    a, b = models
    engine = TorchEngine(str(a), version=4)
    before = {k: v.clone() for k, v in engine.model.state_dict().items()}
    hub = hub_tensors(b)
    del hub[MISSING]
    with pytest.raises(WeightSyncError, match=MISSING.replace(".", r"\.") + ".*missing"):
        _push(engine, hub, version=5)
    assert engine.version == 4
    for name, value in engine.model.state_dict().items():
        assert torch.equal(value, before[name]), f"{name} changed in a refused push"


@pytest.mark.parametrize("fault", ["expert_out_of_range", "expert_wrong_shape", "fused_and_per_expert"])
def test_load_weights_refuses_a_bad_expert_stream(models, fault):
    a, b = models
    engine = TorchEngine(str(a), version=2)
    before = {k: v.clone() for k, v in engine.model.state_dict().items()}
    hub = hub_tensors(b)
    if fault == "expert_out_of_range":  # the model has experts 0..3
        bad = "model.layers.0.mlp.experts.4.gate_proj.weight"
        hub[bad] = hub["model.layers.0.mlp.experts.0.gate_proj.weight"]
    elif fault == "expert_wrong_shape":
        bad = "model.layers.1.mlp.experts.2.down_proj.weight"
        hub[bad] = hub[bad].t().contiguous()  # [I, H] instead of [H, I]
    else:
        bad = "model.layers.0.mlp.experts"
        hub[f"{bad}.gate_up_proj"] = before[f"{bad}.gate_up_proj"]
    with pytest.raises(ValueError, match=bad.replace(".", r"\.")):
        engine.load_weights(hub.items(), version=3)
    assert engine.version == 2
    assert all(torch.equal(v, before[k]) for k, v in engine.model.state_dict().items())
