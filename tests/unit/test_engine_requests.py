"""What an engine is asked per order (review P1/P2): vLLM requests carry the order's seed only with
fleet.reproducible (vLLM samples seeded rows one by one); the light engine keeps its per-order seeds; the
start-up line compares the engine's KV capacity with fleet.max_in_flight."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_oapl.config import load_config
from megatron_oapl.rollout.engine_worker import request_params, seeds_requests
from megatron_oapl.rollout.types import SamplingParams
from megatron_oapl.rollout.vllm_engine import VLLMEngine, kv_capacity_line

TINY = str(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml")
BASE = SamplingParams(n=4, temperature=1.0, top_p=1.0, max_new_tokens=8, stop_token_ids=(2,))


@pytest.mark.parametrize("engine, reproducible, seeded", [
    ("vllm", False, False), ("vllm", True, True), ("torch", False, True), ("torch", True, True)])
def test_requests_are_seeded_iff_reproducible_for_vllm(engine, reproducible, seeded):
    cfg = load_config(TINY, [f"fleet.engine={engine}", f"fleet.reproducible={str(reproducible).lower()}"],
                      check_hardware=False)
    assert seeds_requests(cfg) is seeded
    assert request_params(BASE, 1234, seeds_requests(cfg)).seed == (1234 if seeded else None)


def test_vllm_sampling_params_carry_the_seed_as_given():
    """The vLLM SamplingParams the engine submits (real vLLM class): seeded only when the order's params are."""
    engine = VLLMEngine.__new__(VLLMEngine)  # no LLM: only the request conversion runs
    engine._has_tokenizer = False
    assert engine._vllm_params(request_params(BASE, 99, seeded=True)).seed == 99
    assert engine._vllm_params(request_params(BASE, 99, seeded=False)).seed is None


def test_kv_capacity_line_says_how_many_full_sequences_fit():
    # Qwen3-4B on an 80 GB H100 at TP 1 (review §6): ~413K tokens, 18K-token sequences
    line = kv_capacity_line(413_000, 18_432, 256)
    assert line.startswith("vLLM KV cache: 413,000 tokens = 22 sequences of max_model_len=18,432 tokens")
    assert "(fleet.max_in_flight=256: fits at a mean of 1,613 tokens per sequence, else vLLM preempts)" in line
    assert kv_capacity_line(413_000, 18_432, 16).endswith("(fleet.max_in_flight=16)")
