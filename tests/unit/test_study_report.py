"""The study report's bookkeeping of one cell, from a run directory as `oapl train` leaves it (its config,
TensorBoard read back with TensorBoard's own reader): generations sampled count what the steps consumed,
groups dropped as stale and the all-equal groups a dynamically sampled step looked past."""

from __future__ import annotations

from megatron_oapl import metrics as M
from megatron_oapl.config import load_config, to_yaml
from megatron_oapl.study import Cell
from megatron_oapl.study_report import CellResult, _spread


def test_generations_sampled_count_stale_drops_and_dynamic_sampling_refills(tmp_path):
    run_dir = tmp_path / "cell"
    run_dir.mkdir()
    cfg = load_config(None, ["fleet.prompts_per_step=4", "fleet.group_size=8", "optim.train_steps=3"],
                      check_hardware=False)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    writer = M.MetricsWriter(run_dir / "tensorboard")
    for step, (extra, stale_total) in enumerate([(2, 0), (0, 3), (5, 3)], start=1):
        writer.scalars({M.EXTRA_ORDERS: extra, M.DROPPED_STALE: stale_total}, step)
    writer.close()

    result = CellResult(Cell({}, [], run_dir))
    assert result.generations(0) == 0
    assert result.generations(1) == (1 * 4 + 0 + 2) * 8
    assert result.generations(3) == (3 * 4 + 3 + 2 + 0 + 5) * 8  # stale drops are a running total, refills per step
    assert result.consumed == 3 * 4 * 8


def test_the_seed_spread_is_the_sd_of_the_seeds_not_the_standard_error():
    assert _spread([0.2, 0.4]) == "0.141 [0.200, 0.400]"
    assert _spread([0.3]) == "n/a"
