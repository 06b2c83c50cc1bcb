"""RoPE scaling of HF checkpoints (Llama 3.x `llama3`, and `linear`): HF -> Megatron logits equal
`transformers`' and the export writes the same scaling back.

The tiny models make the scaling visible at short lengths: head_dim 16 and theta 10^4 give wavelengths
6.3, 20, 63, 199, ... tokens, and a pre-training context of 64 with low/high_freq_factor 1/4 puts the
first below 64/4 (kept), the next two between 16 and 64 (ramped) and the rest above 64 (slowed by 8), so
all three llama3 bands act on a 48-token sequence.

One 1-rank gloo world (the same rank-side helpers as test_checkpoint.py): import each HF model into a
TP=1 checkpoint, load it into a policy, take its logits; the same with the scaling switched off (what
this code computed before it read rope scaling), then export every checkpoint back to HF.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from megatron_oapl.checkpoint import convert
from megatron_oapl.config import RopeScalingConfig, to_dict
from tests.support.checkpoint_workers import hf_conversions
from tests.support.distributed import run_ranks
from tests.support.hf_reference import hf_logits

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}
MODELS = {
    "llama3": dict(head_dim=16, rope_scaling=LLAMA3),
    "linear": dict(head_dim=32, rope_scaling={"rope_type": "linear", "factor": 4.0}),  # head_dim != 64 / 4
}
TOKENS = [[(7 * i + 3) % 37 for i in range(48)]]
# fp32 on CPU: Megatron and transformers differ by the order of their reductions (~1e-6 on these logits).
ATOL = 1e-4


def make_model(name: str, out: Path) -> Path:
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=37, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=10000.0,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, **MODELS[name])
    torch.manual_seed(11)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():  # larger than the default init, so position information reaches the logits
        for pname, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in pname else 0.2 * torch.randn_like(p))
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("rope")
    jobs, exports, out = [], [], {}
    for name in MODELS:
        hf = make_model(name, root / f"{name}-hf")
        cfg = convert.import_config(hf, 1, 1)
        assert cfg.model.rope_scaling.type == name
        unscaled = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, rope_scaling=RopeScalingConfig()))
        ckpt = root / f"{name}-ckpt"
        jobs += [{"name": name, "hf": str(hf), "ckpt": str(ckpt), "tokens": TOKENS, "import_cfg": to_dict(cfg),
                  "cfg": to_dict(cfg)},
                 {"name": f"{name}-unscaled", "hf": str(hf), "ckpt": str(ckpt), "tokens": TOKENS,
                  "import_cfg": None, "cfg": to_dict(unscaled)}]
        exports.append({"ckpt": str(ckpt), "out": str(root / f"{name}-back")})
        out[name] = {"hf": hf, "back": root / f"{name}-back"}
    logits_dir = root / "logits"
    logits_dir.mkdir()
    run_ranks(1, hf_conversions, jobs, exports, str(logits_dir))
    for name in MODELS:
        out[name]["megatron"] = torch.load(logits_dir / f"{name}.pt")["logits"]
        out[name]["unscaled"] = torch.load(logits_dir / f"{name}-unscaled.pt")["logits"]
        out[name]["reference"] = hf_logits(out[name]["hf"], TOKENS)
    return out


@pytest.mark.parametrize("name", list(MODELS))
def test_megatron_logits_match_transformers_with_rope_scaling(runs, name):
    run = runs[name]
    diff = (run["megatron"] - run["reference"]).abs().max().item()
    ignored = (run["unscaled"] - run["reference"]).abs().max().item()
    print(f"{name}: max |logit diff| {diff:.2e} with the scaling, {ignored:.3f} without it")
    # The check can fail: ignoring the scaling moves the logits far more than the tolerance.
    assert ignored > 100 * ATOL
    torch.testing.assert_close(run["megatron"], run["reference"], rtol=0, atol=ATOL)


@pytest.mark.parametrize("name", list(MODELS))
def test_export_writes_the_same_rope_scaling_back(runs, name):
    run = runs[name]
    original = json.loads((run["hf"] / "config.json").read_text())
    exported = json.loads((run["back"] / "config.json").read_text())
    for key in ("rope_parameters", "rope_scaling", "rope_theta", "head_dim", "max_position_embeddings"):
        assert exported.get(key) == original.get(key), key
    # The round trip keeps the function, not only the fields.
    torch.testing.assert_close(hf_logits(run["back"], TOKENS), run["reference"], rtol=0, atol=0)
