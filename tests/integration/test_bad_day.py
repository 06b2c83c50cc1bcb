"""An operator's bad day on real processes (gloo ranks, Megatron's checkpoint writer, `oapl train`
pieces): whatever goes wrong ends with one line naming the cause, and nothing the run started stays."""

from __future__ import annotations

import json

from tests.support.bad_day_workers import save_then_fill_the_disk
from tests.support.distributed import run_ranks
from tests.support.oapl_case import run_config
from tests.support.small_disk import small_disk  # noqa: F401 - a fixture


def test_a_checkpoint_that_fills_the_disk_is_one_line_and_leaves_no_helper_process(setup, small_disk, tmp_path):
    """Megatron's writer used to start a Manager process on the first save that outlived a killed rank;
    a full disk during a save used to end in `CheckpointException ranks:dict_keys([])` and a traceback."""
    root, _ = setup
    run_dir = small_disk.root / "run"
    out = tmp_path / "out.json"
    run_ranks(1, save_then_fill_the_disk, run_config(), str(root / "batch.pt"), str(run_dir), small_disk.mounted,
              str(out))
    result = json.loads(out.read_text())
    assert result["children"] == []  # nothing of the save keeps running (before: a multiprocessing Manager)
    assert result["error"] is not None and "\n" not in result["error"], result
    assert result["error"].startswith("saving checkpoint step_2 failed: no space left on device at "), result
    assert str(run_dir / "checkpoints") in result["error"] and "needed" in result["error"], result
    assert result["latest"] == "step_1"  # the complete checkpoint stays the one to resume from
