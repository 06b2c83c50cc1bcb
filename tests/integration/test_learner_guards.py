"""A non-finite loss skips the optimizer step (weights untouched, counted); N in a row stop the run."""

from __future__ import annotations

import torch

from tests.support.distributed import run_ranks
from tests.support.learner_workers import nonfinite_steps
from tests.support.oapl_case import run_config


def test_nonfinite_steps_are_skipped_then_stop_the_run(setup, tmp_path):
    root, _ = setup
    cfg = run_config(tp=2)
    cfg["optim"]["max_consecutive_nonfinite"] = 2
    run_ranks(2, nonfinite_steps, cfg, str(root / "batch.pt"), str(tmp_path))
    result = torch.load(tmp_path / "result.pt")
    # good, bad, good, bad, bad -> the second consecutive bad step raises.
    assert result["skipped"] == [False, True, False, True, True]
    assert result["unchanged"] == [False, True, False, True, True]
    assert result["total"] == 3
    assert "2 optimizer steps in a row" in result["error"]
    assert "optim.max_consecutive_nonfinite=2" in result["error"]
