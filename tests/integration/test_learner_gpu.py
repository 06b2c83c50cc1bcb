"""GPU-only: the same OAPL step with Transformer Engine layers in FP8 (skipped without a GPU)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from tests.support.distributed import run_ranks
from tests.support.learner_workers import oapl_steps
from tests.support.oapl_case import run_config

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("recipe", ["delayed", "tensorwise"])
def test_fp8_oapl_step_runs_and_stays_close_to_bf16(setup, tmp_path, recipe):
    if importlib.util.find_spec("transformer_engine") is None:
        pytest.skip("transformer-engine is not installed")
    root, _ = setup
    results = {}
    for name, fp8 in (("bf16", {"enabled": False}), ("fp8", {"enabled": True, "recipe": recipe})):
        cfg = run_config()
        # FP8 GEMMs need dimensions that are multiples of 16.
        cfg["precision"] = {"params_dtype": "bf16", "fp8": fp8}
        out = tmp_path / name
        out.mkdir()
        run_ranks(1, oapl_steps, cfg, str(root / "ref.pt"), str(root / "batch.pt"), str(out), 2)
        results[name] = torch.load(out / "rank0.pt")
    assert not any(results["fp8"]["skipped"])
    # FP8 logits differ from bf16 by quantisation noise; sequence log-probs of ~-20 nats stay close.
    torch.testing.assert_close(results["fp8"]["logp_before"], results["bf16"]["logp_before"], rtol=0.05, atol=0.5)
