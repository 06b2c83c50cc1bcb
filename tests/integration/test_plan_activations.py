"""The memory plan's activation model against what Megatron really keeps for backward.

One gloo rank builds the real Megatron-Core GPT model (local spec, CPU, fp32) at the tiny model's shape and
runs one forward + log-probs for a row of 128 and a row of 512 tokens under
`torch.autograd.graph.saved_tensors_hooks`, summing the bytes of every distinct storage autograd saves
(parameters excluded): a direct, deterministic measure of activations. Unfused attention keeps a
row x row softmax per head, so the two budgets differ by more than their token ratio (4x); the plan's
predicted ratio must follow the measured one within 25%, and each figure within 5% (measured: 3,805,824 and
21,907,968 bytes, predicted 3,801,088 and 21,889,024). The GPU formula differs only in the fused kernels'
terms (see megatron_oapl/plan.py), which cannot run here.
"""

from __future__ import annotations

import torch

from megatron_oapl.config import from_dict
from megatron_oapl.plan import ModelDims, activation_bytes
from tests.support.distributed import run_ranks

ROWS = (128, 512)
MODEL = {"preset": "llama", "hf_path": None, "num_layers": 2, "hidden_size": 128, "ffn_hidden_size": 256,
         "num_attention_heads": 4, "vocab_size": 64, "max_seq_length": 512}


def _cfg():
    return from_dict({"model": MODEL, "parallel": {"tensor_model_parallel_size": 1, "backend": "gloo"},
                      "precision": {"params_dtype": "fp32"}})


def _saved_bytes(model, row: int) -> int:
    """Bytes of the distinct non-parameter storages autograd saves in one forward + log-prob pass."""
    from megatron_oapl.learner.logprobs import vocab_parallel_token_logprobs

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    tokens = torch.randint(0, MODEL["vocab_size"], (1, row))
    positions = torch.arange(row).unsqueeze(0)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(tokens, positions, None)
        logp = vocab_parallel_token_logprobs(logits, tokens, 1.0, MODEL["vocab_size"])
    logp.sum().backward()  # the pass is a real training pass: its saved tensors are used
    return sum(storages.values())


def measure(out_path: str) -> None:
    from megatron_oapl.learner.distributed import destroy_distributed, init_distributed
    from megatron_oapl.models.megatron_model import build_gpt_model, build_transformer_config

    cfg = _cfg()
    init_distributed(cfg)
    try:
        model = build_gpt_model(cfg, build_transformer_config(cfg), pre_process=True, post_process=True)
        model.train()
        torch.save({row: _saved_bytes(model, row) for row in ROWS}, out_path)
    finally:
        destroy_distributed()


def _predicted(row: int) -> float:
    """The plan's activations for one row of `row` tokens (Megatron's local spec, as on CPU) plus the fp32
    softmax the log-prob's cross entropy keeps (4 bytes x padded vocabulary per token)."""
    cfg = _cfg()
    dims = ModelDims.of(cfg.model)
    return activation_bytes(cfg, dims, row, row, "none", kernels="local") + 4 * dims.padded_vocab(1) * row


def test_activation_model_follows_the_measured_saved_tensors(tmp_path):
    out = tmp_path / "saved.pt"
    run_ranks(1, measure, str(out))
    measured = torch.load(out)
    short, long = ROWS
    measured_ratio = measured[long] / measured[short]
    predicted_ratio = _predicted(long) / _predicted(short)
    assert measured_ratio > 1.3 * long / short  # the row x row term is really there
    assert abs(predicted_ratio / measured_ratio - 1) < 0.25, (measured, predicted_ratio, measured_ratio)
    for row in ROWS:  # and the absolute figures, which the plan's verdicts rest on
        assert abs(_predicted(row) / measured[row] - 1) < 0.05, (row, _predicted(row), measured[row])
